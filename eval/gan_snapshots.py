"""FID snapshots during StyleGAN2 training: the metrics function ``cxr train-gan stylegan2`` injects.

The trainer (:mod:`gan.stylegan2.trainer`, a lower layer) cannot import the feature extractors,
so it takes a callable ``metrics_fn(snapshot) -> dict`` and asks it, every ``train.fid_every``
steps (or ``train.fid_kimg``), for the Fréchet distance of ``G_ema``'s images to the real
training split. :func:`fid_metrics` builds that callable the way ``cxr evaluate gan`` chooses
its feature space (:func:`eval.gan_features.resolve_kind`): Inception (pytorch-fid's weights)
or torchxrayvision's DenseNet only when their weights are already local, else the small CNN
trained as a classifier on the real training split, named ``trained-<network>-<hash>``. The
real tree is split by patient as every trainer splits it, so the reference is exactly the
images the generator sees, and with ``--size``/``--seed`` equal the trained encoder has the
recipe and images of the one ``cxr evaluate gan`` trains (the hash in its name says whether
the weights came out the same).

Built lazily at the first snapshot, inside the run folder (``fid/encoder``: the encoder's own
classifier run; a resumed run loads it instead of training it again); the real features'
mean and covariance are computed once. Training the encoder re-seeds the global random
streams and switches torch's determinism flags, so all of them are saved before and restored
after: a run with snapshots draws the same training numbers as before its first snapshot, and a
resume continues them.
"""

from __future__ import annotations

import contextlib
import random
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from classifiers.trainer import MODULE, build_model
from cxr.data.layouts import load_tree
from cxr.data.splits import split_records
from cxr.engine import checkpoint as ckpt_io
from cxr.errors import ConfigError, DataError
from cxr.metrics import generative as gm
from eval.gan_features import (
    Extractor,
    inception_extractor,
    penultimate_extractor,
    resolve_kind,
    weights_hash,
    xrv_extractor,
)
from eval.generative import GanEvalOptions, ImageGroup, classifier_config, read_images, task_for, train_classifier
from gan.stylegan2.trainer import Snapshot, StyleGAN2Config

ENCODER_DIR = "fid/encoder"  # the trained extractor's classifier run, inside the StyleGAN2 run folder


@contextlib.contextmanager
def isolated_global_state() -> Iterator[None]:
    """Python, numpy and torch (CPU and CUDA) random states and torch's determinism switches as
    they were, whatever the body does (a nested training run seeds them all)."""
    py, np_state, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    det, det_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn_det, cudnn_bench = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(np_state)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        if torch.are_deterministic_algorithms_enabled() != det:
            torch.use_deterministic_algorithms(det, warn_only=det_warn)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn_det, cudnn_bench


class FidMetrics:
    """``metrics_fn`` for :class:`gan.stylegan2.trainer.StyleGAN2Family`: FD of ``G_ema``'s images
    to the real training split in one extractor's feature space (see the module docstring)."""

    def __init__(self, real: str | Path, size: int = 64, extractor: str = "auto", seed: int = 0,
                 fractions: tuple[float, float, float] = (0.7, 0.1, 0.2), classifier_config: str = "classifier_tiny",
                 distributed: bool = False, layout: str | None = None, labels_csv: str | None = None):
        self.kind = resolve_kind(extractor)
        if self.kind == "trained" and distributed:
            raise ConfigError("train.fid_extractor: FID snapshots with the trained extractor run in one process "
                              "only (its classifier run is a training of its own); under torchrun use an extractor "
                              "whose weights are local (inception, xrv) or train.fid_every=0")
        self.real, self.size, self.seed, self.fractions = Path(real), size, seed, tuple(fractions)
        self.layout, self.labels_csv, self.classifier_config = layout, labels_csv, classifier_config
        self.extractor: Extractor | None = None
        self.real_stats: tuple[np.ndarray, np.ndarray] | None = None
        self.n_real = 0

    def _prepare(self, run_dir: Path, device: torch.device) -> None:
        """Read and split the real tree, build the extractor, fit the real features once."""
        records = list(load_tree(self.real, self.layout, labels_csv=self.labels_csv).records)
        if not records:
            raise DataError(self.real, "FID snapshots: the tree holds no images")
        parts = split_records(records, self.fractions, seed=self.seed)
        groups = {k: ImageGroup(str(self.real), parts[k], read_images(parts[k], self.size))
                  for k in ("train", "val", "test")}
        if self.kind == "inception":
            ext = inception_extractor(device)
        elif self.kind == "xrv":
            ext = xrv_extractor(device)
        else:
            ext = self._trained(run_dir / ENCODER_DIR, groups, device)
        self.extractor = ext
        feats = ext.embed(groups["train"].images)
        self.real_stats = gm.gaussian_fit(feats)
        self.n_real = len(feats)

    def _trained(self, encoder_dir: Path, groups: dict[str, ImageGroup], device: torch.device) -> Extractor:
        """The small CNN trained as a classifier on the training split, as ``cxr evaluate gan`` trains it."""
        if not groups["val"].records or not groups["test"].records:
            raise DataError(self.real, "FID snapshots with the trained extractor: too few patients for its "
                                       "validation and test parts; use train.fid_extractor=inception or xrv")
        task = task_for(groups["train"].records, self.real)
        opts = GanEvalOptions(real=self.real, fake=self.real, out=self.real, extractor="trained", size=self.size,
                              seed=self.seed, cas=False, classifier_config=self.classifier_config)
        cfg = classifier_config(opts, task, device.type)
        best = encoder_dir / "checkpoints" / ckpt_io.BEST
        with isolated_global_state():
            if ckpt_io.is_complete(best):  # a resumed run: the encoder its earlier snapshots used
                model = build_model(cfg, task)
                ckpt_io.load_module(best, MODULE, model)
                model.eval()
            else:
                model, _ = train_classifier(cfg, task, groups["train"], groups["val"], groups["test"], encoder_dir,
                                            "real")
        name = f"trained-{cfg.model.name}-{weights_hash(model, [r.image for r in groups['train'].records])}"
        return penultimate_extractor(model, name, device)

    def __call__(self, snap: Snapshot) -> dict[str, Any]:
        if self.extractor is None:
            self._prepare(snap.run_dir, snap.device)
        assert self.extractor is not None and self.real_stats is not None
        fake = snap.sample(snap.n_images).float()
        if fake.shape[-1] != self.size:
            mode = "area" if fake.shape[-1] > self.size else "bilinear"
            fake = F.interpolate(fake, size=(self.size, self.size), mode=mode)
        feats = self.extractor.embed(fake[:, 0].clamp(0, 1).cpu().numpy())
        fd = gm.frechet_distance_from_stats(*self.real_stats, *gm.gaussian_fit(feats))
        return {"fd": float(fd), "extractor": self.extractor.name, "n_real": self.n_real, "n_fake": len(feats),
                "fid_size": self.size}


def fid_metrics(cfg: StyleGAN2Config, distributed: bool = False) -> Callable[[Snapshot], dict[str, Any]] | None:
    """The snapshot metrics function a StyleGAN2 config asks for, or None when its snapshots are off."""
    t, d = cfg.train, cfg.data
    if not t.fid_interval:
        return None
    return FidMetrics(d.train, size=t.fid_size, extractor=t.fid_extractor, seed=d.split_seed,
                      fractions=d.split_fractions, distributed=distributed, layout=d.layout, labels_csv=d.labels_csv)
