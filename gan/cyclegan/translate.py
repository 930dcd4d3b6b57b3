"""Apply a trained generator to a whole dataset tree and write the same tree, translated.

Any run whose ``A → B`` generator is checkpointed as ``G_ab`` with a ``family`` in its
``model_args`` translates here: the CycleGAN (``a2b`` and, with ``G_ba``, ``b2a``) and CUT /
FastCUT (:mod:`gan.cut`; ``a2b`` only). :func:`load_translator` checks that the checkpoint is
of the method asked for (:data:`METHODS`), so a run of another family or mode is one line.

The tree is rewritten by :func:`cxr.data.rewrite.rewrite_tree`: every file carried over, each
image replaced *at its original size, in its original file format and mode*, so the translated
tree is read by the same loader as the source, with the same records, labels and masks.
``cxr_translation.json`` at the top records what made it (checkpoint and its weights' hash,
direction, source tree).

Each image goes through the preprocessing the generator was trained with (read from the
checkpoint's ``model_args["input"]``: square size and pad/crop fit), the generator, and back
to the file's size. By default (``detail="keep"``) only the generator's *change* goes back: the
difference between its output and its input square is resized to the file's size and added to
the original, so a 4020 x 4892 radiograph translated by a 256² generator keeps its own fine
detail instead of becoming a 256² image blown up. ``detail="none"`` writes the generator's
image itself, resized (the padding cut off with ``fit="pad"``; with ``fit="crop"`` pasted into
the resized original, whose edges the network never saw). At the training size both agree.

A generator trained with ``data.prematch: histogram`` (:mod:`gan.cyclegan.prematch`) records
the fitted histogram match in its input contract; each image is matched first, then translated
(``add_change`` then adds the change to the matched image). :func:`translate_tree` reads the
matched image back as the run's matched tree stores it (the source's format and bit depth), so
translating the original tree gives exactly what translating the run's ``prematched/`` tree
gives; :meth:`Translator.images` matches in float.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from cxr.data.preprocess import fit_geometry, resize_square
from cxr.data.record import Sample
from cxr.data.rewrite import RewriteReport, encode_like, file_sha256, rewrite_tree
from cxr.engine.checkpoint import CheckpointError, load_module, read_meta, read_model_args, resolve_checkpoint
from cxr.engine.ema import ema_name
from cxr.errors import ConfigError
from gan.cyclegan.data import to_model_range, to_unit_range
from gan.cyclegan.prematch import reference_of
from gan.networks import build_from_model_args
from harmonize.histogram import HistogramReference, match_histogram
from harmonize.trees import match_as_written

__all__ = ["MANIFEST", "DIRECTIONS", "DETAIL_MODES", "WEIGHTS", "METHODS", "Translator", "load_translator",
           "checkpoint_method", "from_square", "add_change", "translate_tree", "translate_run", "encode_like"]

MANIFEST = "cxr_translation.json"
DIRECTIONS = {"a2b": "G_ab", "b2a": "G_ba"}
DETAIL_MODES = ("keep", "none")
WEIGHTS = ("auto", "ema", "raw")  # auto: the EMA generator when the run kept one (train.ema > 0)
# learned translation methods -> how they are named to the user; a CUT run's model_args say
# family "cut" and mode "cut" or "fastcut"
METHODS = {"cyclegan": "CycleGAN", "cut": "CUT", "fastcut": "FastCUT"}
ONE_WAY = ("cut", "fastcut")  # methods with no B → A generator


# ----------------------------------------------------------------------------------------------
# Loading a generator


@dataclass
class Translator:
    """A generator plus the input contract it was trained with."""

    generator: nn.Module
    size: int
    fit: str
    checkpoint: Path
    direction: str
    model_args: dict[str, Any]
    detail: str = "keep"  # "keep": add the generator's change to the original; "none": its image
    module: str = "G_ab"  # the checkpoint module applied (G_ab, G_ba, or their _ema averages)
    prematch: HistogramReference | None = None  # the histogram match applied first (data.prematch)
    method: str = "cyclegan"  # the learned method that trained it (METHODS)

    def squares(self, batch: torch.Tensor) -> torch.Tensor:
        """(N, 1, S, S) [0, 1] preprocessed images → translated, same shape, [0, 1]."""
        return translate_squares(self.generator, batch)

    def images(self, originals: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Decoded (H, W) [0, 1] images of any sizes → their translations, at the same sizes
        (matched first when the generator was trained on matched images)."""
        if self.prematch is not None:
            originals = [match_histogram(o, self.prematch) for o in originals]
        return translate_images(self.generator, originals, self.size, self.fit, self.detail)


