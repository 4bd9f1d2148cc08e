"""Lowerings to execution targets, one per module; installed as ``compressor.backends``."""

from collections.abc import Iterable

from compressor.backends.base import Backend
from compressor.backends.integer_reference import IntegerReference
from compressor.backends.onnxruntime_cpu import OnnxruntimeCPU
from compressor.backends.onnxruntime_cuda import OnnxruntimeCUDA
from compressor.errors import UsageError

BACKENDS: dict[str, type[Backend]] = {"cpu": OnnxruntimeCPU, "cuda": OnnxruntimeCUDA}

__all__ = ["BACKENDS", "Backend", "IntegerReference", "OnnxruntimeCPU", "OnnxruntimeCUDA", "get_backend"]


def get_backend(name: str, threads: int = 2, qdq: bool = False, gemm_convs: Iterable[str] | None = None) -> Backend:
    """The backend registered under ``name`` ('cpu' or 'cuda'); ``qdq`` keeps quantized models in QDQ form.

    ``gemm_convs`` (cpu only) pins the convs that run on MLAS's GEMM path instead of profiling them.
    """
    if name not in BACKENDS:
        raise UsageError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}")
    if gemm_convs is None:
        return BACKENDS[name](threads=threads, qdq=qdq)
    if name != "cpu":
        raise UsageError(f"gemm_convs pins the cpu backend's conv kernels; backend {name!r} has none")
    return OnnxruntimeCPU(threads=threads, qdq=qdq, gemm_convs=gemm_convs)
