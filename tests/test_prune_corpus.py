"""Pruning on ONNX files others exported (`benchmarks.thirdparty`): never a wrong graph.

Every corpus model either prunes, and then the pruned graph passes the full checker and computes what
the original computes with the removed channels' readers zeroed, or is refused with the reason. Ops
the analysis does not follow (Shape arithmetic, LSTM, ConvTranspose...) block only what they touch.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
import pytest

from benchmarks.thirdparty import CORPUS, CorpusModel, feeds, relative_error
from compressor import runtime
from compressor.errors import ModelError
from compressor.passes import import_passes
from compressor.passes.prune_channels import PruneChannels
from compressor.pipeline import PassContext, Pipeline
from compressor.pruning.channels import analyze
from compressor.pruning.config import PruneConfig
from compressor.pruning.surgery import zero_consumers

NOTHING_PRUNABLE = {"magika_v3_3", "silero_vad", "silero_vad_ifless"}


@pytest.mark.parametrize("model", CORPUS, ids=[m.name for m in CORPUS])
def test_corpus_model_prunes_exactly_or_says_why_not(model: CorpusModel) -> None:
    if not model.path.is_file():
        pytest.fail(f"{model.path} is not cached; run `make corpus` (python -m benchmarks.thirdparty fetch)")
    context = PassContext(input_shapes=dict(model.shapes))
    pruned = ir.from_proto(onnx.load(model.path))
    Pipeline(import_passes()).run(pruned, context, [])
    twin = ir.from_proto(ir.to_proto(pruned))
    prune = PruneChannels(PruneConfig(fraction=0.3))
    if model.name in NOTHING_PRUNABLE:
        with pytest.raises(ModelError, match="nothing in this model can be pruned: "):
            Pipeline([prune]).run(pruned, context, [])
        return
    Pipeline([prune]).run(pruned, context, [])
    assert 0.3 <= prune.choice.fraction_removed <= 0.4
    onnx.checker.check_model(ir.to_proto(pruned), full_check=True)
    zero_consumers(twin.graph, analyze(twin.graph), prune.choice.removed)
    inputs = feeds(model)
    expected, actual = runtime.make_session(twin).run(None, inputs), runtime.make_session(pruned).run(None, inputs)
    for want, got in zip(expected, actual, strict=True):
        assert want.shape == got.shape
        assert relative_error(want, got) <= 1e-5
