"""Study files: TOML parsed into typed dataclasses, validated key by key, never executed."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from .budget import parse_budget
from .data import MEAN, STD
from .errors import UserError
from .evaluate import BATCH_SIZE, SCORES
from .grids import FLOAT_INPUT_BITS, GRIDS, check_bits
from .oaq import METHODS
from .samplers import SAMPLERS
from .schema import parse, read_document, to_dict
from .seeds import SEEDS
from .sensitivity import METRICS

FINETUNE_MODES = ("none", "scale", "qat")
TRAIN_SPLITS = ("finetune", "all")
OUTLIER_RULES = ("output_error", "weight_mse")
DATA_KINDS = ("cifar10", "imagefolder", "python")
MAX_TRIALS = 100_000


@dataclass
class ModelConfig:
    """A registered model (`name`), or the user's (`factory`, "package.module:function" with `kwargs`)."""

    name: str | None = None
    factory: str | None = None  # looked up beside the study file first, then among installed packages
    kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None  # None: random initialisation (only useful for smoke tests)
    leaf_modules: list[str] = field(default_factory=list)  # submodules torch.fx calls whole (they stay in float)

    def __post_init__(self):
        if (self.name is None) == (self.factory is None):
            raise UserError("[model] needs exactly one of name (a registered model) or factory (package.module:function)")
        if self.factory is not None and ":" not in self.factory:
            raise UserError(f"model factory must be package.module:function, got {self.factory!r}")
        if self.kwargs and self.factory is None:
            raise UserError("[model] kwargs go with factory; a registered model takes none")

    @property
    def label(self) -> str:
        """What plans name as their model: the registry name, or the factory's."""
        return self.name or self.factory


