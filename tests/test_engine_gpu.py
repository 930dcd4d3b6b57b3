"""The engine on a CUDA device: bf16 autocast, fused Adam, channels_last, CUDA RNG and checkpoints.

Excluded from the default run (``-m gpu`` selects them); skipped where no GPU is visible.
"""

from __future__ import annotations

import pytest
import torch

from cxr.engine.checkpoint import CheckpointManager, load
from cxr.engine.data import gpu_augment
from cxr.engine.distributed import setup_distributed
from cxr.engine.seed import rng_state
from cxr.engine.speed import autocast_context, channels_last, fused_adam_kwargs, to_channels_last, to_device_async
from engine_toy import ToyNet, assert_cuda_graphs_ran, reset_compile_counters

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_cuda_step_and_checkpoint_round_trip(tmp_path, monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    info = setup_distributed("auto")
    assert info.device.type == "cuda"
    dev = info.device
    net = to_channels_last(ToyNet(8).to(dev), True)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, **fused_adam_kwargs(dev))
    x = channels_last(torch.rand(4, 1, 32, 32, device=dev), True)
    with autocast_context(dev, "auto"):
        y = net(gpu_augment().to(dev)(x))
        assert net.body[0](x).dtype == torch.bfloat16
    loss = (y.float() - x).pow(2).mean()
    loss.backward()
    opt.step()
    assert "cuda" in rng_state()
    idx = to_device_async(torch.tensor([3, 0, 2]), dev)  # pinned, non-blocking: queued, then read
    assert idx.device.type == "cuda" and idx.tolist() == [3, 0, 2]
    CheckpointManager(tmp_path).save(1, {"net": net}, {"opt": opt})
    net2 = ToyNet(8).to(dev)
    opt2 = torch.optim.Adam(net2.parameters(), lr=1e-3, **fused_adam_kwargs(dev))
    load(tmp_path, {"net": net2}, {"opt": opt2})
    for a, b in zip(net.parameters(), net2.parameters()):
        assert torch.equal(a, b) and b.device.type == "cuda"
    state = next(iter(opt2.state_dict()["state"].values()))
    assert state["exp_avg"].device.type == "cuda"


def test_cyclegan_step_with_cuda_graphs_matches_eager():
    """``train.compile_mode=reduce-overhead`` replays CUDA graphs; the losses stay the eager
    ones and what the pools keep is a copy of each step's fake, not memory that a later replay
    overwrites."""
    from cxr.engine.config import load_config
    from cxr.engine.seed import seed_everything
    from gan.cyclegan.config import CycleGANConfig
    from gan.cyclegan.trainer import CycleGANSteps

    dev = torch.device("cuda")
    base = ["data.size=32", "model.generator=resnet6", "model.ngf=8", "model.ndf=8", "train.amp=off",
            "train.channels_last=false", "train.steps=6"]
    gen = torch.Generator(dev).manual_seed(1)
    a = torch.rand(6, 1, 1, 32, 32, device=dev, generator=gen) * 2 - 1
    b = torch.rand(6, 1, 1, 32, 32, device=dev, generator=gen) * 2 - 1
    losses = {}
    for name, extra in (("eager", []), ("graphs", ["train.compile=true", "train.compile_mode=reduce-overhead"])):
        seed_everything(0)
        reset_compile_counters()
        steps = CycleGANSteps(load_config(CycleGANConfig, None, base + extra), dev)
        assert steps.cudagraphs == (name == "graphs")
        losses[name], fakes = [], []
        for i in range(6):
            out, shown = steps.step(a[i], b[i], i)
            losses[name].append(out["loss_G"].item())
            fakes.append(shown["fake_b"].float().clone())  # read before the next replay
        # The pool (50 places) kept every step's fake as it was when that step ran.
        assert len(steps.pool_b) == len(fakes)
        for kept, fake in zip(steps.pool_b.images, fakes):
            assert torch.equal(kept.float().reshape(fake.shape), fake)
    assert_cuda_graphs_ran()  # counted since the graphs run's reset
    assert len(set(losses["eager"])) > 1  # the losses move
    # Compiled kernels sum in another order; Adam turns that into small weight differences.
    torch.testing.assert_close(torch.tensor(losses["graphs"]), torch.tensor(losses["eager"]), rtol=2e-3, atol=2e-3)
