"""Apply a trained classifier to a whole dataset tree: one CSV row per image.

The checkpoint says everything needed (``model_args`` of its ``classifier`` module): the
network to rebuild, the task and its label names, the input contract (size, fit) and, for a
fusion model, the metadata statistics fitted on its training set. The operating thresholds
are the ones the trainer chose on validation (``thresholds.json`` beside the best weights);
nothing is re-fitted on the tree being predicted.

Images go through the same preprocessed cache as in training (same preprocessing, same 16-bit
quantization, float16 in memory), so a prediction here equals the trainer's own output for
the same image. An unlabelled tree is fine; labels, when the tree has the task's, are copied
into ``true_<label>`` columns, and ``evaluate=True`` also reports the task's metrics at the
stored thresholds.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from classifiers.data import build_cache, stack_images, tag_origin
from classifiers.metadata import MetaStats, metadata_matrix
from classifiers.models import rebuild
from classifiers.trainer import MODEL_FAMILY, MODULE, THRESHOLDS_FILE, forward_all, probabilities, write_predictions
from cxr.data.cache import ImageCache
from cxr.data.layouts import load_tree
from cxr.data.lungcrop import boxes_or_none
from cxr.data.preprocess import Preprocess
from cxr.data.problems import Problem, Problems
from cxr.data.record import relabel
from cxr.data.tasks import Task, get_task
from cxr.engine import checkpoint as ckpt_io
from cxr.engine.checkpoint import CheckpointError
from cxr.errors import ConfigError, DataError
from cxr.metrics.classification import task_metrics, undefined_notes


@dataclass
class Classifier:
    """A classifier restored from a checkpoint, with what it needs to be applied."""

    checkpoint: Path
    model: nn.Module
    task: Task
    pre: Preprocess
    thresholds: np.ndarray | None
    meta_stats: Any = None
    args: dict = field(default_factory=dict)


@dataclass
class PredictReport:
    out: Path
    n: int
    layout: str
    labelled: bool
    metrics: dict[str, float] | None
    notes: list[str]
    skipped: list[Problem]
    origin: str = "real"  # the tree's (cxr.data.provenance.tree_origin), in every CSV row


def resolve_classifier_checkpoint(path: str | Path) -> Path:
    """A run folder's best checkpoint (else its latest), or the checkpoint folder given."""
    path = Path(path)
    best = path / ckpt_io.CKPT_DIR / ckpt_io.BEST
    if path.is_dir() and ckpt_io.is_complete(best):
        return best
    return ckpt_io.resolve_checkpoint(path)


def _thresholds(ckpt: Path, task: Task) -> np.ndarray | None:
    """Stored validation thresholds: beside the weights, else in the run folder."""
    for f in (ckpt / THRESHOLDS_FILE, ckpt.parent.parent / THRESHOLDS_FILE):
        if f.is_file():
            try:
                data = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                raise CheckpointError(f"{f}: unreadable thresholds file") from None
            if data.get("task") != task.name:
                raise CheckpointError(f"{f}: thresholds are for task {data.get('task')!r}, the weights for {task.name!r}")
            values = data.get("thresholds")
            return None if values is None else np.asarray(values, dtype=np.float64)
    return None


def load_classifier(checkpoint: str | Path, device: torch.device | str = "cpu") -> Classifier:
    """Rebuild the network of a classifier checkpoint and load its weights (one line on mismatch)."""
    ckpt = resolve_classifier_checkpoint(checkpoint)
    if not (ckpt / f"{MODULE}.safetensors").exists():
        have = sorted(p.stem for p in ckpt.glob("*.safetensors"))
        raise CheckpointError(f"{ckpt}: not a classifier checkpoint (it holds {', '.join(have) or 'no weights'})")
    args = ckpt_io.read_model_args(ckpt, MODULE)
    ckpt_io.check_family(ckpt, args, MODEL_FAMILY, "classifier")
    task = get_task(args.get("task", "?"))
    if tuple(args.get("label_names", ())) != task.label_names:
        raise CheckpointError(f"{ckpt}: label names stored with the weights do not match task {task.name!r}")
    model = rebuild(args["model"])
    ckpt_io.load_module(ckpt, MODULE, model)
    model.to(device).eval()
    inp = args.get("input", {})
    stats = args.get("meta_stats")
    return Classifier(ckpt, model, task, Preprocess(size=int(inp["size"]), fit=inp.get("fit", "pad")),
                      _thresholds(ckpt, task), MetaStats.from_dict(stats) if stats else None, args)


