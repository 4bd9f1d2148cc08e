"""INT16 dynamic fixed point, end to end: accuracy, fidelity, size, speed and the int32 accumulators.

    .venv/bin/python -m benchmarks.int16                         # demo and the cached Fashion-MNIST zoo
    .venv/bin/python -m benchmarks.int16 --models demo resnet --samples 64

For each model it compiles the fp32 original to our int8 (fused QLinear ops) and our int16 (int16 QDQ with
power-of-two scales, opset 21), once each, calibrated on the model's ``calib.npz``, and measures:

- top-1 on the whole eval set for fp32, int8 and int16 on onnxruntime, and int16 through the integer
  reference (`IntegerReference`, integer arithmetic only) on the first ``--samples`` eval samples;
- logits SQNR against fp32; size on disk; batch-1 latency (median of interleaved A/B runs);
- the integer reference against onnxruntime: accumulator overflows (chunking on), int16 saturations,
  the largest end-to-end output difference in output steps, and the largest op-by-op step difference;
- an accumulator study on adversarial inputs built from each weighted layer's int16 weights
  (x = 32767 * sign(w) for each output's own row): overflow events with whole-row int32 accumulation
  against the provable chunks of `dfp.chunk_length` (which must give none).

The int16 fallback of int8 on EfficientNet-Lite0 beside the float fallback follows (`benchmarks.int16_fallback`).
Models whose cached files are missing (``benchmarks/cache/<name>/``) are skipped and listed as such. The table is
printed and written atomically to ``benchmarks/results/int16.md``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import compressor
from compressor import runtime
from compressor.backends.integer_reference import IntegerReference
from compressor.metrics import sqnr_db
from compressor.quantization import dfp

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "int16.md"
DEMO = Path(compressor.__file__).parent / "demo"
MODELS = ("demo", "resnet", "mobilenetv2", "squeezenet", "shufflenetv2", "vgg")
BATCH, REF_BATCH, WARMUP, RUNS = 250, 32, 5, 40
HEADER = (
    "model", "top-1 fp32", "top-1 int8", "top-1 int16", "top-1 int16 ref (fp32 same samples)", "SQNR int8 dB",
    "SQNR int16 dB", "× smaller int8", "× smaller int16", "int16/fp32 size", "speed-up int8 b1", "speed-up int16 b1",
    "ref overflows", "ref saturations", "ref vs ORT e2e steps", "ref vs ORT per-op steps", "max reduction",
    "adv. layers overflowing", "adv. overflows whole-row", "adv. overflows chunked", "int8 ref vs fused per-op steps",
    "int8 ref vs fused top-1 agreement", "note",
)  # fmt: skip


def paths(name: str) -> tuple[Path, Path, Path]:
    """Model, calibration and eval files of ``name``."""
    if name == "demo":
        return DEMO / "demo.onnx", DEMO / "demo.npz", DEMO / "demo.npz"
    folder = ROOT / "cache" / name
    return folder / "model.onnx", folder / "calib.npz", folder / "eval.npz"


def options() -> ort.SessionOptions:
    """Two intra-op threads, spinning off: several sessions stay alive on few cores."""
    return runtime.session_options(threads=2, spinning=False)


def predict(session: ort.InferenceSession, name: str, x: np.ndarray) -> np.ndarray:
    """The first output (logits) on ``x``, in batches."""
    return np.concatenate([session.run(None, {name: x[i : i + BATCH]})[0] for i in range(0, len(x), BATCH)])


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    return 100.0 * float(np.mean(np.argmax(logits, axis=-1) == labels))


def disk_bytes(files: list[Path]) -> int:
    return sum(Path(f).stat().st_size for f in files)


def latencies(sessions: list[ort.InferenceSession], name: str, x: np.ndarray) -> list[float]:
    """Median batch-1 latency of each session, timed in interleaved rounds (the order rotates each round)."""
    feeds = {name: x[:1]}
    for session in sessions:
        for _ in range(WARMUP):
            session.run(None, feeds)
    times: list[list[float]] = [[] for _ in sessions]
    for round_ in range(RUNS):
        for k in range(len(sessions)):
            index = (k + round_) % len(sessions)
            start = time.perf_counter()
            sessions[index].run(None, feeds)
            times[index].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def output_step(model: onnx.ModelProto) -> float:
    """The scale of the DequantizeLinear writing graph output 0: one step of its int16 mantissas."""
    node = next(n for n in model.graph.node if model.graph.output[0].name in n.output)
    if node.op_type != "DequantizeLinear":
        raise ValueError(f"output 0 comes from {node.op_type}, not a DequantizeLinear")
    scale = next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == node.input[1])
    return float(np.asarray(scale).reshape(-1)[0])


def exposed(model: onnx.ModelProto, name: str, x: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """onnxruntime's output 0 and every int16 tensor (QuantizeLinear outputs) of ``model`` on ``x``."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    names = [n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    probe.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.INT16, None) for n in names)
    values = runtime.make_session(probe, options=options()).run(None, {name: x})
    return values[0], dict(zip(names, values[len(model.graph.output) :], strict=True))


