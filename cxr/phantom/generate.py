"""Generating phantom dataset trees: subjects → render → acquisition chains → writers.

:func:`generate` plans every image first (which subject, which tree, which file name, which
site), then renders and writes them in worker processes, then writes the CSVs, and finally
renames the finished folder into place, so an interrupted run never leaves a half-written tree.

Presets (``PRESETS``):

* ``nlm`` — ``ChinaSet_AllFiles/`` (662: 336 TB, 326 normal; Shenzhen-like DR chain) and
  ``MontgomerySet/`` (138: 58 TB, 80 normal; Montgomery-like CR chain), as the real NLM sets.
* ``nih`` — NIH ChestX-ray14-like tree, findings co-occurring as in the NIH metadata; every
  image square at ``size`` (NIH's 1024 x 1024 PNGs), whatever the site's frame aspect.
* ``vindr`` — VinDr-CXR-like tree, three simulated readers per image; PNGs with
  ``train_meta.csv`` as the community re-encodings, or ``image_format="dicom"``: DICOMs as the
  official release.
* ``nine`` — the 9-class folder tree, equal counts per class.

The mixed trees (nih, vindr, nine) draw each image's site uniformly from every chain (the two
built-in sites plus any ``--chain-file``); nine.csv's ``source`` names it.

Every preset also writes ``phantom_truth/``: each subject rendered by *every* site under one
geometry (the subject's own tree's), with its masks, boxes and a manifest, i.e. the paired
ground truth a harmonization study scores against.

Determinism: a subject's every random choice comes from generators keyed by its seed (drawn
from the global seed and the subject's index), images are written by file name, CSV rows in a
fixed order, so the output is byte-identical for the same seed whatever ``workers`` is.
"""

from __future__ import annotations

import difflib
import multiprocessing
import os
import secrets
import shutil
import signal
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, Sequence

import numpy as np

from cxr.data.io import claim_output, naming
from cxr.data.record import NIH14, NINE
from cxr.errors import CxrError
from cxr.phantom import writers as W
from cxr.phantom.anatomy import load_anatomy
from cxr.phantom.chains import PRESETS as CHAIN_PRESETS
from cxr.phantom.chains import AcquisitionChain, acquire_all, load_chain, stream
from cxr.phantom.projections import bundled_anatomy
from cxr.phantom.render import preload_volume, render, subject_params, warm_base_maps
from cxr.phantom.subjects import nih_rows, sample_subject
from cxr.phantom.types import DEFAULT_DIFFICULTY, Projection, Subject

PRESETS: tuple[str, ...] = ("nlm", "nih", "vindr", "nine")
FORMATS: dict[str, tuple[str, ...]] = {"png": PRESETS, "dicom": ("vindr",)}  # format -> presets
MIN_SIZE = 32  # below this the lungs are a few pixels wide and markers do not fit
TB = "Tuberculosis"

# Default image counts (the real sets' for nlm; CPU-friendly sizes for the big real sets).
NLM_COUNTS: dict[str, dict[str, int]] = {
    "shenzhen": {TB: 336, "normal": 326},
    "montgomery": {TB: 58, "normal": 80},
}
DEFAULT_N: dict[str, int] = {"nlm": 800, "nih": 1000, "vindr": 500, "nine": 900}
# Findings each preset may draw (the vocabulary `--findings` is checked against).
PRESET_FINDINGS: dict[str, tuple[str, ...]] = {
    "nlm": (TB,),
    "nih": NIH14,
    "vindr": tuple(dict.fromkeys(W.VINDR_OF[f] for f in NIH14 if f in W.VINDR_OF)),
    "nine": tuple(c for c in NINE if c != "No Finding"),
}
NIH_TEST_FRACTION = 0.23  # the official split puts ~23 % of patients in test_list.txt


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PhantomConfig:
    """Everything one ``cxr phantom`` run needs; :func:`check_config` validates it."""

    preset: str
    out: Path
    size: int = 256  # long side of every image
    seed: int = 0
    n: int | None = None  # total images (None: the preset's counts)
    workers: int | None = None  # None: all cores
    bit_depth: int = 8
    overwrite: bool = False
    chain_files: tuple[Path, ...] = ()
    difficulty: float = DEFAULT_DIFFICULTY  # 0 (large, dense lesions) .. 1 (small, faint)
    findings: tuple[str, ...] | None = None  # restrict the findings drawn
    # A user's own chest CT (NIfTI in HU) and its TotalSegmentator-style label map; None: the
    # bundled CT. ``structures``: a ``structure,id`` CSV when the label ids are numbered otherwise.
    ct: Path | None = None
    labels: Path | None = None
    structures: Path | None = None
    image_format: str = "png"  # "dicom": train/<image_id>.dicom (vindr preset)


