"""What every benchmark records beside its numbers: the command, the code, the date, the machine."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch

REPOSITORY = Path(__file__).resolve().parents[1]
RESULTS = REPOSITORY / "benchmarks" / "results"
SHARED = REPOSITORY.parent / "shared"
CHECKPOINTS = REPOSITORY / "benchmarks" / "checkpoints"  # the reference models trained here


def checkpoint(model: str) -> Path:
    """A model's JPEG-domain checkpoint: the shared ResNets, else the reference models trained here."""
    shared = SHARED / f"models/{model}_cifar10jpeg.pt"
    return shared if shared.is_file() else CHECKPOINTS / f"{model}_cifar10jpeg.pt"


def machine() -> dict[str, object]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "torch": torch.__version__, "python": platform.python_version()}


def code_version() -> str | None:
    """The commit checked out, with "+ changes" when tracked code differs from it (results files aside);
    None outside a git checkout. Read when a benchmark starts, so later commits do not relabel its run."""
    def git(*arguments: str) -> str:
        return subprocess.run(["git", *arguments], cwd=REPOSITORY, capture_output=True, text=True, check=True).stdout
    try:
        commit = git("rev-parse", "--short", "HEAD").strip()
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results").strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + (" + changes" if changed else "")


CODE = code_version()


def invocation() -> str:
    """This process's command line as run from the repository root (whatever folder it was started
    in), shell-quoted so it copy-pastes."""
    script = Path(sys.argv[0]).resolve()
    if script.is_relative_to(REPOSITORY):
        script = script.relative_to(REPOSITORY)
    return shlex.join([Path(sys.executable).name, str(script), *sys.argv[1:]])


def write_results(name: str, rows: list[dict], markdown: str, extra: dict | None = None,
                  command: str | None = None) -> Path:
    """benchmarks/results/<name>.json and .md, each with the command (default: this one), code, date and machine."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    header = {"command": command or invocation(), "code": CODE,
              "date": datetime.date.today().isoformat(), "machine": machine(), **(extra or {})}
    (RESULTS / f"{name}.json").write_text(json.dumps({**header, "rows": rows}, indent=2) + "\n")
    gpu = f", GPU {header['machine']['gpu']}" if header["machine"]["gpu"] else ""
    meta = (f"Command: `{header['command']}`  \nCode: {CODE or 'unknown'}  \nDate: {header['date']}  \n"
            f"Machine: {header['machine']['cpu']}, {header['machine']['cores']} cores, "
            f"{header['machine']['torch_threads']} torch threads{gpu}, torch {header['machine']['torch']}\n\n")
    path = RESULTS / f"{name}.md"
    path.write_text(meta + markdown + "\n")
    return path
