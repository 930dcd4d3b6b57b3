"""PatchNCE (Park et al. 2020, eq. 5): a translation's patches should be recognised as the
input's patches at the same place, against the input's patches elsewhere in the same image.

For one tapped generator layer l, sample P locations s = 1..P of its (C_l, H_l, W_l) feature
map (the same locations in the input's and the translation's map), embed each location's
C_l-vector with a 2-layer MLP head H_l (C_l → n → n, ReLU between) and L2-normalize it:
``q_s`` from the translation G(x), ``k_s`` from the input x. Then, per image::

    ℓ(q_s) = −log [ exp(q_s·k_s / τ) / Σ_{t=1..P} exp(q_s·k_t / τ) ]
    L_PatchNCE = mean over layers l, images and locations s of ℓ(q_s)

a P-way cross-entropy whose positive is the same location and whose negatives are the other
P − 1 sampled locations of the same image (the paper's internal negatives). The keys k carry
no gradient (they only say what the query should match); G and the heads learn through the
queries. The temperature τ is 0.07. Pure: tensors in, tensors out, no project state.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class PatchHeads(nn.Module):
    """One 2-layer MLP per tapped layer (C_l → n → n), applied to sampled locations, L2-normalized."""

    def __init__(self, channels: Sequence[int], width: int = 256):
        super().__init__()
        if not channels or min(channels) < 1 or width < 1:
            raise ValueError(f"heads need channels >= 1 per layer and width >= 1, got {list(channels)}, {width}")
        self.channels = tuple(int(c) for c in channels)
        self.width = width
        self.mlps = nn.ModuleList(nn.Sequential(nn.Linear(c, width), nn.ReLU(), nn.Linear(width, width))
                                  for c in self.channels)

    def forward(self, features: Sequence[torch.Tensor], locations: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """(N, C_l, H_l, W_l) maps and (P_l,) flat location indices → (N, P_l, width) unit vectors."""
        if len(features) != len(self.mlps) or len(locations) != len(self.mlps):
            raise ValueError(f"expected {len(self.mlps)} feature maps and location sets, "
                             f"got {len(features)} and {len(locations)}")
        return [F.normalize(mlp(gather_patches(f, ids).float()), dim=-1)
                for mlp, f, ids in zip(self.mlps, features, locations)]


def gather_patches(feature: torch.Tensor, locations: torch.Tensor) -> torch.Tensor:
    """The C-vectors of an (N, C, H, W) map at flat locations (P,) → (N, P, C)."""
    return feature.flatten(2).index_select(2, locations).transpose(1, 2)


def sample_locations(shapes: Sequence[tuple[int, int]], num_patches: int, generator: torch.Generator
                     ) -> list[torch.Tensor]:
    """Per layer of spatial size (H, W): ``min(num_patches, H·W)`` distinct flat locations, drawn
    from ``generator`` (on its device), shared by every image of the batch."""
    return [torch.randperm(h * w, generator=generator, device=generator.device)[:num_patches] for h, w in shapes]


def patch_nce(queries: torch.Tensor, keys: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """Mean PatchNCE loss of (N, P, C) unit query and key embeddings (module docstring).

    Row s of each image's P × P similarity matrix is the logits of location s; its target is
    the diagonal. Keys are detached here, whatever the caller passes.
    """
    if queries.shape != keys.shape or queries.dim() != 3:
        raise ValueError(f"queries and keys must both be (N, P, C), got {tuple(queries.shape)} and {tuple(keys.shape)}")
    n, p, _ = queries.shape
    logits = torch.bmm(queries.float(), keys.detach().float().transpose(1, 2)) / temperature  # (N, P, P)
    target = torch.arange(p, device=queries.device).repeat(n)
    return F.cross_entropy(logits.reshape(n * p, p), target)


def multilayer_patch_nce(queries: Sequence[torch.Tensor], keys: Sequence[torch.Tensor],
                         temperature: float = 0.07) -> torch.Tensor:
    """PatchNCE averaged over the tapped layers (each a :func:`patch_nce`)."""
    return torch.stack([patch_nce(q, k, temperature) for q, k in zip(queries, keys)]).mean()