def check_config(cfg: PhantomConfig) -> PhantomConfig:
    """Raise a one-line :class:`CxrError` for any bad value; return the config normalised."""
    if cfg.preset not in PRESETS:
        close = difflib.get_close_matches(cfg.preset, PRESETS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise CxrError(f"unknown preset '{cfg.preset}'{hint}; choose one of {', '.join(PRESETS)}")
    if cfg.size <= 0:
        raise CxrError(f"--size must be a positive number of pixels, got {cfg.size}")
    if cfg.size < MIN_SIZE:
        raise CxrError(f"--size {cfg.size} is too small; use at least {MIN_SIZE}")
    if cfg.n is not None and cfg.n <= 0:
        raise CxrError(f"--n must be a positive number of images, got {cfg.n}")
    if cfg.workers is not None and cfg.workers < 0:
        raise CxrError(f"--workers must be >= 0 (0: in this process), got {cfg.workers}")
    if cfg.bit_depth not in (8, 16):
        raise CxrError(f"--bit-depth must be 8 or 16, got {cfg.bit_depth}")
    if cfg.image_format not in FORMATS:
        raise CxrError(f"unknown --format '{cfg.image_format}'; choose one of {', '.join(FORMATS)}")
    if cfg.preset not in FORMATS[cfg.image_format]:
        raise CxrError(f"--format {cfg.image_format} is for the {', '.join(FORMATS[cfg.image_format])} "
                       f"preset (the real release's format); preset {cfg.preset} writes PNGs")
    if not 0.0 <= cfg.difficulty <= 1.0:
        raise CxrError(f"--difficulty must be between 0 (easy) and 1 (hard), got {cfg.difficulty}")
    if cfg.seed < 0:
        raise CxrError(f"--seed must be zero or positive, got {cfg.seed}")
    if cfg.findings is not None:
        allowed = PRESET_FINDINGS[cfg.preset]
        if not cfg.findings:
            raise CxrError("--findings is empty; name at least one finding")
        for name in cfg.findings:
            if name not in allowed:
                close = difflib.get_close_matches(name, allowed, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise CxrError(f"unknown finding '{name}' for preset {cfg.preset}{hint}; "
                               f"known: {', '.join(allowed)}")
    if (cfg.ct is None) != (cfg.labels is None):
        raise CxrError("--ct and --labels go together: a user CT needs its label map")
    if cfg.structures is not None and cfg.ct is None:
        raise CxrError("--structures numbers a user CT's label map: it needs --ct and --labels")
    for flag, path in (("--ct", cfg.ct), ("--labels", cfg.labels), ("--structures", cfg.structures)):
        if path is not None and not Path(path).is_file():
            raise CxrError(f"{path}: {flag} file not found")
    check_out(cfg.out, cfg.overwrite)
    return cfg


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an output path that is a file, or a non-empty folder without ``overwrite``."""
    out = Path(out)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise CxrError(f"{out}: output path exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CxrError(f"{out}: output folder is not empty (use --overwrite to replace it)")


def resolve_chains(chain_files: Sequence[Path]) -> dict[str, AcquisitionChain]:
    """The built-in sites plus the user's: a file named like a built-in replaces it."""
    chains = {name: load_chain(name) for name in CHAIN_PRESETS}
    for path in chain_files:
        chain = load_chain(Path(path))
        chains[chain.name] = chain
    return chains


# --------------------------------------------------------------------------------------------
# The renderer (the anatomy half of the phantom), behind a small interface
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SubjectRequest:
    """One subject to draw: its index (seed stream), and the findings it must or may have."""

    index: int
    mode: str  # "normal", "tb", "nih", "vindr", or "nine:<Class>"


class Backend(Protocol):
    """What generation needs from the anatomy half: load once, draw subjects, render."""

    def load(self) -> Any: ...

    def subjects(self, requests: Sequence[SubjectRequest], seed: int, difficulty: float,
                 allowed: tuple[str, ...] | None) -> list[Subject]: ...

    def render(self, subject: Subject, anatomy: Any, size: int) -> Projection: ...

    # Optional: ``warm(anatomy, subjects, threads)`` does, once and before the workers fork, the
    # set-up that rendering these subjects would otherwise repeat in every worker;
    # ``preload(anatomy)`` the part of it that needs no subjects, while they are being drawn.


@dataclass(frozen=True)
class CTBackend:
    """The real thing: the bundled chest CT, or a user's own (:mod:`cxr.phantom.anatomy`),
    subjects drawn from real NIH rows (:mod:`cxr.phantom.subjects`), rendered by
    :mod:`cxr.phantom.render`."""

    ct: Path | None = None  # None: the bundled CT
    labels: Path | None = None
    structures: Path | None = None
    # The bundled CT's shipped projections (cxr.phantom.projections) instead of projecting it
    # here: the same maps to the bit, 0.3 s sooner. False projects it as a user's CT is.
    shipped_projections: bool = True

    def load(self) -> Any:
        if self.ct is None and self.shipped_projections:
            return bundled_anatomy()
        return load_anatomy(self.ct, self.labels, self.structures)

    def subjects(self, requests: Sequence[SubjectRequest], seed: int, difficulty: float,
                 allowed: tuple[str, ...] | None) -> list[Subject]:
        rows = nih_rows()
        nih_allowed = tuple(f for f in NIH14 if allowed is None or f in allowed)
        vindr_allowed = tuple(f for f in nih_allowed if f in W.VINDR_OF
                              and (allowed is None or W.VINDR_OF[f] in allowed or f in allowed))
        out = []
        for r in requests:
            kw: dict[str, Any] = {"difficulty": difficulty, "rows": rows}
            if r.mode == "normal":
                subj = sample_subject(seed, r.index, findings=(), view="PA", **kw)
            elif r.mode == "tb":
                subj = sample_subject(seed, r.index, findings=(TB,), view="PA", **kw)
            elif r.mode.startswith("nine:"):
                subj = sample_subject(seed, r.index, findings=(r.mode[5:],), **kw)
            elif r.mode == "nih":
                subj = sample_subject(seed, r.index, allowed=nih_allowed, **kw)
            elif r.mode == "vindr":
                # NIH co-occurrence, renamed to the VinDr classes the lesions are drawn as
                subj = sample_subject(seed, r.index, allowed=vindr_allowed, **kw)
                names = tuple(sorted({W.VINDR_OF[f] for f in subj.findings}))
                subj = replace(subj, findings=names)
            else:
                raise ValueError(f"unknown subject mode {r.mode!r}")
            out.append(subj)
        return out

    def render(self, subject: Subject, anatomy: Any, size: int) -> Projection:
        return render(subject, anatomy, size)

    def preload(self, anatomy: Any) -> None:
        """Build the CT's channel volume that every yaw bin's projection reads."""
        preload_volume(anatomy, threads=min(2, available_cores()))

    def warm(self, anatomy: Any, subjects: Sequence[Subject], threads: int = 1) -> None:
        """Project the CT at every yaw these subjects use (cached on ``anatomy``)."""
        warm_base_maps(anatomy, (subject_params(s)["yaw_deg"] for s in subjects), threads)


def default_backend() -> Backend:
    """The CT-based renderer."""
    return CTBackend()


# --------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Job:
    """One image to make: a subject, the tree and file it goes to, and the site that takes it."""

    index: int
    subject: Subject
    tree: str  # "shenzhen", "montgomery", "nih", "vindr", "nine"
    home: str  # chain whose geometry and appearance the tree image has
    image: str  # path of the tree image, relative to the output folder
    mode8: str | None = None  # 8-bit PNG mode the tree needs; None: the chain's own
    extra: tuple[tuple[str, Any], ...] = ()


def split_counts(total: int, weights: dict[str, float]) -> dict[str, int]:
    """Split ``total`` in proportion to ``weights`` (largest remainder), every part ≥ 1 when
    there are enough to go round."""
    keys = list(weights)
    w = np.array([weights[k] for k in keys], dtype=np.float64)
    raw = total * w / w.sum()
    counts = np.floor(raw).astype(int)
    order = np.argsort(-(raw - counts), kind="stable")
    for i in order[: total - counts.sum()]:
        counts[i] += 1
    if total >= len(keys):
        for i in range(len(keys)):
            while counts[i] == 0:
                j = int(np.argmax(counts))
                counts[j] -= 1
                counts[i] += 1
    return {k: int(c) for k, c in zip(keys, counts)}


def _nlm_counts(n: int | None) -> dict[str, dict[str, int]]:
    if n is None:
        return {t: dict(c) for t, c in NLM_COUNTS.items()}
    flat = {(t, c): v for t, cs in NLM_COUNTS.items() for c, v in cs.items()}
    split = split_counts(n, {f"{t}|{c}": v for (t, c), v in flat.items()})
    out: dict[str, dict[str, int]] = {t: {} for t in NLM_COUNTS}
    for key, v in split.items():
        t, c = key.split("|")
        out[t][c] = v
    return out


def plan(cfg: PhantomConfig, chains: dict[str, AcquisitionChain], backend: Backend) -> list[Job]:
    """Every image of the run, in index order, with its subject drawn and its name fixed."""
    mixed = list(chains)  # sites a mixed tree (nih, vindr, nine) draws from
    if cfg.preset == "nlm":
        counts = _nlm_counts(cfg.n)
        requests, slots = [], []
        for tree in ("shenzhen", "montgomery"):
            for cls in ("normal", TB):  # normals first, then TB, as the real numbering
                for _ in range(counts[tree][cls]):
                    requests.append(SubjectRequest(len(requests), "tb" if cls == TB else "normal"))
                    slots.append(tree)
        subjects = backend.subjects(requests, cfg.seed, cfg.difficulty, cfg.findings)
        jobs, number = [], {"shenzhen": 0, "montgomery": 0}
        for req, subj, tree in zip(requests, subjects, slots):
            number[tree] += 1
            tb = int(TB in subj.findings)
            if tree == "shenzhen":
                name = f"CHNCXR_{number[tree]:04d}_{tb}"
                image = f"{W.SHENZHEN_DIR}/CXR_png/{name}.png"
            else:
                name = f"MCUCXR_{number[tree]:04d}_{tb}"
                image = f"{W.MONTGOMERY_DIR}/CXR_png/{name}.png"
            jobs.append(Job(req.index, subj, tree, tree, image, extra=(("name", name),)))
        return jobs

    n = cfg.n if cfg.n is not None else DEFAULT_N[cfg.preset]
    if cfg.preset == "nine":
        classes = ["No Finding"] + [c for c in NINE if c != "No Finding"
                                    and (cfg.findings is None or c in cfg.findings)]
        per = split_counts(n, {c: 1.0 for c in classes})
        modes = [m for c in classes
                 for m in ["normal" if c == "No Finding" else f"nine:{c}"] * per[c]]
        requests = [SubjectRequest(i, m) for i, m in enumerate(modes)]
    else:
        requests = [SubjectRequest(i, cfg.preset) for i in range(n)]
    subjects = backend.subjects(requests, cfg.seed, cfg.difficulty, cfg.findings)
    site_rng = stream(cfg.seed, "sites", cfg.preset)
    homes = [mixed[int(k)] for k in site_rng.integers(len(mixed), size=len(subjects))]

    if cfg.preset == "nih":
        patients = nih_patients(subjects, stream(cfg.seed, "nih-patients"))
        jobs = []
        for req, subj, home, (pid, follow) in zip(requests, subjects, homes, patients):
            image = f"images/{pid:08d}_{follow:03d}.png"
            jobs.append(Job(req.index, subj, "nih", home, image, mode8="L",
                            extra=(("patient_id", pid), ("follow_up", follow))))
        return jobs
    if cfg.preset == "vindr":
        jobs = []
        for req, subj, home in zip(requests, subjects, homes):
            image_id = W.vindr_image_id(cfg.seed, req.index)
            suffix = W.DICOM_SUFFIX if cfg.image_format == "dicom" else ".png"
            jobs.append(Job(req.index, subj, "vindr", home, f"train/{image_id}{suffix}", mode8="L",
                            extra=(("image_id", image_id),)))
        return jobs
    jobs = []
    for req, subj, home in zip(requests, subjects, homes):
        cls = W.nine_class(subj.findings)
        jobs.append(Job(req.index, subj, "nine", home, f"{cls}/phantom_{req.index + 1:05d}.png"))
    return jobs


def nih_patients(subjects: Sequence[Subject], rng: np.random.Generator) -> list[tuple[int, int]]:
    """(patient id, follow-up #) per subject: NIH has ~3.6 images per patient.

    Subjects of one sex, sorted by age, are cut into runs of geometric length; each run is one
    patient whose follow-ups are in age order, so a patient's sex is fixed and ages rise.
    """
    order = sorted(range(len(subjects)), key=lambda i: (subjects[i].sex, subjects[i].age, i))
    out: list[tuple[int, int]] = [(0, 0)] * len(subjects)
    pid, k = 0, 0
    while k < len(order):
        run = int(rng.geometric(1 / 3.6))
        sex = subjects[order[k]].sex
        pid += 1
        follow = 0
        while k < len(order) and follow < run and subjects[order[k]].sex == sex:
            out[order[k]] = (pid, follow)
            follow += 1
            k += 1
    return out


# --------------------------------------------------------------------------------------------
# Work (runs in the worker processes)
# --------------------------------------------------------------------------------------------

@dataclass
class _Context:
    """What every job needs, built once per process."""

    root: Path
    size: int
    bit_depth: int
    seed: int
    chains: dict[str, AcquisitionChain]
    backend: Backend
    anatomy: Any = None


def make_image(job: Job, ctx: _Context) -> W.ImageRow:
    """Render one subject, pass it through every site, write its files; return its metadata."""
    subj = job.subject
    proj = ctx.backend.render(subj, ctx.anatomy, ctx.size)
    home = ctx.chains[job.home]
    # NIH stored every film square (resized to 1024 x 1024): its tree's frames are too
    rads = acquire_all(proj, ctx.chains.values(), home, ctx.size, seed=subj.seed, square=job.tree == "nih")
    rad = rads[job.home]
    geom = rad.geometry
    assert geom is not None
    h, w = rad.image.shape
    frame = geom.frame
    extra = dict(job.extra)
    root = f"{ctx.root}/"  # file paths as strings: Path joins cost ~10 per image for nothing

    renders: dict[str, bytes] = {
        name: W.image_png(r.image, r.bits, ctx.bit_depth, ctx.chains[name].output_mode)
        for name, r in rads.items()
    }
    if job.image.endswith(W.DICOM_SUFFIX):  # the acquisition's own levels, whatever bit_depth
        tree_file = W.vindr_dicom(rad.image, rad.bits, job.home, subj, extra["image_id"],
                                  (frame.width, frame.height) if frame else (w, h), stream(subj.seed, "dicom"))
    elif job.mode8 in (None, home.output_mode) or ctx.bit_depth == 16:
        tree_file = renders[job.home]
    else:
        tree_file = W.image_png(rad.image, rad.bits, ctx.bit_depth, job.mode8)
    W.write_bytes(root + job.image, tree_file)

    reading_rng = stream(subj.seed, "reading")
    tb = TB in subj.findings
    if job.tree == "shenzhen":
        text = W.shenzhen_reading(subj.sex, subj.age, rad.lesions, rad.lung_mask, tb, reading_rng)
        W.write_text(f"{root}{W.SHENZHEN_DIR}/ClinicalReadings/{extra['name']}.txt", text)
    elif job.tree == "montgomery":
        text = W.montgomery_reading(subj.sex, subj.age, rad.lesions, rad.lung_mask, tb, reading_rng)
        W.write_text(f"{root}{W.MONTGOMERY_DIR}/ClinicalReadings/{extra['name']}.txt", text)
        for folder, label in (("leftMask", 1), ("rightMask", 2)):
            W.write_bytes(f"{root}{W.MONTGOMERY_DIR}/ManualMask/{folder}/{extra['name']}.png",
                          W.mask_png(rad.lung_mask == label))

    boxes = [W.TruthBox(les.finding, les.kind, les.box, getattr(les, "region", "lung"))
             for les in rad.lesions]
    if job.tree == "vindr":
        # boxes in the original's pixels: the plate's for a PNG, the DICOM's own for a DICOM
        scale = (frame.width / w, frame.height / h) if frame and job.image.endswith(".png") else (1.0, 1.0)
        vindr_boxes = [b for b in boxes if W.vindr_class(b.finding) is not None]
        extra["reader_rows"] = W.vindr_reader_rows(extra["image_id"], vindr_boxes, scale,
                                                   stream(subj.seed, "readers"))

    sid = subj.subject_id
    truth = W.TRUTH_DIR
    render_paths = {}
    for name, data in renders.items():
        rel = f"{truth}/{name}/{sid}.png"
        W.write_bytes(root + rel, data)
        render_paths[name] = rel
    lung_rel = f"{truth}/lung/{sid}.png"
    W.write_bytes(root + lung_rel, W.png_bytes(rad.lung_mask.astype(np.uint8), "L"))
    lesion_rels = []
    for k, les in enumerate(rad.lesions):
        rel = f"{truth}/lesions/{sid}_{k}.png"
        W.write_bytes(root + rel, W.mask_png(les.mask))
        lesion_rels.append(rel)

    return W.ImageRow(
        index=job.index, subject_id=sid, seed=subj.seed, tree=job.tree, image=job.image,
        chain=job.home, width=w, height=h,
        original_width=frame.width if frame else w, original_height=frame.height if frame else h,
        age=subj.age, sex=subj.sex, view=subj.view, findings=tuple(subj.findings),
        severity=subj.severity, boxes=boxes, renders=render_paths, lung_mask=lung_rel,
        lesion_masks=lesion_rels, extra=extra)


# One context per worker process, set by the pool initializer (a process-local handle, not
# shared state: each process builds its own and only reads it).
_WORKER_CONTEXT: _Context | None = None


def _init_worker(ctx: _Context) -> None:
    global _WORKER_CONTEXT
    import torch

    # Ctrl-C reaches the whole process group: the parent stops the pool (and cleans up), the
    # workers stay quiet instead of each printing its own KeyboardInterrupt traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    torch.set_num_threads(1)  # one process per core already; more threads only contend
    if ctx.anatomy is None:
        ctx.anatomy = ctx.backend.load()
    _WORKER_CONTEXT = ctx


def _work_chunk(jobs: Sequence[Job]) -> list[W.ImageRow]:
    assert _WORKER_CONTEXT is not None, "worker not initialised"
    return [make_image(job, _WORKER_CONTEXT) for job in jobs]


def _run_jobs(jobs: Sequence[Job], ctx: _Context, workers: int,
              progress: Callable[[int], None] | None) -> list[W.ImageRow]:
    rows: list[W.ImageRow] = []
    # Project the anatomy (loaded by generate) once in the parent: forked workers share the
    # maps copy-on-write instead of each projecting the CT again.
    warm = getattr(ctx.backend, "warm", None)
    if warm is not None:
        warm(ctx.anatomy, [job.subject for job in jobs], workers)
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            rows.append(make_image(job, ctx))
            if progress:
                progress(1)
        return rows
    with multiprocessing.get_context().Pool(workers, initializer=_init_worker, initargs=(ctx,)) as pool:
        for part in pool.imap(_work_chunk, guided_chunks(jobs, workers)):
            rows.extend(part)
            if progress:
                progress(len(part))
    return rows


def guided_chunks(items: Sequence[Job], workers: int, most: int = 32, least: int = 2) -> Iterable[Sequence[Job]]:
    """Consecutive slices of ``items``, each an eighth of what is left per worker, between
    ``least`` and ``most`` ("guided" scheduling).

    Every chunk costs a hand-over between processes (a worker waking up, two pipe messages,
    the parent's result thread): at 4 images a chunk that was 0.2 s of an 800-image run's CPU.
    Large chunks early and small ones at the end keep that down without leaving one worker
    busy with a long last chunk while the others wait. The progress bar moves a chunk at a time.
    """
    i, n = 0, len(items)
    while i < n:
        k = max(least, min(most, (n - i) // (8 * workers)))
        yield items[i:i + k]
        i += k


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------

@dataclass
class PhantomResult:
    out: Path
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # tree -> label -> images
    images: int = 0


def _finish_tree(root: Path, preset: str, rows: list[W.ImageRow], chains: Sequence[str], seed: int) -> None:
    if preset == "nih":
        patients = sorted({str(r.extra["patient_id"]) for r in rows}, key=int)
        rng = stream(seed, "nih-split")
        n_test = int(round(NIH_TEST_FRACTION * len(patients)))
        test = {patients[i] for i in rng.permutation(len(patients))[:n_test]}
        W.write_nih(root, rows, test)
        (root / "images").mkdir(exist_ok=True)
    elif preset == "vindr":
        W.write_vindr(root, rows)
    elif preset == "nine":
        W.write_nine(root, rows)
    W.write_truth_manifest(root, sorted(rows, key=lambda r: r.index), chains)


def phantom_settings(cfg: PhantomConfig, chains: dict[str, AcquisitionChain],
                     anatomy_source: str | None, images: int) -> dict[str, Any]:
    """What made a phantom tree, for ``phantom_truth/settings.json``: the options that change
    its pixels (not ``--workers`` or the output path, which do not), the CT and every site's
    full chain, so a tree can be traced and regenerated."""
    return {
        "preset": cfg.preset, "size": cfg.size, "seed": cfg.seed, "images": images,
        "bit_depth": cfg.bit_depth, "difficulty": cfg.difficulty,
        "findings": list(cfg.findings) if cfg.findings is not None else None,
        "anatomy": anatomy_source,
        "labels": str(cfg.labels) if cfg.labels is not None else None,
        "structures": str(cfg.structures) if cfg.structures is not None else None,
        "chains": {name: asdict(chain) for name, chain in chains.items()},
        # only when not the default, so a PNG tree's settings.json keeps its bytes
        **({"format": cfg.image_format} if cfg.image_format != "png" else {}),
    }


def _counts(rows: Iterable[W.ImageRow], preset: str) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for r in rows:
        tree = out.setdefault(r.tree, {})
        if preset == "nine":
            key = W.nine_class(r.findings)
        elif preset == "nlm":
            key = TB if TB in r.findings else "normal"
        else:
            key = "No Finding" if not r.findings else "abnormal"
        tree[key] = tree.get(key, 0) + 1
    return out


def generate(cfg: PhantomConfig, backend: Backend | None = None,
             progress: Callable[[int], None] | None = None,
             on_plan: Callable[[int], None] | None = None) -> PhantomResult:
    """Write the preset's tree(s) and ``phantom_truth/`` to ``cfg.out``, atomically.

    ``progress(k)`` is called as images finish; ``on_plan(total)`` once the plan is known.
    """
    cfg = check_config(cfg)
    chains = resolve_chains(cfg.chain_files)
    backend = backend if backend is not None else CTBackend(cfg.ct, cfg.labels, cfg.structures)
    # The CT is laid out for projection (numpy copies, which release the GIL) while the plan is
    # drawn. It is loaded first, alone: its many short steps, each waiting for the GIL behind
    # the plan's pure-Python draws, took 5x longer side by side.
    anatomy = backend.load()
    preload = getattr(backend, "preload", None)
    with ThreadPoolExecutor(1) as pool:
        preloading = pool.submit(preload, anatomy) if preload is not None else None
        jobs = plan(cfg, chains, backend)
        if preloading is not None:
            preloading.result()
    if on_plan:
        on_plan(len(jobs))
    workers = available_cores() if cfg.workers is None else cfg.workers

    out = Path(cfg.out)
    tmp = out.parent / f".{out.name}.{secrets.token_hex(6)}.tmp"
    with claim_output(out), naming(out, tmp):  # one writer per --out, --overwrite or not; OS errors name it
        tmp.mkdir()
        try:
            ctx = _Context(tmp, cfg.size, cfg.bit_depth, cfg.seed, chains, backend, anatomy)
            rows = _run_jobs(jobs, ctx, workers, progress)
            _finish_tree(tmp, cfg.preset, rows, list(chains), cfg.seed)
            W.write_settings(tmp, phantom_settings(cfg, chains, getattr(anatomy, "source", None), len(rows)))
            _replace_dir(tmp, out, cfg.overwrite)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return PhantomResult(out, _counts(rows, cfg.preset), len(rows))


def _replace_dir(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished ``tmp`` to ``out``; an old ``out`` is removed only afterwards."""
    check_out(out, overwrite)  # it may have been filled while we were writing
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if out.exists():
        old = out.parent / f".{out.name}.{secrets.token_hex(6)}.old"
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


def available_cores() -> int:
    """Cores this process may run on (the default ``--workers``)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1
