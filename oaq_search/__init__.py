"""oaq-search: hardware-aware mixed-precision quantization search with outlier-aware quantization.

`search(model, loader, budget=...)` is the verb for any model and data. The pipeline, one module per
stage: models -> graph -> oaq/grids/activations (quantizers) -> hwmodels (cost) -> engine (objective,
seeds, samplers, queue) -> plan -> finetune -> packing. `pipeline` runs study files through the engine.
"""

__version__ = "0.1.0"

from .api import SearchResult, search  # noqa: E402
from .checkpoints import load_checkpoint  # noqa: E402
from .config import FinetuneConfig, StudyConfig, load_study_config  # noqa: E402
from .data import load_cifar10  # noqa: E402
from .errors import UserError  # noqa: E402
from .evaluate import accuracy  # noqa: E402
from .fake_quant import calibrate_activations, quantize_  # noqa: E402
from .finetune import finetune  # noqa: E402
from .graph import LayerGraph, build_layer_graph  # noqa: E402
from .oaq import WeightQuantizer  # noqa: E402
from .pipeline import layer_graph, load_model, run_study  # noqa: E402
from .plan import LayerPlan, Plan  # noqa: E402
from .planning import PlanFactory  # noqa: E402
from .ptq import post_training_quantize  # noqa: E402

__all__ = [
    "FinetuneConfig", "LayerGraph", "LayerPlan", "Plan", "PlanFactory", "SearchResult", "StudyConfig", "UserError",
    "WeightQuantizer",
    "accuracy", "build_layer_graph", "calibrate_activations", "finetune", "layer_graph", "load_checkpoint", "load_cifar10",
    "load_model", "load_study_config", "post_training_quantize", "quantize_", "run_study", "search",
]
