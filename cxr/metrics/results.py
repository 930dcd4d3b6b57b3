"""Metric results on disk (one JSON + one CSV per evaluation) and as a terminal table.

JSON is for programs (the study aggregator reads it back with :func:`read_results`), CSV for
spreadsheets and pandas. Both hold the same numbers; undefined ones are ``null`` in JSON and an
empty cell in CSV (never the string ``NaN``, which strict JSON readers reject). Files are
written atomically, so an interrupted run never leaves a half-written result behind.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from cxr.data.io import atomic_write_text
from cxr.errors import DataError

Interval = tuple[float, float]
_RESERVED = ("name", "metrics", "ci_low", "ci_high")
CSV_COLUMNS = ("metric", "value", "ci_low", "ci_high")


def _jsonable(value: Any) -> Any:
    """``value`` with numpy scalars/arrays made plain and non-finite floats made ``None``."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def _csv_number(value: float | None) -> str:
    if value is None or not math.isfinite(float(value)):
        return ""
    return repr(float(value))  # shortest text that reads back to the same float


def write_results(out_dir: str | Path, name: str, metrics: Mapping[str, float],
                  intervals: Mapping[str, Interval] | None = None,
                  extra: Mapping[str, Any] | None = None) -> tuple[Path, Path]:
    """Write ``<out_dir>/<name>.json`` and ``<out_dir>/<name>.csv``; returns both paths.

    JSON: ``{"name", "metrics": {k: v}, "ci_low": {k: lo}, "ci_high": {k: hi}, **extra}``
    (``extra`` holds e.g. notes, thresholds, n; its keys must not clash with those four).
    CSV: one row per metric, columns ``metric,value,ci_low,ci_high``, in ``metrics`` order.
    """
    if not name or any(c in name for c in "/\\") or name in (".", ".."):
        raise ValueError(f"write_results: {name!r} is not a plain file name")
    intervals = dict(intervals or {})
    extra = dict(extra or {})
    clash = sorted(set(extra) & set(_RESERVED))
    if clash:
        raise ValueError(f"write_results: extra keys {clash} clash with the result's own fields")
    unknown = sorted(set(intervals) - set(metrics))
    if unknown:
        raise ValueError(f"write_results: intervals for metrics not in the results: {unknown}")
    out_dir = Path(out_dir)
    values = {k: float(v) for k, v in metrics.items()}
    lows = {k: float(intervals[k][0]) for k in values if k in intervals}
    highs = {k: float(intervals[k][1]) for k in values if k in intervals}

    doc = {"name": name, "metrics": values, "ci_low": lows, "ci_high": highs, **extra}
    json_path = atomic_write_text(out_dir / f"{name}.json",
                                  json.dumps(_jsonable(doc), indent=2, allow_nan=False) + "\n")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for key, value in values.items():
        writer.writerow([key, _csv_number(value), _csv_number(lows.get(key)), _csv_number(highs.get(key))])
    csv_path = atomic_write_text(out_dir / f"{name}.csv", buf.getvalue())
    return json_path, csv_path


def read_results(path: str | Path) -> tuple[dict[str, float], dict[str, Interval], dict[str, Any]]:
    """``(metrics, intervals, extra)`` from a JSON written by :func:`write_results`; null → NaN.

    A missing or malformed file is a :class:`DataError` naming it.
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(path, "no such results file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(path, f"not a readable results JSON ({err})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("metrics"), dict):
        raise DataError(path, "not a results file (no 'metrics' object)")

    def num(v: Any) -> float:
        return math.nan if v is None else float(v)

    try:
        metrics = {k: num(v) for k, v in doc["metrics"].items()}
        lows, highs = doc.get("ci_low") or {}, doc.get("ci_high") or {}
        intervals = {k: (num(lows.get(k)), num(highs.get(k))) for k in metrics if k in lows or k in highs}
    except (TypeError, ValueError, AttributeError):
        raise DataError(path, "a metric value is not a number") from None
    extra = {k: v for k, v in doc.items() if k not in _RESERVED}
    return metrics, intervals, extra


def _cell(value: float, key: str) -> str:
    if not math.isfinite(value):
        return "—"
    if key.split("/", 1)[0] in ("n", "n_pos", "auroc_labels") and float(value).is_integer():
        return str(int(value))
    return f"{value:.4f}"


def format_metrics(metrics: Mapping[str, float], intervals: Mapping[str, Interval] | None = None,
                   keys: Iterable[str] | None = None) -> str:
    """A fixed-width table ``metric  value  95% CI`` for terminals (undefined shown as ``—``).

    ``keys`` picks and orders rows (default: all, in ``metrics`` order; unknown keys skipped).
    """
    intervals = intervals or {}
    rows = [k for k in (metrics if keys is None else keys) if k in metrics]
    width = max([len("metric")] + [len(k) for k in rows])
    lines = [f"{'metric':<{width}}  {'value':>8}  95% CI"]
    for key in rows:
        value = float(metrics[key])
        ci = ""
        if key in intervals:
            lo, hi = intervals[key]
            ci = f"[{_cell(float(lo), key)}, {_cell(float(hi), key)}]"
        lines.append(f"{key:<{width}}  {_cell(value, key):>8}  {ci}".rstrip())
    return "\n".join(lines)
