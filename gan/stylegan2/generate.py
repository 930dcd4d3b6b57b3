"""Write a synthetic dataset from a trained StyleGAN2 generator, in a real dataset's layout.

:func:`load_generator` reads a StyleGAN2 checkpoint (``G_ema`` when it holds one, else ``G``)
and the label set it was trained on (``model_args["label_names"]``); :func:`generate_tree`
writes ``n`` images of the requested class mix as a tree the loaders read like real data:

* ``shenzhen``: ``ChinaSet_AllFiles/CXR_png/CHNCXR_0001_<0|1>.png`` (palette PNGs, as released);
* ``montgomery``: ``MontgomerySet/CXR_png/MCUCXR_0001_<0|1>.png``;
* ``nih``: ``images/00000001_000.png`` and ``Data_Entry_2017.csv`` (``Finding Labels``; one
  patient per image, no age, sex or view);
* ``folders``: ``<class>/synthetic_000001.png``, one folder per class.

A synthetic image has no patient, so the NLM trees carry no ``ClinicalReadings`` and no
``ManualMask``; the NLM loaders expect none in a tree whose manifest says it is synthetic.
Beside the images: ``cxr_generation_labels.csv`` (image, class, seed, one 0/1 column per label)
and the manifest ``cxr_generation.json`` (checkpoint and its weights' sha256, seed per image,
truncation, class per image, code version, layout), which makes the tree's origin
``synthetic`` (:func:`cxr.data.provenance.tree_origin`).

Labels follow the trainer's ``model_args``: ``label_kind`` ``single`` is one-hot over
``label_names`` (``normal``/``Tuberculosis``, the 9 classes), ``multi`` multi-hot (NIH's 14),
where the all-zero vector is ``No Finding`` and ``A|B`` names a combination. Without
``label_kind``, a label set holding a normal class is one-hot, any other multi-hot, and a single
label column (``c_dim == 1``) is that label and ``normal``.

Determinism: image ``i`` draws its latent from its own seed, ``SeedSequence([seed, i])``, and
the synthesis noise is the generator's stored constant noise, so the set does not depend on the
batch size; truncation pulls ``w`` toward its class's mean ``w`` (:meth:`Generator.class_w_avg`,
a fixed draw), ``w' = w̄_c + ψ (w − w̄_c)``, so ψ → 0 keeps the class.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from cxr.data.io import atomic_write, claim_output, naming, swap_in_tree
from cxr.data.layouts import load_tree
from cxr.data.provenance import GENERATION_LABELS_CSV
from cxr.data.record import NIH14
from cxr.data.rewrite import file_sha256
from cxr.engine.checkpoint import CheckpointError, load_module, read_meta, read_model_args, resolve_checkpoint
from cxr.engine.rundir import git_revision
from cxr.errors import ConfigError, DataError
from cxr.phantom.writers import NIH_ENTRY_HEADER, png_bytes, write_bytes, write_csv
from gan.stylegan2.networks import FAMILY, Generator, build_from_model_args

__all__ = ["MANIFEST", "LABELS_CSV", "LAYOUTS", "LoadedGenerator", "load_generator", "parse_class_mix",
           "prevalence_of", "class_counts", "image_seed", "generate_tree", "write_grid", "write_interpolation"]

MANIFEST = "cxr_generation.json"
LABELS_CSV = GENERATION_LABELS_CSV
LAYOUTS = ("shenzhen", "montgomery", "nih", "folders")
NIH_ENTRY = "Data_Entry_2017.csv"
NORMAL = "normal"
NO_FINDING = "No Finding"
_NORMAL_KEYS = ("normal", "nofinding")  # spellings of "no finding" across label sets
_CENTER_SEED = 0  # the class centres are a property of the model: one fixed draw
_CENTER_DRAWS = 1000
_NLM = {"shenzhen": ("ChinaSet_AllFiles", "CHNCXR", "P"), "montgomery": ("MontgomerySet", "MCUCXR", "L")}


def _key(name: str) -> str:
    k = name.strip().lower().replace(" ", "").replace("_", "")
    return "nofinding" if k in _NORMAL_KEYS else k


# ----------------------------------------------------------------------------------------------
# The generator and its classes


@dataclass
class LoadedGenerator:
    """A StyleGAN2 generator ready to sample, with its classes (name → label vector)."""

    generator: Generator
    checkpoint: Path
    module: str
    model_args: dict[str, Any]
    label_names: list[str]
    multi_label: bool  # label_kind "multi": multi-hot
    classes: dict[str, tuple[float, ...]]  # the base classes; multi-hot also takes "A|B"

    @property
    def size(self) -> int:
        return self.generator.config.resolution

    @property
    def device(self) -> torch.device:
        return self.generator.mapping.w_avg.device

    def resolve_class(self, name: str, where: str = "--class") -> tuple[str, tuple[float, ...]]:
        """The checkpoint's spelling and label vector of class ``name`` (case and ``normal`` /
        ``No Finding`` spellings forgiven; ``A|B`` for a multi-hot combination)."""
        by_key = {_key(k): k for k in self.classes}
        if _key(name) in by_key:
            canon = by_key[_key(name)]
            return canon, self.classes[canon]
        parts = [p for p in name.split("|") if p.strip()]
        if self.multi_label and len(parts) > 1 and all(_key(p) in by_key for p in parts):
            names = sorted({by_key[_key(p)] for p in parts}, key=self.label_names.index)
            if NO_FINDING in names:
                raise ConfigError(f"{where}: class {name!r} combines '{NO_FINDING}' with findings")
            vec = np.zeros(len(self.label_names), np.float32)
            for n in names:
                vec[self.label_names.index(n)] = 1.0
            return "|".join(names), tuple(float(v) for v in vec)
        raise ConfigError(f"{where}: class {name!r} is not in the checkpoint's label set "
                          f"({', '.join(self.classes)}) of {self.checkpoint}")


def _classes(label_names: list[str], c_dim: int, multi_label: bool) -> dict[str, tuple[float, ...]]:
    eye = np.eye(len(label_names), dtype=np.float32)
    classes = {n: tuple(float(v) for v in eye[i]) for i, n in enumerate(label_names)}
    if c_dim == 1:
        return {NORMAL: (0.0,), **classes}
    if multi_label:
        return {**classes, NO_FINDING: tuple(0.0 for _ in label_names)}
    return classes


def load_generator(checkpoint: str | Path, device: torch.device | str = "cpu") -> LoadedGenerator:
    """The StyleGAN2 generator of a run or checkpoint folder (``G_ema`` if kept, else ``G``)."""
    ckpt = resolve_checkpoint(checkpoint)
    modules = read_meta(ckpt).get("modules", [])
    if "G" not in modules and "G_ema" not in modules:
        other = read_model_args(ckpt, modules[0]) if modules else {}
        raise CheckpointError(f"{ckpt}: not a StyleGAN2 checkpoint (no G or G_ema; family "
                              f"{other.get('family', other.get('name'))!r}, modules {', '.join(modules)}); "
                              "cxr generate samples StyleGAN2 runs")
    name = "G_ema" if "G_ema" in modules else "G"
    args = read_model_args(ckpt, name)
    family = args.get("family", args.get("name"))
    if family != FAMILY or args.get("kind") != "generator":
        raise CheckpointError(f"{ckpt}: module '{name}' is not a StyleGAN2 generator (family {family!r}, "
                              f"kind {args.get('kind')!r}); cxr generate samples StyleGAN2 runs")
    try:
        generator = build_from_model_args(args, where=f"{ckpt}: module '{name}'")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    load_module(ckpt, name, generator)
    generator.eval().requires_grad_(False).to(device)
    c_dim = generator.config.c_dim
    label_names = [str(n) for n in args.get("label_names") or []]
    if c_dim == 0:
        raise CheckpointError(f"{ckpt}: an unconditional generator (c_dim 0) has no classes to label a tree with")
    if len(label_names) != c_dim:
        raise CheckpointError(f"{ckpt}: module '{name}' has c_dim {c_dim} but {len(label_names)} label_names")
    kind = args.get("label_kind")
    if kind in ("single", "multi"):
        multi = kind == "multi"
    elif kind is None:  # no record: a label set with a normal class is one-hot, NIH's 14 multi-hot
        multi = c_dim > 1 and not any(_key(n) == "nofinding" for n in label_names)
    else:
        raise CheckpointError(f"{ckpt}: module '{name}' has label_kind {kind!r} (expected single or multi)")
    return LoadedGenerator(generator, ckpt, name, args, label_names, multi, _classes(label_names, c_dim, multi))


# ----------------------------------------------------------------------------------------------
# The class mix


def parse_class_mix(text: str, gen: LoadedGenerator) -> dict[str, float]:
    """``"Tuberculosis=0.5,normal=0.5"`` → ``{class: proportion}`` in the checkpoint's spelling;
    the proportions must be in [0, 1] and sum to 1."""
    mix: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, eq, value = part.rpartition("=")
        if not eq or not name.strip():
            raise ConfigError(f"--class: {part!r} is not CLASS=PROPORTION (e.g. Tuberculosis=0.5,normal=0.5)")
        try:
            p = float(value)
        except ValueError:
            raise ConfigError(f"--class: proportion {value!r} of {name.strip()!r} is not a number") from None
        if not (math.isfinite(p) and 0.0 <= p <= 1.0):
            raise ConfigError(f"--class: proportion {value!r} of {name.strip()!r} is not in [0, 1]")
        canon, _ = gen.resolve_class(name.strip())
        if canon in mix:
            raise ConfigError(f"--class: class {canon!r} is given twice")
        mix[canon] = p
    if not mix:
        raise ConfigError("--class: no class given (e.g. Tuberculosis=0.5,normal=0.5)")
    total = sum(mix.values())
    if abs(total - 1.0) > 1e-6:
        raise ConfigError(f"--class: the proportions sum to {total:g}, not 1")
    return mix


def prevalence_of(tree: str | Path, gen: LoadedGenerator) -> dict[str, float]:
    """The class mix of a dataset tree (each image's positive labels, as the checkpoint names
    them; no positive label is the normal class), for ``--match-prevalence``."""
    ds = load_tree(tree)
    if not ds.records:
        raise DataError(tree, "no images to take a class mix from")
    counts: dict[str, int] = {}
    for r in ds.records:
        labels = np.nan_to_num(np.asarray(r.labels, np.float32)) > 0.5
        names = [n for n, on in zip(r.label_names, labels) if on and _key(n) != "nofinding"]
        text = "|".join(names) if names else NORMAL
        try:
            canon, _ = gen.resolve_class(text, where=f"--match-prevalence {tree}")
        except ConfigError:
            raise DataError(tree, f"image {r.image} is {text!r}, not a class of the checkpoint's label set "
                                  f"({', '.join(gen.classes)})") from None
        counts[canon] = counts.get(canon, 0) + 1
    total = sum(counts.values())
    order = {name: i for i, name in enumerate(gen.classes)}  # the checkpoint's order, combinations last
    return {k: counts[k] / total for k in sorted(counts, key=lambda k: (order.get(k, len(order)), k))}


def class_counts(mix: dict[str, float], n: int) -> dict[str, int]:
    """``n`` images split by ``mix`` (largest remainders, ties to the first class)."""
    raw = {k: p * n for k, p in mix.items()}
    counts = {k: int(math.floor(v)) for k, v in raw.items()}
    left = n - sum(counts.values())
    for k in sorted(raw, key=lambda k: -(raw[k] - counts[k]))[:left]:
        counts[k] += 1
    return counts


def image_seed(seed: int, index: int) -> int:
    """The seed of image ``index``: a 32-bit draw of ``SeedSequence([seed, index])``."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


