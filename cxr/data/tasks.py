"""The three classification tasks: which labels, what kind of output, how targets are formed.

A task is data, not code: the trainer, the metrics, ``cxr predict`` and the checkpoint all ask
the task what the network's outputs mean, so a checkpoint trained for one task cannot be
silently evaluated as another (its ``task`` name is stored with the weights).

- ``tb``: binary. One logit; the target is the ``Tuberculosis`` label (Shenzhen, Montgomery,
  both, or any tree that has that label).
- ``nih14``: multi-label. One logit per NIH ChestX-ray14 finding, sigmoid + BCE; a NaN target
  (label not annotated by that source) is masked out of the loss and the metrics.
- ``nine``: single-label. Softmax over the nine classes; the target is the index of the one
  present label (a record with none or several present is refused: the source task is
  single-label by construction).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

from cxr.data.record import NIH14, NINE, TB
from cxr.errors import ConfigError, DataError

Kind = Literal["binary", "multilabel", "multiclass"]


@dataclass(frozen=True)
class Task:
    """What a classifier predicts: its name, output kind and label names (output order)."""

    name: str
    kind: Kind
    label_names: tuple[str, ...]

    @property
    def num_outputs(self) -> int:
        """Logits per image: 1 for a binary task, one per label otherwise."""
        return 1 if self.kind == "binary" else len(self.label_names)

    def targets(self, labels: np.ndarray, where: str = "labels", names: Sequence[str] | None = None) -> np.ndarray:
        """Training targets from an (N, L) label matrix aligned to :attr:`label_names`.

        binary → (N,) float 0/1/NaN; multilabel → (N, L) float 0/1/NaN; multiclass → (N,)
        int64 class index (a row without exactly one present label is a :class:`DataError`
        naming the first such image, ``names[row]``, when given).
        """
        labels = np.asarray(labels, dtype=np.float32)
        if labels.ndim != 2 or labels.shape[1] != len(self.label_names):
            raise DataError(where, f"expected an (N, {len(self.label_names)}) label matrix for task "
                                   f"{self.name!r}, got shape {labels.shape}")
        if self.kind == "binary":
            return labels[:, 0].copy()
        if self.kind == "multilabel":
            return labels.copy()
        present = labels == 1
        counts = present.sum(axis=1)
        bad = np.flatnonzero(counts != 1)
        if bad.size:
            first = names[int(bad[0])] if names is not None else f"row {int(bad[0])}"
            hint = (f"; a tree of another task? {self.name!r} needs one of "
                    f"{', '.join(self.label_names)} per image") if counts[bad[0]] == 0 else ""
            raise DataError(where, f"task {self.name!r} is single-label, but {bad.size} record(s) have "
                                   f"{int(counts[bad[0]])} present labels (first: {first}){hint}")
        return present.argmax(axis=1).astype(np.int64)


TASKS: dict[str, Task] = {
    "tb": Task("tb", "binary", TB),
    "nih14": Task("nih14", "multilabel", NIH14),
    "nine": Task("nine", "multiclass", NINE),
}


def get_task(name: str) -> Task:
    """The task called ``name``; an unknown name is a :class:`ConfigError` listing the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown task {name!r} (choose from: {', '.join(TASKS)})") from None
