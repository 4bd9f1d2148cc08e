"""Channel-dependency analysis and channel surgery on hand-built graphs, one coupling kind per test.

Every removal is checked three ways: the pruned graph passes onnx's full check; onnxruntime gives
the same outputs as the original graph with the removed channels' consumer weights zeroed (within
1e-5); and the outputs do differ from the untouched original, so the check could fail.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import assert_close, float_model, random_input, run_onnx
from onnx import helper

from compressor.passes import import_passes
from compressor.pipeline import PassContext, Pipeline
from compressor.pruning.channels import ChannelGraph, analyze
from compressor.pruning.surgery import remove_channels, zero_consumers

RNG = np.random.default_rng(0)


def weight(name: str, *shape: int) -> onnx.TensorProto:
    return onnx.numpy_helper.from_array(RNG.uniform(-0.5, 0.5, shape).astype(np.float32), name)


def conv(name: str, x: str, w: str, out: str, **attrs: object) -> onnx.NodeProto:
    return helper.make_node("Conv", [x, w, f"{w}_b"], [out], name=name, pads=[1, 1, 1, 1], **attrs)


def conv_weights(name: str, c_out: int, c_in: int, k: int = 3) -> list[onnx.TensorProto]:
    return [weight(name, c_out, c_in, k, k), weight(f"{name}_b", c_out)]


def imported(proto: onnx.ModelProto) -> ir.Model:
    model = ir.from_proto(proto)
    Pipeline(import_passes()).run(model, PassContext(), [])
    return model


def removal_is_exact(proto: onnx.ModelProto, removed_classes: list[int] | None = None, x_shape=(2, 3, 8, 8)):
    """Remove ``removed_classes`` (default: half the prunable ones) and check it three ways; return the analysis."""
    model = imported(proto)
    analysis = analyze(model.graph)
    removed = np.zeros(len(analysis.classes), dtype=bool)
    chosen = removed_classes if removed_classes is not None else analysis.prunable[::2]
    removed[chosen] = True
    twin = imported(proto)
    zero_consumers(twin.graph, analyze(twin.graph), removed)
    remove_channels(model.graph, analysis, removed)
    pruned = ir.to_proto(model)
    onnx.checker.check_model(pruned, full_check=True)
    feeds = {"input": random_input(x_shape, seed=3)}
    expected, got, original = run_onnx(twin, feeds), run_onnx(pruned, feeds), run_onnx(proto, feeds)
    assert_close(expected, got, rtol=1e-5)
    assert np.abs(original[0] - got[0]).max() > 1e-3, "removal changed nothing: the check would not fail"
    return analysis


def classes_with(analysis: ChannelGraph, *layers: str) -> list[int]:
    """The classes whose units come exactly from ``layers``."""
    return [
        index
        for index, members in enumerate(analysis.classes)
        if {analysis.sources[u].node.name for u in members} == set(layers)
    ]


def test_chain_and_model_output() -> None:
    nodes = [conv("a", "input", "wa", "ya"), helper.make_node("Relu", ["ya"], ["ra"]), conv("b", "ra", "wb", "output")]
    proto = float_model(
        "chain", nodes, conv_weights("wa", 8, 3) + conv_weights("wb", 4, 8), ([2, 3, 8, 8], [2, 4, 8, 8])
    )
    analysis = removal_is_exact(proto)
    assert len(classes_with(analysis, "a")) == 8 and len(analysis.prunable) == 8
    assert all("model output" in why for why in analysis.blocked.values()) and len(analysis.blocked) == 4


def test_residual_add_couples_both_layers() -> None:
    nodes = [
        conv("a", "input", "wa", "ya"),
        conv("b", "ya", "wb", "yb"),
        helper.make_node("Add", ["ya", "yb"], ["s"]),
        conv("c", "s", "wc", "output"),
    ]
    inits = conv_weights("wa", 8, 3) + conv_weights("wb", 8, 8) + conv_weights("wc", 4, 8)
    analysis = removal_is_exact(float_model("residual", nodes, inits, ([2, 3, 8, 8], [2, 4, 8, 8])))
    coupled = classes_with(analysis, "a", "b")
    assert len(coupled) == 8 and all(len(analysis.classes[c]) == 2 for c in coupled)


def test_add_with_a_graph_input_is_blocked() -> None:
    nodes = [
        conv("a", "input", "wa", "ya"),
        helper.make_node("Add", ["ya", "input"], ["s"]),
        conv("c", "s", "wc", "output"),
    ]
    proto = float_model(
        "input_add", nodes, conv_weights("wa", 3, 3) + conv_weights("wc", 4, 3), ([2, 3, 8, 8], [2, 4, 8, 8])
    )
    analysis = analyze(imported(proto).graph)
    assert classes_with(analysis, "a") and all(c in analysis.blocked for c in classes_with(analysis, "a"))


def test_concat_offsets_and_split_sizes() -> None:
    nodes = [
        conv("a", "input", "wa", "ya"),
        conv("b", "input", "wb", "yb"),
        helper.make_node("Concat", ["ya", "yb"], ["cat"], axis=1),
        helper.make_node("Split", ["cat"], ["s0", "s1"], axis=1, num_outputs=2),
        conv("c", "s0", "wc", "yc"),
        conv("d", "s1", "wd", "yd"),
        helper.make_node("Add", ["yc", "yd"], ["output"]),
    ]
    inits = conv_weights("wa", 8, 3) + conv_weights("wb", 16, 3) + conv_weights("wc", 4, 12) + conv_weights("wd", 4, 12)
    proto = float_model("concat_split", nodes, inits, ([2, 3, 8, 8], [2, 4, 8, 8]), opset=18)
    analysis = analyze(imported(proto).graph)
    a, b = classes_with(analysis, "a"), classes_with(analysis, "b")
    assert len(a) == 8 and len(b) == 16
    removal_is_exact(proto, [a[0], a[5], b[0], b[15]])  # uneven: the split must get explicit sizes
    removal_is_exact(proto, [b[2], b[3]])


def test_depthwise_conv_follows_its_input() -> None:
    nodes = [
        conv("a", "input", "wa", "ya"),
        conv("dw", "ya", "wdw", "ydw", group=8),
        conv("c", "ydw", "wc", "output"),
    ]
    inits = conv_weights("wa", 8, 3) + conv_weights("wdw", 8, 1) + conv_weights("wc", 4, 8)
    analysis = removal_is_exact(float_model("depthwise", nodes, inits, ([2, 3, 8, 8], [2, 4, 8, 8])))
    assert len(classes_with(analysis, "a")) == 8


def test_batchnorm_and_per_channel_constants_are_sliced() -> None:
    bn = [onnx.numpy_helper.from_array(v.astype(np.float32), n) for n, v in
          (("g", RNG.uniform(0.5, 1.5, 8)), ("be", RNG.uniform(-1, 1, 8)), ("mu", RNG.uniform(-1, 1, 8)),
           ("var", RNG.uniform(0.5, 2, 8)))]  # fmt: skip
    scale = onnx.numpy_helper.from_array(RNG.uniform(0.5, 2, (8, 1, 1)).astype(np.float32), "scale")
    nodes = [
        conv("a", "input", "wa", "ya"),
        helper.make_node("Relu", ["ya"], ["r"]),  # BN after a Relu: not folded
        helper.make_node("BatchNormalization", ["r", "g", "be", "mu", "var"], ["n"]),
        helper.make_node("Mul", ["n", "scale"], ["m"]),
        helper.make_node("Add", ["m", "one"], ["p"]),  # a scalar: broadcast, nothing to slice
        conv("c", "p", "wc", "output"),
    ]
    one = onnx.numpy_helper.from_array(np.array(1.0, np.float32), "one")
    inits = conv_weights("wa", 8, 3) + conv_weights("wc", 4, 8) + [*bn, scale, one]
    analysis = removal_is_exact(float_model("bn", nodes, inits, ([2, 3, 8, 8], [2, 4, 8, 8])))
    assert len(classes_with(analysis, "a")) == 8


def test_channel_shuffle_keeps_groups_equal() -> None:
    shape1 = onnx.numpy_helper.from_array(np.array([-1, 2, 8, 8, 8], np.int64), "shape1")
    shape2 = onnx.numpy_helper.from_array(np.array([-1, 16, 8, 8], np.int64), "shape2")
    nodes = [
        conv("a", "input", "wa", "ya"),
        conv("b", "input", "wb", "yb"),
        helper.make_node("Concat", ["ya", "yb"], ["cat"], axis=1),
        helper.make_node("Reshape", ["cat", "shape1"], ["v"]),
        helper.make_node("Transpose", ["v"], ["t"], perm=[0, 2, 1, 3, 4]),
        helper.make_node("Reshape", ["t", "shape2"], ["shuffled"]),
        conv("c", "shuffled", "wc", "output"),
    ]
    inits = conv_weights("wa", 8, 3) + conv_weights("wb", 8, 3) + conv_weights("wc", 4, 16) + [shape1, shape2]
    proto = float_model("shuffle", nodes, inits, (["N", 3, 8, 8], ["N", 4, 8, 8]))
    analysis = analyze(imported(proto).graph)
    coupled = classes_with(analysis, "a", "b")
    assert len(coupled) == 8, "channel i of each half stays together so that both groups keep the same count"
    removal_is_exact(proto, coupled[1:4])


def test_flatten_then_gemm_removes_spatial_blocks() -> None:
    nodes = [
        conv("a", "input", "wa", "ya"),
        helper.make_node("Flatten", ["ya"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "wg", "bg"], ["output"], transB=1),
    ]
    inits = [*conv_weights("wa", 8, 3), weight("wg", 5, 8 * 8 * 8), weight("bg", 5)]
    analysis = removal_is_exact(float_model("flatten", nodes, inits, ([2, 3, 8, 8], [2, 5])))
    assert len(classes_with(analysis, "a")) == 8


def test_gemm_chain_prunes_hidden_units() -> None:
    nodes = [
        helper.make_node("Flatten", ["input"], ["f"]),
        helper.make_node("Gemm", ["f", "w1", "b1"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["output"]),
    ]
    inits = [weight("w1", 16, 3 * 8 * 8), weight("b1", 16), weight("w2", 16, 5)]
    analysis = removal_is_exact(float_model("mlp", nodes, inits, ([2, 3, 8, 8], [2, 5])))
    assert len(classes_with(analysis, "fc1")) == 16


def test_an_unknown_op_blocks_what_it_touches_and_says_why() -> None:
    nodes = [
        conv("a", "input", "wa", "ya"),
        helper.make_node("LRN", ["ya"], ["l"], size=3),  # mixes neighbouring channels
        conv("b", "l", "wb", "yb"),
        helper.make_node("Relu", ["yb"], ["rb"]),
        conv("c", "rb", "wc", "output"),
    ]
    inits = conv_weights("wa", 8, 3) + conv_weights("wb", 8, 8) + conv_weights("wc", 4, 8)
    proto = float_model("lrn", nodes, inits, ([2, 3, 8, 8], [2, 4, 8, 8]))
    analysis = removal_is_exact(proto)
    blocked_a = {analysis.blocked.get(c) for c in classes_with(analysis, "a")}
    assert len(blocked_a) == 1 and "LRN" in blocked_a.pop()
    assert all(c not in analysis.blocked for c in classes_with(analysis, "b"))


def test_removing_nothing_and_blocked_classes() -> None:
    nodes = [conv("a", "input", "wa", "ya"), conv("b", "ya", "wb", "output")]
    model = imported(float_model("two", nodes, conv_weights("wa", 8, 3) + conv_weights("wb", 4, 8),
                                 ([2, 3, 8, 8], [2, 4, 8, 8])))  # fmt: skip
    analysis = analyze(model.graph)
    before = ir.to_proto(model).SerializeToString()
    assert remove_channels(model.graph, analysis, np.zeros(len(analysis.classes), dtype=bool)) == 0
    assert ir.to_proto(model).SerializeToString() == before
    removed = np.zeros(len(analysis.classes), dtype=bool)
    removed[next(iter(analysis.blocked))] = True
    with pytest.raises(ValueError, match="blocked"):
        remove_channels(model.graph, analysis, removed)


def test_a_tensor_read_inside_a_subgraph_is_blocked() -> None:
    """An If body reads conv a's output from the outer scope: a's channels must stay."""
    branch = [
        helper.make_graph(
            [helper.make_node("Relu" if which else "Sigmoid", ["ya"], [f"out_{which}"])],
            f"branch_{which}",
            [],
            [helper.make_tensor_value_info(f"out_{which}", onnx.TensorProto.FLOAT, None)],
        )
        for which in (0, 1)
    ]
    flag = onnx.numpy_helper.from_array(np.array(True), "flag")
    nodes = [
        conv("a", "input", "wa", "ya"),
        helper.make_node("If", ["flag"], ["picked"], then_branch=branch[1], else_branch=branch[0]),
        conv("b", "picked", "wb", "output"),
    ]
    inits = [*conv_weights("wa", 8, 3), *conv_weights("wb", 4, 8), flag]
    model = ir.from_proto(float_model("if", nodes, inits, ([2, 3, 8, 8], [2, 4, 8, 8])))
    analysis = analyze(model.graph)
    reasons = {analysis.blocked.get(c) for c in classes_with(analysis, "a")}
    assert len(reasons) == 1 and "subgraph reads 'ya'" in reasons.pop()