@dataclass
class DataConfig:
    """Where the images come from: CIFAR-10, class folders (ImageFolder), or the user's loader function."""

    kind: str = "cifar10"  # cifar10 | imagefolder | python
    root: str | None = None  # cifar10: the folder holding cifar-10-batches-py/ ($OAQ_DATA_ROOT); imagefolder: its root
    search_size: int = 5000  # the training set's last images: the search objective's and calibration's data
    test_images: int | None = None  # None: the whole test split (what results report); fewer for a quick look
    download: bool = False
    # imagefolder: class folders under root/train and root/test (or root/val); without a test folder,
    # the last test_fraction of each class of train is the test split
    train: str = "train"
    test: str | None = None  # None: "test" or "val", whichever exists
    test_fraction: float = 0.2
    resize: int | None = None  # shorter side to this many pixels (None: images as they are)
    crop: int | None = None  # then a centred square crop of this size; images must end at one size
    mean: list[float] = field(default_factory=lambda: list(MEAN))  # per channel, of pixels scaled to [0, 1]
    std: list[float] = field(default_factory=lambda: list(STD))
    # python: "package.module:function" returning {"search" or "train": loader, "finetune": loader, "test": loader}
    loader: str | None = None

    def __post_init__(self):
        if self.kind not in DATA_KINDS:
            raise UserError(f"data kind must be one of {', '.join(DATA_KINDS)}, got {self.kind!r}")
        if self.kind == "python" and (self.loader is None or ":" not in self.loader):
            raise UserError("data kind 'python' needs loader = \"package.module:function\"")
        if self.kind == "imagefolder" and self.root is None:
            raise UserError("data kind 'imagefolder' needs root: the folder holding train/ (and test/ or val/)")
        if self.search_size < 1:
            raise UserError(f"search_size must be at least 1, got {self.search_size}")
        if self.test_images is not None and self.test_images < 1:
            raise UserError(f"test_images must be at least 1 (or left out for the whole test split), got {self.test_images}")
        if not 0 < self.test_fraction < 1:
            raise UserError(f"test_fraction must be between 0 and 1, got {self.test_fraction}")
        for name in ("resize", "crop"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserError(f"{name} must be a positive number of pixels, got {getattr(self, name)}")
        if len(self.mean) != len(self.std) or not all(s > 0 for s in self.std):
            raise UserError(f"mean and std need one value per channel and std > 0, got {self.mean} and {self.std}")


@dataclass
class SearchConfig:
    n_trials: int = 20
    weight_bits: list[int] = field(default_factory=lambda: [2, 3, 4, 5, 6, 8])
    first_last_bits: int | None = 8  # pin the first and last layer (None: search them too)
    # every layer's input at this many bits (ends at >= first_last_bits); a list: searched per tie group, 32
    # in it letting a group's input stay float (what a runtime with integer kernels for 8 bits trades)
    activation_bits: int | list[int] | None = None
    method: str = "oaq"
    grid: str | list[str] = "uniform"  # a list: each tie group takes whichever measures best at its bits
    per_channel: bool = False
    eval_images: int = 1000  # images of the search split scored per trial
    score: str = "accuracy"  # accuracy | kl: minus the KL from full precision's predictions, far less noisy on few images
    screen_images: int = 0  # >0: score this many first, and let Optuna prune hopeless trials there
    finalists: int = 3  # the best few trials re-scored on the whole search split; the best of those wins (1: off)
    # ... but replaces the integer-program seed only if better by this many standard errors (paired, per image)
    seed_margin: float = 1.0
    bn_correction: bool = True  # match BatchNorm statistics to full precision (one search-split batch)
    outlier_rule: str = "output_error"  # how (s, T) are chosen: layer output error on search images, or weight MSE
    batch_size: int = BATCH_SIZE  # images per inference batch
    seed: int = 0
    sampler: str = "tpe"  # tpe | random (a baseline)
    local_search: float = 0.5  # share of tpe's trials spent on untried neighbours of the best plan (0: plain TPE)
    fill_budget: bool = True  # raise bits where a sampled plan leaves budget unused (single objective only)
    cost_model: str = "memory"
    sensitivity_metric: str = "hessian"  # the per-layer table, computed only where read: pruning; seeds and repair when not measured
    measured_sensitivity_images: int = 512  # >0: seeds and repair use each group's output KL on these images; 0: table
    prune_sensitivity: float | None = None  # drop a group's bit-widths whose sensitivity is above this
    seeds: list[str] = field(default_factory=lambda: ["integer_program", "greedy", "uniform"])
    pareto_metric: str | None = None  # set (e.g. "weight_bytes") for accuracy-vs-cost multi-objective
    heartbeat_seconds: int = 30  # a worker silent for grace_seconds has its trial retried
    grace_seconds: int = 90

    def __post_init__(self):
        if not self.weight_bits:
            raise UserError("weight_bits must list at least one bit-width")
        for bits in self.weight_bits:
            check_bits(bits, "weight_bits")
        if self.first_last_bits is not None:
            check_bits(self.first_last_bits, "first_last_bits")
        if self.activation_bits == []:
            raise UserError("activation_bits lists no bit-width: give at least one, or leave it out (full precision)")
        for bits in self.searched_activation_bits or []:
            if bits != FLOAT_INPUT_BITS:
                check_bits(bits, f"activation_bits (or {FLOAT_INPUT_BITS}, a float input)")
        if self.activation_bits is not None and not self.searched_activation_bits:
            check_bits(self.activation_bits, "activation_bits (a list of them may hold 32, a float input)")
        if self.method not in METHODS:
            raise UserError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        for grid in self.grids:
            if grid not in GRIDS:
                raise UserError(f"grid must be one of {', '.join(GRIDS)} (or a list of them), got {grid!r}")
        if not self.grids or len(set(self.grids)) < len(self.grids):
            raise UserError(f"grid must name at least one grid, each once, got {self.grid!r}")
        if (len(self.grids) > 1 or self.searched_activation_bits) and not self.measured_sensitivity_images:
            raise UserError("searching grids or activation bits ranks each group's settings by measured sensitivity: "
                            "set measured_sensitivity_images above 0")
        for name in ("n_trials", "eval_images", "finalists", "batch_size", "heartbeat_seconds", "grace_seconds"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.n_trials > MAX_TRIALS:
            raise UserError(f"n_trials must be at most {MAX_TRIALS} (each is a queued trial in the study), "
                            f"got {self.n_trials}")
        if not self.seed_margin >= 0:
            raise UserError(f"seed_margin must be 0 (the best re-scored finalist wins) or more, got {self.seed_margin}")
        if self.measured_sensitivity_images < 0:
            raise UserError(f"measured_sensitivity_images must be 0 (use the sensitivity table) or more, "
                            f"got {self.measured_sensitivity_images}")
        if self.score not in SCORES:
            raise UserError(f"score must be one of {', '.join(SCORES)}, got {self.score!r}")
        if self.score != "accuracy" and self.screen_images:
            raise UserError(f"screen_images prunes by the binomial noise of an accuracy: with score = {self.score!r} "
                            f"set screen_images = 0")
        if self.outlier_rule not in OUTLIER_RULES:
            raise UserError(f"outlier_rule must be one of {', '.join(OUTLIER_RULES)}, got {self.outlier_rule!r}")
        if not 0.0 <= self.local_search <= 1.0:
            raise UserError(f"local_search is the share of trials spent near the best plan: a number in [0, 1], "
                            f"got {self.local_search}")
        SAMPLERS.check(self.sampler, "sampler")
        METRICS.check(self.sensitivity_metric, "sensitivity_metric")
        for seed in self.seeds:
            SEEDS.check(seed, "seeds")

    @property
    def grids(self) -> list[str]:
        """The grids a tie group may take: `grid`, or each grid it lists."""
        return [self.grid] if isinstance(self.grid, str) else list(self.grid)

    @property
    def searched_activation_bits(self) -> list[int] | None:
        """The input bit-widths searched per tie group (`activation_bits` a list), else None."""
        return sorted(set(self.activation_bits)) if isinstance(self.activation_bits, list) else None

    @property
    def default_activation_bits(self) -> int | None:
        """Every layer's input bits when they are not searched; else the widest, for the pinned ends."""
        return max(self.activation_bits) if isinstance(self.activation_bits, list) else self.activation_bits


@dataclass
class FinetuneConfig:
    """The final fine-tune of the chosen plan (oaq_search.finetuning)."""

    mode: str = "none"  # none | scale (OAQ's Algorithm 1: only s and activation ranges learn) | qat (weights too)
    epochs: int = 3
    batch_size: int = 128
    learning_rate: float | None = None  # qat weights (SGD) or scale's BN affine (Adam); None: 0.005 / 0.001
    quantizer_learning_rate: float = 0.01  # s logits and activation ranges (Adam)
    learn_activation_ranges: bool = True
    # scale: also train BatchNorm's affine (gamma, beta), statistics frozen; false is Algorithm 1 exactly.
    # Measured on ResNet-20 W4A4 (1 epoch): s and ranges alone 86.1 %, with the affine 87.1 % (PTQ 86.5 %).
    learn_batchnorm: bool = True
    distill: bool = True  # add knowledge distillation from the full-precision model to the labels' loss
    distill_temperature: float = 4.0
    images_per_epoch: int | None = None  # None: the whole training set (train_split) each epoch
    # finetune | all: add the search split. A checkpoint has often memorised its own training images; the
    # search split's are new to it. With `all` the per-epoch search-split accuracy is no longer held out.
    train_split: str = "finetune"
    channels_last: bool = True  # measured 25 % faster on CPU (benchmarks/finetune_speed.py)
    device: str = "auto"  # where the training steps run: auto (cuda when there is one) | cpu | cuda[:N]
    seed: int = 0

    def __post_init__(self):
        if self.mode not in FINETUNE_MODES:
            raise UserError(f"finetune mode must be one of {', '.join(FINETUNE_MODES)}, got {self.mode!r}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"finetune {name} must be at least 1, got {getattr(self, name)}")
        if self.train_split not in TRAIN_SPLITS:
            raise UserError(f"finetune train_split must be one of {', '.join(TRAIN_SPLITS)}, got {self.train_split!r}")
        if self.images_per_epoch is not None and self.images_per_epoch < 1:
            raise UserError(f"finetune images_per_epoch must be at least 1, got {self.images_per_epoch}")
        check_device(self.device, "finetune")
        for name in ("learning_rate", "quantizer_learning_rate", "distill_temperature"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise UserError(f"finetune {name} must be positive, got {value}")


@dataclass
class PtqConfig:
    """How the chosen plan becomes a model post-training: rounding to nearest, or block reconstruction
    (oaq_search.reconstruction: AdaRound's learned rounding per residual block, QDrop's dropping)."""

    reconstruct: bool = False
    images: int = 1024  # calibration images of the search split the blocks are fitted on
    iterations: int = 1000  # optimizer steps per block
    batch_size: int = 32
    learn_rounding: bool = True  # each weight's rounding direction (AdaRound)
    learn_activation_ranges: bool = True  # the activation quantizers' ranges (step sizes)
    drop_probability: float = 0.5  # QDrop: each activation value passes unquantized with this probability
    rounding_weight: float = 0.01  # AdaRound's regularizer pulling each rounding to down or up
    learning_rate: float = 0.01  # Adam, rounding logits (ResNet-20 W2A8, 1000 steps: 0.01 -3.3 points, 0.003 -5.6)
    range_learning_rate: float = 0.001  # Adam, activation ranges
    device: str = "auto"  # auto (cuda when there is one) | cpu | cuda[:N]
    seed: int = 0
    # reconstructions with seeds `seed`, `seed` + 1, ...; the one most accurate on the search images past `images`
    # is kept (ResNet-20 W4A4 reconstructed with seeds 0, 1, 2 scored -0.12, -0.55, -0.84 points on test)
    restarts: int = 1
    # `run`: reconstruct every re-scored finalist and pick among them by their score on the search images the
    # reconstruction does not fit on (one reconstruction per finalist; ResNet-20 at 2.5 bits: +0.43 on test)
    finalists: bool = False

    def settings(self) -> dict | None:
        """What the reconstructed model depends on (not where it ran); None when rounding to nearest."""
        return {k: v for k, v in to_dict(self).items() if k not in ("device", "finalists")} if self.reconstruct else None

    def __post_init__(self):
        for name in ("images", "iterations", "batch_size", "restarts"):
            if getattr(self, name) < 1:
                raise UserError(f"ptq {name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.drop_probability < 1:
            raise UserError(f"ptq drop_probability must be in [0, 1), got {self.drop_probability}")
        for name in ("rounding_weight", "learning_rate", "range_learning_rate"):
            if not getattr(self, name) >= 0:
                raise UserError(f"ptq {name} must not be negative, got {getattr(self, name)}")
        check_device(self.device, "ptq")


def check_device(device: str, section: str) -> None:
    if not (device in ("auto", "cpu", "cuda") or device.startswith("cuda:")):
        raise UserError(f"{section} device must be auto, cpu, cuda or cuda:N, got {device!r}")


@dataclass
class StudyConfig:
    name: str
    model: ModelConfig
    data: DataConfig = field(default_factory=DataConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    ptq: PtqConfig = field(default_factory=PtqConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    budget: dict[str, str] = field(default_factory=dict)  # e.g. {"memory": "98KiB"}
    storage: str | None = None  # Optuna storage URL; None: SQLite file in output_dir
    output_dir: str | None = None  # None: runs/<name>
    folder = Path(".")  # not a key: the study file's folder, where [model] factory and [data] loader modules are found

    def __post_init__(self):
        parse_budget(self.budget)  # validates names and units now, not mid-run

    @property
    def output_path(self) -> Path:
        return Path(self.output_dir or f"runs/{self.name}")

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{self.output_path / 'study.db'}"


def validate(config: StudyConfig) -> StudyConfig:
    """Check a config again after its fields were changed (command-line overrides): every section's rules."""
    for section in (config.model, config.data, config.search, config.ptq, config.finetune, config):
        section.__post_init__()
    return config


def load_study_config(path: str | Path) -> StudyConfig:
    config = parse(StudyConfig, read_document(path, "study file"), f"study file {path}")
    config.folder = Path(path).parent
    return config


def dump_study_config(config: StudyConfig) -> str:
    return tomli_w.dumps(to_dict(config))
