"""ONNX Runtime as the judge of a deployed model: its accuracy, which kernels it runs, its latency."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from .data import ImageSplit
from .evaluate import paired_difference

INTEGER_KERNELS = ("QLinearConv", "QGemm", "QLinearMatMul", "ConvInteger", "MatMulInteger")
FLOAT_KERNELS = ("Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul")
LATENCY_ROUNDS = 50  # timed runs per model and batch size


def session(path: str | Path, threads: int = 1, optimized_path: str | Path | None = None, spinning: bool = True):
    """An ONNX Runtime CPU session with `threads` intra-op threads (all optimizations on). `spinning=False`:
    its threads sleep between runs instead of spinning, which sessions timed in alternation need (another
    session's spinning threads took the cores: ResNet-56 float ran 10x slower after an int8 model)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # no warnings about initializers the optimizer dropped
    if optimized_path is not None:
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(optimized_path)
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_logits(path: str | Path, split: ImageSplit, batch_size: int = 100, threads: int = 1) -> torch.Tensor:
    """The ONNX model's outputs for every image of `split`, (N, classes)."""
    runner = session(path, threads)
    name = runner.get_inputs()[0].name
    return torch.cat([torch.from_numpy(runner.run(None, {name: images.float().contiguous().numpy()})[0])
                      for images, _ in split.batches(batch_size)])


def kernel_counts(path: str | Path) -> dict[str, int]:
    """Integer and float conv/linear kernels in the graph ONNX Runtime optimizes `path` into."""
    import onnx

    with tempfile.TemporaryDirectory() as scratch:
        optimized = Path(scratch) / "optimized.onnx"
        session(path, optimized_path=optimized)
        ops = [node.op_type for node in onnx.load(str(optimized)).graph.node]
    return {"integer": sum(op in INTEGER_KERNELS for op in ops), "float": sum(op in FLOAT_KERNELS for op in ops)}


def paired_latency(paths: dict[str, str | Path], images: torch.Tensor | dict[str, torch.Tensor], threads: int = 2,
                   rounds: int = LATENCY_ROUNDS, runs_per_turn: int = 1) -> dict[str, float]:
    """Median seconds per run of each model on `images` (one batch for all, or one per label), the models
    timed in alternation round by round, so a noisy machine slows them alike. `runs_per_turn` runs each
    model that many times in a row per round and times the last: with many models alternating, a model's
    first run after the others finds its memory out of the caches, which a deployed model running on its
    own would not."""
    runners = {label: session(path, threads, spinning=False) for label, path in paths.items()}
    inputs = images if isinstance(images, dict) else dict.fromkeys(runners, images)
    feeds = {label: {runner.get_inputs()[0].name: inputs[label].float().contiguous().numpy()}
             for label, runner in runners.items()}
    for label, runner in runners.items():  # warm-up: allocations, kernel selection
        for _ in range(3):
            runner.run(None, feeds[label])
    times = {label: [] for label in runners}
    for _ in range(rounds):
        for label, runner in runners.items():
            for _ in range(runs_per_turn - 1):
                runner.run(None, feeds[label])
            started = time.perf_counter()
            runner.run(None, feeds[label])
            times[label].append(time.perf_counter() - started)
    return {label: statistics.median(values) for label, values in times.items()}


def accuracy_change(deployed: torch.Tensor, planned: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Deployed minus planned top-1 accuracy in points, and its standard error over the images (paired):
    how large a change the images that switched class make by chance alone."""
    right = lambda outputs: 100.0 * (outputs.argmax(1) == labels.cpu()).double()  # noqa: E731
    return paired_difference(right(deployed), right(planned))


def agreement(first: torch.Tensor, second: torch.Tensor) -> float:
    """The share of images two models give the same top-1 class."""
    return float((first.argmax(1) == second.argmax(1)).double().mean())
