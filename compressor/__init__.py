"""compressor: a compression and quantization compiler for ONNX models.

>>> import compressor
>>> result = compressor.compress("model.onnx", target="fp32", eval="test.npz")
>>> print(result.report.table())
>>> result.save("model.fp32.onnx")
"""

from compressor.api import Result, compress
from compressor.errors import CompressorError
from compressor.pipeline import LOSSLESS, Pass, PassContext, Pipeline, Tolerance
from compressor.recipe import Recipe

__all__ = [
    "LOSSLESS",
    "CompressorError",
    "Pass",
    "PassContext",
    "Pipeline",
    "Recipe",
    "Result",
    "Tolerance",
    "compress",
]
__version__ = "0.1.0"
