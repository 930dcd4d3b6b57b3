"""What a run writes as it goes: ``stats.jsonl``, TensorBoard events, ``summary.csv``, ``log.txt``.

Only the main process logs (``RunLogger(run_dir, enabled=info.is_main)``); on other ranks every
method is a no-op, so the training loop needs no ``if rank == 0`` around each call.

On ``--resume`` pass ``resume_step``: lines logged after that checkpoint by the killed run are
dropped from ``stats.jsonl`` and TensorBoard, so the logs read like one uninterrupted run.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping

import torch
from tqdm import tqdm

from cxr.data.io import atomic_write_text


def _scalar(v: Any) -> float | int | str | None:
    if isinstance(v, torch.Tensor):
        v = v.detach().float().item() if v.numel() == 1 else v.detach().float().mean().item()
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, int):
        return v
    return float(v)


def _json_number(v: Any) -> Any:
    # JSON has no NaN/Inf; write them as strings so the line stays valid JSON.
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] for display: [-1, 1] input (any negative value) is mapped linearly."""
    x = images.detach().float().cpu()
    if x.numel() and x.min() < 0:
        x = (x + 1) / 2
    return x.clamp(0, 1)


def image_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2) -> torch.Tensor:
    """A (C, H', W') grid of an (N, C, H, W) batch, in [0, 1]."""
    from torchvision.utils import make_grid

    if images.dim() != 4:
        raise ValueError(f"expected an (N, C, H, W) batch, got shape {tuple(images.shape)}")
    return make_grid(to_unit_range(images), nrow=nrow, padding=padding, pad_value=1.0)


def progress(total: int, initial: int = 0, desc: str = "", enabled: bool = True) -> tqdm:
    """A tqdm bar with ETA on stderr; silent when stderr is not a terminal or ``enabled`` is False."""
    return tqdm(total=total, initial=initial, desc=desc, file=sys.stderr, dynamic_ncols=True,
                disable=not (enabled and sys.stderr.isatty()), smoothing=0.05)


class RunLogger:
    """Scalars, image grids, summary rows and text lines for one run folder."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, resume_step: int | None = None,
                 tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.tensorboard = tensorboard
        self.resume_step = resume_step
        self._writer = None
        self._summary_fields: list[str] | None = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.stats_path = self.run_dir / "stats.jsonl"
        self.summary_path = self.run_dir / "summary.csv"
        self.log_path = self.run_dir / "log.txt"
        # on resume, stats.jsonl loses its lines after the checkpoint only when the first new
        # line is written: a resume refused before that (a checkpoint that does not fit) changes nothing
        self._truncate_at = resume_step

    # -- files ---------------------------------------------------------------------------------

    def _truncate_stats(self, step: int) -> None:
        """Drop ``stats.jsonl`` lines after ``step`` (logged by a run killed after its checkpoint)."""
        if not self.stats_path.exists():
            return
        kept = []
        for line in self.stats_path.read_text(encoding="utf-8").splitlines():
            try:
                if int(json.loads(line).get("step", -1)) > step:
                    continue
            except (ValueError, AttributeError, TypeError):
                continue  # a torn last line from the kill
            kept.append(line)
        atomic_write_text(self.stats_path, "".join(f"{x}\n" for x in kept))

    def _tb(self):
        if not self.tensorboard:
            return None
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if self.resume_step is None else self.resume_step + 1
            self._writer = SummaryWriter(log_dir=str(self.run_dir / "tb"), purge_step=purge)
        return self._writer

    # -- public --------------------------------------------------------------------------------

    def scalars(self, step: int, values: Mapping[str, Any]) -> dict[str, Any]:
        """Append ``{"step", "time", **values}`` to ``stats.jsonl`` and to TensorBoard."""
        if not self.enabled:
            return {}
        if self._truncate_at is not None:
            self._truncate_stats(self._truncate_at)
            self._truncate_at = None
        row = {k: _scalar(v) for k, v in values.items()}
        line = {"step": int(step), "time": round(datetime.now().timestamp(), 3)}
        line.update({k: _json_number(v) for k, v in row.items()})
        with open(self.stats_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
        tb = self._tb()
        if tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    tb.add_scalar(k, v, int(step))
        return row

    def images(self, step: int, tag: str, images: torch.Tensor, nrow: int = 8) -> None:
        """An image grid of an (N, 1, H, W) batch in [0, 1] or [-1, 1] to TensorBoard."""
        if not self.enabled:
            return
        tb = self._tb()
        if tb is not None:
            tb.add_image(tag, image_grid(images, nrow=nrow), int(step))

    def summary(self, row: Mapping[str, Any]) -> None:
        """Append one row to ``summary.csv``; the header is the first row's keys."""
        if not self.enabled:
            return
        if self._summary_fields is None:
            if self.summary_path.exists() and self.summary_path.stat().st_size > 0:
                with open(self.summary_path, newline="", encoding="utf-8") as f:
                    self._summary_fields = next(csv.reader(f), None) or list(row)
            else:
                self._summary_fields = list(row)
                with open(self.summary_path, "w", newline="", encoding="utf-8") as f:
                    csv.writer(f).writerow(self._summary_fields)
        buf = io.StringIO()
        csv.DictWriter(buf, fieldnames=self._summary_fields, extrasaction="ignore").writerow(
            {k: _scalar(v) for k, v in row.items()})
        with open(self.summary_path, "a", newline="", encoding="utf-8") as f:
            f.write(buf.getvalue())

    def text(self, msg: str, echo: bool = False) -> None:
        """A timestamped line in ``log.txt`` (and on stderr with ``echo``)."""
        if not self.enabled:
            return
        stamp = datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(f"{stamp} {msg}\n")
        if echo:
            tqdm.write(msg, file=sys.stderr)

    def progress(self, total: int, initial: int = 0, desc: str = "") -> tqdm:
        return progress(total, initial, desc, enabled=self.enabled)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "RunLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
