"""The ``compress`` command: exit 0 ok, 2 bad input or usage, 1 internal error."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from compressor.errors import CompressorError, UsageError

if TYPE_CHECKING:
    from compressor.recipe import Recipe

EXAMPLES = """\
examples:
  compress --demo                                   run on the bundled Fashion-MNIST demo
  compress model.onnx --target fp32                 normalise: fold BN, drop Identity/dead nodes
  compress model.onnx --target int8 --calib calib.npz --eval test.npz
  compress model.onnx --target int8 --calib calib.npz --format qdq --calibration percentile
  compress model.onnx --target int8 --calib calib.npz --explain 10   rank layers by int8 sensitivity
  compress model.onnx --target int8 --calib photos/ --preprocess resize=256,crop=224,mean=0.5,std=0.25
  compress model.onnx --target int8 --calib calib.npz --min-sqnr 0   no layers kept in float
  compress model.onnx --target int8 --calib calib.npz --rounding adaround   learned weight rounding
  compress model.onnx --target int16 --calib calib.npz   INT16 dynamic fixed point, half the fp32 size
  compress model.onnx --target int8 --calib calib.npz --fallback int16   what int8 breaks in int16, not float
  compress model.onnx --prune 0.5   remove half the MACs as whole channels (a smaller, faster fp32 model)
  compress model.onnx --prune 0.5 --train train.npz --eval test.npz   pruned, then fine-tuned (3 epochs)
  compress model.onnx --prune 0.5 --target int8 --calib calib.npz   pruned, then quantized
  compress model.onnx --target fp32 --eval test.npz --report report.json
  compress model.onnx -o clean.onnx --verify --dump-ir ir_dump/
  compress --target int8 --calibration entropy --print-recipe > r.toml   write the job down, edit it
  compress model.onnx --recipe r.toml --calib calib.npz                  run it (or a report's recipe)

data files are .npz with 'x' (float32, the model's input layout) and optional 'y'
(int64 labels); multi-input models use one array per input name.
exit status: 0 ok, 2 bad input or usage, 1 internal error (please report it).
"""

# Flags of capabilities still being built: accepted by the parser so the user
# gets "not implemented yet" rather than "unrecognised argument".
PLANNED_FLAGS = ("lowrank", "tune", "records")
# Flags that describe the job, so a --recipe already says them: flag -> its default when not given.
RECIPE_FLAGS = {
    "target": None, "backend": None, "format": None, "calibration": None, "keep_float": None, "min_sqnr": None,
    "explain": None, "seed": None, "threads": None, "no_latency": False, "no_fidelity": False,
    "keep_slow_int8": False, "rounding": None, "fallback": None, "prune": None, "prune_method": None,
    "prune_round_to": None, "epochs": None, "lr": None,
}  # fmt: skip
EXPLAIN_ROWS = 10


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        raise UsageError(f"{message}; see compress --help")


DEMO_FOLDER = Path("compressor-demo")
LISTED_NAMES = 6  # names a report line lists before it counts the rest


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="compress",
        description="Compress an ONNX model for an onnxruntime backend and report fp32 vs compressed.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", nargs="?", help="input .onnx file (never modified)")
    parser.add_argument("--demo", action="store_true", help="use the bundled demo model and data")
    parser.add_argument(
        "--target", help="fp32 (default), int8, or int16 (dynamic fixed point: int16 mantissas, power-of-two scales)"
    )
    parser.add_argument("--recipe", metavar="FILE", help="run the job a .toml/.json recipe (or a --report file) holds")
    parser.add_argument(
        "--print-recipe", action="store_true", help="print the recipe the other flags describe (TOML) and exit"
    )
    parser.add_argument("-o", "--output", help="output .onnx (default: MODEL.<target>.onnx beside the input)")
    parser.add_argument("--calib", help="calibration data: .npz, or a folder of images")
    parser.add_argument("--eval", help="evaluation data: .npz (with 'y' for accuracy), or a folder of images")
    parser.add_argument(
        "--preprocess",
        metavar="SPEC",
        help="for image folders: e.g. resize=256,crop=224,mean=0.485/0.456/0.406,std=0.229/0.224/0.225,layout=nchw "
        "(defaults: straight resize to the model's size, scale=1/255, no normalisation, nchw)",
    )
    parser.add_argument("--backend", help="cpu (default) or cuda")
    parser.add_argument(
        "--format",
        choices=["fused", "qdq"],
        help="int8 output: fused integer ops (fastest on CPU, default) or portable QDQ",
    )
    parser.add_argument(
        "--calibration",
        choices=["minmax", "moving_average", "percentile", "entropy", "mse"],
        help="calibration method (default minmax; int16 takes minmax or percentile)",
    )
    parser.add_argument(
        "--rounding",
        choices=["nearest", "adaround"],
        help="int8 weight rounding: to nearest (default), or learned per layer on the calibration data (AdaRound; "
        "slower to compile, more accurate)",
    )
    parser.add_argument(
        "--fallback",
        choices=["float", "int16"],
        help="what the layers int8 breaks run in: float (default), or INT16 dynamic fixed point, so that every "
        "op stays integer",
    )
    parser.add_argument(
        "--prune",
        type=float,
        metavar="FRACTION",
        help="remove this fraction of the MACs as whole channels first (structured pruning, e.g. 0.5)",
    )
    parser.add_argument(
        "--prune-method", choices=["l1", "lrp", "masksparsity"], help="channel scores (default l1: filter magnitude)"
    )
    parser.add_argument(
        "--prune-round-to", type=int, metavar="N", help="keep channel counts in multiples of N (default 8)"
    )
    parser.add_argument("--train", help="training data (.npz with labels 'y'): fine-tunes the model after --prune")
    parser.add_argument("--epochs", type=int, help="fine-tuning epochs with --train (default 3)")
    parser.add_argument("--lr", type=float, help="fine-tuning learning rate with --train (default 0.001, Adam)")
    parser.add_argument("--keep-float", nargs="+", metavar="NODE", help="nodes to leave in float")
    parser.add_argument(
        "--min-sqnr",
        type=float,
        metavar="DB",
        help="int8: keep the most sensitive layers (at most 10%%) in float until the output SQNR on the "
        "calibration data reaches DB (default 30; 0 turns the search off)",
    )
    parser.add_argument(
        "--explain",
        type=int,
        nargs="?",
        const=EXPLAIN_ROWS,
        metavar="N",
        help="int8: measure each layer's sensitivity and print the N most sensitive (default 10)",
    )
    parser.add_argument(
        "--input-shape",
        action="append",
        metavar="NAME=DIMS",
        help="sizes for inputs the model leaves symbolic, for measuring without data: x=1,3,640,640 "
        "(NAME= may be left out for a single-input model; the output keeps them symbolic)",
    )
    parser.add_argument("--report", help="write the summary and per-pass records as JSON")
    parser.add_argument("--verify", action="store_true", help="check each pass's numerics against onnxruntime")
    parser.add_argument("--dump-ir", help="write the model after every pass into this folder")
    parser.add_argument("--seed", type=int, help="random seed (default 0)")
    parser.add_argument("--threads", type=int, help="onnxruntime threads for measurements (default 2)")
    parser.add_argument("--no-latency", action="store_true", help="skip the report's latency measurement")
    parser.add_argument(
        "--no-fidelity",
        action="store_true",
        help="skip the report's accuracy/SQNR rows (they re-run both models on the --eval or --calib data)",
    )
    parser.add_argument(
        "--keep-slow-int8",
        action="store_true",
        help="int8: do not time the int8 islands (by default an island that runs slower than float stays float)",
    )
    parser.add_argument("--force", action="store_true", help="overwrite an existing output file")
    planned = parser.add_argument_group("planned (not implemented yet)")
    planned.add_argument("--lowrank", type=float)
    planned.add_argument("--tune", type=int)
    planned.add_argument("--records")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``compress`` console script; returns the exit status."""
    try:
        return _main(argv)
    except CompressorError as exc:
        print(f"compress: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("compress: interrupted; no output was written", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
        if os.environ.get("COMPRESSOR_DEBUG"):
            traceback.print_exc()
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(
            f"compress: internal error: {type(exc).__name__}: {message} "
            "(set COMPRESSOR_DEBUG=1 for the traceback, and please report it)",
            file=sys.stderr,
        )
        return 1


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    planned = [f"--{name.replace('_', '-')}" for name in PLANNED_FLAGS if getattr(args, name) is not None]
    if planned:
        raise UsageError(f"{', '.join(planned)}: not implemented yet; use --target fp32 or int8 for now")
    _check_recipe_flags(args)
    recipe = _recipe(args)  # heavy imports from here on: the flags are valid
    if args.print_recipe:
        print(recipe.to_toml(), end="")
        return 0
    model, calib, evaluation, output, force = _resolve_paths(args, recipe.target)
    demo_folder = args.demo and output.parent == DEMO_FOLDER

    from compressor.api import compress

    result = compress(
        model,
        recipe=recipe,
        calib=calib,
        eval=evaluation,
        train=args.train,
        preprocess=args.preprocess,
        verify=args.verify,
        dump_ir=args.dump_ir,
        input_shapes=_input_shapes(args.input_shape or []),
    )
    if demo_folder:
        DEMO_FOLDER.mkdir(exist_ok=True)  # only the demo creates a folder, and only its own
    result.save(output, force=force)
    print(result.report.table())
    evaluation_info = result.report.evaluation
    if evaluation_info:
        print(f"\nevaluated on {evaluation_info['samples']} samples from {evaluation_info['source']} data")
    for record in result.report.passes:
        status = "changed" if record["modified"] else "no change"
        print(f"  pass {record['name']:<22} {record['seconds'] * 1e3:8.1f} ms  {status}")
    for name, seconds in result.report.steps.items():
        print(f"  step {name:<22} {seconds * 1e3:8.1f} ms")
    explained = args.explain or (EXPLAIN_ROWS if any(getattr(c, "explain", False) for c in recipe.stages) else 0)
    if explained and result.sensitivity:
        from compressor.quantization.sensitivity import format_table

        print(f"\nmost sensitive layers (each layer's output SQNR with only that layer in int8), {explained} of "
              f"{len(result.sensitivity)}:")  # fmt: skip
        print(format_table(result.sensitivity, explained))
    if result.report.kept_float:
        print(f"left in float ({len(result.report.kept_float)}):")
        by_reason: dict[str, list[str]] = {}
        for node, why in result.report.kept_float.items():
            by_reason.setdefault(why, []).append(node)
        for why, nodes in by_reason.items():
            print(f"  {_listed(nodes)}: {why}")
    for rewrite, nodes in result.report.lowering.items():
        print(f"lowering, {rewrite.replace('_', ' ')} ({len(nodes)}): {_listed(nodes)}")
    for note in result.report.notes:
        print(f"note: {note}")
    print(f"wrote {output}")
    if args.report:
        result.report.write_json(args.report)
        print(f"wrote {args.report}")
    return 0


def _listed(names: list[str]) -> str:
    more = len(names) - LISTED_NAMES
    return ", ".join(names[:LISTED_NAMES]) + (f", ... {more} more" if more > 0 else "")


def _input_shapes(specs: list[str]) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for spec in specs:
        name, _, dims = spec.rpartition("=")
        try:
            shapes[name] = tuple(int(d) for d in dims.split(","))
        except ValueError:
            raise UsageError(f"--input-shape {spec}: expected NAME=1,3,640,640 (whole numbers)") from None
    return shapes


def _check_recipe_flags(args: argparse.Namespace) -> None:
    """Flag checks that need no imports: --recipe against the flags it replaces, ranges, int8-only flags."""
    if args.recipe is not None:
        given = [f"--{name.replace('_', '-')}" for name, unset in RECIPE_FLAGS.items() if getattr(args, name) != unset]
        if given:
            raise UsageError(f"--recipe {args.recipe} describes the whole job; drop {', '.join(given)} "
                             "(or set it in the recipe)")  # fmt: skip
        return
    if args.seed is not None and args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    int8_only = args.explain is not None or args.min_sqnr is not None or args.rounding or args.fallback
    if int8_only and args.target != "int8":
        raise UsageError("--explain, --min-sqnr, --rounding and --fallback apply to --target int8 only")
    if args.prune is not None and not 0.0 < args.prune < 1.0:
        raise UsageError(f"--prune takes the fraction of MACs to remove, between 0 and 1 (exclusive); got {args.prune}")
    if (args.prune_method or args.prune_round_to is not None or args.train) and args.prune is None:
        raise UsageError("--prune-method, --prune-round-to and --train need --prune FRACTION")
    if (args.epochs is not None or args.lr is not None) and args.train is None:
        raise UsageError("--epochs and --lr set fine-tuning: they need --train DATA")
    if args.epochs is not None and args.epochs < 1:
        raise UsageError(f"--epochs must be >= 1, got {args.epochs}")
    if args.lr is not None and not args.lr > 0:
        raise UsageError(f"--lr must be > 0, got {args.lr}")
    if args.explain is not None and args.explain < 1:
        raise UsageError(f"--explain needs a positive number of layers, got {args.explain}")


def _recipe(args: argparse.Namespace) -> Recipe:
    from compressor.recipe import Recipe

    if args.recipe is not None:
        return Recipe.load(args.recipe)
    options = {
        "backend": args.backend, "threads": args.threads, "qdq": None if args.format is None else args.format == "qdq",
        "seed": args.seed, "explain": True if args.explain is not None else None,
    }  # fmt: skip
    return Recipe.from_options(
        args.target or "fp32",
        **{name: value for name, value in options.items() if value is not None},  # type: ignore[arg-type]
        latency_guard=not args.keep_slow_int8,
        measure_latency=not args.no_latency,
        measure_fidelity=not args.no_fidelity,
        int8=_int8_overrides(args),
        int16=_int16_overrides(args),
        prune=_prune_settings(args),
    )


def _prune_settings(args: argparse.Namespace) -> dict[str, object] | None:
    if args.prune is None:
        return None
    given = {"fraction": args.prune, "method": args.prune_method, "round_to": args.prune_round_to,
             "epochs": args.epochs, "lr": args.lr}  # fmt: skip
    return {name: value for name, value in given.items() if value is not None}


def _int8_overrides(args: argparse.Namespace) -> dict[str, object]:
    overrides: dict[str, object] = {}
    if args.calibration:
        overrides["calibration"] = args.calibration
    if args.keep_float:
        overrides["keep_float"] = frozenset(args.keep_float)
    if args.min_sqnr is not None:
        overrides["min_sqnr_db"] = args.min_sqnr
    if args.rounding:
        overrides["rounding"] = args.rounding
    if args.fallback:
        overrides["fallback"] = args.fallback
    return overrides


def _int16_overrides(args: argparse.Namespace) -> dict[str, object]:
    given = {"calibration": args.calibration, "keep_float": frozenset(args.keep_float or ()) or None}
    return {name: value for name, value in given.items() if value}


def _resolve_paths(args: argparse.Namespace, target: str) -> tuple[Path, str | None, str | None, Path, bool]:
    """Check every path before any work, so bad input fails fast and writes nothing."""
    force = args.force
    if args.demo:
        if args.model:
            raise UsageError("--demo takes no model path; drop one of them")
        demo = resources.files("compressor.demo")
        model = Path(str(demo / "demo.onnx"))
        calib = args.calib or str(demo / "demo.npz")
        evaluation = args.eval or str(demo / "demo.npz")
        if args.output is None:
            # The demo's own folder, created only once the run succeeded; its output is re-written every run.
            args.output = str(DEMO_FOLDER / f"demo.{target}.onnx")
            force = True
    elif args.model is None:
        raise UsageError("no model given; pass MODEL.onnx or --demo")
    else:
        model, calib, evaluation = Path(args.model), args.calib, args.eval
    if not model.is_file():
        raise UsageError(f"model file not found: {model}; check the path")
    output = Path(args.output) if args.output else model.with_name(f"{model.stem}.{target}.onnx")
    if output.resolve() == model.resolve():
        raise UsageError(f"output {output} is the input model; choose another path with -o")
    if output.is_dir():
        raise UsageError(f"output {output} is a folder; pass a file path such as {output / model.name}")
    if not output.parent.is_dir() and not (args.demo and output.parent == DEMO_FOLDER):
        raise UsageError(f"output folder does not exist: {output.parent}; create it first")
    if output.exists() and not force:
        raise UsageError(f"output file already exists: {output}; pass --force to overwrite it")
    for flag, path in (("--calib", calib), ("--eval", evaluation), ("--train", args.train)):
        if path is not None and not Path(path).exists():
            raise UsageError(f"{flag} not found: {path}; check the path")
    if args.report:
        report = Path(args.report).resolve()
        if not report.parent.is_dir():
            raise UsageError(f"report folder does not exist: {Path(args.report).parent}; create it first")
        clashes = {model.resolve(): "the input model", output.resolve(): "the output model"}
        if report in clashes or report.is_dir():
            what = clashes.get(report, "a folder")
            raise UsageError(f"--report {args.report} is {what}; pass another path, e.g. {output.stem}.json")
    if args.dump_ir and Path(args.dump_ir).exists() and not Path(args.dump_ir).is_dir():
        raise UsageError(f"--dump-ir {args.dump_ir} is a file; pass a folder (it is created if missing)")
    if args.dump_ir and Path(args.dump_ir).resolve() in {model.resolve().parent, output.resolve().parent}:
        raise UsageError(f"--dump-ir {args.dump_ir} holds the input or output model; pass a folder of its own")
    return model, calib, evaluation, output, force


if __name__ == "__main__":
    sys.exit(main())
