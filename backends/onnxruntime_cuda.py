"""onnxruntime on an NVIDIA GPU (CUDAExecutionProvider, TensorRT first where present).

Quantized models stay in QDQ form. TensorRT fuses it into int8 kernels; the CUDA
provider alone has no int8 convolutions and runs each DequantizeLinear, then the
float op: measured on an H100, ResNet-18 at 224 ran at 0.56x and EfficientNet-Lite0
at 0.50x of fp32 speed (benchmarks/results/gpu.md). So `compress` times int8 islands here as on the CPU and
keeps float wherever int8 is slower (``--keep-slow-int8`` keeps the QDQ model,
4x smaller, for TensorRT).

Needs the ``onnxruntime-gpu`` build (``pip install 'compressor[gpu]'``) and a
visible GPU; otherwise construction fails with a clear error.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
import onnxruntime as ort

from compressor.backends.base import Backend, to_proto
from compressor.errors import BackendUnavailableError


class OnnxruntimeCUDA(Backend):
    """CUDAExecutionProvider, with CPU fallback for ops CUDA lacks."""

    name = "cuda"

    @property
    def providers(self) -> tuple[str, ...]:  # type: ignore[override]
        available = ort.get_available_providers()
        preferred = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
        return tuple(p for p in preferred if p in available and (p != "TensorrtExecutionProvider" or self.tensorrt))

    def __init__(self, threads: int = 2, qdq: bool = True, tensorrt: bool = False) -> None:
        self.tensorrt = tensorrt
        super().__init__(threads, qdq=True)  # QDQ is what CUDA and TensorRT fuse

    @property
    def times_int8_islands(self) -> bool:
        return True

    def check_available(self) -> None:
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BackendUnavailableError(
                "the cuda backend needs onnxruntime-gpu with CUDAExecutionProvider, which is not available here "
                f"(providers: {', '.join(ort.get_available_providers())}); "
                "install 'compressor[gpu]' on a GPU machine or use --backend cpu"
            )

    def lower(self, model: ir.Model) -> onnx.ModelProto:
        return to_proto(model)
