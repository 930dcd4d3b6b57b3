"""Checkpoints: safetensors + weights-only state, atomic, keep-last-k and best, clear mismatches."""

from __future__ import annotations

import json
import pickle
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn

import cxr.engine.checkpoint as ckpt_mod
from cxr.engine.checkpoint import (
    CheckpointError,
    CheckpointManager,
    latest,
    list_checkpoints,
    load,
    read_meta,
    read_model_args,
)
from engine_toy import ToyNet

ROOT = Path(__file__).resolve().parents[1]


def _trained(channels: int = 4, seed: int = 0) -> tuple[ToyNet, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    net = ToyNet(channels)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        net(torch.rand(2, 1, 8, 8)).pow(2).mean().backward()
        opt.step()
    return net, opt


def test_layout_metadata_and_weights_only_state(tmp_path):
    net, opt = _trained()
    path = CheckpointManager(tmp_path).save(100, {"net": net}, {"opt": opt}, extra={"pool": torch.ones(2)},
                                            model_args={"net": net.model_args})
    assert path == tmp_path / "checkpoints" / "step-00000100"
    assert sorted(p.name for p in path.iterdir()) == ["COMPLETE", "net.safetensors", "state.pt"]
    with safe_open(str(path / "net.safetensors"), framework="pt") as f:
        meta = f.metadata()
        assert json.loads(meta["model_args"]) == {"channels": 4}
        assert meta["format_version"] == "1"
        assert torch.equal(f.get_tensor("body.0.weight"), net.state_dict()["body.0.weight"])
    state = torch.load(path / "state.pt", weights_only=True)
    assert state["step"] == 100 and set(state["rng"]) >= {"python", "numpy", "torch"}
    assert torch.equal(state["extra"]["pool"], torch.ones(2))
    assert read_meta(tmp_path)["step"] == 100
    assert read_model_args(tmp_path, "net") == {"channels": 4}


def test_round_trip_into_a_fresh_process(tmp_path):
    net, opt = _trained()
    CheckpointManager(tmp_path).save(7, {"net": net}, {"opt": opt}, model_args={"net": net.model_args})
    x = torch.linspace(0, 1, 64).reshape(1, 1, 8, 8)
    torch.save(x, tmp_path / "x.pt")
    expected = net(x).detach()
    script = f"""
import sys, torch
sys.path.insert(0, {str(ROOT / 'tests')!r})
from engine_toy import ToyNet
from cxr.engine.checkpoint import load, read_model_args
run = {str(tmp_path)!r}
net = ToyNet(**read_model_args(run, "net"))
opt = torch.optim.Adam(net.parameters(), lr=1e-2)
info = load(run, {{"net": net}}, {{"opt": opt}})
assert info["step"] == 7 and len(opt.state_dict()["state"]) == 4
torch.save(net(torch.load(run + "/x.pt", weights_only=True)).detach(), run + "/y.pt")
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert torch.equal(torch.load(tmp_path / "y.pt", weights_only=True), expected)


def test_optimizer_and_scheduler_state_restored(tmp_path):
    net, opt = _trained()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step()
    sched.step()
    CheckpointManager(tmp_path).save(2, {"net": net}, {"opt": opt}, {"sched": sched})
    net2 = ToyNet(4)
    opt2 = torch.optim.Adam(net2.parameters(), lr=1e-2)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=1, gamma=0.5)
    info = load(tmp_path, {"net": net2}, {"opt": opt2}, {"sched": sched2})
    assert info["step"] == 2 and info["path"].name == "step-00000002"
    assert sched2.get_last_lr() == sched.get_last_lr() == [5e-3]
    for p, q in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values()):
        assert torch.equal(p["exp_avg"], q["exp_avg"]) and torch.equal(p["exp_avg_sq"], q["exp_avg_sq"])
    for a, b in zip(net.parameters(), net2.parameters()):
        assert torch.equal(a, b)


def test_rng_states_restored(tmp_path):
    net, _ = _trained()
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    CheckpointManager(tmp_path).save(1, {"net": net})
    first = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist())
    load(tmp_path, {"net": net})
    assert (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()) == first
    load(tmp_path, {"net": net}, restore_rng=False)
    assert torch.rand(3).tolist() != first[2]


def test_keep_last_k_and_best(tmp_path):
    net, _ = _trained()
    mgr = CheckpointManager(tmp_path, keep_last=2)
    metrics = [0.5, 0.9, 0.7, 0.3, 0.8]
    for step, m in enumerate(metrics, start=1):
        mgr.save(step, {"net": net}, metric=m)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000004", "step-00000005"]
    best = tmp_path / "checkpoints" / "best"
    assert json.loads((best / "COMPLETE").read_text())["step"] == 2  # its step folder is gone
    assert load(best, {"net": ToyNet(4)}, restore_rng=False)["step"] == 2
    assert latest(tmp_path).name == "step-00000005"  # "best" is never taken for the latest

    low = CheckpointManager(tmp_path / "low", keep_last=0)
    for step, m in enumerate(metrics, start=1):
        low.save(step, {"net": net}, metric=m, higher_is_better=False)
    assert len(list_checkpoints(tmp_path / "low")) == 5  # keep_last <= 0 keeps everything
    assert low.best_metric() == 0.3 and read_meta(low.best_path)["step"] == 4


def test_half_written_checkpoints_are_ignored(tmp_path):
    net, _ = _trained()
    mgr = CheckpointManager(tmp_path, keep_last=0)
    mgr.save(20, {"net": net})
    root = tmp_path / "checkpoints"
    tmp = root / ".tmp-step-00000030-dead"  # a run killed while writing
    tmp.mkdir()
    (tmp / "net.safetensors").write_bytes(b"partial")
    no_marker = root / "step-00000040"  # a step folder without COMPLETE (copied by hand, say)
    no_marker.mkdir()
    (no_marker / "state.pt").write_bytes(b"partial")
    torn = root / "step-00000050"
    torn.mkdir()
    (torn / "COMPLETE").write_text('{"step": 5')  # torn marker
    assert latest(tmp_path).name == "step-00000020"
    assert load(tmp_path, {"net": ToyNet(4)})["step"] == 20
    with pytest.raises(CheckpointError, match="incomplete"):
        load(no_marker, {"net": ToyNet(4)})
    # the next save sweeps leftover temporaries of the killed run
    mgr.save(21, {"net": net})
    assert not tmp.exists() and latest(tmp_path).name == "step-00000021"


def test_a_save_that_fails_midway_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    net, _ = _trained()
    mgr = CheckpointManager(tmp_path)
    mgr.save(10, {"net": net})

    def dies(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_mod.torch, "save", dies)
    with pytest.raises(KeyboardInterrupt):
        mgr.save(11, {"net": net})
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000010"]
    assert mgr.latest().name == "step-00000010"


def test_resaving_the_same_step_replaces_it(tmp_path):
    net, _ = _trained()
    mgr = CheckpointManager(tmp_path)
    mgr.save(5, {"net": net}, extra={"v": 1})
    mgr.save(5, {"net": net}, extra={"v": 2})
    assert load(tmp_path, {"net": ToyNet(4)})["extra"] == {"v": 2}
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000005"]


def test_incompatible_shape_is_one_clear_line(tmp_path):
    net, _ = _trained(channels=4)
    CheckpointManager(tmp_path).save(1, {"net": net})
    with pytest.raises(CheckpointError) as e:
        load(tmp_path, {"net": ToyNet(8)})
    msg = str(e.value)
    assert "module 'net'" in msg and "'body.0.weight'" in msg
    assert "checkpoint (4, 1, 3, 3), model (8, 1, 3, 3)" in msg and "\n" not in msg


def test_checkpoint_of_another_model_is_refused(tmp_path):
    net, _ = _trained()
    CheckpointManager(tmp_path).save(1, {"net": net})
    with pytest.raises(CheckpointError, match=r"module 'net' does not match this model: missing key 'weight'"):
        load(tmp_path, {"net": nn.Linear(3, 2)})
    with pytest.raises(CheckpointError, match=r"no weights for module 'G_A' \(the checkpoint holds: net\)"):
        load(tmp_path, {"G_A": ToyNet(4)})
    with pytest.raises(CheckpointError, match="no state for optimizer 'opt_D'"):
        load(tmp_path, {"net": ToyNet(4)}, {"opt_D": torch.optim.SGD(ToyNet(4).parameters(), lr=1)})


def test_optimizer_of_another_shape_is_refused(tmp_path):
    net, opt = _trained()
    CheckpointManager(tmp_path).save(1, {"net": net}, {"opt": opt})
    other = nn.Sequential(ToyNet(4), nn.Conv2d(1, 1, 1))
    with pytest.raises(CheckpointError, match="optimizer 'opt' does not match"):
        load(tmp_path, {"net": ToyNet(4)}, {"opt": torch.optim.Adam(other.parameters())})


def test_corrupt_files_are_clear_errors(tmp_path):
    net, _ = _trained()
    path = CheckpointManager(tmp_path).save(1, {"net": net})
    (path / "net.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match=r"net\.safetensors: unreadable weights file"):
        load(tmp_path, {"net": ToyNet(4)})
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load(tmp_path / "nope", {"net": ToyNet(4)})
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load(tmp_path / "empty", {"net": ToyNet(4)})


class _Evil:
    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (exec, (f"open({self.target!r}, 'w').write('pwned')",))


def test_loading_never_unpickles_code(tmp_path):
    net, _ = _trained()
    path = CheckpointManager(tmp_path).save(1, {"net": net})
    marker = tmp_path / "pwned.txt"
    with open(path / "state.pt", "wb") as f:
        torch.save({"format_version": 1, "step": 1, "x": _Evil(str(marker))}, f)
    with pytest.raises(CheckpointError, match=r"state\.pt: cannot read training state"):
        load(tmp_path, {"net": ToyNet(4)})
    assert not marker.exists()
    # and the same pickle would have run code with a plain pickle.load
    pickle.loads(pickle.dumps(_Evil(str(marker))))
    assert marker.exists()


def test_extra_must_be_plain_data(tmp_path):
    net, _ = _trained()
    with pytest.raises(TypeError, match=r"extra.*_Evil cannot be stored"):
        CheckpointManager(tmp_path).save(1, {"net": net}, extra={"obj": _Evil("x")})
    assert latest(tmp_path) is None


def test_tied_weights_are_saved(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3, bias=False)
            self.b = nn.Linear(3, 3, bias=False)
            self.b.weight = self.a.weight

    m = Tied()
    CheckpointManager(tmp_path).save(1, {"m": m})
    m2 = Tied()
    load(tmp_path, {"m": m2})
    assert torch.equal(m2.a.weight, m.a.weight) and m2.b.weight is m2.a.weight
