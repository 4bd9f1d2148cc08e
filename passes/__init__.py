"""Graph transforms, one per module; installed as ``compressor.passes``."""

from compressor.passes.canonicalize_pooling import CanonicalizePooling, CanonicalizePoolingConfig
from compressor.passes.cleanup import Cleanup, CleanupConfig
from compressor.passes.fold_batchnorm import FoldBatchNorm, FoldBatchNormConfig
from compressor.passes.fold_constants import FoldConstants, FoldConstantsConfig
from compressor.passes.infer_shapes import InferShapes, InferShapesConfig
from compressor.passes.negative_dims import NegativeDims, NegativeDimsConfig
from compressor.passes.upgrade_opset import UpgradeOpset, UpgradeOpsetConfig
from compressor.passes.weights_as_inputs import WeightsAsInputs, WeightsAsInputsConfig

__all__ = [
    "CanonicalizePooling",
    "CanonicalizePoolingConfig",
    "Cleanup",
    "CleanupConfig",
    "FoldBatchNorm",
    "FoldBatchNormConfig",
    "FoldConstants",
    "FoldConstantsConfig",
    "InferShapes",
    "InferShapesConfig",
    "NegativeDims",
    "NegativeDimsConfig",
    "UpgradeOpset",
    "UpgradeOpsetConfig",
    "WeightsAsInputs",
    "WeightsAsInputsConfig",
    "import_passes",
]


def import_passes() -> list:
    """The lossless normalisation every model goes through after loading."""
    return [
        WeightsAsInputs(),
        NegativeDims(),
        UpgradeOpset(),
        Cleanup(),
        FoldConstants(),
        FoldBatchNorm(),
        InferShapes(),  # before pooling: without stored shapes (the TorchScript exporter's) no rank is known
        CanonicalizePooling(),
        Cleanup(),
    ]
