"""What each `oaq-search` command does, over the Python API. `cli` parses; these import the heavy modules."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import optuna
import tomli_w

import hwmodels
from hwmodels import MemoryModel

from .budget import format_quantity
from .config import DataConfig, FinetuneConfig, PtqConfig, load_study_config, validate
from .data import load_cifar10
from .errors import UserError
from .evaluate import BATCH_SIZE, accuracy, format_score, reference_accuracy
from .files import check_writable, write_text_atomically
from .models import model_spec
from .packing import pack_model
from .pipeline import (create_study, export_plans, finetune_and_test, layer_graph, load_model, load_study_data,
                       load_study_model, run_study, run_worker)
from .plan import Plan
from .planning import PlanFactory
from .progress import note
from .ptq import CALIBRATION_IMAGES, post_training_quantize, reconstruct_plan
from .sensitivity import DEFAULT_METRICS, compute_sensitivity, get_metric

optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own summary and progress bar say enough


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


def run(args: argparse.Namespace) -> int:
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
    nearest = plan.metadata.get("nearest_test_accuracy")
    reconstructed = "" if nearest is None else f" reconstructed (rounded to nearest {nearest:.2f} %)"
    print(f"scores: trial {format_score(score, result.search_score)}{whole_split}, test {result.test_accuracy:.2f} %"
          f"{reconstructed} (full precision {result.fp_test_accuracy:.2f} %, change "
          f"{result.test_accuracy - result.fp_test_accuracy:+.2f})")
    print("time: " + ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in result.seconds.items()))
    print(f"plan written to {result.plan_path}, the packed model beside it (model.packed.pt)")
    if result.finetuned is not None:
        _print_finetune(result.finetuned)
    print(f"report written to {result.report_path}")
    print(f"browse the study: optuna-dashboard {result.storage_url} (pip install 'oaq-search[dashboard]')")
    return 0


def create(args: argparse.Namespace) -> int:
    config = _study_config(args)
    queued = create_study(config)
    print(f"study {config.name} in {config.storage_url}: {queued} trials queued; start workers with "
          f"`oaq-search worker {args.study} --storage URL --worker-index N`")
    return 0


def worker(args: argparse.Namespace) -> int:
    ran = run_worker(_study_config(args), args.worker_index)
    print(f"worker {args.worker_index}: ran {ran} trials; the queue is empty")
    return 0


def export(args: argparse.Namespace) -> int:
    folder = Path(args.out if args.out != "plan.json" else "pareto")
    check_writable(folder / "trial0.json" if args.pareto else args.out, "exported plan")
    plans = export_plans(_study_config(args), args.trial, args.pareto)
    if args.pareto:
        for plan in plans:
            plan.save(folder / f"trial{plan.metadata['trial']}.json")
        print(f"{len(plans)} Pareto plans written to {folder}/")
    else:
        print(f"plan of trial {plans[0].metadata['trial']} written to {plans[0].save(args.out)}")
    return 0


def graph(args: argparse.Namespace) -> int:
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


def finetune(args: argparse.Namespace) -> int:
    check_writable(Path(args.out) / "plan.json", "fine-tune output")  # refused now, not after the epochs
    plan = Plan.load(args.plan)
    study = load_study_config(args.study) if args.study else None
    config = study.finetune if study else FinetuneConfig(mode="scale")
    if config.mode == "none":
        config.mode = "scale"
    for option in ("mode", "epochs", "images_per_epoch", "train_split", "learning_rate", "device", "distill"):
        if getattr(args, option) is not None:
            setattr(config, option, getattr(args, option))
    config = FinetuneConfig(**vars(config))  # validate the overrides
    model_name = args.model or plan.model
    checkpoint = args.checkpoint or (study.model.checkpoint if study else plan.metadata.get("checkpoint"))
    if checkpoint is None:
        raise UserError("no checkpoint to fine-tune: pass --checkpoint (the plan does not name one)")
    model = load_model(model_name, checkpoint)
    plan.check_against(layer_graph(model_name, model), model_name)
    data = study.data if study else DataConfig()
    splits = load_cifar10(args.data_root or data.root, data.search_size)
    result = finetune_and_test(model, plan, splits, config, args.out, args.test_images,
                               reconstruction=_ptq_config(args, study.ptq if study else PtqConfig()))
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


def quantize(args: argparse.Namespace) -> int:
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
                              code_packing=args.code_packing, cache_dir="default")
        plan = factory.uniform(args.wbits, args.abits, args.first_last_bits)
    quantized = post_training_quantize(model, plan, splits.search, not args.no_bn_correction)
    split, batch_size = getattr(splits, args.split), args.batch_size or BATCH_SIZE
    fp, ours = reference_accuracy(model, split, batch_size), accuracy(quantized, split, batch_size)
    ptq, nearest = _ptq_config(args, PtqConfig()), ""
    if "reconstruction" in plan.metadata and not ptq.reconstruct:
        note("this plan was reconstructed: its learned rounding is in the packed model written with it; rounding to "
             "nearest here (pass --reconstruct to learn the rounding again)")
    if ptq.reconstruct:
        plan, nearest = reconstruct_plan(quantized, model, plan, splits.search, ptq), f"; rounded to nearest {ours:.2f} %"
        ours = accuracy(quantized, split, batch_size)
    size = MemoryModel().evaluate(graph, plan).totals["weight_bytes"]
    print(f"{args.model} on {len(split)} {args.split} images: full precision {fp:.2f} %, quantized {ours:.2f} % "
          f"(change {ours - fp:+.2f}{nearest}); weights {format_quantity('weight_bytes', size)} packed")
    if args.out:
        payload = pack_model(quantized, plan, args.out, splits.input_shape)
        plan_path = plan.save(Path(args.out).with_suffix(".plan.json"))
        print(f"packed model {args.out} ({payload} bytes of layers), plan {plan_path}")
    return 0


def _ptq_config(args: argparse.Namespace, base: PtqConfig) -> PtqConfig:
    """`base` with the command line's reconstruction options over it, validated."""
    overrides = {"reconstruct": args.reconstruct or base.reconstruct, "iterations": args.reconstruct_iterations,
                 "images": args.reconstruct_images, "restarts": args.reconstruct_restarts}
    return PtqConfig(**{**vars(base), **{key: value for key, value in overrides.items() if value is not None}})


