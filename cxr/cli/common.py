"""Small pieces every subcommand uses: progress bars to stderr, the shared ``--workers``, input checks."""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from tqdm import tqdm

from cxr.data.lungcrop import check_source as check_lung_crop
from cxr.engine.cli import discard_failed_run, prepare_checked_run_dir, print_dry_run, resolve_run
from cxr.engine.distributed import resolve_device
from cxr.engine.guards import EXIT_INTERRUPTED
from cxr.errors import DataError


@contextmanager
def progress_bar(total: int | None = None, desc: str = "", unit: str = "it") -> Iterator[tqdm]:
    """A tqdm bar on stderr that disappears when stderr is not a terminal and stays quiet in CI."""
    bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False,
               disable=not sys.stderr.isatty())
    try:
        yield bar
    finally:
        bar.close()


def worker_count(text: str) -> int:
    """argparse type of ``--workers``: a whole number >= 0 (0: in this process)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0: work in this process), got {n}")
    return n


def add_workers_argument(parser: argparse.ArgumentParser, default: int | None, default_text: str,
                         what: str = "worker processes") -> None:
    """``--workers K``, the same in every command: K >= 0 processes beside this one, 0 meaning
    everything in this process; a negative or non-integer K is an argparse error (exit 2)."""
    parser.add_argument("--workers", type=worker_count, default=default, metavar="K",
                        help=f"{what}; 0: in this process (default: {default_text})")


def check_out_file(path: Path, option: str = "--out") -> None:
    """Refuse an output file path that is an existing folder, or that lies under a regular file,
    before any work: one line naming it (writing would fail only at the end)."""
    if path.is_dir():
        raise DataError(path, f"{option} is a folder; give the path of the file to write")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise DataError(parent, f"not a folder, so {option} {path} cannot be written under it")
            break


def check_trainer_inputs(cfg, keys: tuple[str, ...], hinted: tuple[str, ...] = ("train",)) -> None:
    """A trainer's inputs, checked before its run folder exists: the device, then every path of the
    ``data.<key>`` keys (one path or several); a missing one is one line, with the phantom hint for
    the keys in ``hinted``."""
    resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
    check_lung_crop(getattr(cfg.data, "lung_crop", None))
    for key in keys:
        value = getattr(cfg.data, key)
        for path in (value,) if isinstance(value, (str, Path)) else value:
            if not Path(path).exists():
                hint = (" (create the phantom with `cxr phantom --preset nlm --out data/phantom`, or pass "
                        f"data.{key}=PATH)") if key in hinted else ""
                raise DataError(f"data.{key}={path}", f"no such folder or archive{hint}")


def run_epoch_trainer(args: argparse.Namespace, config_cls: type, default_config: str, family: str,
                      train: Callable[..., Any], command: str,
                      score_line: Callable[[Any, str, dict[str, Any]], str]) -> int:
    """The body of ``cxr train-detector`` and ``cxr train-segmenter``: config, inputs checked before
    the run folder exists (``data.train``, ``val``, ``test``), then :func:`train_and_report` with
    ``score_line(cfg, set name, scores)`` for each scored set."""
    cfg = resolve_run(args, config_cls, default_config, family=family)
    if print_dry_run(args, cfg):
        return 0
    run_dir = prepare_checked_run_dir(args, family, lambda: check_trainer_inputs(cfg, ("train", "val", "test")))
    return train_and_report(args, cfg, run_dir, train, command,
                            lambda result: [score_line(cfg, name, m) for name, m in result.results.items()])


def train_and_report(args: argparse.Namespace, cfg: Any, run_dir: Path, train: Callable[..., Any], command: str,
                     lines: Callable[[Any], Iterable[str]]) -> int:
    """Train an epoch-based family into ``run_dir`` (a failed fresh run's folder removed), then, from
    the main process only, a summary line, ``lines(result)`` and the resume hint when interrupted."""
    main = int(os.environ.get("RANK", "0")) == 0
    with discard_failed_run(args, run_dir):
        result = train(cfg, run_dir, resume=args.resume, echo=lambda m: print(m, file=sys.stderr, flush=True))
    if main:
        state = "interrupted" if result.interrupted else "stopped early" if result.stopped_early else "trained"
        print(f"{state} after {result.epochs_done}/{cfg.train.epochs} epochs ({result.steps_done} steps) "
              f"in {result.seconds:.0f} s; run folder {run_dir}")
        for line in lines(result):
            print(line)
        if result.interrupted:
            print(f"resume with: cxr {command} --run-dir {run_dir} --resume", file=sys.stderr)
    return EXIT_INTERRUPTED if result.interrupted else 0
