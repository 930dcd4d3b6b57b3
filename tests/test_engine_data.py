"""The resumable batch stream, GPU-side augmentation, seeding and the speed/device helpers."""

from __future__ import annotations

import contextlib
import itertools
import random

import numpy as np
import pytest
import torch

from cxr.engine.data import InfiniteBatchSampler, gpu_augment, infinite_loader, to_device
from cxr.engine.distributed import (
    DistInfo,
    all_reduce_mean,
    resolve_device,
    setup_distributed,
    shard_indices,
    unwrap_model,
    wrap_ddp,
)
from cxr.engine.seed import rng_state, seed_everything, set_rng_state
from cxr.engine.speed import (
    autocast_context,
    channels_last,
    fused_adam_kwargs,
    maybe_compile,
    to_channels_last,
    uses_cudagraphs,
)
from cxr.errors import ConfigError
from engine_toy import ToyImages, ToyNet


def _take(it, n):
    return list(itertools.islice(iter(it), n))


def test_stream_covers_each_epoch_once_and_reshuffles():
    s = InfiniteBatchSampler(10, 3, seed=5)
    assert s.steps_per_epoch == 3  # 10 // 3; the leftover index is dropped each epoch
    batches = _take(s, 6)
    epoch0, epoch1 = sum(batches[:3], []), sum(batches[3:], [])
    assert len(set(epoch0)) == 9 and len(set(epoch1)) == 9 and all(len(b) == 3 for b in batches)
    assert epoch0 != epoch1  # a new order each epoch
    assert _take(InfiniteBatchSampler(10, 3, seed=5), 6) == batches  # a function of the seed
    assert _take(InfiniteBatchSampler(10, 3, seed=6), 3) != batches[:3]


def test_start_step_continues_the_same_stream():
    full = _take(InfiniteBatchSampler(13, 4, seed=1), 12)
    for start in (1, 3, 5, 10):
        assert _take(InfiniteBatchSampler(13, 4, seed=1, start_step=start), 12 - start) == full[start:]


def test_ranks_split_the_global_batch():
    single = _take(InfiniteBatchSampler(20, 6, seed=2), 7)
    ranks = [_take(InfiniteBatchSampler(20, 6, DistInfo(rank=r, world_size=3, is_main=r == 0), seed=2), 7)
             for r in range(3)]
    for t in range(7):
        parts = [ranks[r][t] for r in range(3)]
        assert all(len(p) == 2 for p in parts)
        assert sorted(sum(parts, [])) == sorted(single[t])  # union = the 1-process batch
    assert shard_indices(9, DistInfo(rank=1, world_size=2), 0, 0) == \
        torch.randperm(9, generator=torch.Generator().manual_seed(0))[1::2].tolist()


def test_bad_batch_sizes_are_config_errors():
    with pytest.raises(ConfigError, match=r"'train\.batch_size': 5 does not split evenly over 2 processes"):
        InfiniteBatchSampler(20, 5, DistInfo(rank=0, world_size=2))
    with pytest.raises(ConfigError, match=r"'train\.batch_size': 8 is larger than the dataset \(5 images\)"):
        InfiniteBatchSampler(5, 8)
    with pytest.raises(ConfigError, match="at least 1"):
        InfiniteBatchSampler(5, 0)


def test_infinite_loader_batches_resume_and_leave_global_rng_alone():
    ds = ToyImages(10, 8)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    stream = infinite_loader(ds, 4, seed=3)
    batches = _take(stream, 6)  # crosses two epoch boundaries (2 steps per epoch)
    assert torch.equal(torch.get_rng_state(), before)  # the loader never draws from the global RNG
    assert batches[0]["image"].shape == (4, 1, 8, 8)
    resumed = _take(infinite_loader(ds, 4, seed=3, start_step=4), 2)
    for a, b in zip(batches[4:], resumed):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["image"], b["image"])


def test_infinite_loader_with_a_worker_matches_in_process():
    ds = ToyImages(12, 8)
    main = _take(infinite_loader(ds, 4, seed=9), 4)
    worker = _take(infinite_loader(ds, 4, seed=9, num_workers=1), 4)
    assert all(torch.equal(a["index"], b["index"]) for a, b in zip(main, worker))


def test_gpu_augment_shape_range_and_reproducibility():
    x = torch.linspace(0, 1, 2 * 32 * 32).reshape(2, 1, 32, 32)
    aug = gpu_augment(degrees=10, p=1.0)
    torch.manual_seed(0)
    y1 = aug(x)
    torch.manual_seed(0)
    y2 = aug(x)
    assert y1.shape == x.shape and y1.dtype == x.dtype
    assert 0.0 <= float(y1.min()) and float(y1.max()) <= 1.0
    assert torch.equal(y1, y2) and not torch.allclose(y1, x)
    identity = gpu_augment(degrees=0, scale=(1.0, 1.0), translate=0, brightness=0, contrast=0)
    assert torch.equal(identity(x), x)


def test_rng_state_round_trip():
    seed_everything(4)
    state = rng_state()
    first = (random.random(), np.random.rand(), torch.rand(2).tolist())
    random.random(), np.random.rand(), torch.rand(2)
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(2).tolist()) == first
    assert isinstance(state["numpy"]["key"], torch.Tensor)  # storable with weights_only


def test_seed_everything_deterministic_flag():
    try:
        seed_everything(1, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.backends.cudnn.benchmark
        seed_everything(1, deterministic=False)
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


def test_devices_and_single_process_setup(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    info = setup_distributed("cpu")
    assert (info.rank, info.world_size, info.is_main, info.device) == (0, 1, True, torch.device("cpu"))
    net = ToyNet(2)
    assert wrap_ddp(net, info) is net and unwrap_model(net) is net
    t = torch.tensor([1.0, 3.0])
    assert all_reduce_mean(t, info) is t
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device cuda: no CUDA GPU is available"):
            resolve_device("cuda")


def test_speed_helpers_on_cpu():
    cpu = torch.device("cpu")
    assert isinstance(autocast_context(cpu, "auto"), contextlib.nullcontext)
    assert isinstance(autocast_context(cpu, "off"), contextlib.nullcontext)
    with autocast_context(cpu, "bf16"):
        y = torch.nn.functional.linear(torch.rand(2, 3), torch.rand(4, 3))
    assert y.dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="train.amp"):
        autocast_context(cpu, "fp16")
    assert fused_adam_kwargs(cpu) == {} and fused_adam_kwargs("cuda") == {"fused": True}
    net = ToyNet(2)
    assert maybe_compile(net, False) is net
    assert maybe_compile(net, False, "reduce-overhead") is net
    # CUDA graphs only where they exist: a CPU run of the same config stays plain compiled.
    assert uses_cudagraphs(True, "reduce-overhead", "cuda") and uses_cudagraphs(True, "max-autotune", "cuda")
    assert not uses_cudagraphs(True, "reduce-overhead", cpu)
    assert not uses_cudagraphs(False, "reduce-overhead", "cuda")
    assert not uses_cudagraphs(True, "default", "cuda")
    assert not uses_cudagraphs(True, "max-autotune-no-cudagraphs", "cuda")
    cl = to_channels_last(ToyNet(2), True)
    assert cl.body[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert channels_last(torch.rand(2, 3, 4, 4), True).is_contiguous(memory_format=torch.channels_last)
    assert to_device({"a": torch.ones(1), "b": [torch.zeros(1)], "i": 3}, cpu)["i"] == 3