def sensitivity(args: argparse.Namespace) -> int:
    model = load_model(args.model, args.checkpoint)
    graph = layer_graph(args.model, model)
    metrics = [get_metric(name.strip()) for name in (args.metrics or ",".join(DEFAULT_METRICS)).split(",") if name.strip()]
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


def report(args: argparse.Namespace) -> int:
    from .pipeline import load_study
    from .report import write_report

    config = _study_config(args)
    page = write_report(load_study(config), args.out or config.output_path / "report")
    print(f"report written to {page}")
    return 0


def hw_list(args: argparse.Namespace) -> int:
    for name in hwmodels.available():
        model = hwmodels.get_cost_model(name)
        description = model.table.description if isinstance(model, hwmodels.TargetModel) else type(model).__doc__
        print(f"{name:12} {description.strip().splitlines()[0]}")
    return 0


def hw_measure(args: argparse.Namespace) -> int:
    out = args.out or ("onnxruntime-cpu.toml" if args.runtime == "onnxruntime" else "local-cpu.toml")
    check_writable(out, "target table")  # refused now, not after the timing
    model = load_model(args.model, args.checkpoint)
    graph, input_shape = layer_graph(args.model, model), model_spec(args.model).input_shape
    if args.runtime == "onnxruntime":
        from hwmodels.measure_onnxruntime import measure_onnxruntime

        table = measure_onnxruntime(model, graph, input_shape, args.batch, args.threads, args.repeats)
    else:
        from hwmodels.measure import measure_local_cpu

        table = measure_local_cpu(model, graph, input_shape, args.repeats)
    write_text_atomically(out, tomli_w.dumps(table))
    hwmodels.load_target(out)  # the file we wrote must read back
    print(f"measured {len(graph.names)} layers of {args.model} ({table['target']['description']}); "
          f"written to {out}; select it with cost_model = \"target:{out}\"")
    return 0


