"""Apply a trained generator to a whole dataset tree and write the same tree, translated.

The tree is rewritten by :func:`cxr.data.rewrite.rewrite_tree`: every file carried over, each
image replaced *at its original size, in its original file format and mode*, so the translated
tree is read by the same loader as the source, with the same records, labels and masks.
``cxr_translation.json`` at the top records what made it (checkpoint and its weights' hash,
direction, source tree).

Each image goes through the preprocessing the generator was trained with (read from the
checkpoint's ``model_args["input"]``: square size and pad/crop fit), the generator, and back:
the padding is cut off (``fit="pad"``) or the translated centre is pasted into the resized
original (``fit="crop"``, whose edges the network never saw), then resized to the file's size.
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
from cxr.engine.checkpoint import CheckpointError, load_module, read_model_args, resolve_checkpoint
from cxr.errors import ConfigError
from gan.cyclegan.data import to_model_range, to_unit_range
from gan.networks import build_from_model_args

__all__ = ["MANIFEST", "DIRECTIONS", "Translator", "load_translator", "from_square", "translate_tree",
           "encode_like"]

MANIFEST = "cxr_translation.json"
DIRECTIONS = {"a2b": "G_ab", "b2a": "G_ba"}


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

    def squares(self, batch: torch.Tensor) -> torch.Tensor:
        """(N, 1, S, S) [0, 1] preprocessed images → translated, same shape, [0, 1]."""
        return translate_squares(self.generator, batch)

    def images(self, originals: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Decoded (H, W) [0, 1] images of any sizes → their translations, at the same sizes."""
        return translate_images(self.generator, originals, self.size, self.fit)


@torch.no_grad()
def translate_squares(generator: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """(N, 1, S, S) [0, 1] images through a generator in its [-1, 1] range, back to [0, 1] on CPU."""
    device = next(generator.parameters()).device
    return to_unit_range(generator(to_model_range(batch.to(device)))).cpu()


def translate_images(generator: nn.Module, originals: Sequence[np.ndarray], size: int, fit: str) -> list[np.ndarray]:
    """Decoded images into the generator's ``size``² square (``fit``), through it, and back to
    each original's shape: what ``cxr translate`` does to every image of a tree."""
    squares = torch.from_numpy(np.stack([resize_square(o, size, fit) for o in originals]))[:, None]
    translated = translate_squares(generator, squares)[:, 0].numpy()
    return [from_square(sq, o, fit) for sq, o in zip(translated, originals)]


def load_translator(checkpoint: str | Path, direction: str, device: torch.device | str = "cpu") -> Translator:
    """The ``a2b`` or ``b2a`` generator of a CycleGAN run or checkpoint folder, ready to apply."""
    if direction not in DIRECTIONS:
        raise ConfigError(f"--direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
    ckpt = resolve_checkpoint(checkpoint)
    name = DIRECTIONS[direction]
    args = read_model_args(ckpt, name)
    if args.get("family") != "cyclegan" or args.get("kind") != "generator":
        raise CheckpointError(f"{ckpt}: module '{name}' is not a CycleGAN generator "
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
    return Translator(generator, size, fit, ckpt, direction, args)


# ----------------------------------------------------------------------------------------------
# Image geometry: into the network's square and back (pure)


def from_square(square: np.ndarray, original: np.ndarray, fit: str) -> np.ndarray:
    """Undo :func:`cxr.data.preprocess.resize_square` for a translated square image.

    ``original`` is the decoded source (H, W) in [0, 1]; the result has its shape.
    """
    h, w = original.shape
    size = square.shape[0]
    nh, nw, oy, ox = fit_geometry(h, w, size, fit)
    if fit == "pad":
        region = square[oy:oy + nh, ox:ox + nw]
    else:  # crop: the square is the centre of the (nh, nw) resized image; keep its edges as they were
        region = _resize(original, nh, nw)
        region[-oy:-oy + size, -ox:-ox + size] = square
    out = region if region.shape == (h, w) else _resize(region, h, w)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
    from PIL import Image

    pil = Image.fromarray(np.ascontiguousarray(img, dtype=np.float32), mode="F")
    return np.asarray(pil.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32).copy()


# ----------------------------------------------------------------------------------------------
# The tree


def translate_tree(src: str | Path, out: str | Path, translator: Translator, layout: str | None = None,
                   batch_size: int = 8, workers: int = 0, overwrite: bool = False,
                   progress: Callable[[int], None] | None = None) -> RewriteReport:
    """Write the translation of the dataset tree ``src`` (folder or zip) to the folder ``out``."""

    def transform(_records: Sequence[Sample], originals: list[np.ndarray]) -> list[np.ndarray]:
        return translator.images(originals)

    weights = translator.checkpoint / f"{DIRECTIONS[translator.direction]}.safetensors"
    manifest = {"direction": translator.direction, "checkpoint": str(translator.checkpoint),
                "weights_sha256": file_sha256(weights), "generator": translator.model_args.get("name"),
                "size": translator.size, "fit": translator.fit}
    return rewrite_tree(src, out, transform, manifest, MANIFEST, layout=layout, batch_size=batch_size,
                        workers=workers, overwrite=overwrite, progress=progress)
