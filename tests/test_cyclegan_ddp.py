"""CycleGAN under DDP (gloo, CPU): 2 processes equal 1 process with the same global batch.

With the image pool off (each rank keeps its own pool, so pooled fakes differ by design) the
two ranks' half-batches, averaged by DDP, give the single process's full-batch gradients: the
per-step losses and the trained generators' outputs agree. Raw weights are not compared: a conv
bias in front of an instance norm has an exactly-zero true gradient, and Adam turns the
rounding noise it gets instead into ±lr steps of arbitrary sign (harmless: the norm removes it).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cyclegan_helpers import nlm_site
from gan.cyclegan.translate import load_translator

ROOT = Path(__file__).resolve().parents[1]
_DIST_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _launch(run_dir: Path, overrides: list[str], extra_env: dict[str, str]) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in _DIST_KEYS}
    env.update(extra_env, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "cxr.cli.main", "train-gan", "cyclegan", "--run-dir", str(run_dir),
                             *overrides], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_gloo_processes_equal_one(tmp_path):
    a, b = nlm_site(tmp_path / "data", "montgomery", 8), nlm_site(tmp_path / "data", "shenzhen", 8)
    overrides = [f"data.a={a}", f"data.b={b}", f"data.cache_dir={tmp_path / 'cache'}", "data.size=32",
                 "data.decode_workers=1", "model.generator=resnet6", "model.ngf=4", "model.ndf=4", "model.d_layers=2",
                 "loss.pool_size=0", "train.batch_size=4", "train.steps=3", "train.ckpt_every=3", "train.log_every=1",
                 "train.channels_last=false", "optim.lr=0.002", "device=cpu"]
    single = _launch(tmp_path / "single", overrides + ["train.ckpt_every=1", "train.keep_last=0"], {})
    assert single.wait(timeout=300) == 0, single.stderr.read()
    dist = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": _free_port(), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    ranks = [_launch(tmp_path / "ddp", overrides, {**dist, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in (0, 1)]
    for proc in ranks:
        assert proc.wait(timeout=300) == 0, proc.stderr.read()
    stats = {k: [json.loads(line) for line in (tmp_path / k / "stats.jsonl").read_text().splitlines()]
             for k in ("single", "ddp")}
    assert [r["step"] for r in stats["ddp"]] == [1, 2, 3]
    for one, two in zip(stats["single"], stats["ddp"]):
        for key in ("adv_ab", "adv_ba", "cycle_a", "cycle_b", "idt_a", "idt_b", "loss_G", "loss_D_a", "loss_D_b"):
            assert two[key] == pytest.approx(one[key], rel=1e-3), (one["step"], key)
    # The generators agree to a small fraction of how far steps 2 and 3 moved them.
    x = torch.linspace(0, 1, 32 * 32).view(1, 1, 32, 32)
    for direction in ("a2b", "b2a"):
        one = load_translator(tmp_path / "single", direction).squares(x)
        two = load_translator(tmp_path / "ddp", direction).squares(x)
        earlier = load_translator(tmp_path / "single" / "checkpoints" / "step-00000001", direction).squares(x)
        moved = (one - earlier).abs().mean()
        assert (two - one).abs().mean() < 0.1 * moved, (direction, float((two - one).abs().mean()), float(moved))