def evaluate(args: argparse.Namespace) -> int:
    model = load_model(args.model, args.checkpoint)
    splits = load_cifar10(args.data_root, args.search_size)
    split = getattr(splits, args.split)
    print(f"{args.model}: top-1 {accuracy(model, split, args.batch_size or BATCH_SIZE):.2f} % on {len(split)} {args.split} images")
    return 0


def deploy(args: argparse.Namespace) -> int:
    from .deploy import export_onnx, from_packed
    from .packing import load_packed
    from .runtime import kernel_counts

    check_writable(args.out, "ONNX model")  # refused now, not after the export
    packed = load_packed(args.packed)
    reads_data = args.check or args.data_root is not None  # a packed model carries what the export needs
    name = args.model or packed.plan.model
    if args.study:
        config = _study_config(args)
        model = load_study_model(config.model, config.folder)
        splits = load_study_data(config.data, config.folder) if reads_data else None
    else:
        model = load_model(name)
        splits = load_cifar10(args.data_root) if reads_data else None
    input_shape = packed.input_shape or (None if args.study else model_spec(name).input_shape)
    if splits is None and input_shape is None:
        raise UserError(f"{args.packed} does not say its input shape (written before packed models held it): pass "
                        f"--data-root or --study")
    layers = from_packed(packed, model)
    images = next(splits.search.batches(CALIBRATION_IMAGES))[0] if splits is not None else None
    export_onnx(model, packed.plan, images, args.out, layers, args.weights, args.quantize_skips, input_shape)
    kernels = kernel_counts(args.out)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 1024:.0f} KiB): {kernels['integer']} of "
          f"{kernels['integer'] + kernels['float']} convolutions and linears run as ONNX Runtime integer kernels"
          + ("; packed weights: ONNX Runtime dequantizes them and runs float kernels" if args.weights == "packed" else ""))
    if args.check:
        _check_deployed(args, model, layers, splits.test)
    return 0


def _check_deployed(args: argparse.Namespace, model, layers, test) -> None:
    """ONNX Runtime's accuracy beside PyTorch's for the same plan, and latency against the float model."""
    import tempfile

    from .deploy import export_float_onnx, reference_model
    from .evaluate import logits, top1
    from .runtime import LATENCY_ROUNDS, accuracy_change, agreement, onnx_logits, paired_latency

    test = test.subset(args.test_images or len(test))
    ours, theirs = onnx_logits(args.out, test, threads=args.threads), logits(reference_model(model, layers), test)
    change, error = accuracy_change(ours, theirs, test.labels)
    print(f"ONNX Runtime on {len(test)} test images: {top1(ours, test):.2f} % (PyTorch, same plan: "
          f"{top1(theirs, test):.2f} %; change {change:+.2f} ± {error:.2f}, one standard error over images; "
          f"the same class for {100 * agreement(ours, theirs):.1f} % of images)")
    with tempfile.TemporaryDirectory() as scratch:
        float_path = Path(scratch) / "float.onnx"
        export_float_onnx(model, next(test.batches(1))[0], float_path)
        timings = []
        for batch in (1, 64):
            seconds = paired_latency({"int8": args.out, "float": float_path}, next(test.batches(batch))[0], args.threads)
            timings.append(f"batch {batch} {seconds['int8'] * 1e3:.2f} ms vs float {seconds['float'] * 1e3:.2f} ms "
                           f"({seconds['float'] / seconds['int8']:.2f}x)")
    print(f"latency ({args.threads} threads, median of {LATENCY_ROUNDS} alternating runs): {'; '.join(timings)}")
