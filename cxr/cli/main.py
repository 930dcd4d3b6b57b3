"""The ``cxr`` command: one entry point, one thin module per subcommand.

Each subcommand module defines ``add_parser(subparsers)`` which registers its parser and sets
``func`` (``args -> exit code``). User errors (:class:`~cxr.errors.CxrError`) become one line
on stderr and exit code 2; nothing prints a traceback for bad input. So does an
:class:`OSError` that names a file (a read-only or full file system, a path under a regular
file, permissions): ``cxr: error: <path>: <reason>``; the writers remove their temporary files
and folders on the way out. An OSError naming no file is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
from typing import Sequence

# Idle OpenMP threads sleep instead of spinning. On a CPU shared with other jobs, spinning
# threads of torch's parallel regions fight the other processes for cores: measured on a
# loaded 2-core machine, a CycleGAN step of the demo's size took 10-30x longer with two
# spinning threads than with one. Must be set before torch starts its OpenMP runtime; a
# value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from cxr.engine.cli import CommandParser, parse_command
from cxr.errors import CxrError

# Subcommand modules, in the order `cxr --help` lists them; each must import.
SUBCOMMANDS: tuple[str, ...] = (
    "cxr.cli.demo",
    "cxr.cli.datasets",
    "cxr.cli.phantom",
    "cxr.cli.train_gan",
    "cxr.cli.generate",
    "cxr.cli.translate",
    "cxr.cli.harmonize",
    "cxr.cli.train_classifier",
    "cxr.cli.predict",
    "cxr.cli.explain",
    "cxr.cli.train_segmenter",
    "cxr.cli.segment",
    "cxr.cli.train_detector",
    "cxr.cli.detect",
    "cxr.cli.evaluate",
)


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="cxr",
        description="GAN data augmentation and domain harmonization of chest X-rays.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parse_command(parser, argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return int(args.func(args) or 0)
    except CxrError as e:
        print(f"cxr: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.filename is None:
            raise
        print(f"cxr: error: {os_error_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cxr: interrupted", file=sys.stderr)
        return 130


def os_error_line(e: OSError) -> str:
    """``<path>: <reason>`` for an OSError naming a file: the destination of a failed copy or
    rename when the disk refused the write, else both of its paths."""
    if e.filename2 is None:
        where = str(e.filename)
    elif e.errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT):
        where = str(e.filename2)
    else:
        where = f"{e.filename} -> {e.filename2}"
    reason = e.strerror or (str(e.args[0]) if e.args else type(e).__name__)
    return f"{where}: {reason}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
