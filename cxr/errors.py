"""User-facing errors: one clear line naming the file or field and the problem.

The CLI catches :class:`CxrError` and prints ``cxr: error: <message>`` with a non-zero exit,
never a traceback. Library code raises these for bad *input*; programming errors stay ordinary
exceptions so they keep their tracebacks.
"""

from __future__ import annotations

from pathlib import Path


class CxrError(Exception):
    """Base class for errors caused by the user's input (files, configs, arguments)."""


class DataError(CxrError):
    """A problem with one input file or field: ``str(err)`` is ``"<where>: <problem>"``."""

    def __init__(self, where: str | Path, problem: str):
        self.where = str(where)
        self.problem = problem
        super().__init__(f"{self.where}: {problem}")

    def __reduce__(self):
        # raised in a worker process, it reaches the parent pickled: rebuild it from its parts
        return type(self), (self.where, self.problem)


class ConfigError(CxrError):
    """A malformed config, an unknown key or an invalid value."""
