"""History of generated images that the discriminator is shown (Shrivastava et al. 2017).

Feeding D a mix of this step's fakes and fakes from earlier generators damps the oscillation
in which G and D chase each other's latest move. For each image of a batch: while the pool
holds fewer than ``size`` images, store it and pass it on; afterwards, with probability ½
pass on a random stored image and put the new one in its place, else pass the new one on.

The draws come from a ``torch.Generator`` the caller passes in (never the global RNG), and
:meth:`state_dict` holds the stored images so a resumed run sees the same pool.
"""

from __future__ import annotations

import torch


class ImagePool:
    """A buffer of up to ``size`` earlier fakes; ``size=0`` passes every batch through."""

    def __init__(self, size: int = 50):
        if size < 0:
            raise ValueError(f"pool size must be >= 0, got {size}")
        self.size = size
        self.images: list[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self.images)

    @torch.no_grad()
    def query(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The batch D is trained on: ``batch`` (N, C, H, W) with some images swapped for old ones.

        ``generator`` must live on the CPU; the pool keeps its images detached on ``batch``'s device.
        """
        if self.size == 0:
            return batch.detach()
        out = []
        for image in batch.detach():
            if len(self.images) < self.size:
                self.images.append(image.clone())
                out.append(image)
                continue
            if torch.rand((), generator=generator).item() < 0.5:
                k = int(torch.randint(len(self.images), (), generator=generator).item())
                old = self.images[k]
                self.images[k] = image.clone()
                out.append(old.to(image.device))
            else:
                out.append(image)
        return torch.stack(out)

    def state_dict(self) -> dict[str, torch.Tensor | int]:
        """Stored images as one (M, C, H, W) CPU tensor (empty when the pool is)."""
        images = torch.stack([im.cpu() for im in self.images]) if self.images else torch.zeros(0)
        return {"size": self.size, "images": images}

    def load_state_dict(self, state: dict, device: torch.device | str | None = None) -> None:
        if int(state["size"]) != self.size:
            raise ValueError(f"pool of size {self.size} cannot load a state of size {int(state['size'])}")
        images = state["images"]
        self.images = [im.to(device) if device is not None else im.clone() for im in images] \
            if images.numel() else []
