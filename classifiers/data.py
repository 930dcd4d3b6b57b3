"""What a classifier trains, validates and is tested on: trees → records → in-memory tensors.

Two stages, kept apart so the choice of images can be tested without decoding any:

1. :func:`assemble` reads every tree named in the config (:func:`cxr.data.layouts.load_tree`),
   splits the training trees by patient exactly as the CycleGAN trainer does (each tree on its
   own, with its own labels, ``split_seed``), tags each record's origin (``real``,
   ``synthetic``, ``harmonized``, ``translated``; the tree's own ``source`` moves to
   ``extra["dataset"]``),
   aligns labels to the task and mixes synthetic records in at the requested ratio
   (:func:`mix`). Harmonized trees are translations of real trees with the same file names and
   patients, so they are split the same way and only their training part is used: a
   translated copy of a test image never reaches training.

   The origin is the tree's own (its manifest, :func:`cxr.data.provenance.tree_origin`) under
   every key; the data key a tree is given under decides only how it is used, and names the
   origin of a tree without a manifest (``real`` for train/val/test, ``harmonized`` and
   ``synthetic`` for those keys). So a translated tree tests as ``translated`` and a tree
   written by ``cxr harmonize`` trains as ``harmonized`` under ``data.train`` too.
2. :func:`load_images` preprocesses every image once through the content-addressed cache
   (:class:`cxr.data.cache.ImageCache`) and stacks each set into one (N, 1, S, S) float16
   tensor, on the GPU when there is one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from classifiers.config import ClassifierDataConfig
from cxr.data.cache import ImageCache, decode_workers
from cxr.data.layouts import LoadedDataset, load_tree
from cxr.data.lungcrop import Box, boxes_or_none
from cxr.data.preprocess import Preprocess
from cxr.data.problems import Problem, Problems
from cxr.data.provenance import ORIGINS
from cxr.data.record import Sample, relabel
from cxr.data.splits import split_records
from cxr.data.tasks import Task
from cxr.errors import ConfigError, DataError


@dataclass
class TreeInfo:
    """One tree as it was read: what for, which layout, how many images it gave to which set."""

    role: str  # train, val, test, synthetic, harmonized
    path: str
    layout: str
    n_tree: int
    used: dict[str, int] = field(default_factory=dict)  # set name -> images taken
    origin: str = "real"  # the origin its images were tagged with (tree_origin_or)


@dataclass
class Assembly:
    """The records of every set, labels aligned to the task, origins tagged."""

    task: Task
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]  # data.test trees, or the held-out part of the training trees
    heldout: list[Sample]  # the training trees' held-out test part (in-domain test)
    trees: list[TreeInfo]
    problems: list[Problem]
    test_is_heldout: bool

    def sets(self) -> dict[str, list[Sample]]:
        """Evaluation sets by name (``heldout`` only when it differs from ``test``)."""
        out = {"val": self.val, "test": self.test}
        if not self.test_is_heldout and self.heldout:
            out["heldout"] = self.heldout
        return out


@dataclass
class ImageSet:
    """One set ready for the network: images, aligned labels, targets, origins."""

    name: str
    records: list[Sample]
    images: torch.Tensor  # (N, 1, S, S) float16 in [0, 1]
    labels: np.ndarray  # (N, L) float32 over task.label_names, NaN = not labelled
    targets: np.ndarray  # task.targets(labels)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def origins(self) -> list[str]:
        return [r.source or "real" for r in self.records]

    @property
    def patient_ids(self) -> list[str]:
        return [r.patient_id for r in self.records]


# ----------------------------------------------------------------------------------------------
# Records


def tag_origin(records: Sequence[Sample], origin: str, tree: str | Path) -> list[Sample]:
    """Copies of ``records`` with ``source=origin``; the tree's own source kept in ``extra``."""
    if origin not in ORIGINS:
        raise ValueError(f"origin must be one of {ORIGINS}, got {origin!r}")
    out = []
    for r in records:
        extra = dict(r.extra)
        if r.source and r.source not in ORIGINS:
            extra.setdefault("dataset", r.source)
        extra["tree"] = str(tree)
        out.append(Sample(**{**r.__dict__, "source": origin, "extra": extra}))
    return out


def tree_origin_or(ds: LoadedDataset, fallback: str) -> str:
    """The origin of a tree's images: its manifest's, else the one its data key implies."""
    return ds.origin if ds.origin != "real" else fallback


def align_labels(records: Sequence[Sample], task: Task, where: str) -> list[Sample]:
    """Records relabelled to the task's label names; a tree with none of them is refused.

    A tree whose records carry no value (all NaN) for every label the task predicts cannot
    serve the task: say which tree and which labels it does have.
    """
    aligned = [r if r.label_names == task.label_names else relabel(r, task.label_names) for r in records]
    if aligned and all(np.isnan(r.labels).all() for r in aligned):
        have = ", ".join(records[0].label_names) or "none"
        raise DataError(where, f"has none of the labels of task {task.name!r} ({', '.join(task.label_names)}); "
                               f"its labels: {have}")
    return aligned


