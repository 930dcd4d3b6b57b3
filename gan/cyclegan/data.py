"""The two training domains: which images, preprocessed once, held in memory, drawn by step.

A domain is a dataset tree read by any loader (:func:`cxr.data.layouts.load_tree`), reduced to
its patient-level *training* split by default (:func:`cxr.data.splits.split_records`, the same
split the classifiers use with the same seed), so that no image a classifier is later tested
on ever reaches the generator. Images go through the preprocessed cache
(:class:`cxr.data.cache.ImageCache`; decoded and resized once, in worker processes) and then
sit in one (N, 1, S, S) float16 tensor, on the GPU when there is one: an unpaired GAN step
then reads no file and copies nothing from the host.

Batches are a pure function of (seed, step) (:class:`cxr.engine.data.InfiniteBatchSampler`:
seeded per-epoch permutations, each DDP rank taking its share of every global batch), so a
resumed run continues the exact stream and ``W`` processes together see the same global batch
as one process.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from cxr.data.cache import ImageCache, decode_workers
from cxr.data.layouts import load_tree
from cxr.data.lungcrop import boxes_or_none
from cxr.data.preprocess import Preprocess
from cxr.data.problems import Problem, Problems
from cxr.data.record import Sample
from cxr.data.splits import split_records
from cxr.engine.config import DataConfig
from cxr.engine.data import InfiniteBatchSampler
from cxr.engine.distributed import DistInfo, epoch_permutation
from cxr.engine.speed import to_device_async
from cxr.errors import ConfigError, DataError


@dataclass
class Domain:
    """One side of the translation, ready to draw batches from."""

    name: str  # "a" or "b"
    root: Path
    layout: str
    records: list[Sample]  # the images training draws from, in tensor order
    images: torch.Tensor  # (N, 1, S, S) float16 in [0, 1]
    n_tree: int  # images the tree holds (before the split)
    problems: list[Problem]

    def __len__(self) -> int:
        return len(self.records)


def preprocess_for(cfg: DataConfig) -> Preprocess:
    """The preprocessing a model trained with ``cfg`` expects (and translation repeats)."""
    return Preprocess(size=cfg.size, fit=cfg.fit)


def select_records(records: list[Sample], cfg: DataConfig, where: str) -> list[Sample]:
    """The records training may use: the patient-level train split, or all with ``split=all``."""
    if cfg.split == "all":
        return list(records)
    try:
        chosen = split_records(records, cfg.split_fractions, seed=cfg.split_seed)["train"]
    except ConfigError as e:
        raise ConfigError(f"config key 'data.split_fractions': {e}") from None
    if not chosen:
        n_patients = len({r.patient_id for r in records})
        raise DataError(where, f"the training split is empty ({len(records)} images of {n_patients} "
                               "patients); use more images or data.split=all")
    return chosen


def load_domain(name: str, path: str | Path, layout: str | None, cfg: DataConfig, cache_dir: Path,
                device: torch.device, build: bool = True, workers: int | None = None,
                labels_csv: str | Path | None = None) -> Domain:
    """Load, split, cache and stack one domain's images (``labels_csv``: see ``load_tree``).

    ``build=False`` (the non-zero DDP ranks) reads a cache the main process has built.
    Bad files stop with one line naming the file, or are skipped with ``cfg.skip_bad``.
    """
    path = Path(path)
    where = f"data.{name}={path}"
    if not path.exists():
        raise DataError(where, "no such folder or archive")
    problems = Problems(skip_bad=cfg.skip_bad)
    ds = load_tree(path, layout=layout, problems=problems, labels_csv=labels_csv)
    if not ds.records:
        raise DataError(where, f"no images found (layout {ds.layout})")
    chosen = select_records(ds.records, cfg, where)
    cache = ImageCache(cache_dir, preprocess_for(cfg))
    boxes = boxes_or_none(chosen, cfg.lung_crop, cfg.lung_crop_margin, cache_dir, cache.content_hash,
                          echo=None if build else _quiet)
    if build:
        cache.build([r.image for r in chosen], workers=decode_workers(workers), problems=problems, boxes=boxes)
    failed = {p.where for p in problems.items}
    kept = [r for r in chosen if r.image not in failed]
    if not kept:
        raise DataError(where, "no readable training images left after skipping bad files")
    stacked = torch.from_numpy(cache.stack([r.image for r in kept], boxes)[:, None]).to(torch.float16)
    return Domain(name, path, ds.layout, kept, stacked.to(device), len(ds.records), list(problems.items))


def _quiet(_line: str) -> None:
    """The lung crop's notice is said by the main process only."""


class DomainStream:
    """This process's batch of a domain at any global step, as [0, 1] images on its device."""

    def __init__(self, domain: Domain, batch_size: int, info: DistInfo, seed: int):
        self.domain = domain
        self.sampler = InfiniteBatchSampler(len(domain), batch_size, info, seed)
        self._orders: dict[int, torch.Tensor] = {}  # the current epoch's permutation

    def indices(self, step: int) -> list[int]:
        epoch = step // self.sampler.steps_per_epoch
        if epoch not in self._orders:
            self._orders = {epoch: epoch_permutation(self.sampler.n, self.sampler.seed, epoch)}
        return self.sampler.batch_at(step, self._orders)

    def batch(self, step: int) -> torch.Tensor:
        idx = to_device_async(torch.tensor(self.indices(step)), self.domain.images.device)
        return self.domain.images.index_select(0, idx)


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] images (any float dtype) → float32 in [-1, 1], the generators' tanh range."""
    return images.float() * 2.0 - 1.0


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] network output → float32 in [0, 1]."""
    return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)
