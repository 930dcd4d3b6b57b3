"""Feature extractors for judging generated image sets: one per evaluation, named in every output.

* ``inception``: Inception-v3 with pytorch-fid's FID weights (2048-d pool features), comparable
  with published FIDs; used only when ``pt_inception-2015-12-05-*.pth`` is already in torch's
  hub cache (``torch.hub.get_dir()/checkpoints``). Nothing is downloaded.
* ``xrv``: torchxrayvision's DenseNet-121 ``densenet121-res224-all`` (1024-d pooled features of a
  network trained on chest X-rays), when its weights are in torchxrayvision's own cache.
* ``trained``: the small CNN of :mod:`classifiers` trained as a classifier on the real tree's
  training split (its penultimate, pooled features), named ``trained-<network>-<hash>`` with the
  hash of its weights and its training images, so two evaluations share a name only when they
  used the same encoder.

``auto`` takes the first of these whose weights are local. Every extractor maps an
``(N, S, S)`` float array in [0, 1] to ``(N, D)`` features.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from classifiers.pretrained import xrv_weights_path
from cxr.errors import CxrError

EXTRACTORS = ("auto", "inception", "xrv", "trained")
XRV_MODEL = "densenet121-res224-all"
FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid's FID_WEIGHTS_URL basename


@dataclass
class Extractor:
    """A named map from [0, 1] images to feature vectors."""

    name: str
    dims: int
    embed_batch: Callable[[torch.Tensor], torch.Tensor]  # (B, 1, S, S) in [0, 1] -> (B, D)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    notes: list[str] = field(default_factory=list)

    @torch.no_grad()
    def embed(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """(N, S, S) float images in [0, 1] → (N, D) float64 features."""
        out = [self.embed_batch(torch.as_tensor(images[i:i + batch_size], dtype=torch.float32)[:, None]
                                .to(self.device)).float().cpu().numpy()
               for i in range(0, len(images), batch_size)]
        return np.concatenate(out).astype(np.float64) if out else np.zeros((0, self.dims))


def inception_weights_path() -> Path:
    """Where pytorch-fid's FID Inception weights sit in the torch hub cache (if they are there)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_FILE


def available(kind: str) -> bool:
    """Whether the pretrained extractor ``kind`` has its weights on this machine."""
    if kind == "inception":
        return inception_weights_path().is_file()
    if kind == "xrv":
        try:
            return xrv_weights_path(XRV_MODEL).is_file()
        except CxrError:  # torchxrayvision missing
            return False
    return kind == "trained"


def resolve_kind(kind: str) -> str:
    """The extractor ``auto`` stands for, or ``kind`` itself once its weights are checked."""
    if kind not in EXTRACTORS:
        raise CxrError(f"--extractor: unknown extractor {kind!r} (choose from: {', '.join(EXTRACTORS)})")
    if kind == "auto":
        return next(k for k in ("inception", "xrv", "trained") if available(k))
    if not available(kind):
        where = inception_weights_path() if kind == "inception" else xrv_weights_path(XRV_MODEL)
        raise CxrError(f"{where}: the {kind} extractor's weights are not in the local cache (nothing is "
                       "downloaded here; copy the file there, or use --extractor trained)")
    return kind


def inception_extractor(device: torch.device) -> Extractor:
    """Inception-v3, FID weights, 2048-d; grey images repeated on three channels, resized to 299."""
    from pytorch_fid.inception import InceptionV3

    net = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True, normalize_input=True,
                      use_fid_inception=True).to(device).eval()

    def embed(x: torch.Tensor) -> torch.Tensor:
        return net(x.repeat(1, 3, 1, 1))[0].flatten(1)

    return Extractor("inception-v3-fid", 2048, embed, device)


def xrv_extractor(device: torch.device, weights: str | None = XRV_MODEL) -> Extractor:
    """torchxrayvision's DenseNet-121 (all datasets), 1024-d pooled features at 224², its
    intensity contract [−1024, 1024]. ``weights=None``: random weights (tests only)."""
    with warnings.catch_warnings():  # torchxrayvision.models calls filterwarnings("ignore") at import
        import torchxrayvision as xrv

        net = xrv.models.DenseNet(weights=weights).to(device).eval()

    def embed(x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
        return net.features2(x * 2048.0 - 1024.0)

    return Extractor(f"xrv-{weights or 'random'}", 1024, embed, device)


def penultimate_extractor(model: nn.Module, name: str, device: torch.device) -> Extractor:
    """The input of ``model``'s last linear layer (its pooled features) as the embedding."""
    heads = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not heads:
        raise ValueError(f"{type(model).__name__} has no linear head to take features before")
    head = heads[-1]
    model = model.to(device).eval()
    seen: list[torch.Tensor] = []

    def embed(x: torch.Tensor) -> torch.Tensor:
        handle = head.register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[0].detach()))
        try:
            model(x)
        finally:
            handle.remove()
        return seen.pop()

    return Extractor(name, head.in_features, embed, device)


def weights_hash(model: nn.Module, training_images: Sequence[str]) -> str:
    """12 hex digits of SHA-256 over the weights (by name) and the training image list."""
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    for ref in sorted(training_images):
        h.update(os.fsencode(ref) + b"\n")
    return h.hexdigest()[:12]