def mix(real: Sequence[Sample], synthetic: Sequence[Sample], ratio: float, seed: int) -> list[Sample]:
    """``real`` plus ``round(ratio · len(real))`` records drawn from ``synthetic``.

    Drawn without replacement while the synthetic pool is large enough, with replacement
    otherwise (then some synthetic images appear more than once). Seeded and pure.
    """
    if ratio < 0:
        raise ValueError(f"ratio must be >= 0, got {ratio}")
    k = int(round(ratio * len(real)))
    if k == 0:
        return list(real)
    if not synthetic:
        raise DataError("data.synthetic", f"synthetic_ratio={ratio} asks for {k} synthetic images but the "
                                          "synthetic trees hold none")
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(synthetic), size=k, replace=k > len(synthetic))
    return list(real) + [synthetic[int(i)] for i in idx]


def _read(path: str, role: str, cfg: ClassifierDataConfig, problems: Problems) -> LoadedDataset:
    where = f"data.{role}={path}"
    if not Path(path).exists():
        raise DataError(where, "no such folder or archive")
    try:
        ds = load_tree(path, layout=cfg.layout, problems=problems, labels_csv=cfg.labels_csv)
    except DataError as e:
        if e.where == str(Path(path)):  # layout detection: name the config key too
            raise DataError(where, e.problem) from None
        if cfg.labels_csv is not None and e.where == str(cfg.labels_csv):
            raise DataError(f"data.labels_csv={cfg.labels_csv}", e.problem) from None
        raise
    if not ds.records:
        raise DataError(where, f"no images found (layout {ds.layout})")
    return ds


def _split(records: list[Sample], cfg: ClassifierDataConfig, where: str) -> dict[str, list[Sample]]:
    """The training tree's parts: {"train", "val", "test"} (test empty with ``split=all``)."""
    try:
        if cfg.split == "all":
            fv = cfg.split_fractions[1]
            parts = split_records(records, (1.0 - fv, fv, 0.0), seed=cfg.split_seed, use_official=False)
            return {"train": parts["train"], "val": parts["val"], "test": []}
        return split_records(records, cfg.split_fractions, seed=cfg.split_seed)
    except ConfigError as e:
        raise ConfigError(f"config key 'data.split_fractions': {e}") from None


def assemble(cfg: ClassifierDataConfig, task: Task, seed: int = 0) -> Assembly:
    """Read, split, tag, align and mix every tree of ``cfg`` (no image is decoded here)."""
    problems = Problems(skip_bad=cfg.skip_bad)
    trees: list[TreeInfo] = []
    train: list[Sample] = []
    val: list[Sample] = []
    heldout: list[Sample] = []
    harmonized: list[Sample] = []
    carve_val = not cfg.val

    for role, fallback in (("train", "real"), ("harmonized", "harmonized")):
        for path in getattr(cfg, role):
            where = f"data.{role}={path}"
            ds = _read(path, role, cfg, problems)
            parts = _split(ds.records, cfg, where)
            taken = parts["train"] + ([] if carve_val else parts["val"])
            if not taken:
                raise DataError(where, f"the training part of the split is empty ({len(ds.records)} images); "
                                       "use more images or data.split=all")
            origin = tree_origin_or(ds, fallback)
            info = TreeInfo(role, str(path), ds.layout, len(ds.records), origin=origin)
            recs = {k: align_labels(tag_origin(v, origin, path), task, where) for k, v in parts.items()}
            if role == "train":
                train += recs["train"] + ([] if carve_val else recs["val"])
                info.used["train"] = len(recs["train"]) + (0 if carve_val else len(recs["val"]))
                if carve_val:
                    val += recs["val"]
                    info.used["val"] = len(recs["val"])
                heldout += recs["test"]
                info.used["heldout"] = len(recs["test"])
            else:
                harmonized += recs["train"] + ([] if carve_val else recs["val"])
                info.used["train"] = len(recs["train"]) + (0 if carve_val else len(recs["val"]))
            trees.append(info)

    synthetic: list[Sample] = []
    for path in cfg.synthetic:
        where = f"data.synthetic={path}"
        ds = _read(path, "synthetic", cfg, problems)
        origin = tree_origin_or(ds, "synthetic")
        synthetic += align_labels(tag_origin(ds.records, origin, path), task, where)
        trees.append(TreeInfo("synthetic", str(path), ds.layout, len(ds.records), origin=origin))
    mixed = mix(train, synthetic, cfg.synthetic_ratio, seed)
    for t in trees:
        if t.role == "synthetic":
            t.used["train"] = sum(1 for r in mixed[len(train):] if r.extra.get("tree") == t.path)
    # data.duplicate_ratio: real training records drawn again (the control for added synthetic ones)
    train = mixed + mix(train, train, cfg.duplicate_ratio, seed)[len(train):] + harmonized

    test: list[Sample] = []
    for role in ("val", "test"):
        for path in getattr(cfg, role):
            where = f"data.{role}={path}"
            ds = _read(path, role, cfg, problems)
            recs = align_labels(tag_origin(ds.records, ds.origin, path), task, where)
            (val if role == "val" else test).extend(recs)
            trees.append(TreeInfo(role, str(path), ds.layout, len(ds.records), {role: len(recs)}, ds.origin))
    if not cfg.test:
        test = list(heldout)

    if not val:
        raise DataError("data.val" if cfg.val else f"data.train={cfg.train[0]}",
                        "the validation set is empty (too few patients for the validation fraction "
                        f"{cfg.split_fractions[1]}); add images or pass data.val=TREE")
    _check_disjoint(train, val, "data.val")
    _check_disjoint(train, test, "data.test")
    return Assembly(task, train, val, test, heldout, trees, list(problems.items), not cfg.test)


