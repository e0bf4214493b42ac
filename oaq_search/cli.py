"""`oaq-search`: a thin command line over the Python API. Errors are one line and exit 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import optuna

from hwmodels import MemoryModel


from importlib.metadata import version
from .budget import format_quantity
from .config import load_study_config
from .data import load_cifar10
from .errors import UserError
from .evaluate import accuracy
from .grids import GRIDS
from .oaq import METHODS
from .packing import pack_model
from .pipeline import layer_graph, load_model, run_study
from .plan import Plan
from .planning import PlanFactory
from .ptq import post_training_quantize

EXIT_USER_ERROR = 2


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own summary and progress bar say enough
    try:
        return args.handler(args)
    except UserError as error:
        print(f"oaq-search: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("oaq-search: interrupted; finished trials are saved, run the same command to resume", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oaq-search", description="Hardware-aware mixed-precision OAQ search.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('oaq-search')}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a study file end to end and write the best plan")
    run.add_argument("study", help="study file (TOML), e.g. studies/quickstart.toml")
    run.add_argument("--n-trials", type=int, help="finished trials the study should reach (overrides the file)")
    run.add_argument("--storage", help="Optuna storage URL (default: SQLite file in the output folder)")
    run.add_argument("--data-root", help="folder holding cifar-10-batches-py/ (default: file, then $OAQ_DATA_ROOT)")
    run.add_argument("--output-dir", help="where plan.json and the study go (default: runs/<study name>)")
    run.set_defaults(handler=_run)

    graph = commands.add_parser("graph", help="print a model's quantizable layers and totals")
    _model_arguments(graph, checkpoint=False)
    graph.add_argument("--json", action="store_true", help="print JSON instead of a table")
    graph.set_defaults(handler=_graph)

    quantize = commands.add_parser("quantize", help="post-training quantization: a plan or a uniform setting")
    _model_arguments(quantize)
    _data_arguments(quantize)
    quantize.add_argument("--plan", help="plan.json to apply (instead of a uniform setting)")
    quantize.add_argument("--wbits", type=int, default=4, help="uniform weight bits (default 4)")
    quantize.add_argument("--abits", type=int, help="uniform activation bits (default: full precision)")
    quantize.add_argument("--method", choices=METHODS, default="oaq")
    quantize.add_argument("--grid", choices=GRIDS, default="uniform")
    quantize.add_argument("--per-channel", action="store_true", help="per-output-channel statistics")
    quantize.add_argument("--first-last-bits", type=int, default=8, help="bits of the first and last layer")
    quantize.add_argument("--no-bn-correction", action="store_true", help="quantize weights data-free")
    quantize.add_argument("--out", help="write the packed model here (and the plan beside it)")
    quantize.set_defaults(handler=_quantize)

    evaluate = commands.add_parser("eval", help="top-1 accuracy of a full-precision checkpoint")
    _model_arguments(evaluate)
    _data_arguments(evaluate)
    evaluate.set_defaults(handler=_eval)
    return parser


def _model_arguments(parser: argparse.ArgumentParser, checkpoint: bool = True) -> None:
    parser.add_argument("--model", required=True, help="registered model name, e.g. resnet20")
    if checkpoint:
        parser.add_argument("--checkpoint", help="state_dict file (loaded with weights_only=True)")


def _data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-root", help="folder holding cifar-10-batches-py/ (default: $OAQ_DATA_ROOT)")
    parser.add_argument("--split", choices=("test", "search"), default="test", help="which split to score")
    parser.add_argument("--search-size", type=int, default=5000, help="images in the search split (training tail)")
    parser.add_argument("--batch-size", type=int, default=500)


def _run(args: argparse.Namespace) -> int:
    config = load_study_config(args.study)
    if args.n_trials is not None:
        config.search.n_trials = args.n_trials
    for option in ("storage", "output_dir"):
        if getattr(args, option):
            setattr(config, option, getattr(args, option))
    if args.data_root:
        config.data.root = args.data_root
    result = run_study(config)
    totals = result.plan.totals
    bits = ", ".join(f"{layer.name}={layer.weight_bits}" for layer in result.plan.layers)
    print(f"study {result.study_name}: {result.finished_trials} trials in {result.storage_url}")
    print(f"best plan: {bits}")
    print(f"weights {format_quantity('weight_bytes', totals['weight_bytes'])}, "
          f"search-split accuracy {result.search_accuracy:.2f} %, test accuracy {result.test_accuracy:.2f} % "
          f"(full precision {result.fp_test_accuracy:.2f} %, change {result.test_accuracy - result.fp_test_accuracy:+.2f})")
    print(f"plan written to {result.plan_path}")
    return 0


def _graph(args: argparse.Namespace) -> int:
    model = load_model(args.model)
    graph = layer_graph(args.model, model)
    if args.json:
        print(json.dumps([vars(info) for info in graph.infos()], indent=2))
        return 0
    print(f"{'layer':32} {'type':7} {'weights':>9} {'MACs':>12}  input -> output")
    for info in graph.infos():
        print(f"{info.name:32} {info.op_type:7} {info.weight_count:>9} {info.macs:>12}  "
              f"{list(info.input_shape)} -> {list(info.output_shape)}")
    print(f"{len(graph.names)} quantizable layers, {graph.total_weights} weights, {graph.total_params} parameters, "
          f"{graph.total_macs / 1e6:.2f} M MACs, peak activations (fp32) "
          f"{format_quantity('peak_activation_bytes', graph.peak_activation_bytes())}, "
          f"{len(graph.tie_groups())} tie groups")
    return 0


def _quantize(args: argparse.Namespace) -> int:
    model = load_model(args.model, args.checkpoint)
    graph = layer_graph(args.model, model)
    if args.plan:
        plan = Plan.load(args.plan)
        plan.check_against(graph)
    else:
        factory = PlanFactory(args.model, model, graph, args.method, args.grid, args.per_channel)
        plan = factory.uniform(args.wbits, args.abits, args.first_last_bits)
    splits = load_cifar10(args.data_root, args.search_size)
    quantized = post_training_quantize(model, plan, splits.search, not args.no_bn_correction)
    split = getattr(splits, args.split)
    fp, ours = accuracy(model, split, args.batch_size), accuracy(quantized, split, args.batch_size)
    size = MemoryModel().evaluate(graph, plan).totals["weight_bytes"]
    print(f"{args.model} on {len(split)} {args.split} images: full precision {fp:.2f} %, quantized {ours:.2f} % "
          f"(change {ours - fp:+.2f}); weights {format_quantity('weight_bytes', size)} packed")
    if args.out:
        payload = pack_model(quantized, plan, args.out)
        plan_path = plan.save(Path(args.out).with_suffix(".plan.json"))
        print(f"packed model {args.out} ({payload} bytes of layers), plan {plan_path}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    model = load_model(args.model, args.checkpoint)
    splits = load_cifar10(args.data_root, args.search_size)
    split = getattr(splits, args.split)
    print(f"{args.model}: top-1 {accuracy(model, split, args.batch_size):.2f} % on {len(split)} {args.split} images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
