"""Files written whole or not at all: another process (a second worker, a resumed run) reading one, or
a kill mid-write, never leaves half a file behind."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from .errors import UserError


def replace_atomically(path: str | Path, write: Callable[[Path], object]) -> Path:
    """`write` a private temporary file beside `path`, then rename it over `path` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")  # per process: writers never share one
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def write_text_atomically(path: str | Path, text: str) -> Path:
    return replace_atomically(path, lambda partial: partial.write_text(text))


def save_atomically(state: object, path: str | Path) -> Path:
    """torch.save, whole or not at all."""
    return replace_atomically(path, lambda partial: torch.save(state, partial))


def check_writable(path: str | Path, what: str) -> Path:
    """Before any work: `path` can be written (its folder made or writable, not itself a folder)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"{what} {path} cannot be written: {error.strerror or error}") from None
    if path.is_dir() or not os.access(path.parent, os.W_OK):
        reason = "it is a folder" if path.is_dir() else f"{path.parent} is not writable"
        raise UserError(f"{what} {path} cannot be written: {reason}; choose another path")
    return path
