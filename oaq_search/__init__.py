"""oaq-search: hardware-aware mixed-precision quantization search with outlier-aware quantization.

`search(model, loader, budget=...)` is the verb for any model and data. The pipeline, one module per
stage: models -> graph -> oaq/grids/activations (quantizers) -> hwmodels (cost) -> engine (objective,
seeds, samplers, queue) -> plan -> finetune -> packing. `pipeline` runs study files through the engine.
The names below load on first use, so the command line starts without importing torch.
"""

from importlib import import_module

__version__ = "0.1.0"

_HOMES = {  # public name -> the module that defines it
    "SearchResult": "api", "search": "api",
    "load_checkpoint": "checkpoints",
    "FinetuneConfig": "config", "PtqConfig": "config", "StudyConfig": "config", "load_study_config": "config",
    "load_cifar10": "data",
    "export_onnx": "deploy",
    "UserError": "errors",
    "accuracy": "evaluate",
    "calibrate_activations": "fake_quant", "quantize_": "fake_quant",
    "finetune": "finetuning",
    "LayerGraph": "graph", "build_layer_graph": "graph",
    "WeightQuantizer": "oaq",
    "layer_graph": "pipeline", "load_model": "pipeline", "run_study": "pipeline",
    "LayerPlan": "plan", "Plan": "plan",
    "PlanFactory": "planning",
    "post_training_quantize": "ptq",
    "reconstruct": "reconstruction",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'oaq_search' has no attribute {name!r}")
    return getattr(import_module(f".{_HOMES[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))