# ----------------------------------------------------------------------------------------------
# Sampling


def _latents(gen: LoadedGenerator, seeds: Sequence[int]) -> torch.Tensor:
    z = [torch.randn(1, gen.generator.config.z_dim, generator=torch.Generator().manual_seed(s)) for s in seeds]
    return torch.cat(z).to(gen.device)


@torch.no_grad()
def _centres(gen: LoadedGenerator, vectors: Sequence[tuple[float, ...]]) -> dict[tuple[float, ...], torch.Tensor]:
    unique = list(dict.fromkeys(vectors))
    c = torch.tensor(unique, dtype=torch.float32, device=gen.device)
    w = gen.generator.class_w_avg(c, n=_CENTER_DRAWS, generator=torch.Generator().manual_seed(_CENTER_SEED))
    return {v: w[i] for i, v in enumerate(unique)}


@torch.no_grad()
def sample(gen: LoadedGenerator, seeds: Sequence[int], vectors: Sequence[tuple[float, ...]],
           truncation: float, centres: dict[tuple[float, ...], torch.Tensor]) -> np.ndarray:
    """Images (N, R, R) uint8 of the given per-image seeds and label vectors."""
    z = _latents(gen, seeds)
    c = torch.tensor(list(vectors), dtype=torch.float32, device=gen.device)
    w_center = torch.stack([centres[v] for v in vectors]) if truncation < 1.0 else None
    img = gen.generator(z, c, psi=truncation, noise_mode="const", w_center=w_center)
    return _to_uint8(img[:, 0])