def int8_reference(model_path: Path, calib: Path, name: str, x: np.ndarray) -> tuple[int, float]:
    """The integer reference on our int8 QDQ model (latency guard off: every island int8) against the fused
    lowering onnxruntime runs: the largest per-op step difference, and top-1 agreement of the logits."""
    from compressor import ir as cir

    result = compressor.compress(model_path, target="int8", calib=calib, latency_guard=False, measure_latency=False,
                                 measure_fidelity=False, progress=False)  # fmt: skip
    qdq = cir.to_proto(result.model)
    inits = {t.name: t for t in qdq.graph.initializer}
    quantize = [n for n in qdq.graph.node if n.op_type == "QuantizeLinear"]
    probe = onnx.ModelProto()
    probe.CopyFrom(qdq)
    probe.graph.output.extend(helper.make_tensor_value_info(n.output[0], inits[n.input[2]].data_type, None)
                              for n in quantize)  # fmt: skip
    probe_session = runtime.make_session(probe, options=options())
    fused = runtime.make_session(result.lowered, options=options())
    per_op, agree = 0, []
    for i in range(0, len(x), REF_BATCH):
        feeds = {name: x[i : i + REF_BATCH]}
        values = probe_session.run(None, feeds)[len(qdq.graph.output) :]
        observed = dict(zip([n.output[0] for n in quantize], values, strict=True))
        reference = IntegerReference(qdq)
        steps = reference.step_differences(feeds, observed)
        per_op = max(per_op, max(steps.values(), default=0))
        oracle = reference.run(feeds)[0]
        agree.append(np.argmax(oracle, -1) == np.argmax(fused.run(None, feeds)[0], -1))
    return per_op, 100.0 * float(np.mean(np.concatenate(agree)))


def reduction_rows(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Per Conv/Gemm/MatMul with a DequantizeLinear'd int16 initializer weight: its [reduction, outputs] mantissas."""
    inits = {t.name: t for t in model.graph.initializer}
    int16_of = {
        n.output[0]: numpy_helper.to_array(inits[n.input[0]])
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].data_type == TensorProto.INT16
    }
    layers: dict[str, np.ndarray] = {}
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2 or node.input[1] not in int16_of:
            continue
        w = int16_of[node.input[1]].astype(np.int64)
        trans_b = any(a.name == "transB" and a.i for a in node.attribute)
        if node.op_type == "Conv":
            matrix = w.reshape(w.shape[0], -1).T  # [out, in/g, k, k] -> [in/g*k*k, out]
        elif w.ndim != 2:
            continue
        else:
            matrix = w.T if node.op_type == "Gemm" and trans_b else w
        layers[node.name or node.output[0]] = matrix
    return layers


def adversarial(model: onnx.ModelProto) -> tuple[int, int, int]:
    """Layers that can overflow, overflow events whole-row and with `dfp.chunk_length` chunks, on x = 32767*sign(w).

    Each output gets its own adversarial row: x [outputs, 1, K] against w [outputs, K, 1], so only the
    "diagonal" (each output with its own worst input) is accumulated and counted.
    """
    layers = events_whole = events_chunked = 0
    for matrix in reduction_rows(model).values():
        w = matrix.T[:, :, None].astype(np.int16)  # [outputs, K, 1]
        x = (dfp.MANTISSA_MAX * np.sign(matrix.T))[:, None, :].astype(np.int16)  # [outputs, 1, K]
        whole, chunked = dfp.AccumulatorStats(), dfp.AccumulatorStats()
        dfp.chunked_matmul(x, w, matrix.shape[0], whole)
        dfp.chunked_matmul(x, w, dfp.chunk_length(matrix), chunked)
        layers += whole.overflows > 0
        events_whole += whole.overflows
        events_chunked += chunked.overflows
    return layers, events_whole, events_chunked


