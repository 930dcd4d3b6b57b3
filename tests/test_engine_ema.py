"""The generators' weight average (train.ema): maths, checkpoint state, and what translate applies."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cxr.engine.config import StepTrainConfig
from cxr.engine.ema import WeightAverage, ema_name


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))


def test_first_update_copies_then_each_moves_one_minus_decay_of_the_way():
    net = _net()
    avg = WeightAverage(net, decay=0.75)
    w0 = net[0].weight.detach().clone()
    avg.update(net)
    assert torch.equal(avg.module[0].weight, w0)  # no pull toward the initialization
    with torch.no_grad():
        net[0].weight.add_(4.0)
        net[1].running_mean.fill_(8.0)
    avg.update(net)
    assert torch.allclose(avg.module[0].weight, w0 + 1.0)  # 0.75·w0 + 0.25·(w0 + 4)
    assert torch.allclose(avg.module[1].running_mean, torch.full((2,), 2.0))  # buffers averaged too
    assert avg.state() == {"decay": 0.75, "updates": 2}
    assert not any(p.requires_grad for p in avg.module.parameters())
    assert set(avg.module.state_dict()) == set(net.state_dict())  # checkpoints like the network


def test_restored_update_count_continues_the_average():
    net = _net()
    avg = WeightAverage(net, decay=0.5)
    avg.update(net)
    fresh = WeightAverage(_net(), decay=0.5)
    fresh.module.load_state_dict(avg.module.state_dict())
    fresh.load_state(avg.state())
    with torch.no_grad():
        net[0].weight.add_(2.0)
    avg.update(net)
    fresh.update(net)  # averages (count restored) instead of copying as a first update would
    assert torch.equal(fresh.module[0].weight, avg.module[0].weight)


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.1])
def test_decay_outside_the_open_interval_is_refused(decay):
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(_net(), decay)


def test_train_ema_key_is_checked():
    assert StepTrainConfig().ema == 0.0
    with pytest.raises(ValueError, match="train.ema"):
        StepTrainConfig(ema=1.0)
    assert ema_name("G_ab") == "G_ab_ema"
