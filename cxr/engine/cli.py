"""The arguments every trainer shares, and turning them into a config and a run folder.

::

    cxr train-gan cyclegan --config cyclegan_nlm train.batch_size=4 data.size=128
    cxr train-gan cyclegan --config my.yaml data.a=A --run-dir R data.b=B   # options and overrides in any order
    cxr train-gan cyclegan --run-dir runs/00003-cyclegan --resume
    cxr train-gan cyclegan --dry-run train.steps=10      # print the resolved config, exit
    cxr train-gan cyclegan --list-configs                # the shipped configs' names

``--config`` takes a YAML file or the name of a shipped config (:mod:`cxr.configs`). The
``cxr`` command's parsers are :class:`CommandParser`: a subcommand with ``key=value``
overrides accepts them before, between and after its options, and an argparse error inside a
subcommand prints that subcommand's usage.

A trainer's ``func(args)`` does::

    cfg = resolve_run(args, CycleGANConfig, "cyclegan_nlm")
    if print_dry_run(args, cfg):
        return 0
    run_dir = prepare_run_dir(args, "cyclegan")
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import torch.distributed as dist

from cxr.configs import CONFIG_DIR, config_names, resolve_config
from cxr.engine.checkpoint import latest, load_state
from cxr.engine.config import format_config, load_config
from cxr.engine.distributed import DistInfo
from cxr.engine.rundir import next_run_dir
from cxr.errors import ConfigError, CxrError, DataError

T = TypeVar("T")

RUNS_DIR = Path("runs")
COMMAND_PARSER = "_command_parser"  # the Namespace attribute naming the (sub)command's parser


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser whose subcommands can take options and positionals in any order.

    A parser with ``intermixed = True`` (set by :func:`add_run_arguments`) parses with
    :meth:`~argparse.ArgumentParser.parse_known_intermixed_args`, so ``--config C data.a=A
    --run-dir R data.b=B`` gives every override, wherever it stands. Each parser also records
    itself on the namespace (innermost subcommand first): :func:`parse_command` reports
    arguments nobody recognised with that subcommand's usage, not the top-level one.
    Subparsers are of the same class (``add_subparsers`` makes them so).
    """

    intermixed = False

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        if self.intermixed and not getattr(self, "_intermixing", False):
            self._intermixing = True  # parse_known_intermixed_args calls back into this method
            try:
                namespace, extras = self.parse_known_intermixed_args(args, namespace)
            finally:
                self._intermixing = False
        else:
            namespace, extras = super().parse_known_args(args, namespace)
        if not hasattr(namespace, COMMAND_PARSER):
            setattr(namespace, COMMAND_PARSER, self)
        return namespace, extras