def measure(name: str, samples: int, folder: Path) -> dict[str, object]:
    """One model's row (values by column) and its per-target pass/fail."""
    model_path, calib, eval_path = paths(name)
    data = np.load(eval_path)
    x, y = data["x"], data["y"]
    built: dict[str, tuple[onnx.ModelProto, int]] = {}
    for target in ("int8", "int16"):
        result = compressor.compress(model_path, target=target, calib=calib, measure_latency=False,
                                     measure_fidelity=False, progress=False)  # fmt: skip
        built[target] = (result.lowered, disk_bytes(result.save(folder / f"{name}-{target}.onnx")))
    fp32_bytes = disk_bytes([model_path, *model_path.parent.glob(model_path.name + ".data")])
    sessions = [runtime.make_session(model_path, options=options())]
    sessions += [runtime.make_session(built[t][0], options=options()) for t in ("int8", "int16")]
    input_name = sessions[0].get_inputs()[0].name
    fp32, int8, int16 = (predict(s, input_name, x) for s in sessions)
    lat = latencies(sessions, input_name, x)
    del sessions

    lowered = built["int16"][0]
    n = min(samples, len(x))
    ref = IntegerReference(lowered, chunking=True)
    oracle = np.concatenate([ref.run({input_name: x[i : i + REF_BATCH]})[0] for i in range(0, n, REF_BATCH)])
    overflows, saturations = ref.stats.overflows, ref.stats.saturations
    reduction = max((r for r, _ in ref.stats.reductions.values()), default=0)
    e2e = float(np.abs(oracle - int16[:n]).max() / output_step(lowered))
    per_op = 0
    probe = IntegerReference(lowered, chunking=True)  # its own stats: the counts above are from `ref.run` alone
    for i in range(0, n, REF_BATCH):
        _, observed = exposed(lowered, input_name, x[i : i + REF_BATCH])
        steps = probe.step_differences({input_name: x[i : i + REF_BATCH]}, observed)
        per_op = max(per_op, max(steps.values(), default=0))
    adv_layers, adv_whole, adv_chunked = adversarial(lowered)
    int8_steps, int8_agree = int8_reference(model_path, calib, input_name, x[:n])

    acc = {"fp32": top1(fp32, y), "int8": top1(int8, y), "int16": top1(int16, y)}
    sqnr = {"int8": sqnr_db(fp32, int8), "int16": sqnr_db(fp32, int16)}
    ratio16 = built["int16"][1] / fp32_bytes
    row = [
        name, f"{acc['fp32']:.2f}%", f"{acc['int8']:.2f}%", f"{acc['int16']:.2f}%",
        f"{top1(oracle, y[:n]):.2f}% ({top1(fp32[:n], y[:n]):.2f}%, n={n})", f"{sqnr['int8']:.1f}",
        f"{sqnr['int16']:.1f}", f"{fp32_bytes / built['int8'][1]:.2f}×", f"{fp32_bytes / built['int16'][1]:.2f}×",
        f"{ratio16:.3f}", f"{lat[0] / lat[1]:.2f}×", f"{lat[0] / lat[2]:.2f}×", str(overflows), str(saturations),
        f"{e2e:.0f}", str(per_op), str(reduction), str(adv_layers), str(adv_whole), str(adv_chunked), str(int8_steps),
        f"{int8_agree:.1f}%", "",
    ]  # fmt: skip
    passes = {
        "top-1": abs(acc["fp32"] - acc["int16"]) <= 0.05,
        "SQNR": sqnr["int16"] >= 60.0,
        "overflows": overflows == 0 and adv_chunked == 0,
        "size": ratio16 <= 0.55,
    }
    return {"row": row, "passes": passes}


