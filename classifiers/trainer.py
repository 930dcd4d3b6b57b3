"""Classifier training on the shared run infrastructure, read top to bottom.

Per epoch: shuffled (or class-balanced) batches of the in-memory training images, GPU-side
augmentation (:func:`cxr.engine.data.gpu_augment`, no flips), the task's loss

- binary / multi-label: ``BCE(z, y) = −[w·y·log σ(z) + (1 − y)·log(1 − σ(z))]`` averaged over
  the labelled entries only (a NaN target is masked out), ``w`` = negatives/positives per label
  from the training set with ``model.pos_weight``, else 1;
- single-label: ``CE(z, c) = −log softmax(z)_c``,

AdamW with a cosine (or, ``optim.schedule: constant``, a constant) learning rate (a pure
function of the step), then exact batch-norm
statistics over the training images (:func:`cxr.engine.batchnorm.recalibrate_batchnorm`: the
running averages lag fast-moving weights on small sets) and validation. The checkpoint of each
epoch carries the validation headline metric (:data:`cxr.metrics.classification.HEADLINE`: AUROC for tb and
nih14, cross-entropy for nine); ``checkpoints/best`` is the best, and ``train.patience``
epochs without improvement stop the run. A validation set holding one class has no AUROC:
that is logged and the run selects on validation loss instead. ``train.select: last`` keeps
the last epoch as ``checkpoints/best`` instead (a fixed schedule).

At the end the best checkpoint is reloaded, operating thresholds are chosen on the validation
set **only** (Youden's J, :func:`cxr.metrics.classification.choose_thresholds`) and applied unchanged to every
test set; metrics get patient-level bootstrap 95% intervals and are split by origin (real,
synthetic, harmonized) and by tree when a set mixes them. Written into the run folder:
``val``/``test``/``heldout`` ``.json``+``.csv`` (:func:`cxr.metrics.results.write_results`),
``predictions_<set>.csv`` (one row per image) and ``thresholds.json`` (also beside the best
weights, where ``cxr predict`` reads it).
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from classifiers.config import ClassifierConfig
from classifiers.data import ImageSet, assemble, load_images, origin_counts
from classifiers.metadata import metadata_matrix
from classifiers.models import build_classifier
from classifiers.models import model_args as network_args
from cxr.data.io import atomic_write_text
from cxr.data.tasks import Task, get_task
from cxr.engine import checkpoint as ckpt_io
from cxr.engine.batchnorm import recalibrate_batchnorm
from cxr.engine.data import gpu_augment
from cxr.engine.distributed import epoch_permutation, unwrap_model, wrap_ddp
from cxr.engine.loop import Evaluation, Family, LoopResult, Run, best_or_latest, main_first, run_training
from cxr.engine.schedules import warmup_constant_lr, warmup_cosine_lr
from cxr.engine.speed import (
    autocast_context,
    channels_last,
    cudagraphs_ddp_warning,
    mark_step_begin,
    maybe_compile,
    to_channels_last,
    to_device_async,
    uses_cudagraphs,
)
from cxr.errors import ConfigError
from cxr.metrics.classification import HEADLINE, choose_thresholds, task_metrics, undefined_notes
from cxr.metrics.intervals import bootstrap_task_metrics
from cxr.metrics.results import write_results

MODEL_FAMILY = "classifier"
MODULE = "classifier"  # the checkpoint's module name
THRESHOLDS_FILE = "thresholds.json"


# ----------------------------------------------------------------------------------------------
# Pure pieces: loss, weights, schedule, batch order


def masked_bce(logits: torch.Tensor, targets: torch.Tensor, pos_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean binary cross-entropy over the entries whose target is not NaN (0 when none is)."""
    logits = logits.float()
    targets = targets.float().reshape(logits.shape)
    mask = ~torch.isnan(targets)
    loss = F.binary_cross_entropy_with_logits(logits, torch.nan_to_num(targets), reduction="none",
                                              pos_weight=pos_weight)
    return (loss * mask).sum() / mask.sum().clamp(min=1)


