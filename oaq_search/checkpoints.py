"""Loading checkpoints safely: `weights_only=True` always, and one-line errors for bad files."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

from .errors import UserError

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")  # common training-script layouts
_MAX_KEYS_SHOWN = 5


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, unwrapped and without a DataParallel `module.` prefix."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist: check the path in --checkpoint or the study file")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first_line = str(error).strip().splitlines()[0]
        raise UserError(f"checkpoint {path} is refused: it holds more than tensors ({first_line})") from error
    except Exception as error:  # torch raises many types for damaged files (RuntimeError, KeyError, IndexError, ...)
        raise UserError(f"checkpoint {path} cannot be read (truncated or corrupt?): {_first_line(error)}") from None
    if isinstance(loaded, dict):
        for key in _WRAPPER_KEYS:
            if isinstance(loaded.get(key), dict):
                loaded = loaded[key]
                break
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise UserError(f"checkpoint {path} holds no state_dict of tensors: save `model.state_dict()`")
    return {key.removeprefix("module."): value for key, value in loaded.items()}


def load_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load `path` into `model` strictly; mismatches name the file and the offending keys."""
    state_dict = read_state_dict(path)
    expected = model.state_dict()
    optional = {k for k in expected if k.endswith("num_batches_tracked")}
    missing = sorted(set(expected) - set(state_dict) - optional)
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = sorted(
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    )
    problems = [
        f"{label} {_abbreviate(keys)}"
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong_shape))
        if keys
    ]
    if problems:
        raise UserError(
            f"checkpoint {path} does not match the model ({'; '.join(problems)}): is it for another architecture?"
        )
    broken = [key for key, value in state_dict.items() if value.is_floating_point() and not value.isfinite().all()]
    if broken:
        raise UserError(f"checkpoint {path} holds NaN or infinite values in {_abbreviate(broken)}: the training that "
                        f"wrote it diverged; use an earlier checkpoint")
    model.load_state_dict(state_dict, strict=False)
    return model


def _abbreviate(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_KEYS_SHOWN])
    return f"[{shown}{f', ... {len(keys) - _MAX_KEYS_SHOWN} more' if len(keys) > _MAX_KEYS_SHOWN else ''}]"


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
