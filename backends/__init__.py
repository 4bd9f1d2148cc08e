"""Lowerings to execution targets, one per module; installed as ``compressor.backends``."""

from compressor.backends.base import Backend
from compressor.backends.onnxruntime_cpu import OnnxruntimeCPU
from compressor.backends.onnxruntime_cuda import OnnxruntimeCUDA

BACKENDS: dict[str, type[Backend]] = {"cpu": OnnxruntimeCPU, "cuda": OnnxruntimeCUDA}

__all__ = ["BACKENDS", "Backend", "OnnxruntimeCPU", "OnnxruntimeCUDA", "get_backend"]


def get_backend(name: str, threads: int = 2, qdq: bool = False) -> Backend:
    """The backend registered under ``name`` ('cpu' or 'cuda'); ``qdq`` keeps quantized models in QDQ form."""
    from compressor.errors import UsageError

    if name not in BACKENDS:
        raise UsageError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}")
    return BACKENDS[name](threads=threads, qdq=qdq)
