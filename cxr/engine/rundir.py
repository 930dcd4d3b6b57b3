"""Run folders: ``runs/00001-<name>/`` holding everything needed to understand a run later.

``config.yaml`` is the resolved config (``--config`` it back to rerun); ``run.json`` records
where and with what it ran: git revision, package versions, python, device, seed, command.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import re
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from cxr.data.io import atomic_write_text
from cxr.engine.config import config_to_dict, save_config

_NUMBERED = re.compile(r"^(\d{5,})-")
PACKAGES = ("torch", "torchvision", "numpy", "cxr-gan")


def _clean_name(name: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", name.strip()).strip("-.")
    return name or "run"


def next_run_dir(base: str | Path, name: str) -> Path:
    """Create and return ``base/NNNNN-name`` with the next free number.

    ``mkdir`` without ``exist_ok`` is the lock: two runs starting together get different folders.
    """
    base = Path(base)
    base.mkdir(parents=True, exist_ok=True)
    taken = [int(m.group(1)) for p in base.iterdir() if (m := _NUMBERED.match(p.name))]
    number = max(taken, default=0) + 1
    name = _clean_name(name)
    while True:
        path = base / f"{number:05d}-{name}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            number += 1


def git_revision(where: str | Path | None = None) -> str | None:
    """``<sha>`` (with ``-dirty`` when the tree has changes) of the checkout holding the code."""
    cwd = Path(where) if where else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}-dirty" if dirty else sha


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for n in names:
        try:
            versions[n] = importlib.metadata.version(n)
        except importlib.metadata.PackageNotFoundError:
            versions[n] = None
    return versions


def device_name(device: torch.device | str) -> str:
    dev = device if isinstance(device, torch.device) else torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return f"{dev} ({torch.cuda.get_device_name(dev)})"
    if dev.type == "cpu":
        return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return str(dev)


def run_info(cfg: Any, device: torch.device | str, extra: dict | None = None) -> dict[str, Any]:
    """The facts ``run.json`` records."""
    cfg_dict = config_to_dict(cfg)
    info: dict[str, Any] = {
        "start_time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv else [],
        "git_revision": git_revision(),
        "python": platform.python_version(),
        "packages": package_versions(),
        "device": device_name(device),
        "seed": cfg_dict.get("seed") if isinstance(cfg_dict, dict) else None,
        "host": platform.node(),
    }
    if extra:
        info.update(extra)
    return info


def write_run_info(run_dir: str | Path, cfg: Any, device: torch.device | str,
                   extra: dict | None = None) -> dict[str, Any]:
    """Write ``config.yaml`` and ``run.json`` into ``run_dir`` (atomically); return the info.

    On a resumed run the previous ``run.json`` is kept as ``run-<n>.json`` history.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    info = run_info(cfg, device, extra)
    target = run_dir / "run.json"
    if target.exists():
        n = 1
        while (run_dir / f"run-{n}.json").exists():
            n += 1
        target.replace(run_dir / f"run-{n}.json")
    atomic_write_text(target, json.dumps(info, indent=2, default=str) + "\n")
    return info
