"""The torch ``Dataset`` over sample records: one-channel tensors and NaN-aware label vectors.

Images come from the preprocessed cache when one is given (an epoch then reads no PNG), or
are decoded on the fly. Labels are aligned to the requested label set with
:func:`cxr.data.record.relabel`, so trees with different label sets can be concatenated; a
label the source does not have is NaN and is masked out of losses and metrics.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from cxr.data import preprocess
from cxr.data.cache import ImageCache
from cxr.data.image import load_image
from cxr.data.preprocess import Preprocess
from cxr.data.record import Sample, relabel


class CXRDataset(Dataset):
    """``dataset[i]`` → ``{"image": (1, S, S) float32 in [0, 1], "labels": (L,) float32 with
    NaN for not-labelled, "index": i}``.

    ``label_names`` defaults to the first record's label set. Pass ``cache`` (an
    :class:`ImageCache` with the same ``Preprocess``) to read preprocessed arrays instead of
    decoding files.
    """

    def __init__(self, records: Sequence[Sample], pre: Preprocess = Preprocess(),
                 label_names: tuple[str, ...] | None = None, cache: ImageCache | None = None):
        if cache is not None and cache.pre != pre:
            raise ValueError("cache was built with different preprocessing settings")
        self.records = list(records)
        self.pre = pre
        self.cache = cache
        self.label_names = label_names or (self.records[0].label_names if self.records else ())
        self._labels = np.stack([
            (r if r.label_names == self.label_names else relabel(r, self.label_names)).labels
            for r in self.records
        ]) if self.records else np.zeros((0, len(self.label_names)), np.float32)

    def __len__(self) -> int:
        return len(self.records)

    def image(self, i: int) -> np.ndarray:
        """The preprocessed image of record ``i`` as a float32 (S, S) array."""
        ref = self.records[i].image
        if self.cache is not None:
            return self.cache.get(ref)
        return preprocess.apply(load_image(ref), self.pre)

    @property
    def labels(self) -> np.ndarray:
        """(N, L) float32 label matrix aligned to ``label_names``; NaN = not labelled."""
        return self._labels

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | int]:
        img = self.image(i)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(img))[None],
            "labels": torch.from_numpy(self._labels[i]),
            "index": i,
        }