def predict_tree(checkpoint: str | Path, tree: str | Path, out_csv: str | Path,
                 device: torch.device | str = "cpu", layout: str | None = None, batch_size: int = 64,
                 task: str | None = None, evaluate: bool = False, skip_bad: bool = False,
                 cache_dir: str | Path | None = None, workers: int | None = None,
                 labels_csv: str | Path | None = None) -> PredictReport:
    """Write ``out_csv`` with the classifier's probabilities and decisions for every image of ``tree``.

    ``task``: refuse a checkpoint trained for another task. ``evaluate``: the tree must hold
    the task's labels; metrics at the stored thresholds are returned. ``labels_csv``: an NIH label
    CSV kept outside the tree (:func:`cxr.data.layouts.load_tree`). The CSV's ``origin`` column is
    the tree's own (its manifest: ``harmonized``, ``translated``, ``synthetic``; else ``real``).
    """
    device = torch.device(device)
    clf = load_classifier(checkpoint, device)
    if task is not None and get_task(task).name != clf.task.name:
        raise ConfigError(f"--task {task}: {clf.checkpoint} was trained for task {clf.task.name!r}")
    tree = Path(tree)
    if not tree.exists():
        raise DataError(f"--in {tree}", "no such folder or archive")
    problems = Problems(skip_bad=skip_bad)
    ds = load_tree(tree, layout=layout, problems=problems, labels_csv=labels_csv)
    if not ds.records:
        raise DataError(f"--in {tree}", f"no images found (layout {ds.layout})")
    records = [r if r.label_names == clf.task.label_names else relabel(r, clf.task.label_names)
               for r in tag_origin(ds.records, ds.origin, tree)]
    labels = np.stack([r.labels for r in records]).astype(np.float32)
    labelled = bool((~np.isnan(labels)).any())
    notes: list[str] = []
    if not labelled:
        msg = (f"{tree} has none of the labels of task {clf.task.name!r} ({', '.join(clf.task.label_names)}); "
               f"its labels: {', '.join(ds.label_names) or 'none'}")
        if evaluate:
            raise DataError(f"--in {tree}", f"cannot evaluate: {msg.split(' has ', 1)[1]}")
        notes.append(msg + ": predictions only")

    with tempfile.TemporaryDirectory(prefix="cxr-predict-") as tmp:
        cache = ImageCache(cache_dir or tmp, clf.pre)
        inp = clf.args.get("input", {})  # a model trained on lung crops sees lung crops here too
        boxes = boxes_or_none(records, inp.get("lung_crop"), float(inp.get("lung_crop_margin", 0.1)),
                              cache_dir or tmp, cache.content_hash)
        skipped = build_cache([r.image for r in records], cache, skip_bad, workers, boxes)
        failed = {p.where for p in skipped}
        keep = [i for i, r in enumerate(records) if r.image not in failed]
        records = [records[i] for i in keep]
        labels = labels[keep]
        if not records:
            raise DataError(f"--in {tree}", "no readable images left after skipping bad files")
        images = stack_images([r.image for r in records], cache, boxes)
    meta = None
    if getattr(clf.model, "uses_metadata", False):
        x, used = metadata_matrix(records, clf.meta_stats)
        meta = torch.as_tensor(x, dtype=torch.float32)
        if used.n_imputed_age:
            notes.append(f"metadata: {used.n_imputed_age} of {len(records)} ages missing or implausible, "
                         "imputed with the training median")
    logits = forward_all(clf.model, images, meta, batch_size, device, amp="auto")
    probs = probabilities(clf.task, logits)
    if clf.thresholds is None and clf.task.kind != "multiclass":
        notes.append(f"{clf.checkpoint}: no stored validation thresholds; decisions use 0.5")
    out = write_predictions(Path(out_csv), clf.task, records, probs, labels if labelled else None, clf.thresholds)
    metrics = None
    if evaluate:
        targets = clf.task.targets(labels, where=f"--in {tree}")
        notes += undefined_notes(clf.task, targets, str(tree))
        metrics = task_metrics(clf.task, targets, probs, clf.thresholds)
    return PredictReport(out, len(records), ds.layout, labelled, metrics, notes,
                         list(problems.items) + list(skipped), ds.origin)