def markdown(rows: list[list[str]], passes: dict[str, dict[str, bool]], samples: int) -> str:
    """The table, its legend and the targets."""
    lines = ["# INT16 dynamic fixed point: accuracy, fidelity, size, speed and the accumulators", ""]
    lines += ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(cell.replace("|", "/").replace("\n", " ") for cell in row) + " |" for row in rows]
    when = datetime.date.today().isoformat()
    lines += [
        "",
        "top-1: on every eval sample (onnxruntime, batched); *int16 ref* runs the int16 model in integer arithmetic "
        f"(`IntegerReference`, chunking on) on the first {samples} eval samples, with fp32's top-1 on the same "
        "samples in brackets. SQNR: logits against fp32, 10·log10(Σref²/Σ(ref−x)²) over all eval outputs. "
        "× smaller: fp32 bytes / compressed bytes on disk; int16/fp32 size: the inverse for int16. speed-up: fp32 / "
        f"compressed median batch-1 latency, {RUNS} interleaved runs each after {WARMUP} warm-up runs, all sessions "
        "alive with 2 intra-op threads and spinning off; onnxruntime emulates int16 QDQ in float, so int16 is slower "
        "than fp32 there. ref overflows / saturations: int32 accumulator overflow events and int16 clips in the "
        "reference over its samples. ref vs ORT e2e steps: max |reference − onnxruntime int16| of the logits, in "
        "steps of the output's DequantizeLinear scale. per-op steps: max of `step_differences` (each op fed "
        "onnxruntime's own int16 inputs). max reduction: the longest Conv in/g·k·k or Gemm/MatMul K. adv.: per "
        "weighted layer, each output's own adversarial row x = 32767·sign(w): layers with any overflow when the "
        "whole row is summed in one int32, the overflow events so, and the events with `dfp.chunk_length` chunks. "
        "int8 ref vs fused: the reference on our int8 QDQ model (latency guard off) against onnxruntime: the largest "
        "per-op difference in int8 steps, and top-1 agreement with the fused lowering's logits, on the same samples.",
        "",
        f"Machine: {os.cpu_count()} cores; onnxruntime {ort.__version__}; {when}.",
        "",
        "Targets: top-1 within 0.05 pt of fp32 (|fp32 − int16|, onnxruntime, all eval samples), logits SQNR ≥ 60 dB "
        "(int16), zero overflows with chunking (ref on eval samples and adversarial), size ≤ 0.55× fp32 (int16).",
        "",
    ]
    if passes:
        names = list(next(iter(passes.values())))
        lines += ["| model | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for model, marks in passes.items():
            lines.append(f"| {model} | " + " | ".join("pass" if marks[k] else "**fail**" for k in names) + " |")
    return "\n".join(lines) + "\n"


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
        handle.write(text)
    os.chmod(handle.name, 0o644)  # NamedTemporaryFile creates it 0600
    Path(handle.name).replace(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="demo and/or cached zoo names")
    parser.add_argument("--samples", type=int, default=256, help="eval samples run through the integer reference")
    args = parser.parse_args(argv)
    rows: list[list[str]] = []
    passes: dict[str, dict[str, bool]] = {}
    with tempfile.TemporaryDirectory(prefix="int16-bench-") as tmp:
        for name in args.models:
            missing = [str(p.relative_to(ROOT.parent)) for p in dict.fromkeys(paths(name)) if not p.exists()]
            if missing:
                rows.append([name, *["—"] * (len(HEADER) - 2), f"skipped: {', '.join(missing)} missing"])
                print(f"{name}: skipped, missing {', '.join(missing)}", flush=True)
                continue
            start = time.perf_counter()
            try:
                measured = measure(name, args.samples, Path(tmp))
                rows.append(measured["row"])  # type: ignore[arg-type]
                passes[name] = measured["passes"]  # type: ignore[assignment]
            except Exception as exc:  # noqa: BLE001 - one model's failure is its row's note, not the end of the run
                traceback.print_exc()
                rows.append([name, *["—"] * (len(HEADER) - 2), f"error: {type(exc).__name__}: {exc}"])
            print(f"{name}: done in {time.perf_counter() - start:.0f} s", flush=True)
        from benchmarks import int16_fallback  # it builds on this module

        try:
            fallback = int16_fallback.section(Path(tmp))
        except Exception as exc:  # noqa: BLE001 - the main table still gets written
            traceback.print_exc()
            fallback = [f"The int16 fallback section failed: {type(exc).__name__}: {exc}"]
    text = markdown(rows, passes, args.samples) + "\n" + "\n".join(fallback) + "\n"
    print(text)
    write_atomically(RESULTS, text)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
