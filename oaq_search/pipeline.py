"""Study files to the engine: one call per user task (run a study end to end, join it as a worker,
create it for workers, export its plans).

The CLI is a thin layer over these functions. `prepare` loads what a study file names (a registered
model or the user's factory, CIFAR-10, an ImageFolder or the user's loader) and builds the `Engine`
from it; `run_study` creates or resumes the study, works through its queue, writes the best plan
and reports it on the test split.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from torch import nn

from .budget import Budget
from .checkpoints import load_checkpoint
from .config import DataConfig, FinetuneConfig, ModelConfig, PtqConfig, StudyConfig
from .data import Splits, load_cifar10, split_from_batches, split_training_tail
from .engine import OUTCOME, Engine, build_engine, finish, finished_trials, open_study, run_trials
from .errors import UserError
from .evaluate import accuracy, reference_accuracy
from .finetuning import FinetuneResult, finetune
from .graph import LayerGraph, build_layer_graph
from .imagefolder import load_imagefolder
from .models import build_model, model_spec
from .objective import best_trial, pareto_trials
from .packing import pack_model
from .plan import Plan
from .plugins import import_named
from .progress import stage
from .ptq import post_training_quantize
from .report import write_report
from .storage import open_storage


def load_model(name: str, checkpoint: str | Path | None = None) -> nn.Module:
    """A registered model in eval mode, with `checkpoint` loaded safely when given."""
    model = build_model(name)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model.eval()


def layer_graph(name: str, model: nn.Module) -> LayerGraph:
    """The layer graph of a registered model, traced on its registered input shape."""
    return build_layer_graph(model, model_spec(name).input_shape)


def load_study_model(config: ModelConfig, folder: Path = Path(".")) -> nn.Module:
    """The model a study file names: registered by `name`, or built by the user's `factory` (a module
    path, looked up in the study file's `folder` first), with its checkpoint loaded; eval mode."""
    if config.name is not None:
        return load_model(config.name, config.checkpoint)
    with _importable(folder):
        build = import_named(config.factory, "model factory")
    if not callable(build):
        raise UserError(f"model factory {config.factory!r} is a {type(build).__name__}, not a function or class")
    try:
        model = build(**config.kwargs)
    except TypeError as error:
        raise UserError(f"model factory {config.factory!r} does not take kwargs {config.kwargs}: {error}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"model factory {config.factory!r} returned a {type(model).__name__}, not a torch.nn.Module")
    if config.checkpoint is not None:
        load_checkpoint(model, config.checkpoint)
    return model.eval()


def load_study_data(config: DataConfig, folder: Path = Path(".")) -> Splits:
    """The splits a study file's [data] names: CIFAR-10, an ImageFolder, or the user's loader function."""
    if config.kind == "cifar10":
        return load_cifar10(config.root, config.search_size, config.download)
    if config.kind == "imagefolder":
        return load_imagefolder(config)
    with _importable(folder):
        loader = import_named(config.loader, "data loader")
    loaders = loader() if callable(loader) else loader
    if not isinstance(loaders, dict) or "test" not in loaders or not {"train", "search"} & set(loaders):
        raise UserError(f"data loader {config.loader!r} must return a dict of loaders with 'test' and 'search' (or "
                        f"'train', whose last search_size images become the search split), got {type(loaders).__name__}")
    unknown = sorted(set(loaders) - {"train", "search", "finetune", "test"})
    if unknown:
        raise UserError(f"data loader {config.loader!r} returned an unknown split {unknown[0]!r}: use search, finetune "
                        f"and test, or train and test")
    test = split_from_batches(loaders["test"], "test")
    if "train" in loaders:
        return split_training_tail(split_from_batches(loaders["train"], "train"), test, config.search_size)
    search = split_from_batches(loaders["search"], "search")
    return Splits(search, split_from_batches(loaders["finetune"], "finetune") if "finetune" in loaders else search, test)


class _importable:
    """Within it, modules beside the study file import first (a factory named "model:build")."""

    def __init__(self, folder: Path):
        self.folder = str(Path(folder).resolve())

    def __enter__(self):
        sys.path.insert(0, self.folder)

    def __exit__(self, *exc):
        sys.path.remove(self.folder)


def model_identity(config: ModelConfig) -> dict[str, str]:
    """The model and its weights in a study's fingerprint: a registry name, or the factory and its kwargs."""
    model = config.name or f"{config.factory}({json.dumps(config.kwargs, sort_keys=True)})"
    return {"model": model, "checkpoint": _file_digest(config.checkpoint) if config.checkpoint else "none"}


def prepare(config: StudyConfig, progress: bool | None = None) -> Engine:
    """The engine for a study file: its model, data, search settings and budget."""
    model = load_study_model(config.model, config.folder)
    splits = load_study_data(config.data, config.folder)
    return build_engine(config.name, config.storage_url, model, config.model.label, splits, config.search,
                        Budget.parse(config.budget), model_identity(config.model), config.model.leaf_modules,
                        progress=progress)


@dataclass
class StudyResult:
    """What `run_study` produced: the best plan, its accuracies, and where things were written."""

    plan: Plan
    plan_path: Path
    study_name: str
    storage_url: str
    search_score: float  # the best trial's, by config.search.score
    fp_test_accuracy: float
    test_accuracy: float
    finished_trials: int
    parameters: int
    seconds: dict[str, float] = field(default_factory=dict)
    model: nn.Module | None = None  # the plan's quantized model, as packed beside the plan
    finetuned: FinetuneResult | None = None  # when the study file has a [finetune] section
    report_path: Path | None = None


def run_study(config: StudyConfig, progress: bool | None = None) -> StudyResult:
    """Create or resume the study, run its queue, write the best plan and the report, score it on test."""
    engine = prepare(config, progress)
    study, storage = open_study(engine, create=True)
    run_trials(engine, study, storage)
    result = finish_study(config, engine, study)
    if config.finetune.mode != "none":
        # One folder per plan: re-running resumes the same plan's fine-tune; a new best plan starts afresh.
        folder = config.output_path / "finetune" / result.plan.key()
        result.finetuned = finetune_and_test(engine.model, result.plan, engine.splits, config.finetune, folder,
                                             config.data.test_images, progress, config.ptq, result.model)
        result.seconds["finetune"] = result.finetuned.seconds
        tuned = result.finetuned.plan.metadata["finetune"]
        study.set_user_attr(OUTCOME, {**study.user_attrs[OUTCOME], "finetuned": {
            "mode": tuned["mode"], "epochs": len(tuned["history"]), "test_accuracy": tuned["test_accuracy"],
            "plan": str(result.finetuned.files["plan"])}})
    with stage("report", progress):
        result.report_path = write_report(study, config.output_path / "report")
    return result


def finish_study(config: StudyConfig, engine: Engine, study: optuna.Study) -> StudyResult:
    """The best feasible plan, scored once on the test split and written to the study's output folder
    with its packed model (post-training quantized, reconstructed if [ptq] says so)."""
    test = engine.splits.test.subset(config.data.test_images or len(engine.splits.test))
    plan, quantized = finish(engine, study, test, config.ptq)
    plan.metadata["checkpoint"] = config.model.checkpoint
    plan_path = plan.save(config.output_path / "plan.json")
    pack_model(quantized, plan, config.output_path / "model.packed.pt", engine.splits.input_shape)  # what `deploy` reads
    return StudyResult(plan, plan_path, config.name, config.storage_url, plan.metadata["search_score"],
                       plan.metadata["fp_test_accuracy"], plan.metadata["test_accuracy"], finished_trials(study),
                       len(engine.space.parameter_names), engine.seconds, model=quantized)


def finetune_and_test(model: nn.Module, plan: Plan, splits: Splits, config: FinetuneConfig,
                      output_dir: str | Path, test_images: int | None = None, progress: bool | None = None,
                      reconstruction: PtqConfig | None = None, quantized: nn.Module | None = None) -> FinetuneResult:
    """Fine-tune `plan` (from `quantized`, or its post-training quantization, reconstructed when
    `reconstruction` says so), then score full precision, post-training and fine-tuned on the test split.

    The three accuracies go into the result's `scores` and the fine-tuned plan's metadata; the first
    two are taken from the plan when `finish` already scored it on the same test images and in the same
    way. The post-training score is measured once, before training, and kept in the fine-tune's saved
    state, so a resumed fine-tune neither rebuilds nor reconstructs its start."""
    test_split = splits.test.subset(test_images or len(splits.test))
    made_by = plan.metadata.get("reconstruction")  # the settings `reconstruct_plan` wrote, device included
    made_by = PtqConfig(**made_by).settings() if made_by else None
    scored = (plan.metadata.get("test_images") == len(test_split)
              and made_by == (reconstruction.settings() if reconstruction else None))

    def score_start(start: nn.Module) -> dict[str, float]:
        return {"test_images": len(test_split), "ptq_test_accuracy": accuracy(start, test_split, progress=progress)}

    result = finetune(model, plan, splits, config, output_dir, progress, reconstruction, quantized,
                      score_start=None if scored else score_start)
    start = result.start_scores or {}
    if scored:
        ptq = plan.metadata["test_accuracy"]
    elif start.get("test_images") == len(test_split):
        ptq = start["ptq_test_accuracy"]
    else:  # resumed from a state saved without this score, or with another number of test images
        ptq = score_start(post_training_quantize(model, plan, splits.search, reconstruction=reconstruction,
                                                 progress=progress))["ptq_test_accuracy"]
    fp = plan.metadata["fp_test_accuracy"] if scored else reference_accuracy(model, test_split, progress=progress)
    result.scores = {"fp_test_accuracy": fp, "ptq_test_accuracy": ptq,
                     "test_accuracy": accuracy(result.model, test_split, progress=progress),
                     "test_images": len(test_split)}
    result.plan.metadata["finetune"].update(result.scores)
    result.plan.save(result.files["plan"])
    return result


def run_worker(config: StudyConfig, worker_index: int, progress: bool | None = None) -> int:
    """Join an existing study and run waiting trials until the queue is empty; returns trials run."""
    engine = prepare(config, progress)
    study, storage = open_study(engine, create=False, worker_index=worker_index)
    return run_trials(engine, study, storage)


def create_study(config: StudyConfig) -> int:
    """Create the study and enqueue its trials (seeds first) without running any; returns the queue size."""
    engine = prepare(config)
    study, _ = open_study(engine, create=True)
    return len(study.get_trials(deepcopy=False))


def load_study(config: StudyConfig) -> optuna.Study:
    """The stored study a study file names, read as it is: no model, data or search is prepared."""
    storage = open_storage(config.storage_url, config.search.heartbeat_seconds, config.search.grace_seconds)
    try:
        return optuna.load_study(study_name=config.name, storage=storage)
    except KeyError:
        raise UserError(f"study {config.name!r} does not exist in {config.storage_url}") from None


def export_plans(config: StudyConfig, trial_number: int | None = None, pareto: bool = False) -> list[Plan]:
    """Plans stored in a study: its best feasible trial, a given trial, or the whole Pareto front."""
    study = load_study(config)
    if pareto:
        trials = pareto_trials(study)
    elif trial_number is not None:
        trials = [t for t in study.get_trials(deepcopy=False) if t.number == trial_number]
        if not trials or trials[0].state != optuna.trial.TrialState.COMPLETE:
            raise UserError(f"study {config.name!r} has no finished trial number {trial_number}")
    else:
        trials = [best_trial(study)]
    plans = []
    for trial in trials:
        plan = Plan.from_dict(trial.user_attrs["plan"])
        plan.totals = trial.user_attrs["costs"]
        plan.metadata = {"study": config.name, "trial": trial.number, "score": config.search.score,
                         "search_score": trial.values[0]}
        plans.append(plan)
    return plans


def _file_digest(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
