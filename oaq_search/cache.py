"""Results computed from a model's weights under some settings, kept on disk so a warm run reads them.

A file is named by a hash of the tensors and the settings, so a change to either is a new entry
and nothing stale is read. `$OAQ_CACHE_DIR` moves the folder; `cache_dir=None` turns caching off.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from .files import write_text_atomically

CACHE_ENV = "OAQ_CACHE_DIR"


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "oaq-search") / "sensitivity"


def cache_file(cache_dir: str | Path | None, tensors: Mapping[str, torch.Tensor], settings: Mapping,
               prefix: str = "") -> Path | None:
    """Where a result computed from `tensors` under `settings` is cached; None when caching is off.

    `cache_dir="default"` is `default_cache_dir()`; the name is a hash of both."""
    if cache_dir is None:
        return None
    digest = _tensors_hash(tensors)
    digest.update(json.dumps(settings, sort_keys=True).encode())
    folder = default_cache_dir() if cache_dir == "default" else Path(cache_dir)
    return folder / f"{prefix}{digest.hexdigest()[:24]}.json"


def cached_json(tensors: Mapping[str, torch.Tensor], settings: Mapping, prefix: str, compute: Callable[[], Any],
                cache_dir: str | Path | None = "default") -> Any:
    """`compute()` (a JSON value), or what it returned before for the same tensors and settings (a file
    that does not parse is computed again and replaced: a cache is never worth an error)."""
    path = cache_file(cache_dir, tensors, settings, prefix)
    if path is not None and path.is_file():
        try:
            return json.loads(path.read_text())
        except ValueError:
            pass
    value = compute()
    if path is not None:
        write_text_atomically(path, json.dumps(value) + "\n")
    return value


def weights_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """A short hash of named tensors (a state_dict): whether two models hold the same weights."""
    return _tensors_hash(tensors).hexdigest()[:16]


def _tensors_hash(tensors: Mapping[str, torch.Tensor]):
    digest = hashlib.sha256()
    for name, tensor in tensors.items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest
