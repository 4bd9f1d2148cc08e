"""Recipes for the peers we compare against, and for our own API.

Every recipe is a module-level ``fn(model, out_path) -> Path`` run by the harness in a
child process; heavy libraries are imported inside the functions so a recipe's peak
RSS only counts what it uses. A recipe that does not apply raises `NotApplicable`.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from benchmarks.harness import NotApplicable
from benchmarks.svd_baseline import choose_fraction, svd_lowrank
from compressor import ir as cir
from compressor import runtime
from compressor.data import Dataset

if TYPE_CHECKING:
    from benchmarks.zoo import ZooModel

CALIB_BATCH = 1  # samples per calibration call, as ORT's and NNCF's examples feed them
PRUNE_TARGET = 0.6  # fraction of MACs to remove
PRUNE_TOLERANCE = 0.02
LOWRANK_TARGET = 0.2  # factored layers keep this fraction of their params


def _calib(model: ZooModel) -> Dataset:
    return Dataset(model.calib_path, runtime.input_specs(cir.load_model(model.onnx_path)))


def _feeds(model: ZooModel) -> Iterator[dict[str, np.ndarray]]:
    for batch in _calib(model).batches(batch_size=CALIB_BATCH):
        yield batch.feeds


# ---------------------------------------------------------------- onnxruntime


def _ort_reader(model: ZooModel):
    """A `CalibrationDataReader` streaming the calib npz, one sample per call."""
    from onnxruntime.quantization import CalibrationDataReader

    class NpzReader(CalibrationDataReader):
        def __init__(self) -> None:
            self.rewind()

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

        def rewind(self) -> None:
            self._it = _feeds(model)

    return NpzReader()


def _ort_quantize(model: ZooModel, out_path: Path, *, preprocess: bool, **options) -> Path:
    from onnxruntime.quantization import quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    source = model.onnx_path
    if preprocess:
        source = out_path.with_name("preprocessed.onnx")
        with contextlib.chdir(out_path.parent):  # its shape inference leaves temporary files in the working folder
            quant_pre_process(str(model.onnx_path), str(source))
    quantize_static(str(source), str(out_path), _ort_reader(model), **options)
    return out_path


def _ort_best_flags(**extra):
    from onnxruntime.quantization import QuantType

    return {
        "activation_type": QuantType.QUInt8,
        "weight_type": QuantType.QInt8,
        "per_channel": True,
        "reduce_range": True,
        **extra,
    }


def ort_defaults(model: ZooModel, out_path: Path) -> Path:
    """`quantize_static` as users call it: QDQ, s8 activations and weights, per-tensor, MinMax."""
    return _ort_quantize(model, out_path, preprocess=False)


def ort_defaults_preprocessed(model: ZooModel, out_path: Path) -> Path:
    """The defaults after `quant_pre_process`."""
    return _ort_quantize(model, out_path, preprocess=True)


def ort_best(model: ZooModel, out_path: Path) -> Path:
    """ORT's hand-found fast flags: u8 activations, s8 per-channel 7-bit weights, pre-processed."""
    return _ort_quantize(model, out_path, preprocess=True, **_ort_best_flags())


def ort_entropy(model: ZooModel, out_path: Path) -> Path:
    """The best flags with entropy (KL) calibration."""
    from onnxruntime.quantization import CalibrationMethod

    flags = _ort_best_flags(calibrate_method=CalibrationMethod.Entropy)
    return _ort_quantize(model, out_path, preprocess=True, **flags)


def ort_percentile(model: ZooModel, out_path: Path) -> Path:
    """The best flags with percentile (99.999%) calibration."""
    from onnxruntime.quantization import CalibrationMethod

    flags = _ort_best_flags(calibrate_method=CalibrationMethod.Percentile)
    return _ort_quantize(model, out_path, preprocess=True, **flags)


# ---------------------------------------------------------------- NNCF


class _Replayable:
    """An iterable NNCF can walk more than once; each walk streams the npz again."""

    def __init__(self, model: ZooModel) -> None:
        self.model = model

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return _feeds(self.model)

    def __len__(self) -> int:
        return math.ceil(_calib(self.model).num_samples / CALIB_BATCH)


def nncf_default(model: ZooModel, out_path: Path) -> Path:
    """`nncf.quantize` on the ONNX model, default preset, every calibration sample."""
    import nncf

    data = _Replayable(model)
    quantized = nncf.quantize(onnx.load(str(model.onnx_path)), nncf.Dataset(data), subset_size=len(data))
    onnx.save(quantized, str(out_path))
    return out_path


# ---------------------------------------------------------------- Torch-Pruning


def _torch_model(model: ZooModel):
    import torch

    from benchmarks.zoo import build_torch

    if model.torch_state is None:
        raise NotApplicable("needs a torch model; this zoo entry has no torch state")
    net = build_torch(model.name)
    net.load_state_dict(torch.load(model.torch_state, weights_only=True))
    return net.eval()


def _onnx_io(model: ZooModel) -> tuple[str, str, tuple[int, ...]]:
    proto = onnx.load(str(model.onnx_path), load_external_data=False)
    graph_input, output = proto.graph.input[0], proto.graph.output[0]
    dims = tuple(d.dim_value or 1 for d in graph_input.type.tensor_type.shape.dim)
    return graph_input.name, output.name, dims[1:]


