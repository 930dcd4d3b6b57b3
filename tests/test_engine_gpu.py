"""The engine on a CUDA device: bf16 autocast, fused Adam, channels_last, CUDA RNG and checkpoints.

Excluded from the default run (``-m gpu`` selects them); skipped where no GPU is visible.
"""

from __future__ import annotations

import pytest
import torch
from engine_toy import ToyNet

from cxr.engine.checkpoint import CheckpointManager, load
from cxr.engine.data import gpu_augment
from cxr.engine.distributed import setup_distributed
from cxr.engine.seed import rng_state
from cxr.engine.speed import autocast_context, channels_last, fused_adam_kwargs, to_channels_last

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
    CheckpointManager(tmp_path).save(1, {"net": net}, {"opt": opt})
    net2 = ToyNet(8).to(dev)
    opt2 = torch.optim.Adam(net2.parameters(), lr=1e-3, **fused_adam_kwargs(dev))
    load(tmp_path, {"net": net2}, {"opt": opt2})
    for a, b in zip(net.parameters(), net2.parameters()):
        assert torch.equal(a, b) and b.device.type == "cuda"
    state = next(iter(opt2.state_dict()["state"].values()))
    assert state["exp_avg"].device.type == "cuda"
