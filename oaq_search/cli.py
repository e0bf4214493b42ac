"""`oaq-search`: a thin command line over the Python API. Errors are one line and exit 2.

This module only parses; `commands` does the work. Parsing imports nothing heavy (no torch, no optuna),
so `--help` and argument errors answer at once (benchmarks/cli_startup.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib import import_module
from importlib.metadata import version

from .choices import CODE_PACKINGS, GRIDS, METHODS
from .errors import UserError

EXIT_USER_ERROR = 2


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return getattr(import_module("oaq_search.commands"), args.handler)(args)
    except UserError as error:
        print(f"oaq-search: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("oaq-search: interrupted; finished trials are saved, run the same command to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so exit's flush doesn't fail again
        return 1


def _reconstruction_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reconstruct", action="store_true", help="learn the weights' rounding and the activation "
                        "ranges block by block on calibration images (AdaRound/QDrop; minutes on a CPU)")
    parser.add_argument("--reconstruct-iterations", type=int, help="optimizer steps per block (default 1000)")
    parser.add_argument("--reconstruct-images", type=int, help="calibration images of the search split (default 1024)")
    parser.add_argument("--reconstruct-restarts", type=int, help="reconstructions with successive seeds, the best on "
                        "the search images past those it fits on kept (default 1)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oaq-search", description="Hardware-aware mixed-precision OAQ search.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('oaq-search')}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a study file end to end and write the best plan")
    _study_arguments(run)
    run.add_argument("--n-trials", type=int, help="finished trials the study should reach (overrides the file)")
    run.set_defaults(handler="run")

    create = commands.add_parser("create", help="create a study and enqueue its trials, for workers to run")
    _study_arguments(create)
    create.set_defaults(handler="create")

    worker = commands.add_parser("worker", help="join an existing study and run its waiting trials")
    _study_arguments(worker)
    worker.add_argument("--worker-index", type=int, default=0, help="distinct per worker: offsets its sampler seed")
    worker.set_defaults(handler="worker")

    export = commands.add_parser("export", help="write plans from a study: the best, one trial, or the Pareto front")
    _study_arguments(export)
    choice = export.add_mutually_exclusive_group()
    choice.add_argument("--trial", type=int, help="export this trial number")
    choice.add_argument("--pareto", action="store_true", help="export every plan on the accuracy/cost front")
    export.add_argument("--out", default="plan.json", help="file (or folder with --pareto) to write")
    export.set_defaults(handler="export")

    graph = commands.add_parser("graph", help="print a model's quantizable layers and totals")
    _model_arguments(graph, checkpoint=False)
    graph.add_argument("--json", action="store_true", help="print JSON instead of a table")
    graph.set_defaults(handler="graph")

    quantize = commands.add_parser("quantize", help="post-training quantization at a uniform setting")
    _model_arguments(quantize)
    _data_arguments(quantize)
    quantize.add_argument("--wbits", type=int, default=4, help="uniform weight bits (default 4)")
    quantize.add_argument("--abits", type=int, help="uniform activation bits (default: full precision)")
    quantize.add_argument("--method", choices=METHODS, default="oaq")
    quantize.add_argument("--grid", choices=GRIDS, default="uniform")
    quantize.add_argument("--per-channel", action="store_true", help="per-output-channel statistics")
    quantize.add_argument("--first-last-bits", type=int, default=8, help="bits of the first and last layer")
    quantize.add_argument("--code-packing", choices=CODE_PACKINGS, default="fields",
                          help="base3: 2-bit layers' ternary codes five to a byte (1.6 bits a weight)")
    quantize.add_argument("--no-bn-correction", action="store_true", help="quantize weights data-free")
    _reconstruction_arguments(quantize)
    quantize.add_argument("--out", help="write the packed model here (and the plan beside it)")
    quantize.set_defaults(handler="quantize")

    apply = commands.add_parser("apply", help="apply a plan to a checkpoint: quantized model and packed file")
    _model_arguments(apply)
    _data_arguments(apply)
    apply.add_argument("--plan", required=True, help="plan.json from `run` or `export`")
    apply.add_argument("--no-bn-correction", action="store_true", help="quantize weights data-free")
    _reconstruction_arguments(apply)
    apply.add_argument("--out", help="write the packed model here (and the plan beside it)")
    apply.set_defaults(handler="quantize")

    finetune = commands.add_parser("finetune", help="fine-tune a plan: OAQ scale fine-tuning or QAT, resumable")
    finetune.add_argument("--plan", required=True, help="plan.json from `run` or `export`")
    finetune.add_argument("--study", help="take the [finetune] section (and model, data) from this study file")
    finetune.add_argument("--model", help="registered model name (default: the plan's)")
    finetune.add_argument("--checkpoint", help="full-precision checkpoint (default: the one the plan's study used)")
    finetune.add_argument("--data-root", help="folder holding cifar-10-batches-py/ (default: $OAQ_DATA_ROOT)")
    finetune.add_argument("--mode", choices=("scale", "qat"), help="scale: learn OAQ's s and activation ranges "
                                                                  "(default); qat: train the weights too")
    finetune.add_argument("--epochs", type=int)
    _reconstruction_arguments(finetune)
    finetune.add_argument("--images-per-epoch", type=int, help="fine-tuning images per epoch (default: all 45,000)")
    finetune.add_argument("--train-split", choices=("finetune", "all"), help="all: train on the search split too "
                                                                             "(images the checkpoint never saw)")
    finetune.add_argument("--learning-rate", type=float, help="qat weight learning rate (SGD, cosine decay)")
    finetune.add_argument("--distill", action=argparse.BooleanOptionalAction,
                          help="distill from the full-precision model besides the labels (default: the study's, else on)")
    finetune.add_argument("--device", help="auto (a CUDA GPU when PyTorch sees one; the default), cpu, cuda or cuda:N")
    finetune.add_argument("--test-images", type=int, help="score on the first N test images (default: all)")
    finetune.add_argument("--out", default="runs/finetune", help="folder for the plan, checkpoint, packed model "
                                                                 "and resumable state")
    finetune.set_defaults(handler="finetune")

    sensitivity = commands.add_parser("sensitivity", help="per-layer sensitivity table, ranked, with a heatmap")
    _model_arguments(sensitivity)
    sensitivity.add_argument("--metrics", help="comma-separated metric names or module:Class (default: "
                                               "ssim_weight,ssim_distribution,mse; hessian needs data)")
    sensitivity.add_argument("--methods", default="vanilla,oaq", help="comma-separated: vanilla, oaq, literal")
    sensitivity.add_argument("--grid", choices=GRIDS, default="uniform")
    sensitivity.add_argument("--rank-bits", type=int, default=3, help="bit-width the printed ranking uses")
    sensitivity.add_argument("--data-root", help="CIFAR-10 root; needed by data-driven metrics (hessian)")
    sensitivity.add_argument("--out", default="runs/sensitivity", help="folder for sensitivity.json/.csv/.png")
    sensitivity.set_defaults(handler="sensitivity")

    report = commands.add_parser("report", help="write an HTML page with figures for a study")
    _study_arguments(report)
    report.add_argument("--out", help="folder for index.html and the PNGs (default: <output_dir>/report)")
    report.set_defaults(handler="report")

    hardware = commands.add_parser("hw", help="hardware targets: list them, or measure this machine's")
    hardware_commands = hardware.add_subparsers(dest="hw_command", required=True)
    hardware_commands.add_parser("list", help="cost models and targets a study can name").set_defaults(handler="hw_list")
    measure = hardware_commands.add_parser("measure", help="time this CPU's int8 and fp32 kernels for a model's layers")
    _model_arguments(measure)
    measure.add_argument("--runtime", choices=("torch", "onnxruntime"), default="torch",
                         help="whose kernels: torch's (the local-cpu target) or ONNX Runtime's, as `deploy` exports "
                              "each layer (needs the [deploy] extra)")
    measure.add_argument("--out", help="target table to write, then cost_model = \"target:FILE\" (default: "
                                       "local-cpu.toml, or onnxruntime-cpu.toml with --runtime onnxruntime)")
    measure.add_argument("--repeats", type=positive, default=50, help="timed runs per kernel (median is kept)")
    measure.add_argument("--batch", type=positive, default=1, help="images per run (onnxruntime; torch times batch 1)")
    measure.add_argument("--threads", type=positive, default=2, help="ONNX Runtime intra-op threads (onnxruntime)")
    measure.set_defaults(handler="hw_measure")

    deploy = commands.add_parser("deploy", help="write a packed model as ONNX that ONNX Runtime runs with integer "
                                                "kernels; --check compares accuracy and latency")
    deploy.add_argument("packed", help="packed model from quantize/apply --out, finetune or run (model.packed.pt)")
    deploy.add_argument("--out", default="model.onnx", help="ONNX file to write (default model.onnx)")
    deploy.add_argument("--study", help="take the model (a factory) and data from this study file")
    deploy.add_argument("--model", help="registered model name (default: the plan's)")
    deploy.add_argument("--data-root", help="CIFAR-10 root, read only for --check and by packed models from before "
                                            "they carried every range (calibration images fit those)")
    deploy.add_argument("--weights", choices=("int8", "packed"), default="int8",
                        help="int8: codes in int8, which ONNX Runtime runs as integer kernels (default); packed: "
                             "each layer's codes as int2/int4/int8 for the file's true size, exactly the plan's "
                             "model, which ONNX Runtime runs dequantized, as float kernels")
    deploy.add_argument("--quantize-skips", action="store_true",
                        help="residual adds take the 8-bit quantized block input instead of the float one, so ONNX "
                             "Runtime runs them as integer adds: faster, no longer exactly the plan's model")
    deploy.add_argument("--check", action="store_true", help="run it in ONNX Runtime: test accuracy beside "
                                                             "PyTorch's, integer kernels, latency against float")
    deploy.add_argument("--test-images", type=positive, help="score --check on the first N test images (default all)")
    deploy.add_argument("--threads", type=positive, default=2, help="ONNX Runtime threads for the latency check")
    deploy.set_defaults(handler="deploy")

    evaluate = commands.add_parser("eval", help="top-1 accuracy of a full-precision checkpoint")
    _model_arguments(evaluate)
    _data_arguments(evaluate)
    evaluate.set_defaults(handler="evaluate")
    return parser


def positive(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _study_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study", help="study file (TOML)")
    parser.add_argument("--storage", help="Optuna storage URL, e.g. postgresql://user:pass@host/db")
    parser.add_argument("--data-root", help="folder holding cifar-10-batches-py/")
    parser.add_argument("--output-dir", help="where plan.json and the study go (default: runs/<study name>)")


def _model_arguments(parser: argparse.ArgumentParser, checkpoint: bool = True) -> None:
    parser.add_argument("--model", required=True, help="registered model name, e.g. resnet20")
    if checkpoint:
        parser.add_argument("--checkpoint", help="state_dict file (loaded with weights_only=True)")


def _data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-root", help="folder holding cifar-10-batches-py/ (default: $OAQ_DATA_ROOT)")
    parser.add_argument("--split", choices=("test", "search"), default="test", help="which split to score")
    parser.add_argument("--search-size", type=int, default=5000, help="images in the search split (training tail)")
    parser.add_argument("--batch-size", type=positive, help="images per forward pass (default 100)")


if __name__ == "__main__":
    sys.exit(main())
