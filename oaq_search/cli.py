"""`oaq-search`: a thin command line over the Python API. Errors are one line and exit 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
from importlib.metadata import version
from pathlib import Path

import optuna
import tomli_w

import hwmodels
from hwmodels import MemoryModel

from .budget import format_quantity
from .config import DataConfig, FinetuneConfig, load_study_config, validate
from .data import load_cifar10
from .errors import UserError
from .evaluate import BATCH_SIZE, accuracy, format_score
from .files import check_writable, write_text_atomically
from .grids import GRIDS
from .models import model_spec
from .oaq import METHODS
from .packing import pack_model
from .pipeline import create_study, export_plans, finetune_and_test, layer_graph, load_model, run_study, run_worker
from .plan import CODE_PACKINGS, Plan
from .planning import PlanFactory
from .ptq import CALIBRATION_IMAGES, post_training_quantize
from .sensitivity import DEFAULT_METRICS, METRICS, compute_sensitivity, get_metric

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
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so exit's flush doesn't fail again
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oaq-search", description="Hardware-aware mixed-precision OAQ search.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('oaq-search')}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a study file end to end and write the best plan")
    _study_arguments(run)
    run.add_argument("--n-trials", type=int, help="finished trials the study should reach (overrides the file)")
    run.set_defaults(handler=_run)

    create = commands.add_parser("create", help="create a study and enqueue its trials, for workers to run")
    _study_arguments(create)
    create.set_defaults(handler=_create)

    worker = commands.add_parser("worker", help="join an existing study and run its waiting trials")
    _study_arguments(worker)
    worker.add_argument("--worker-index", type=int, default=0, help="distinct per worker: offsets its sampler seed")
    worker.set_defaults(handler=_worker)

    export = commands.add_parser("export", help="write plans from a study: the best, one trial, or the Pareto front")
    _study_arguments(export)
    choice = export.add_mutually_exclusive_group()
    choice.add_argument("--trial", type=int, help="export this trial number")
    choice.add_argument("--pareto", action="store_true", help="export every plan on the accuracy/cost front")
    export.add_argument("--out", default="plan.json", help="file (or folder with --pareto) to write")
    export.set_defaults(handler=_export)

    graph = commands.add_parser("graph", help="print a model's quantizable layers and totals")
    _model_arguments(graph, checkpoint=False)
    graph.add_argument("--json", action="store_true", help="print JSON instead of a table")
    graph.set_defaults(handler=_graph)

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
    quantize.add_argument("--out", help="write the packed model here (and the plan beside it)")
    quantize.set_defaults(handler=_quantize)

    apply = commands.add_parser("apply", help="apply a plan to a checkpoint: quantized model and packed file")
    _model_arguments(apply)
    _data_arguments(apply)
    apply.add_argument("--plan", required=True, help="plan.json from `run` or `export`")
    apply.add_argument("--no-bn-correction", action="store_true", help="quantize weights data-free")
    apply.add_argument("--out", help="write the packed model here (and the plan beside it)")
    apply.set_defaults(handler=_quantize)

    finetune = commands.add_parser("finetune", help="fine-tune a plan: OAQ scale fine-tuning or QAT, resumable")
    finetune.add_argument("--plan", required=True, help="plan.json from `run` or `export`")
    finetune.add_argument("--study", help="take the [finetune] section (and model, data) from this study file")
    finetune.add_argument("--model", help="registered model name (default: the plan's)")
    finetune.add_argument("--checkpoint", help="full-precision checkpoint (default: the one the plan's study used)")
    finetune.add_argument("--data-root", help="folder holding cifar-10-batches-py/ (default: $OAQ_DATA_ROOT)")
    finetune.add_argument("--mode", choices=("scale", "qat"), help="scale: learn OAQ's s and activation ranges "
                                                                  "(default); qat: train the weights too")
    finetune.add_argument("--epochs", type=int)
    finetune.add_argument("--images-per-epoch", type=int, help="fine-tuning images per epoch (default: all 45,000)")
    finetune.add_argument("--train-split", choices=("finetune", "all"), help="all: train on the search split too "
                                                                             "(images the checkpoint never saw)")
    finetune.add_argument("--learning-rate", type=float, help="qat weight learning rate (SGD, cosine decay)")
    finetune.add_argument("--distill", action="store_true", help="also distill from the full-precision model")
    finetune.add_argument("--device", help="auto (a CUDA GPU when PyTorch sees one; the default), cpu, cuda or cuda:N")
    finetune.add_argument("--test-images", type=int, help="score on the first N test images (default: all)")
    finetune.add_argument("--out", default="runs/finetune", help="folder for the plan, checkpoint, packed model "
                                                                 "and resumable state")
    finetune.set_defaults(handler=_finetune)

    sensitivity = commands.add_parser("sensitivity", help="per-layer sensitivity table, ranked, with a heatmap")
    _model_arguments(sensitivity)
    sensitivity.add_argument("--metrics", default=",".join(DEFAULT_METRICS),
                             help=f"comma-separated: {', '.join(METRICS.names())} or module:Class (hessian needs data)")
    sensitivity.add_argument("--methods", default="vanilla,oaq", help="comma-separated: vanilla, oaq, literal")
    sensitivity.add_argument("--grid", choices=GRIDS, default="uniform")
    sensitivity.add_argument("--rank-bits", type=int, default=3, help="bit-width the printed ranking uses")
    sensitivity.add_argument("--data-root", help="CIFAR-10 root; needed by data-driven metrics (hessian)")
    sensitivity.add_argument("--out", default="runs/sensitivity", help="folder for sensitivity.json/.csv/.png")
    sensitivity.set_defaults(handler=_sensitivity)

    report = commands.add_parser("report", help="write an HTML page with figures for a study")
    _study_arguments(report)
    report.add_argument("--out", help="folder for index.html and the PNGs (default: <output_dir>/report)")
    report.set_defaults(handler=_report)

    hardware = commands.add_parser("hw", help="hardware targets: list them, or measure this machine's")
    hardware_commands = hardware.add_subparsers(dest="hw_command", required=True)
    hardware_commands.add_parser("list", help="cost models and targets a study can name").set_defaults(handler=_hw_list)
    measure = hardware_commands.add_parser("measure", help="time this CPU's int8 and fp32 kernels for a model's layers")
    _model_arguments(measure)
    measure.add_argument("--out", default="local-cpu.toml", help="target table to write (use as cost_model = "
                                                                  "\"target:local-cpu.toml\")")
    measure.add_argument("--repeats", type=positive, default=50, help="timed runs per kernel (median is kept)")
    measure.set_defaults(handler=_hw_measure)

    evaluate = commands.add_parser("eval", help="top-1 accuracy of a full-precision checkpoint")
    _model_arguments(evaluate)
    _data_arguments(evaluate)
    evaluate.set_defaults(handler=_eval)
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


def _study_config(args: argparse.Namespace):
    config = load_study_config(args.study)
    if getattr(args, "n_trials", None) is not None:
        config.search.n_trials = args.n_trials
    for option in ("storage", "output_dir"):
        if getattr(args, option, None):
            setattr(config, option, getattr(args, option))
    if getattr(args, "data_root", None):
        config.data.root = args.data_root
    return validate(config)


def _model_arguments(parser: argparse.ArgumentParser, checkpoint: bool = True) -> None:
    parser.add_argument("--model", required=True, help="registered model name, e.g. resnet20")
    if checkpoint:
        parser.add_argument("--checkpoint", help="state_dict file (loaded with weights_only=True)")


def _data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-root", help="folder holding cifar-10-batches-py/ (default: $OAQ_DATA_ROOT)")
    parser.add_argument("--split", choices=("test", "search"), default="test", help="which split to score")
    parser.add_argument("--search-size", type=int, default=5000, help="images in the search split (training tail)")
    parser.add_argument("--batch-size", type=positive, default=BATCH_SIZE)


def _run(args: argparse.Namespace) -> int:
    result = run_study(_study_config(args))
    plan, totals = result.plan, result.plan.totals
    budget = ", ".join(f"{metric} <= {format_quantity(metric, limit)}" for metric, limit in plan.metadata["budget"].items())
    print(f"study {result.study_name}: {result.finished_trials} trials over {result.parameters} Optuna parameters "
          f"in {result.storage_url}")
    print(f"budget: {budget}; best plan (trial {plan.metadata['trial']}, seed: {plan.metadata['seed'] or 'sampled'}) "
          f"costs {', '.join(f'{metric} {format_quantity(metric, value)}' for metric, value in totals.items())}")
    print("bits: " + ", ".join(f"{layer.name} {layer.summary()}" for layer in plan.layers))
    if plan.float_layers:
        print(f"kept in full precision (not quantizable here): {', '.join(plan.float_layers)}")
    score, rescored = plan.metadata["score"], plan.metadata.get("finalist_score")
    whole_split = "" if rescored is None else f" (whole search split {format_score(score, rescored)})"
    print(f"scores: trial {format_score(score, result.search_score)}{whole_split}, test {result.test_accuracy:.2f} % "
          f"(full precision {result.fp_test_accuracy:.2f} %, change {result.test_accuracy - result.fp_test_accuracy:+.2f})")
    print("time: " + ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in result.seconds.items()))
    print(f"plan written to {result.plan_path}")
    if result.finetuned is not None:
        _print_finetune(result.finetuned)
    print(f"browse the study: optuna-dashboard {result.storage_url}")
    return 0


def _create(args: argparse.Namespace) -> int:
    config = _study_config(args)
    queued = create_study(config)
    print(f"study {config.name} in {config.storage_url}: {queued} trials queued; start workers with "
          f"`oaq-search worker {args.study} --storage URL --worker-index N`")
    return 0


def _worker(args: argparse.Namespace) -> int:
    ran = run_worker(_study_config(args), args.worker_index)
    print(f"worker {args.worker_index}: ran {ran} trials; the queue is empty")
    return 0


def _export(args: argparse.Namespace) -> int:
    plans = export_plans(_study_config(args), args.trial, args.pareto)
    if args.pareto:
        folder = Path(args.out if args.out != "plan.json" else "pareto")
        for plan in plans:
            plan.save(folder / f"trial{plan.metadata['trial']}.json")
        print(f"{len(plans)} Pareto plans written to {folder}/")
    else:
        print(f"plan of trial {plans[0].metadata['trial']} written to {plans[0].save(args.out)}")
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


def _finetune(args: argparse.Namespace) -> int:
    check_writable(Path(args.out) / "plan.json", "fine-tune output")  # refused now, not after the epochs
    plan = Plan.load(args.plan)
    study = load_study_config(args.study) if args.study else None
    config = study.finetune if study else FinetuneConfig(mode="scale")
    if config.mode == "none":
        config.mode = "scale"
    for option in ("mode", "epochs", "images_per_epoch", "train_split", "learning_rate", "device"):
        if getattr(args, option) is not None:
            setattr(config, option, getattr(args, option))
    config.distill = config.distill or args.distill
    config = FinetuneConfig(**vars(config))  # validate the overrides
    model_name = args.model or plan.model
    checkpoint = args.checkpoint or (study.model.checkpoint if study else plan.metadata.get("checkpoint"))
    if checkpoint is None:
        raise UserError("no checkpoint to fine-tune: pass --checkpoint (the plan does not name one)")
    model = load_model(model_name, checkpoint)
    plan.check_against(layer_graph(model_name, model), model_name)
    data = study.data if study else DataConfig()
    splits = load_cifar10(args.data_root or data.root, data.search_size)
    result = finetune_and_test(model, plan, splits, config, args.out, args.test_images)
    _print_finetune(result)
    return 0


def _print_finetune(result) -> None:
    scores, last = result.scores, result.history[-1]
    epochs = f"{last['epoch']} epoch{'s' if last['epoch'] != 1 else ''}"
    print(f"fine-tuned ({result.plan.metadata['finetune']['mode']}, {epochs}, {result.seconds:.0f} s, "
          f"{last['images_per_second']:.0f} images/s): test {scores['test_accuracy']:.2f} % on "
          f"{scores['test_images']} images (change {scores['test_accuracy'] - scores['fp_test_accuracy']:+.2f} vs "
          f"full precision {scores['fp_test_accuracy']:.2f} %; post-training {scores['ptq_test_accuracy']:.2f} %)")
    print("files: " + ", ".join(f"{kind} {path}" for kind, path in result.files.items()))


def _quantize(args: argparse.Namespace) -> int:
    if args.out:  # refused now, not after the work
        check_writable(args.out, "packed model")
    model = load_model(args.model, args.checkpoint)
    graph = layer_graph(args.model, model)
    plan = Plan.load(args.plan) if getattr(args, "plan", None) else None
    if plan is not None:
        plan.check_against(graph, args.model)
    splits = load_cifar10(args.data_root, args.search_size)
    if plan is None:  # with calibration data, (s, T) minimise each layer's output error; data-free, weight MSE
        calibration = None if args.no_bn_correction else next(splits.search.batches(CALIBRATION_IMAGES))[0]
        factory = PlanFactory(args.model, model, graph, args.method, args.grid, args.per_channel, calibration,
                              code_packing=args.code_packing)
        plan = factory.uniform(args.wbits, args.abits, args.first_last_bits)
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


def _sensitivity(args: argparse.Namespace) -> int:
    model = load_model(args.model, args.checkpoint)
    graph = layer_graph(args.model, model)
    metrics = [get_metric(name.strip()) for name in args.metrics.split(",") if name.strip()]
    methods = [name.strip() for name in args.methods.split(",") if name.strip()]
    data = load_cifar10(args.data_root).search if any(m.needs_data for m in metrics) else None
    table = compute_sensitivity(model, graph, metrics, methods=methods, grid=args.grid, data=data)
    if args.rank_bits not in table.bits:
        raise UserError(f"--rank-bits must be one of {table.bits}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table.save(out / "sensitivity.json")
    table.write_csv(out / "sensitivity.csv")
    first_metric, first_method = metrics[0].name, methods[-1]
    table.write_heatmap(out / "sensitivity.png", first_metric, first_method)
    print(f"layers by {first_metric} sensitivity at {args.rank_bits} bits ({first_method}), most sensitive first:")
    for rank, layer in enumerate(table.ranking(first_metric, first_method, args.rank_bits), start=1):
        scores = "  ".join(f"{m.name}={table.score(m.name, first_method, layer, args.rank_bits):.4g}" for m in metrics)
        print(f"{rank:3}. {layer:32} {scores}")
    timing = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in table.seconds.items())
    print(f"compute time: {timing}; written to {out}/sensitivity.json, .csv, .png")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .pipeline import load_study
    from .report import write_report

    config = _study_config(args)
    page = write_report(load_study(config), args.out or config.output_path / "report")
    print(f"report written to {page}")
    return 0


def _hw_list(args: argparse.Namespace) -> int:
    for name in hwmodels.available():
        model = hwmodels.get_cost_model(name)
        description = model.table.description if isinstance(model, hwmodels.TargetModel) else type(model).__doc__
        print(f"{name:12} {description.strip().splitlines()[0]}")
    return 0


def _hw_measure(args: argparse.Namespace) -> int:
    from hwmodels.measure import measure_local_cpu

    check_writable(args.out, "target table")  # refused now, not after the timing
    model = load_model(args.model, args.checkpoint)
    graph = layer_graph(args.model, model)
    table = measure_local_cpu(model, graph, model_spec(args.model).input_shape, args.repeats)
    write_text_atomically(args.out, tomli_w.dumps(table))
    hwmodels.load_target(args.out)  # the file we wrote must read back
    print(f"measured {len(graph.names)} layers of {args.model} ({table['target']['description']}); "
          f"written to {args.out}; select it with cost_model = \"target:{args.out}\"")
    return 0


def _eval(args: argparse.Namespace) -> int:
    model = load_model(args.model, args.checkpoint)
    splits = load_cifar10(args.data_root, args.search_size)
    split = getattr(splits, args.split)
    print(f"{args.model}: top-1 {accuracy(model, split, args.batch_size):.2f} % on {len(split)} {args.split} images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