@torch.no_grad()
def translate_squares(generator: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """(N, 1, S, S) [0, 1] images through a generator in its [-1, 1] range, back to [0, 1] on CPU."""
    device = next(generator.parameters()).device
    return to_unit_range(generator(to_model_range(batch.to(device)))).cpu()


def check_detail(detail: str) -> None:
    """A clear error for a ``detail`` mode that is not one of :data:`DETAIL_MODES`."""
    if detail not in DETAIL_MODES:
        raise ConfigError(f"detail must be one of {', '.join(DETAIL_MODES)}, got {detail!r}")


def translate_images(generator: nn.Module, originals: Sequence[np.ndarray], size: int, fit: str,
                     detail: str = "keep") -> list[np.ndarray]:
    """Decoded images into the generator's ``size``² square (``fit``), through it, and back to
    each original's shape: what ``cxr translate`` does to every image of a tree (``detail``: see
    the module docstring)."""
    check_detail(detail)
    inputs = np.stack([resize_square(o, size, fit) for o in originals])
    translated = translate_squares(generator, torch.from_numpy(inputs)[:, None])[:, 0].numpy()
    if detail == "none":
        return [from_square(sq, o, fit) for sq, o in zip(translated, originals)]
    return [add_change(sq - x, o, fit) for sq, x, o in zip(translated, inputs, originals)]


def generator_method(args: dict[str, Any]) -> str | None:
    """The learned method a generator's ``model_args`` name: its family, or a CUT run's mode."""
    family = args.get("family")
    return args.get("mode", family) if family == "cut" else family


def checkpoint_method(checkpoint: str | Path) -> str | None:
    """The method (:data:`METHODS`) of a run or checkpoint folder, from its ``G_ab`` generator."""
    return generator_method(read_model_args(resolve_checkpoint(checkpoint), DIRECTIONS["a2b"]))


def load_translator(checkpoint: str | Path, direction: str, device: torch.device | str = "cpu",
                    detail: str = "keep", weights: str = "auto", method: str = "cyclegan") -> Translator:
    """The ``a2b`` or ``b2a`` generator of a run or checkpoint folder of ``method`` (a CycleGAN
    by default; ``cut`` and ``fastcut`` runs have ``a2b`` only), ready to apply.

    ``weights``: ``auto`` applies the weight average (``train.ema``) when the checkpoint holds
    one, else the trained weights; ``ema`` insists on the average; ``raw`` takes the weights as
    trained. A checkpoint of another method is one line naming both.
    """
    if direction not in DIRECTIONS:
        raise ConfigError(f"--direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
    if weights not in WEIGHTS:
        raise ConfigError(f"--weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    if method not in METHODS:
        raise ConfigError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if method in ONE_WAY and direction != "a2b":
        raise ConfigError(f"--direction {direction}: {METHODS[method]} learns one generator, a2b only")
    check_detail(detail)
    ckpt = resolve_checkpoint(checkpoint)
    name = DIRECTIONS[direction]
    if weights != "raw":
        has_ema = ema_name(name) in read_meta(ckpt).get("modules", [])
        if weights == "ema" and not has_ema:
            raise CheckpointError(f"{ckpt}: no weight average '{ema_name(name)}' (trained without train.ema)")
        name = ema_name(name) if has_ema else name
    args = read_model_args(ckpt, name)
    found = generator_method(args)
    if found != method and found in METHODS:
        raise CheckpointError(f"{ckpt}: a {METHODS[found]} checkpoint, not a {METHODS[method]} one "
                              f"(apply it with --method {found})")
    if found != method or args.get("kind") != "generator":
        raise CheckpointError(f"{ckpt}: module '{name}' is not a {METHODS[method]} generator "
                              f"(family {args.get('family')!r}, kind {args.get('kind')!r})")
    contract = args.get("input") or {}
    try:
        size, fit = int(contract["size"]), str(contract["fit"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{ckpt}: module '{name}' does not record its input size and fit") from None
    try:
        generator = build_from_model_args(args, where=f"{ckpt}: module '{name}'")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    load_module(ckpt, name, generator)
    generator.eval().to(device)
    prematch = reference_of(contract["prematch"]) if contract.get("prematch") else None
    return Translator(generator, size, fit, ckpt, direction, args, detail, name, prematch, method)


# ----------------------------------------------------------------------------------------------
# Image geometry: into the network's square and back (pure)


def from_square(square: np.ndarray, original: np.ndarray, fit: str) -> np.ndarray:
    """Undo :func:`cxr.data.preprocess.resize_square` for a translated square image.

    ``original`` is the decoded source (H, W) in [0, 1]; the result has its shape.
    """
    h, w = original.shape
    nh, nw, _, _ = fit_geometry(h, w, square.shape[0], fit)
    # crop: the square is the centre of the (nh, nw) resized image; keep its edges as they were
    out = _unsquare(square, (h, w), fit, lambda: _resize(original, nh, nw))
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def add_change(change: np.ndarray, original: np.ndarray, fit: str) -> np.ndarray:
    """The original plus a generator's change (its output square minus its input square),
    resized to the original's shape: the translation at the file's own resolution.

    Outside a ``fit="crop"`` square the change is zero (the network never saw those edges).
    """
    h, w = original.shape
    nh, nw, _, _ = fit_geometry(h, w, change.shape[0], fit)
    out = original + _unsquare(change, (h, w), fit, lambda: np.zeros((nh, nw), np.float32))
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _unsquare(square: np.ndarray, shape: tuple[int, int], fit: str,
              outside: Callable[[], np.ndarray]) -> np.ndarray:
    """Undo the square's geometry: cut the padding off (pad) or paste the square into the
    centre of ``outside()`` (crop), then resize to ``shape``."""
    h, w = shape
    size = square.shape[0]
    nh, nw, oy, ox = fit_geometry(h, w, size, fit)
    if fit == "pad":
        region = square[oy:oy + nh, ox:ox + nw]
    else:
        region = outside()
        region[-oy:-oy + size, -ox:-ox + size] = square
    return region if region.shape == (h, w) else _resize(region, h, w)


def _resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
    from PIL import Image

    pil = Image.fromarray(np.ascontiguousarray(img, dtype=np.float32), mode="F")
    return np.asarray(pil.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32).copy()


# ----------------------------------------------------------------------------------------------
# The tree


def translate_tree(src: str | Path, out: str | Path, translator: Translator, layout: str | None = None,
                   batch_size: int = 8, workers: int = 0, overwrite: bool = False,
                   progress: Callable[[int], None] | None = None, command: str = "cxr translate") -> RewriteReport:
    """Write the translation of the dataset tree ``src`` (folder or zip) to the folder ``out``;
    ``command`` (what made it) goes into the manifest and each derived DICOM's description."""

    def transform(records: Sequence[Sample], originals: list[np.ndarray]) -> list[np.ndarray]:
        if translator.prematch is None:
            return translator.images(originals)
        matched = [match_as_written(o, translator.prematch, r.image) for r, o in zip(records, originals)]
        return translate_images(translator.generator, matched, translator.size, translator.fit, translator.detail)

    weights = translator.checkpoint / f"{translator.module}.safetensors"
    manifest = {"method": translator.method, "command": command, "direction": translator.direction,
                "checkpoint": str(translator.checkpoint),
                "module": translator.module,
                "weights_sha256": file_sha256(weights), "generator": translator.model_args.get("name"),
                "size": translator.size, "fit": translator.fit, "detail": translator.detail}
    if translator.prematch is not None:
        manifest["prematch"] = {"method": "histogram", "field": translator.prematch.field,
                                "reference_images": translator.prematch.n_images}
    derivation = (f"{command} {METHODS[translator.method]} {translator.direction}, checkpoint {translator.checkpoint} "
                  f"sha256 {manifest['weights_sha256'][:12]}"
                  + (", after histogram matching to domain B" if translator.prematch is not None else ""))
    return rewrite_tree(src, out, transform, manifest, MANIFEST, layout=layout, batch_size=batch_size,
                        workers=workers, overwrite=overwrite, progress=progress, derivation=derivation)


def translate_run(run: str | Path, src: str | Path, out: str | Path, method: str | None = None,
                  device: torch.device | str = "cpu", weights: str = "auto", detail: str = "keep",
                  batch_size: int = 16, workers: int = 0, overwrite: bool = False, layout: str | None = None,
                  progress: Callable[[int], None] | None = None, command: str = "cxr translate") -> RewriteReport:
    """Translate the tree ``src`` into ``out`` with the ``a2b`` generator of the run (or
    checkpoint folder) ``run``: the library face of ``cxr harmonize --method M --checkpoint RUN``.

    ``method``: ``cyclegan``, ``cut`` or ``fastcut``, checked against the run; None takes the
    run's own (:func:`checkpoint_method`).
    """
    translator = load_translator(run, "a2b", device, detail=detail, weights=weights,
                                 method=method or checkpoint_method(run) or "cyclegan")
    return translate_tree(src, out, translator, layout=layout, batch_size=batch_size, workers=workers,
                          overwrite=overwrite, progress=progress, command=command)
