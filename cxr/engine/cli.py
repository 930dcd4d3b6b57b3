"""The arguments every trainer shares, and turning them into a config and a run folder.

::

    cxr train-gan cyclegan --config configs/cyclegan_nlm.yaml train.batch_size=4 data.size=128
    cxr train-gan cyclegan --run-dir runs/00003-cyclegan --resume
    cxr train-gan cyclegan --dry-run train.steps=10      # print the resolved config, exit

A trainer's ``func(args)`` does::

    cfg = resolve_run(args, CycleGANConfig, DEFAULT_CONFIG)
    if print_dry_run(args, cfg):
        return 0
    run_dir = prepare_run_dir(args, "cyclegan")
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, TypeVar

import torch.distributed as dist

from cxr.engine.checkpoint import latest
from cxr.engine.config import format_config, load_config
from cxr.engine.distributed import DistInfo
from cxr.engine.rundir import next_run_dir
from cxr.errors import ConfigError

T = TypeVar("T")

RUNS_DIR = Path("runs")


def add_run_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--config``, ``--run-dir``, ``--resume``, ``--dry-run`` and ``key=value`` overrides."""
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="YAML config file (default: the trainer's own)")
    parser.add_argument("--run-dir", metavar="DIR", default=None,
                        help=f"run folder (default: a new numbered folder under {RUNS_DIR}/)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --run-dir from its last complete checkpoint")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides with dotted keys, e.g. train.batch_size=4 data.size=64")
    return parser


def resolve_run(args: argparse.Namespace, cls: type[T], default_config: Path | None = None) -> T:
    """The config from ``--config`` (or, on ``--resume``, the run's saved ``config.yaml``, or
    else ``default_config``) with the command-line overrides applied."""
    path: Path | None = Path(args.config) if getattr(args, "config", None) else None
    run_dir = getattr(args, "run_dir", None)
    if path is None and getattr(args, "resume", False) and run_dir and (Path(run_dir) / "config.yaml").exists():
        path = Path(run_dir) / "config.yaml"
    if path is None:
        path = default_config
    return load_config(cls, path, list(getattr(args, "overrides", None) or ()))


def print_dry_run(args: argparse.Namespace, cfg: object) -> bool:
    """With ``--dry-run``, print the resolved config to stdout and return True (the caller exits)."""
    if not getattr(args, "dry_run", False):
        return False
    sys.stdout.write(format_config(cfg))
    sys.stdout.flush()
    return True


def prepare_run_dir(args: argparse.Namespace, name: str, runs_dir: Path = RUNS_DIR,
                    info: DistInfo | None = None) -> Path:
    """The run folder to write into (in a DDP run: chosen by rank 0, shared with the others).

    - ``--resume``: ``--run-dir`` must exist and hold a complete checkpoint.
    - ``--run-dir DIR``: used as given; refused if it already holds checkpoints (resume it or
      choose another folder, so a finished run is never overwritten by accident).
    - neither: a new ``runs/NNNNN-<name>`` folder.
    """
    if info is not None and info.distributed:
        # Only rank 0 checks and creates; the others receive its answer (or its error).
        box: list = [None]
        if info.is_main:
            try:
                box[0] = str(_prepare(args, name, runs_dir))
            except ConfigError as e:
                box[0] = e
        dist.broadcast_object_list(box, src=0)
        if isinstance(box[0], ConfigError):
            raise box[0]
        return Path(box[0])
    return _prepare(args, name, runs_dir)


def prepare_checked_run_dir(args: argparse.Namespace, name: str, check_inputs: Callable[[], None],
                            runs_dir: Path = RUNS_DIR) -> Path:
    """:func:`prepare_run_dir` for a trainer command, with its inputs checked in the right order.

    A multi-process launch must name its folder (each rank would otherwise number its own). A
    resumed run's folder is checked first (nothing is created for it); a new numbered folder
    is made only once ``check_inputs()`` has passed, so a typo in a data path leaves no empty
    run behind.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not getattr(args, "run_dir", None):
        raise ConfigError("a multi-process run needs --run-dir DIR (the same folder for every process)")
    if getattr(args, "resume", False):
        run_dir = prepare_run_dir(args, name, runs_dir)
        check_inputs()
        return run_dir
    check_inputs()
    return prepare_run_dir(args, name, runs_dir)


def _prepare(args: argparse.Namespace, name: str, runs_dir: Path) -> Path:
    run_dir = getattr(args, "run_dir", None)
    if getattr(args, "resume", False):
        if not run_dir:
            raise ConfigError("--resume needs --run-dir DIR (the run to continue)")
        path = Path(run_dir)
        if not path.is_dir():
            raise ConfigError(f"{path}: --resume: no such run folder")
        if latest(path) is None:
            raise ConfigError(f"{path}: --resume: the folder holds no complete checkpoint")
        return path
    if run_dir:
        path = Path(run_dir)
        if latest(path) is not None:
            raise ConfigError(f"{path}: the run folder already holds checkpoints; "
                              "pass --resume to continue it or choose another --run-dir")
        path.mkdir(parents=True, exist_ok=True)
        return path
    return next_run_dir(runs_dir, name)