def _check_disjoint(train: Sequence[Sample], other: Sequence[Sample], key: str) -> None:
    """Refuse an evaluation set that shares image files with the training set (leakage)."""
    seen = {r.image for r in train}
    shared = [r.image for r in other if r.image in seen]
    if shared:
        raise DataError(key, f"{len(shared)} of its images are also training images (first: {shared[0]}); "
                             "evaluate on other trees, or leave the key empty to use the held-out split")


def origin_counts(records: Sequence[Sample]) -> dict[str, int]:
    """Images per origin, in :data:`ORIGINS` order (origins with none left out)."""
    counts = {o: 0 for o in ORIGINS}
    for r in records:
        counts[r.source or "real"] = counts.get(r.source or "real", 0) + 1
    return {k: v for k, v in counts.items() if v}


# ----------------------------------------------------------------------------------------------
# Images


def preprocess_for(cfg: ClassifierDataConfig) -> Preprocess:
    """The preprocessing a model trained with ``cfg`` expects (``cxr predict`` repeats it)."""
    return Preprocess(size=cfg.size, fit=cfg.fit)


def build_cache(refs: Sequence[str], cache: ImageCache, skip_bad: bool, workers: int | None,
                boxes: Mapping[str, Box | None] | None = None) -> list[Problem]:
    """Decode every image not yet cached (cut to its lung crop box, if any); return the skipped
    ones (``skip_bad``) or raise."""
    problems = Problems(skip_bad=skip_bad)
    cache.build(list(refs), workers=decode_workers(workers), problems=problems, boxes=boxes)
    return list(problems.items)


def stack_images(refs: Sequence[str], cache: ImageCache, boxes: Mapping[str, Box | None] | None = None
                 ) -> torch.Tensor:
    """(N, 1, S, S) float16 tensor in [0, 1] of cached images, in ``refs`` order."""
    return torch.from_numpy(cache.stack(refs, boxes)[:, None]).to(torch.float16)


def image_set(name: str, records: Sequence[Sample], images: torch.Tensor, task: Task) -> ImageSet:
    """An :class:`ImageSet` with labels aligned and targets formed (multiclass rows checked)."""
    records = list(records)
    labels = (np.stack([r.labels for r in records]).astype(np.float32) if records
              else np.zeros((0, len(task.label_names)), np.float32))
    where = f"{name} set" if not records else f"{name} set ({records[0].extra.get('tree', records[0].image)})"
    return ImageSet(name, records, images, labels, task.targets(labels, where=where, names=[r.image for r in records]))


def load_images(assembly: Assembly, cfg: ClassifierDataConfig, cache_dir: Path, device: torch.device,
                build: bool = True) -> tuple[dict[str, ImageSet], list[Problem]]:
    """Cache, stack and move every set's images; bad files stop with one line or are skipped.

    ``build=False`` (DDP ranks other than 0) reads a cache the main process has built.
    Returns ``({"train", "val", "test", ["heldout"]}, skipped problems)``.
    """
    cache = ImageCache(cache_dir, preprocess_for(cfg))
    sets = {"train": assembly.train, **assembly.sets()}
    records = list({r.image: r for recs in sets.values() for r in recs}.values())
    refs = [r.image for r in records]
    boxes = boxes_or_none(records, cfg.lung_crop, cfg.lung_crop_margin, cache_dir, cache.content_hash,
                          echo=None if build else (lambda _line: None))
    skipped = build_cache(refs, cache, cfg.skip_bad, cfg.decode_workers, boxes) if build else []
    failed = {p.where for p in skipped}
    out: dict[str, ImageSet] = {}
    for name, recs in sets.items():
        kept = [r for r in recs if r.image not in failed]
        if name in ("train", "val") and not kept:
            raise DataError(f"{name} set", "no readable images left after skipping bad files")
        images = stack_images([r.image for r in kept], cache, boxes)
        out[name] = image_set(name, kept, images.to(device), assembly.task)
    return out, skipped
