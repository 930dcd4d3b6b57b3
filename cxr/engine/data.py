"""Feeding the training loop: a resumable, DDP-aware infinite batch stream and GPU augmentation.

The stream is a pure function of (seed, step): epoch ``e`` visits the dataset in the order
``epoch_permutation(n, seed, e)``, global batch ``t`` of an epoch is the ``t``-th slice of
``batch_size`` indices, and rank ``r`` of ``world_size`` takes every ``world_size``-th index of
it. So a resumed run (``start_step``) continues exactly where the killed one was, and the union
of the ranks' batches at any step is the single-process batch at that step.

Datasets should be deterministic per index (the preprocessed cache); random augmentation runs
on the device with :func:`gpu_augment`, drawing from the torch RNG the checkpoint restores.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cxr.engine.distributed import DistInfo, epoch_permutation
from cxr.errors import ConfigError


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Full global batches per epoch (the last partial batch of each epoch is dropped)."""
    return n // batch_size


class InfiniteBatchSampler:
    """Index lists for this rank, one per step, forever, starting at ``start_step``."""

    def __init__(self, n: int, batch_size: int, info: DistInfo | None = None, seed: int = 0,
                 start_step: int = 0, shuffle: bool = True):
        info = info or DistInfo()
        if batch_size < 1:
            raise ConfigError(f"config key 'train.batch_size': must be at least 1, got {batch_size}")
        if batch_size % info.world_size:
            raise ConfigError(f"config key 'train.batch_size': {batch_size} does not split evenly over "
                              f"{info.world_size} processes")
        if n < batch_size:
            raise ConfigError(f"config key 'train.batch_size': {batch_size} is larger than the dataset "
                              f"({n} images)")
        self.n = n
        self.batch_size = batch_size
        self.rank = info.rank
        self.world_size = info.world_size
        self.seed = seed
        self.start_step = start_step
        self.shuffle = shuffle

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(self.n, self.batch_size)

    def batch_at(self, step: int, _cache: dict | None = None) -> list[int]:
        """This rank's indices at global ``step``."""
        epoch, offset = divmod(step, self.steps_per_epoch)
        order = (_cache or {}).get(epoch)
        if order is None:
            order = epoch_permutation(self.n, self.seed, epoch) if self.shuffle else torch.arange(self.n)
        b = self.batch_size
        return order[offset * b:(offset + 1) * b][self.rank::self.world_size].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        cache: dict[int, torch.Tensor] = {}
        while True:
            epoch = step // self.steps_per_epoch
            if epoch not in cache:
                cache.clear()
                cache[epoch] = (epoch_permutation(self.n, self.seed, epoch) if self.shuffle
                                else torch.arange(self.n))
            yield self.batch_at(step, cache)
            step += 1


def infinite_loader(dataset: Dataset, batch_size: int, info: DistInfo | None = None, seed: int = 0,
                    num_workers: int = 0, start_step: int = 0,
                    collate_fn: Callable[[list], Any] | None = None,
                    pin_memory: bool | None = None, shuffle: bool = True) -> Iterator[Any]:
    """Yield this rank's batches forever, beginning with global step ``start_step``.

    ``batch_size`` is the global batch; each of ``info.world_size`` processes gets an equal share.
    """
    info = info or DistInfo()
    sampler = InfiniteBatchSampler(len(dataset), batch_size, info, seed, start_step, shuffle)
    # A private generator: otherwise creating the DataLoader iterator draws a base seed from the
    # global torch RNG, and a resumed run (which creates it at another step) would diverge.
    gen = torch.Generator()
    gen.manual_seed(int(seed) + 7919 * int(start_step))
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                        collate_fn=collate_fn, generator=gen,
                        pin_memory=(info.device.type == "cuda") if pin_memory is None else pin_memory,
                        persistent_workers=num_workers > 0)
    yield from loader


def to_device(batch: Any, device: torch.device, channels_last: bool = False) -> Any:
    """Move a batch (tensor, or dict/list/tuple of them) to ``device`` without blocking."""
    if isinstance(batch, torch.Tensor):
        t = batch.to(device, non_blocking=True)
        if channels_last and t.dim() == 4:
            t = t.contiguous(memory_format=torch.channels_last)
        return t
    if isinstance(batch, dict):
        return {k: to_device(v, device, channels_last) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device, channels_last) for v in batch)
    return batch


def gpu_augment(degrees: float = 5.0, scale: tuple[float, float] = (0.95, 1.05),
                translate: float = 0.05, brightness: float = 0.1, contrast: float = 0.1,
                hflip: bool = False, p: float = 0.5, clip: bool = True,
                padding: str = "border") -> nn.Module:
    """A kornia pipeline for an (N, 1, H, W) batch in [0, 1], run on the batch's device.

    Small rotations, scaling and shifts (edges padded with the border by default, not black)
    and mild brightness/contrast changes. Flips are off by default: a chest X-ray has a left and a right
    (the heart), and a flipped film is a different, rare acquisition. Apply before mapping to
    [-1, 1] (``clip`` clamps to [0, 1]). ``padding`` fills what a shrink or shift uncovers:
    "border" (repeat the edge), "zeros" (black, like the bands of ``fit="pad"``) or
    "reflection". Randomness comes from the global torch RNG, which checkpoints save and restore.
    """
    import kornia.augmentation as K

    augs: list[nn.Module] = []
    if degrees or translate or scale != (1.0, 1.0):
        augs.append(K.RandomAffine(degrees=degrees, translate=(translate, translate) if translate else None,
                                   scale=scale, padding_mode=padding, p=p))
    if brightness:
        augs.append(K.RandomBrightness(brightness=(1 - brightness, 1 + brightness), clip_output=clip, p=p))
    if contrast:
        augs.append(K.RandomContrast(contrast=(1 - contrast, 1 + contrast), clip_output=clip, p=p))
    if hflip:
        augs.append(K.RandomHorizontalFlip(p=0.5))
    return K.AugmentationSequential(*augs) if augs else nn.Identity()
