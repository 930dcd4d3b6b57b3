"""The torch Dataset: tensors, label alignment with NaN, cache equivalence."""

from __future__ import annotations

import math

import numpy as np
import torch

from builders import write_png
from cxr.data.cache import ImageCache
from cxr.data.dataset import CXRDataset
from cxr.data.preprocess import Preprocess
from cxr.data.record import NINE, TB, Sample, label_vector


def _sample(path, site, labels, names):
    return Sample(image=str(path), patient_id=path.stem, site=site, labels=labels, label_names=names)


def test_items_and_relabelled_labels(tmp_path):
    a = _sample(write_png(tmp_path / "a.png", 30, 40), "shenzhen", [1.0], TB)
    b = _sample(write_png(tmp_path / "b.png", 40, 30, mode="P"), "nine", label_vector({"Covid"}, NINE), NINE)
    ds = CXRDataset([a, b], Preprocess(size=32), label_names=NINE)
    item = ds[0]
    assert item["image"].shape == (1, 32, 32) and item["image"].dtype == torch.float32
    lab = item["labels"].numpy()
    tb = NINE.index("Tuberculosis")
    assert lab[tb] == 1.0 and all(math.isnan(v) for j, v in enumerate(lab) if j != tb)
    assert ds[1]["labels"][NINE.index("Covid")] == 1.0 and ds[1]["labels"].sum() == 1.0
    loader = torch.utils.data.DataLoader(ds, batch_size=2)
    batch = next(iter(loader))
    assert batch["image"].shape == (2, 1, 32, 32) and batch["labels"].shape == (2, len(NINE))


def test_cached_dataset_equals_uncached(tmp_path):
    recs = [_sample(write_png(tmp_path / f"{i}.png", 50, 40, seed=i), "s", [i % 2], TB) for i in range(3)]
    pre = Preprocess(size=24)
    plain = CXRDataset(recs, pre)
    cached = CXRDataset(recs, pre, cache=ImageCache(tmp_path / "cache", pre))
    for i in range(3):
        np.testing.assert_allclose(plain[i]["image"], cached[i]["image"], atol=1 / 65535)