def _to_uint8(img: torch.Tensor) -> np.ndarray:
    unit = (img.float().clamp(-1.0, 1.0) + 1.0) / 2.0  # the model's [-1, 1] → [0, 1]
    return torch.round(unit * 255.0).to(torch.uint8).cpu().numpy()


def check_truncation(truncation: float) -> None:
    if not (math.isfinite(truncation) and 0.0 <= truncation <= 1.0):
        raise ConfigError(f"--truncation must be in [0, 1], got {truncation:g}")


# ----------------------------------------------------------------------------------------------
# The tree


@dataclass
class GenerationReport:
    out: Path
    layout: str
    counts: dict[str, int]
    images: list[dict[str, Any]] = field(default_factory=list)


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an output that is a file, or a non-empty folder without ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise DataError(out, "exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DataError(out, "output folder is not empty (pass --overwrite to replace it)")


def _nlm_digit(layout: str, name: str) -> str:
    k = _key(name)
    if k == "tuberculosis":
        return "1"
    if k == "nofinding":
        return "0"
    raise ConfigError(f"--layout {layout}: the NLM sets hold Tuberculosis and normal images only; class "
                      f"{name!r} does not fit (use --layout nih or folders)")


def _nih_labels(name: str) -> str:
    parts = [p for p in name.split("|") if _key(p) != "nofinding"]
    for p in parts:
        if p not in NIH14:
            raise ConfigError(f"--layout nih: class {p!r} is not one of NIH's 14 findings or {NO_FINDING!r} "
                              "(use --layout folders)")
    return "|".join(sorted(parts)) if parts else NO_FINDING


def image_paths(layout: str, names: Sequence[str]) -> list[str]:
    """Relative path of each image of the tree, in image order (checks every class fits)."""
    if layout not in LAYOUTS:
        raise ConfigError(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    n = len(names)
    if layout in _NLM:
        folder, prefix, _ = _NLM[layout]
        if n > 9999:
            raise ConfigError(f"--layout {layout}: at most 9999 images (file names number them NNNN), got {n}")
        return [f"{folder}/CXR_png/{prefix}_{i + 1:04d}_{_nlm_digit(layout, c)}.png" for i, c in enumerate(names)]
    if layout == "nih":
        for c in set(names):
            _nih_labels(c)
        return [f"images/{i + 1:08d}_000.png" for i in range(n)]
    for c in set(names):
        if "|" in c or "/" in c or c.startswith("."):
            raise ConfigError(f"--layout folders: class {c!r} cannot be a folder name (one label per image)")
    return [f"{c}/synthetic_{i + 1:06d}.png" for i, c in enumerate(names)]


def generate_tree(gen: LoadedGenerator, out: str | Path, mix: dict[str, float], n: int, layout: str,
                  truncation: float = 1.0, seed: int = 0, batch_size: int = 16, overwrite: bool = False,
                  progress: Callable[[int], None] | None = None) -> GenerationReport:
    """Write ``n`` images of the class ``mix`` (class → proportion) as a ``layout`` tree in ``out``.

    Everything is written into a temporary folder beside ``out`` and renamed at the end, so an
    interrupted run leaves nothing; a non-empty ``out`` is replaced only with ``overwrite``.
    """
    out = Path(out)
    if n <= 0:
        raise ConfigError(f"--n must be > 0, got {n}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    check_truncation(truncation)
    counts = class_counts(mix, n)
    # classes interleaved by a seeded permutation, so any prefix of the set has about the mix
    names = list(np.random.default_rng(seed).permutation(np.repeat(list(counts), list(counts.values()))))
    names = [str(c) for c in names]
    rels = image_paths(layout, names)
    vectors = [gen.classes.get(c) or gen.resolve_class(c)[1] for c in names]
    seeds = [image_seed(seed, i) for i in range(n)]
    check_out(out, overwrite)
    mode = _NLM[layout][2] if layout in _NLM else "L"

    weights = gen.checkpoint / f"{gen.module}.safetensors"
    rows = [{"image": rel, "class": c, "seed": s} for rel, c, s in zip(rels, names, seeds)]
    manifest = {
        "generator": FAMILY, "checkpoint": str(gen.checkpoint), "module": gen.module,
        "weights_sha256": file_sha256(weights), "checkpoint_step": read_meta(gen.checkpoint).get("step"),
        "code_version": git_revision(), "layout": layout, "n": n, "seed": seed,
        "seed_rule": "numpy SeedSequence([seed, index]).generate_state(1)[0]; z = torch.randn(z_dim) seeded with it",
        "truncation": truncation, "truncation_center": "class mean w", "noise_mode": "const",
        "size": gen.size, "label_names": gen.label_names, "multi_label": gen.multi_label,
        "class_mix": mix, "class_counts": counts, "labels_csv": LABELS_CSV, "images": rows,
    }
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    with claim_output(out), naming(out, tmp):  # an OS error inside tmp names the path in out
        tmp.mkdir()
        try:
            centres = _centres(gen, vectors) if truncation < 1.0 else {}
            for start in range(0, n, batch_size):
                stop = min(n, start + batch_size)
                images = sample(gen, seeds[start:stop], vectors[start:stop], truncation, centres)
                for rel, pixels in zip(rels[start:stop], images):
                    write_bytes(tmp / rel, png_bytes(pixels, mode))
                if progress:
                    progress(stop - start)
            _write_labels(tmp, gen, rows, vectors)
            if layout == "nih":
                write_csv(tmp / NIH_ENTRY, NIH_ENTRY_HEADER,
                          ([rel.rsplit("/", 1)[-1], _nih_labels(c), 0, i + 1, "", "", "", gen.size, gen.size, "", ""]
                           for i, (rel, c) in enumerate(zip(rels, names))))
            manifest["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
            swap_in_tree(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return GenerationReport(out, layout, counts, rows)


def _write_labels(root: Path, gen: LoadedGenerator, rows: list[dict[str, Any]],
                  vectors: Sequence[tuple[float, ...]]) -> None:
    header = ["image", "class", "seed"] + gen.label_names
    write_csv(root / LABELS_CSV, header,
              ([r["image"], r["class"], r["seed"]] + [int(v) for v in vec] for r, vec in zip(rows, vectors)))




# ----------------------------------------------------------------------------------------------
# Contact sheets


def _sheet(rows: list[np.ndarray], gap: int = 2) -> np.ndarray:
    """Rows of (K, R, R) uint8 images → one (rows, K) grid with ``gap`` black pixels between."""
    k, r = rows[0].shape[0], rows[0].shape[1]
    sheet = np.zeros((len(rows) * (r + gap) - gap, k * (r + gap) - gap), np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            sheet[i * (r + gap):i * (r + gap) + r, j * (r + gap):j * (r + gap) + r] = img
    return sheet


def _write_png(path: str | Path, pixels: np.ndarray) -> Path:
    data = png_bytes(pixels, "L")
    return atomic_write(path, lambda f: f.write(data))


def write_grid(gen: LoadedGenerator, path: str | Path, classes: Sequence[str], columns: int = 8,
               truncation: float = 1.0, seed: int = 0) -> Path:
    """A class × seed contact sheet: row ``i`` is class ``classes[i]``, column ``j`` the latent of
    seed ``image_seed(seed, j)`` (the same latent down each column, so rows differ by class only)."""
    check_truncation(truncation)
    vectors = [gen.resolve_class(c)[1] for c in classes]
    seeds = [image_seed(seed, j) for j in range(columns)]
    centres = _centres(gen, vectors) if truncation < 1.0 else {}
    rows = [sample(gen, seeds, [v] * columns, truncation, centres) for v in vectors]
    return _write_png(path, _sheet(rows))


@torch.no_grad()
def write_interpolation(gen: LoadedGenerator, path: str | Path, classes: Sequence[str], steps: int = 8,
                        truncation: float = 1.0, seed: int = 0) -> Path:
    """A latent walk per class: ``steps`` images from the latent of ``image_seed(seed, 0)`` to that
    of ``image_seed(seed, 1)``, linear in w (one row per class)."""
    check_truncation(truncation)
    if steps < 2:
        raise ConfigError(f"--interpolate-steps must be >= 2, got {steps}")
    g = gen.generator
    vectors = [gen.resolve_class(c)[1] for c in classes]
    centres = _centres(gen, vectors) if truncation < 1.0 else {}
    z = _latents(gen, [image_seed(seed, 0), image_seed(seed, 1)])
    t = torch.linspace(0.0, 1.0, steps, device=gen.device)[:, None]
    rows = []
    for v in vectors:
        w = g.mapping(z, torch.tensor([v, v], dtype=torch.float32, device=gen.device))
        walk = w[0:1].lerp(w[1:2], t)
        centre = centres[v].expand(steps, -1) if truncation < 1.0 else None
        rows.append(_to_uint8(g.synthesis(g.truncate(walk, truncation, None, centre), noise_mode="const")[:, 0]))
    return _write_png(path, _sheet(rows))


def read_labels_csv(root: str | Path) -> list[dict[str, str]]:
    """The rows of a generated tree's ``cxr_generation_labels.csv``."""
    text = (Path(root) / LABELS_CSV).read_text(encoding="utf-8")
    return list(csv.DictReader(io.StringIO(text)))