def parse_command(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, but unrecognised arguments are reported (exit 2) with the
    usage of the subcommand they were given to."""
    args, extras = parser.parse_known_args(argv)
    if extras:
        owner = getattr(args, COMMAND_PARSER, None) or parser
        owner.error(f"unrecognized arguments: {' '.join(extras)}")
    if hasattr(args, COMMAND_PARSER):
        delattr(args, COMMAND_PARSER)
    return args


class _ListConfigs(argparse.Action):
    """``--list-configs``: print the shipped configs (name and first comment line), exit 0."""

    def __init__(self, option_strings, dest, prefix: str = "", **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)
        self.prefix = prefix

    def __call__(self, parser, namespace, values, option_string=None):
        for name in config_names(self.prefix):
            lines = (CONFIG_DIR / f"{name}.yaml").read_text(encoding="utf-8").splitlines()
            about = next((ln.lstrip("# ").strip() for ln in lines if ln.startswith("#")), "")
            print(f"{name:<22} {about}".rstrip())
        parser.exit()


def add_run_arguments(parser: argparse.ArgumentParser, configs: str = "") -> argparse.ArgumentParser:
    """Add ``--config``, ``--list-configs``, ``--run-dir``, ``--resume``, ``--dry-run`` and
    ``key=value`` overrides (in any order among the options on a :class:`CommandParser`).

    ``configs``: the prefix of the shipped configs this trainer reads (``"cyclegan_"``).
    """
    if isinstance(parser, CommandParser):
        parser.intermixed = True
    names = ", ".join(config_names(configs))
    parser.add_argument("--config", metavar="CONFIG", default=None,
                        help=f"YAML config file, or the name of a shipped config ({names}); "
                             "default: the trainer's own")
    parser.add_argument("--list-configs", action=_ListConfigs, prefix=configs,
                        help="list the shipped configs and exit")
    parser.add_argument("--run-dir", metavar="DIR", default=None,
                        help=f"run folder (default: a new numbered folder under {RUNS_DIR}/)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --run-dir from its last complete checkpoint")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides with dotted keys, e.g. train.batch_size=4 data.size=64")
    return parser


def resolve_run(args: argparse.Namespace, cls: type[T], default_config: str | Path | None = None,
                family: str | None = None) -> T:
    """The config from ``--config`` (or, on ``--resume``, the run's saved ``config.yaml``, or
    else ``default_config``) with the command-line overrides applied. ``--config`` and
    ``default_config`` are a YAML file or a shipped config's name (:func:`cxr.configs.resolve_config`).

    ``--resume`` never falls back to a default: the run folder must exist, be a run of
    ``family`` (when given; read from ``run.json`` or the latest checkpoint) and keep its
    ``config.yaml`` (unless ``--config`` names one), else one line and nothing written.
    """
    path: Path | None = resolve_config(args.config) if getattr(args, "config", None) else None
    run_dir = getattr(args, "run_dir", None)
    if getattr(args, "resume", False):
        saved = check_resumable(run_dir, family)
        if path is None:
            if not saved.is_file():
                if latest(saved.parent) is None:  # the more basic problem first
                    raise ConfigError(f"{saved.parent}: --resume: the folder holds no complete checkpoint")
                raise DataError(saved, "missing; cannot resume without the run's config")
            path = saved
    if path is None and default_config is not None:
        path = resolve_config(default_config)
    return load_config(cls, path, list(getattr(args, "overrides", None) or ()))


def check_resumable(run_dir: str | Path | None, family: str | None = None) -> Path:
    """Check that ``run_dir`` can be resumed by a trainer of ``family``; its ``config.yaml`` path.

    The folder must exist (that it holds a complete checkpoint is checked with the run folder,
    :func:`prepare_run_dir`); a run of another family (per its ``run.json``, else its latest
    checkpoint) is named, so the user can pick the right trainer.
    """
    if not run_dir:
        raise ConfigError("--resume needs --run-dir DIR (the run to continue)")
    path = Path(run_dir)
    if not path.is_dir():
        raise ConfigError(f"{path}: --resume: no such run folder")
    if family is not None:
        found = run_family(path, latest(path))
        if found is not None and found != family:
            raise ConfigError(f"{path}: --resume: this is a {found} run, not a {family} one; "
                              f"resume it with the {found} trainer")
    return path / "config.yaml"


def run_family(run_dir: Path, checkpoint: Path | None = None) -> str | None:
    """The model family a run folder was trained with: ``run.json``'s ``family``, else the one
    stored with ``checkpoint``; None when neither says."""
    try:
        found = json.loads((run_dir / "run.json").read_text(encoding="utf-8")).get("family")
        if isinstance(found, str):
            return found
    except (OSError, ValueError, AttributeError):
        pass
    if checkpoint is None:
        return None
    try:
        found = load_state(checkpoint).get("extra", {}).get("family")
    except (CxrError, OSError, RuntimeError, AttributeError):
        return None
    return found if isinstance(found, str) else None


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
        if path.exists() and not path.is_dir():
            raise DataError(path, "--run-dir exists and is not a folder")
        args.run_dir_created = not path.exists()
        path.mkdir(parents=True, exist_ok=True)
        return path
    args.run_dir_created = True
    return next_run_dir(runs_dir, name)


@contextmanager
def discard_failed_run(args: argparse.Namespace, run_dir: Path) -> Iterator[None]:
    """Remove ``run_dir`` when the run inside fails with a user error (a :class:`CxrError`, a
    file-system error, Ctrl-C) before its first checkpoint, *if* this command created it: a
    failed start leaves no empty or cache-only folder behind. A folder that existed before, or
    that holds a checkpoint, is never removed."""
    try:
        yield
    except (CxrError, OSError, KeyboardInterrupt):
        if getattr(args, "run_dir_created", False) and latest(run_dir) is None:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