def task_loss(task: Task, logits: torch.Tensor, targets: torch.Tensor,
              pos_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The task's training loss on (N, outputs) logits (see the module docstring)."""
    if task.kind == "multiclass":
        return F.cross_entropy(logits.float(), targets.long())
    if task.kind == "binary":
        return masked_bce(logits[:, 0], targets, pos_weight)
    return masked_bce(logits, targets, pos_weight)


def positive_weights(targets: np.ndarray, cap: float = 100.0) -> np.ndarray:
    """negatives / positives per label over labelled entries, in [1/cap, cap]; 1 where undefined."""
    t = np.asarray(targets, dtype=np.float64)
    t = t[:, None] if t.ndim == 1 else t
    pos = np.nansum(t == 1, axis=0).astype(np.float64)
    neg = np.nansum(t == 0, axis=0).astype(np.float64)
    w = np.where((pos > 0) & (neg > 0), neg / np.maximum(pos, 1), 1.0)
    return np.clip(w, 1.0 / cap, cap).astype(np.float32)


def balanced_weights(task: Task, targets: np.ndarray) -> np.ndarray:
    """Per-image sampling weights that give every class the same expected share of a batch.

    binary / single-label: 1 / (images of the image's class); an unlabelled (NaN) image gets
    the mean weight. Multi-label: the mean of 1 / prevalence over the image's present labels,
    images with none present weighted by 1 / (their count).
    """
    t = np.asarray(targets)
    n = len(t)
    if n == 0:
        return np.zeros(0)
    if task.kind in ("binary", "multiclass"):
        flat = t.astype(np.float64).reshape(n)
        known = ~np.isnan(flat)
        w = np.zeros(n)
        values, counts = np.unique(flat[known], return_counts=True)
        for v, c in zip(values, counts):
            w[flat == v] = 1.0 / c
        w[~known] = w[known].mean() if known.any() else 1.0
        return w / w.sum()
    present = np.nan_to_num(t.astype(np.float64)) == 1
    per_label = present.sum(0)
    inv = np.where(per_label > 0, 1.0 / np.maximum(per_label, 1), 0.0)
    k = present.sum(1)
    w = np.where(k > 0, (present * inv).sum(1) / np.maximum(k, 1), 0.0)
    none = k == 0
    if none.any():
        w[none] = 1.0 / none.sum()
    return w / w.sum()


def epoch_order(n: int, seed: int, epoch: int, weights: np.ndarray | None = None) -> torch.Tensor:
    """The epoch's visiting order: a permutation, or ``n`` weighted draws with replacement.

    A pure function of (seed, epoch): every DDP rank and a resumed run get the same order.
    """
    if weights is None:
        return epoch_permutation(n, seed, epoch)
    g = torch.Generator()
    g.manual_seed((int(seed) * 1_000_003 + int(epoch) + 17) % (2**63))
    return torch.multinomial(torch.as_tensor(weights, dtype=torch.float64), n, replacement=True, generator=g)


def probabilities(task: Task, logits: torch.Tensor) -> np.ndarray:
    """Network logits → probabilities: (N,) for binary, (N, L) sigmoid or (N, C) softmax."""
    z = logits.detach().float().cpu()
    if task.kind == "binary":
        return torch.sigmoid(z[:, 0]).double().numpy()
    if task.kind == "multilabel":
        return torch.sigmoid(z).double().numpy()
    return torch.softmax(z, dim=1).double().numpy()


# ----------------------------------------------------------------------------------------------
# Networks and what the checkpoint records about them


def model_kwargs(cfg: ClassifierConfig) -> dict[str, Any]:
    """Keywords for :func:`classifiers.models.build_classifier` beyond name and outputs."""
    return dict(cfg.model.options)


def build_model(cfg: ClassifierConfig, task: Task) -> nn.Module:
    """The network the config names (fresh or from ``model.pretrained``); bad options → one line."""
    return build_classifier(cfg.model.name, task.num_outputs, pretrained=cfg.model.pretrained,
                            **model_kwargs(cfg))


def uses_metadata(model: nn.Module) -> bool:
    return bool(getattr(unwrap_model(model), "uses_metadata", False))


def checkpoint_args(model: nn.Module, cfg: ClassifierConfig, task: Task, meta_stats: Any = None) -> dict[str, Any]:
    """``model_args`` of the checkpoint: network, task, labels, input contract, metadata stats."""
    return {"family": MODEL_FAMILY, "task": task.name, "kind": task.kind,
            "label_names": list(task.label_names), "model": network_args(unwrap_model(model)),
            "input": {"size": cfg.data.size, "fit": cfg.data.fit, "channels": 1, "range": [0.0, 1.0],
                      "lung_crop": cfg.data.lung_crop, "lung_crop_margin": cfg.data.lung_crop_margin},
            "meta_stats": meta_stats.to_dict() if meta_stats is not None else None}


def forward_all(model: nn.Module, images: torch.Tensor | None, meta: torch.Tensor | None, batch_size: int,
                device: torch.device, amp: str = "auto", channels: bool = False) -> torch.Tensor:
    """Logits (float32, CPU) of every image, in evaluation mode, in batches.

    ``images`` is None for a network that reads only the metadata (``uses_image = False``).
    """
    was_training = model.training
    model.eval()
    out = []
    n = len(images) if images is not None else len(meta) if meta is not None else 0
    with torch.no_grad():
        for s in range(0, n, batch_size):
            with autocast_context(device, amp):
                if images is None:
                    z = model(meta[s:s + batch_size].to(device))
                else:
                    x = channels_last(images[s:s + batch_size].to(device).float(), channels)
                    z = model(x, meta[s:s + batch_size].to(device)) if meta is not None else model(x)
            out.append(z.float().cpu())
    model.train(was_training)
    n_out = getattr(unwrap_model(model), "num_outputs", None)
    return torch.cat(out) if out else torch.zeros((0, n_out or 1))


# ----------------------------------------------------------------------------------------------
# Evaluation pieces


def selection_rule(task: Task, val: ImageSet) -> tuple[str, bool, list[str]]:
    """(metric name, higher is better, notes): the headline metric, or validation loss when the
    validation set cannot define it (a single class: AUROC undefined)."""
    name, higher = HEADLINE[task.kind]
    notes = list(undefined_notes(task, val.targets, "validation set"))
    if notes and name == "auroc":
        return "val_loss", False, notes + ["early stopping and best checkpoint use validation loss instead"]
    return name, higher, notes


def evaluate_probs(task: Task, targets: np.ndarray, probs: np.ndarray, thresholds: np.ndarray | None) -> dict[str, float]:
    return task_metrics(task, targets, probs, thresholds)


def _group_metrics(task: Task, keys: Sequence[str], targets: np.ndarray, probs: np.ndarray,
                   thresholds: np.ndarray | None) -> dict[str, dict[str, float]]:
    """Metrics per group (origin or tree) when there is more than one group."""
    groups = sorted(set(keys))
    if len(groups) < 2:
        return {}
    keys_arr = np.asarray(keys)
    return {g: {"n": int((keys_arr == g).sum()),
                **evaluate_probs(task, targets[keys_arr == g], probs[keys_arr == g], thresholds)}
            for g in groups}


def write_predictions(path: Path, task: Task, records: Sequence, probs: np.ndarray,
                      labels: np.ndarray | None, thresholds: np.ndarray | None) -> Path:
    """One row per image: image, patient_id, origin, p_<label>…, pred_<label>/pred, true_<label>…"""
    names = list(task.label_names)
    p = np.asarray(probs, dtype=np.float64)
    p2 = p[:, None] if p.ndim == 1 else p
    head = ["image", "patient_id", "origin"] + [f"p_{n}" for n in names]
    if task.kind == "multiclass":
        head.append("pred")
    else:
        head += [f"pred_{n}" for n in names]
    if labels is not None:
        head += [f"true_{n}" for n in names]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(head)
    for i, r in enumerate(records):
        row: list[Any] = [r.image, r.patient_id, r.source or ""] + [f"{v:.8g}" for v in p2[i]]
        if task.kind == "multiclass":
            row.append(names[int(np.argmax(p2[i]))])
        else:
            thr = np.full(p2.shape[1], 0.5) if thresholds is None else np.asarray(thresholds).reshape(-1)
            row += [int(v >= t) for v, t in zip(p2[i], thr)]
        if labels is not None:
            row += ["" if math.isnan(v) else int(v) for v in labels[i]]
        w.writerow(row)
    return atomic_write_text(path, buf.getvalue())


def thresholds_payload(task: Task, thresholds: np.ndarray | None, checkpoint: Path) -> dict[str, Any]:
    return {"task": task.name, "label_names": list(task.label_names),
            "thresholds": None if thresholds is None else [float(t) for t in np.asarray(thresholds).reshape(-1)],
            "chosen_on": "validation", "rule": "youden", "checkpoint": str(checkpoint)}


# ----------------------------------------------------------------------------------------------
# The run


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    epochs_done: int
    steps_done: int
    interrupted: bool
    stopped_early: bool
    best: Path | None
    seconds: float
    results: dict[str, dict[str, float]]  # set name -> metrics (empty when interrupted)
    notes: list[str]


def train(cfg: ClassifierConfig, run_dir: str | Path, resume: bool = False,
          echo: Callable[[str], None] | None = None, sets: dict[str, ImageSet] | None = None) -> TrainResult:
    """Train (or, with ``resume``, continue) a classifier in ``run_dir``; see the module docstring.

    ``sets``: prepared sets instead of the trees ``cfg.data`` names (see :class:`ClassifierFamily`).
    """
    family = ClassifierFamily(cfg, sets=sets)
    loop = run_training(cfg, run_dir, family, resume=resume, echo=echo)
    return TrainResult(loop.run_dir, loop.steps_done // family.spe, loop.steps_done, loop.interrupted,
                       loop.stopped_early, family.best, loop.seconds, family.results, family.notes)


def _meta_matrices(model_uses_meta: bool, sets: dict[str, ImageSet], device: torch.device):
    """Metadata features per set (fit on train) for a network that takes them, else Nones."""
    if not model_uses_meta:
        return {k: None for k in sets}, None
    x_train, stats = metadata_matrix(sets["train"].records)
    out = {"train": torch.as_tensor(x_train, dtype=torch.float32).to(device)}
    for k, s in sets.items():
        if k != "train":
            out[k] = torch.as_tensor(metadata_matrix(s.records, stats)[0], dtype=torch.float32).to(device)
    return out, stats


class ClassifierFamily(Family):
    """The classifier on :func:`cxr.engine.loop.run_training`: an evaluation at every epoch's end.

    ``sets`` (optional) hands it prepared sets instead of the trees ``cfg.data`` names: at least
    ``train`` and ``val`` (and any test sets), e.g. arrays an experiment already holds, or
    metadata-only rows (``images=None``) for a network that reads no image.
    """

    name = MODEL_FAMILY

    def __init__(self, cfg: ClassifierConfig, sets: dict[str, ImageSet] | None = None):
        t = cfg.train
        self.cfg, self.task = cfg, get_task(cfg.task)
        self.prepared = sets
        self.log_every, self.patience = t.log_every, t.patience
        self.batch_size, self.image_size = t.batch_size, cfg.data.size
        self.results: dict[str, dict[str, float]] = {}
        self.notes: list[str] = []
        self.best: Path | None = None
        self.spe = 1
        self._epoch = -1

    def setup(self, run: Run) -> dict[str, Any]:
        cfg, t, task, info = self.cfg, self.cfg.train, self.task, run.info
        device = info.device
        self.run = run
        # --- network first: a bad name, option or pretrained file stops before any data work ---
        model = build_model(cfg, task).to(device)
        self.uses_image = bool(getattr(model, "uses_image", True))
        if not self.uses_image and self.prepared is None:
            raise ConfigError(f"config key 'model.name': {cfg.model.name!r} reads no image; it is trained by "
                              "`cxr train-classifier --model metadata_mlp` (the metadata study)")

        # --- data ---------------------------------------------------------------------------
        trees: list[dict[str, Any]] = []
        if self.prepared is not None:
            sets = self.prepared
        else:
            assembly = assemble(cfg.data, task, seed=cfg.seed)
            trees = [tr.__dict__ for tr in assembly.trees]
            cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else run.run_dir / "cache"
            data_device = device if cfg.data.on_device else torch.device("cpu")
            sets, skipped = main_first(info, lambda build: load_images(assembly, cfg.data, cache_dir, data_device,
                                                                       build=build))
            for p in list(assembly.problems) + list(skipped):
                run.log.text(f"skipped: {p}")
        self.sets = sets
        train_set, val_set = sets["train"], sets["val"]
        for k, s in sets.items():
            run.say(f"{k}: {len(s)} images, {len(set(s.patient_ids))} patients, origins {origin_counts(s.records)}")
        self.metric_name, self.higher, notes = selection_rule(task, val_set)
        self.notes += notes
        for n in notes:
            run.say(f"note: {n}")

        # --- network, optimizer -------------------------------------------------------------
        self.metas, meta_stats = _meta_matrices(uses_metadata(model), sets, device)
        if meta_stats is not None:
            model.meta_stats = meta_stats  # stored in model_args: prediction standardises identically
            if meta_stats.n_imputed_age:
                run.say(f"metadata: {meta_stats.n_imputed_age} of {meta_stats.n_rows} training ages missing or "
                        "implausible, imputed with the training median")
        self.use_cl = t.channels_last and device.type == "cuda"  # measured slower on CPU (see CycleGAN)
        self.model = model = to_channels_last(model, self.use_cl)
        self.opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
        self.step_model = maybe_compile(wrap_ddp(model, info), t.compile, t.compile_mode)
        self.cudagraphs = uses_cudagraphs(t.compile, t.compile_mode, device)  # evaluation runs the plain model
        if (note := cudagraphs_ddp_warning(self.cudagraphs, info.world_size)) is not None:
            run.say(note)
        a = cfg.augment
        self.augment = (gpu_augment(a.degrees, tuple(a.scale), a.translate, a.brightness, a.contrast, a.hflip,
                                    a.p).to(device) if a.enabled else None)
        pos_weight = (torch.as_tensor(positive_weights(train_set.targets), device=device)
                      if cfg.model.pos_weight and task.kind != "multiclass" else None)
        if pos_weight is not None and task.kind == "binary":
            pos_weight = pos_weight[0]
        self.pos_weight = pos_weight
        self.weights = balanced_weights(task, train_set.targets) if cfg.data.balanced else None
        self.targets_t = torch.as_tensor(train_set.targets).to(device)
        self.val_targets_t = torch.as_tensor(val_set.targets)

        n, b = len(train_set), t.batch_size
        if b % info.world_size:
            raise ConfigError(f"config key 'train.batch_size': {b} does not split evenly over {info.world_size} processes")
        if n < b:
            raise ConfigError(f"config key 'train.batch_size': {b} is larger than the training set ({n} images)")
        self.spe = n // b  # full batches per epoch (the last partial batch is dropped)
        self.total_steps = self.spe * t.epochs
        self.warmup = int(round(cfg.optim.warmup_epochs * self.spe))
        self.args = checkpoint_args(model, cfg, task, meta_stats)
        self.lr = cfg.optim.lr
        self.t0 = time.perf_counter()
        return {"task": task.name, "trees": trees,
                "sets": {k: {"images": len(s), "patients": len(set(s.patient_ids)), "origins": origin_counts(s.records)}
                         for k, s in sets.items()}}

    def modules(self) -> dict[str, nn.Module]:
        return {MODULE: self.model}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"opt": self.opt}

    def model_args(self) -> dict[str, dict]:
        return {MODULE: self.args}

    def checkpoint_extra(self) -> dict[str, Any]:
        return {"selection": "last epoch" if self.cfg.train.select == "last" else self.metric_name}

    def train_step(self, step: int) -> dict[str, torch.Tensor]:
        cfg, info, device = self.cfg, self.run.info, self.run.device
        train_set, b = self.sets["train"], self.cfg.train.batch_size
        epoch, offset = divmod(step, self.spe)
        if epoch != self._epoch:  # the epoch's order is a pure function of (seed, epoch)
            self._epoch = epoch
            self.order = epoch_order(len(train_set), cfg.seed, epoch, self.weights)
            self.model.train()
        idx = to_device_async(self.order[offset * b:(offset + 1) * b][info.rank::info.world_size], self.targets_t.device)
        self.lr = (warmup_constant_lr(cfg.optim.lr, step, self.warmup) if cfg.optim.schedule == "constant"
                   else warmup_cosine_lr(cfg.optim.lr, step, self.total_steps, self.warmup))
        for g in self.opt.param_groups:
            g["lr"] = self.lr
        meta = self.metas["train"]
        meta = meta.index_select(0, idx.to(meta.device)) if meta is not None else None
        if self.uses_image:
            x = train_set.images.index_select(0, idx.to(train_set.images.device)).to(device).float()
            if self.augment is not None:
                x = self.augment(x)
            x = channels_last(x, self.use_cl)
        mark_step_begin(self.cudagraphs)
        with autocast_context(device, cfg.train.amp):
            if not self.uses_image:
                logits = self.step_model(meta)
            else:
                logits = self.step_model(x, meta) if meta is not None else self.step_model(x)
            loss = task_loss(self.task, logits, self.targets_t.index_select(0, idx), self.pos_weight)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return {"loss": loss.detach()}

    def log_values(self, step: int, means: dict[str, float], seconds: float, steps_here: int) -> dict[str, Any]:
        return {"train/loss": means["loss"], "lr": self.lr}

    def evaluation_due(self, step: int) -> bool:
        return step % self.spe == 0

    def evaluate(self, step: int, train_means: dict[str, float]) -> Evaluation:
        """Exact BN statistics, then validation loss, thresholds and the headline metric."""
        t, task, device = self.cfg.train, self.task, self.run.device
        val_set = self.sets["val"]
        if t.bn_recalibrate and self.uses_image:
            recalibrate_batchnorm(self.model, self.sets["train"].images, t.eval_batch_size, device, self.metas["train"])
        logits = forward_all(self.model, val_set.images, self.metas["val"], t.eval_batch_size, device, t.amp,
                             self.use_cl)
        val_loss = float(task_loss(task, logits, self.val_targets_t))
        val_probs = probabilities(task, logits)
        thr = choose_thresholds(task, val_set.targets, val_probs)
        vm = evaluate_probs(task, val_set.targets, val_probs, thr)
        value = val_loss if self.metric_name == "val_loss" else float(vm[self.metric_name])
        train_loss = train_means.get("loss", 0.0)
        done_epochs = step // self.spe
        numbers = {k: v for k, v in vm.items() if isinstance(v, (int, float))}
        row = {"epoch": done_epochs, "step": step, "train_loss": train_loss, "val_loss": val_loss,
               **{f"val_{k}": v for k, v in numbers.items()},
               "lr": self.lr, "seconds": round(time.perf_counter() - self.t0, 2)}
        # train.select=last: each epoch improves on the one before, so the last is kept as best
        last = t.select == "last"
        return Evaluation(float(step) if last else value, True if last else self.higher,
                          scalars={"val/loss": val_loss, **{f"val/{k}": v for k, v in numbers.items()}},
                          row=row, message=f"epoch {done_epochs}/{t.epochs}: train loss {train_loss:.4f}, "
                                           f"val loss {val_loss:.4f}, val {self.metric_name} {value:.4f}")

    def early_stop_message(self) -> str:
        return f"early stop: no better validation {self.metric_name} for {self.patience} epochs"

    def finish(self, result: LoopResult, run: Run) -> None:
        self.best = best_or_latest(run.checkpoints)
        if not result.interrupted and run.info.is_main:
            results, notes = finish(self.model, self.task, self.sets, self.metas, self.best, run.run_dir, self.cfg,
                                    run.device, self.use_cl)
            self.results = results
            self.notes += notes

    def final_row(self, result: LoopResult) -> dict[str, Any]:
        return {"epoch": result.steps_done // self.spe, "step": result.steps_done, "seconds": round(result.seconds, 2)}


def finish(model: nn.Module, task: Task, sets: dict[str, ImageSet], metas: dict[str, torch.Tensor | None],
           best: Path, run_dir: Path, cfg: ClassifierConfig, device: torch.device,
           use_cl: bool) -> tuple[dict[str, dict[str, float]], list[str]]:
    """Reload the best weights, choose thresholds on validation, evaluate and write every set."""
    ckpt_io.load_module(best, MODULE, model)
    t = cfg.train
    probs = {k: probabilities(task, forward_all(model, s.images, metas[k], t.eval_batch_size, device, t.amp, use_cl))
             for k, s in sets.items() if k != "train"}
    val = sets["val"]
    thresholds = choose_thresholds(task, val.targets, probs["val"])  # validation only
    payload = thresholds_payload(task, thresholds, best)
    atomic_write_text(run_dir / THRESHOLDS_FILE, json.dumps(payload, indent=2) + "\n")
    atomic_write_text(Path(best) / THRESHOLDS_FILE, json.dumps(payload, indent=2) + "\n")
    results: dict[str, dict[str, float]] = {}
    notes: list[str] = []
    for name, p in probs.items():
        s = sets[name]
        write_predictions(run_dir / f"predictions_{name}.csv", task, s.records, p, s.labels, thresholds)
        if not len(s):
            notes.append(f"{name} set is empty: no metrics")
            continue
        set_notes = list(undefined_notes(task, s.targets, f"{name} set"))
        notes += set_notes
        metrics = evaluate_probs(task, s.targets, p, thresholds)
        intervals = None
        if cfg.eval.n_boot > 0:  # thresholds stay the validation ones in every replicate
            intervals = bootstrap_task_metrics(task, s.targets, p, thresholds, s.patient_ids,
                                               n_boot=cfg.eval.n_boot, seed=cfg.eval.boot_seed,
                                               keys=cfg.eval.ci_metrics or None)
        extra = {"task": task.name, "n_images": len(s), "n_patients": len(set(s.patient_ids)),
                 "origins": origin_counts(s.records), "thresholds": payload["thresholds"],
                 "thresholds_from": "validation", "checkpoint": str(best), "notes": set_notes}
        by_origin = _group_metrics(task, s.origins, s.targets, p, thresholds)
        if by_origin:
            extra["by_origin"] = by_origin
        by_tree = _group_metrics(task, [r.extra.get("tree", "") for r in s.records], s.targets, p, thresholds)
        if by_tree:
            extra["by_tree"] = by_tree
        write_results(run_dir, name, metrics, intervals, extra)
        results[name] = metrics
    return results, notes
