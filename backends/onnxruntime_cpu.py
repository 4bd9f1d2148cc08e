"""onnxruntime on the CPU (MLAS kernels).

fp32 models are handed over with only the deployment trim (`compact`);
onnxruntime's own graph optimisations do the rest. Quantized (QDQ) models are
lowered to fused integer operators (QLinearConv with the activation folded into
its output range, QLinearAdd, QLinearGlobalAveragePool, QLinearConcat, QGemm,
integer MaxPool/Reshape/Split), the form that runs fastest here: stride-2 stems on few
channels are folded by space-to-depth first, single-channel stems run as
depthwise convs, and on CPUs with AMX each conv takes whichever of MLAS's two
int8 paths profiles faster. Scales and biases are stored in the narrowest type
that holds them exactly (onnxruntime widens them at load). ``qdq=True`` keeps the
portable QDQ form instead.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import MappingProxyType

import numpy as np
import onnx
import onnx_ir as ir

from compressor import ir as cir
from compressor import runtime
from compressor.backends.base import Backend, to_proto
from compressor.backends.compact import compact
from compressor.backends.conv_kernels import OFFSET_ZERO_NAME, ConvKernelChooser
from compressor.backends.depthwise_stem import depthwise_stems
from compressor.backends.narrow_storage import narrow_storage
from compressor.backends.qlinear import lower_to_qlinear
from compressor.backends.space_to_depth import space_to_depth_stems
from compressor.errors import DataError


class OnnxruntimeCPU(Backend):
    """CPUExecutionProvider with a fixed thread count (default 2).

    Fast paths on x86: u8 activations with s8 weights. Without VNNI, MLAS
    multiplies u8 by s8 with ``vpmaddubsw``, whose 16-bit pair sums saturate
    unless weights keep to 7 bits; with VNNI (``vpdpbusd`` sums into 32 bits)
    full 8-bit weights are exact and, measured on ResNet-18 at 224, just as fast.
    """

    name = "cpu"
    providers = ("CPUExecutionProvider",)

    def __init__(
        self, threads: int = runtime.DEFAULT_THREADS, qdq: bool = False, gemm_convs: Iterable[str] | None = None
    ) -> None:
        """``gemm_convs`` pins the convs that take the GEMM path (no profiling); by default AMX CPUs profile."""
        super().__init__(threads, qdq)
        wanted = gemm_convs is not None or cpu_has_amx()
        self.conv_kernels = ConvKernelChooser(threads, gemm_convs) if wanted else None

    @property
    def int8_preferences(self) -> Mapping[str, object]:
        bits = 8 if cpu_has_vnni() else 7
        storage = not self.qdq  # only the fused lowering dequantizes stored weights at load
        return MappingProxyType(
            {"activations": "asymmetric_uint8", "weights": "symmetric", "weight_bits": bits, "int8_storage": storage}
        )

    @property
    def times_int8_islands(self) -> bool:
        return not self.qdq  # the fused integer graph is the one whose speed varies by model

    @property
    def dequantizes_weights_at_load(self) -> bool:
        return not self.qdq  # `float_fallback.run_in_float`

    def timed_choices(self) -> Mapping[str, object]:
        if self.qdq:
            return {}
        return {"gemm_convs": tuple(self.rewrites.get("conv_on_gemm_path", ()))}  # `ConvKernelChooser`

    def executable(self, model: ir.Model) -> ir.Model | onnx.ModelProto:
        # The float and QDQ lowerings only serialize and trim: the model runs as it is, and the
        # rewrites recorded for the int8 model the caller lowered last stay that model's.
        return model if self._keeps_form(model) else self.lower(model)

    def lower(self, model: ir.Model) -> onnx.ModelProto:
        self.rewrites = {}
        if not self.qdq and _is_int16_only(model):
            return compact(to_proto(model))  # INT16 DFP runs as its QDQ form, trimmed
        if self._keeps_form(model):
            return to_proto(model)
        working = model.clone()  # shares the tensors: the rewrites replace initializers, never write into them
        stems = space_to_depth_stems(working.graph)
        self.rejected = lower_to_qlinear(working)
        depthwise = depthwise_stems(working.graph)
        lowered = cir.to_proto(working)
        if self.conv_kernels is not None:
            lowered = self.conv_kernels(lowered, _profile_feeds(working))
        gemm = [n.name for n in lowered.graph.node if n.op_type == "QLinearConv" and n.input[5] == OFFSET_ZERO_NAME]
        compacted = compact(lowered)
        narrowed = narrow_storage(compacted)
        self.rewrites = {"space_to_depth_stem": stems, "depthwise_stem": depthwise, "conv_on_gemm_path": gemm,
                         "narrow_storage": narrowed}  # fmt: skip
        return compacted

    def _keeps_form(self, model: ir.Model) -> bool:
        return self.qdq or _is_int16_only(model) or not any(n.op_type == "DequantizeLinear" for n in model.graph)


def _is_int16_only(model: ir.Model) -> bool:
    """Whether ``model`` is INT16 DFP with no int8 in it: onnxruntime has no int16 integer kernels to fuse into."""
    dequantized = {n.inputs[0].dtype for n in model.graph if n.op_type == "DequantizeLinear"}
    return ir.DataType.INT16 in dequantized and not dequantized & {ir.DataType.INT8, ir.DataType.UINT8}


def _profile_feeds(model: ir.Model) -> dict[str, np.ndarray] | None:
    """Random batch-1 inputs, or None when a dimension beyond the batch is symbolic."""
    try:
        return runtime.random_feeds(runtime.input_specs(model), batch=1, seed=0)
    except DataError:
        return None


def cpu_has_vnni() -> bool:
    """Whether this x86 CPU has AVX512-VNNI, AVX-VNNI or AMX-INT8 (Linux; elsewhere assume not)."""
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & _cpu_flags())


def cpu_has_amx() -> bool:
    """Whether this x86 CPU has AMX-INT8 tiles (Linux; elsewhere assume not)."""
    return "amx_int8" in _cpu_flags()


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    flags = next((line.split(":", 1)[1] for line in text.splitlines() if line.startswith("flags")), "")
    return frozenset(flags.split())