def prune_torch(model: ZooModel, out_path: Path, *, target: float, global_pruning: bool, finetune: bool) -> Path:
    """L1-magnitude channel pruning to ``target`` MACs removed, exported with the dynamo exporter."""
    import torch
    import torch_pruning as tp

    net = _torch_model(model)
    input_name, output_name, sample_shape = _onnx_io(model)
    example = torch.zeros(1, *sample_shape)
    base_macs, _ = tp.utils.count_ops_and_params(net, example)
    classifier = [m for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))][-1]

    def pruned(ratio: float) -> tuple[torch.nn.Module, float]:
        candidate = copy.deepcopy(net)
        last = dict(net.named_modules())
        name = next(n for n, m in last.items() if m is classifier)
        pruner = tp.pruner.MetaPruner(
            candidate, example, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=ratio,
            global_pruning=global_pruning, max_pruning_ratio=0.9, ignored_layers=[candidate.get_submodule(name)],
        )  # fmt: skip
        pruner.step()
        macs, _ = tp.utils.count_ops_and_params(candidate, example)
        return candidate, 1.0 - macs / base_macs

    low, high, best = 0.0, 0.95, None
    for _ in range(14):
        ratio = (low + high) / 2
        candidate, removed = pruned(ratio)
        if best is None or abs(removed - target) < abs(best[1] - target):
            best = (candidate, removed)
        if abs(removed - target) <= PRUNE_TOLERANCE:
            break
        low, high = (ratio, high) if removed < target else (low, ratio)
    net, _ = best
    if finetune:
        _finetune(model, net)
    _export(net.eval(), out_path, input_name, output_name, sample_shape)
    return out_path


def _finetune(model: ZooModel, net) -> None:
    if not model.true_labels or _onnx_io(model)[2] != (1, 28, 28):
        raise NotApplicable("fine-tuning is only wired for the Fashion-MNIST models")
    from benchmarks.zoo import train

    train(net, 1, 0, lr=1e-3)


def _export(net, out_path: Path, input_name: str, output_name: str, sample_shape: tuple[int, ...]) -> None:
    import torch

    program = torch.onnx.export(
        net, (torch.zeros(2, *sample_shape),), dynamo=True, opset_version=18,
        dynamic_shapes=({0: torch.export.Dim("batch")},), input_names=[input_name], output_names=[output_name],
    )  # fmt: skip
    onnx.save(program.model_proto, str(out_path))


def tp_uniform(model: ZooModel, out_path: Path) -> Path:
    """Torch-Pruning, L1 magnitude, the same ratio in every layer, ~60% MACs removed, no fine-tune."""
    return prune_torch(model, out_path, target=PRUNE_TARGET, global_pruning=False, finetune=False)


def tp_global(model: ZooModel, out_path: Path) -> Path:
    """Torch-Pruning, L1 magnitude ranked globally (≤ 90% per layer), ~60% MACs removed, no fine-tune."""
    return prune_torch(model, out_path, target=PRUNE_TARGET, global_pruning=True, finetune=False)


def tp_uniform_finetuned(model: ZooModel, out_path: Path) -> Path:
    """`tp_uniform` then one epoch of fine-tuning on Fashion-MNIST train."""
    return prune_torch(model, out_path, target=PRUNE_TARGET, global_pruning=False, finetune=True)


# ---------------------------------------------------------------- truncated-SVD low rank


def _lowrank(model: ZooModel, out_path: Path, *, conv: bool) -> Path:
    proto = onnx.load(str(model.onnx_path))
    fraction = choose_fraction(proto, LOWRANK_TARGET, conv=conv)
    factored, stats = svd_lowrank(proto, fraction, conv=conv)
    if stats.layers == 0:
        raise NotApplicable("no layer where a rank-r factorisation is smaller")
    onnx.save(factored, str(out_path))
    return out_path


def svd_gemm(model: ZooModel, out_path: Path) -> Path:
    """Truncated SVD of every constant Gemm/MatMul weight, ~20% of their params kept, no fine-tune."""
    return _lowrank(model, out_path, conv=False)


def svd_gemm_conv(model: ZooModel, out_path: Path) -> Path:
    """Truncated SVD of Gemm/MatMul and group-1 Conv weights (k×k→r, 1×1→out), ~20% params kept."""
    return _lowrank(model, out_path, conv=True)


# ---------------------------------------------------------------- ours


def _ours(model: ZooModel, out_path: Path, target: str, **options: object) -> Path:
    from compressor import compress
    from compressor.errors import UsageError

    try:
        # The model only, as the peers produce it: the harness measures every row's accuracy and speed itself.
        measured = {"measure_latency": False, "measure_fidelity": False}
        result = compress(model.onnx_path, target=target, calib=model.calib_path, **measured, **options)
    except UsageError as exc:
        if "not implemented" in str(exc):
            raise NotApplicable(str(exc)) from None
        raise
    result.save(out_path)
    return out_path


def ours_fp32(model: ZooModel, out_path: Path) -> Path:
    """`compressor.compress(target="fp32")`: import, clean-up passes, lowering."""
    return _ours(model, out_path, "fp32")


def ours_int8(model: ZooModel, out_path: Path) -> Path:
    """`compressor.compress(target="int8")`; not applicable while the API refuses it."""
    return _ours(model, out_path, "int8")


def ours_int8_adaround(model: ZooModel, out_path: Path) -> Path:
    """int8 with learned weight rounding (``--rounding adaround``), the other defaults as they are."""
    return _ours(model, out_path, "int8", int8={"rounding": "adaround"})


def ours_int8_unsearched(model: ZooModel, out_path: Path) -> Path:
    """int8 without the mixed-precision search or the latency guard (``--min-sqnr 0 --keep-slow-int8``).

    The quantizer alone, for its compile time beside ``quantize_static``'s and for what the two steps buy.
    """
    return _ours(model, out_path, "int8", latency_guard=False, int8={"min_sqnr_db": None})
