"""StyleGAN2 speed keys: bf16 autocast for the main phases only, torch.compile wrappers, their config errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from builders import one_error_line
from cxr.cli.main import main
from cxr.configs import shipped_config
from cxr.engine.checkpoint import CheckpointManager
from cxr.engine.config import load_config
from cxr.engine.distributed import DistInfo
from cxr.engine.logging import RunLogger
from cxr.engine.loop import Run
from cxr.errors import ConfigError
from cyclegan_helpers import nlm_site
from gan.stylegan2.config import LossConfig, preset
from gan.stylegan2.loss import StyleGAN2Loss
from gan.stylegan2.networks import Discriminator, Generator
from gan.stylegan2.trainer import StyleGAN2Config, StyleGAN2Family, train

FAST = ("data.size=32", "data.decode_workers=1", "train.batch_size=4", "device=cpu", "train.image_every=0",
        "loss.r1_interval=2", "loss.pl_weight=2", "loss.pl_interval=2", "ada.kimg=0.05", "ada.interval=2",
        "train.log_every=1", "train.ckpt_every=0")


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return nlm_site(tmp_path_factory.mktemp("nlm"), "shenzhen", 8)


def config(tree: Path, cache: Path, *overrides: str) -> StyleGAN2Config:
    return load_config(StyleGAN2Config, shipped_config("stylegan2_tiny"),
                       [f"data.train={tree}", f"data.cache_dir={cache}", *FAST, *overrides])


def _nets(seed: int = 0) -> tuple[Generator, Discriminator]:
    torch.manual_seed(seed)
    p = preset("tiny", 32, 4, c_dim=2)
    return Generator(p.generator), Discriminator(p.discriminator)


def _loss(G: Generator, D: Discriminator, seed: int) -> StyleGAN2Loss:
    cfg = LossConfig(r1_gamma=1.0, r1_interval=2, pl_weight=2.0, pl_interval=2)
    return StyleGAN2Loss(G, D, cfg, generator=torch.Generator().manual_seed(seed))


def _phases(loss: StyleGAN2Loss, real: torch.Tensor, c: torch.Tensor, z: torch.Tensor) -> list[torch.Tensor]:
    """G main, D main, R1 and path length in order, the global RNG (synthesis noise) seeded per phase."""
    out = []
    for k, phase in enumerate((lambda: loss.g_main(z, c), lambda: loss.d_main(real, c, z, c),
                               lambda: loss.d_reg(real, c), lambda: loss.g_reg(z, c))):
        torch.manual_seed(100 + k)
        out.append(phase()[0])
    return out


def test_main_phases_run_in_bf16_but_losses_and_regularizers_in_float32():
    G, D = _nets()
    real = torch.rand(4, 1, 32, 32) * 2 - 1
    c = torch.eye(2)[[0, 1, 0, 1]]
    z = torch.randn(4, G.config.z_dim)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert D(real, c).dtype == torch.bfloat16  # autocast does reach D's convolutions on a CPU
        loss_amp = _loss(G, D, 1)
        g_loss, d_loss, r1_amp, pl_amp = _phases(loss_amp, real, c, z)
    assert g_loss.dtype == d_loss.dtype == loss_amp.real_logits.dtype == r1_amp.dtype == pl_amp.dtype == torch.float32
    assert torch.isfinite(g_loss) and torch.isfinite(d_loss)
    g_ref, d_ref, r1_ref, pl_ref = _phases(_loss(G, D, 1), real, c, z)
    # autocast is off inside the regularizers: the same numbers as a float32 run, bit for bit ...
    assert torch.equal(r1_amp, r1_ref) and r1_ref > 0
    assert torch.equal(pl_amp, pl_ref) and pl_ref > 0
    # ... whereas the main phases' losses move under bf16, within bf16's precision
    assert not torch.equal(d_loss, d_ref) and not torch.equal(g_loss, g_ref)
    assert float(d_loss.detach()) == pytest.approx(float(d_ref.detach()), rel=0.05)
    assert float(g_loss.detach()) == pytest.approx(float(g_ref.detach()), rel=0.05)


def _stats(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]


def test_amp_bf16_trains_on_cpu_and_amp_auto_is_float32_there(tree, tmp_path):
    bf16 = train(config(tree, tmp_path / "c", "train.steps=3", "train.amp=bf16"), tmp_path / "bf16")
    rows = _stats(bf16.run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        for key in ("loss/G", "loss/D", "loss/r1_penalty", "loss/pl_penalty", "pl_mean"):
            assert np.isfinite(r[key]), (key, r)
    assert rows[-1]["loss/r1_penalty"] > 0 and rows[-1]["loss/pl_penalty"] > 0
    off = train(config(tree, tmp_path / "c", "train.steps=2", "train.amp=off"), tmp_path / "off")
    auto = train(config(tree, tmp_path / "c", "train.steps=2", "train.amp=auto"), tmp_path / "auto")
    w_off = load_file(str(off.checkpoint / "G.safetensors"))
    w_auto = load_file(str(auto.checkpoint / "G.safetensors"))
    assert all(torch.equal(w_off[k], w_auto[k]) for k in w_off)  # auto is float32 on a CPU
    assert _stats(off.run_dir)[0]["loss/D"] != rows[0]["loss/D"]  # bf16 did change the numbers


def test_speed_keys_refused_in_one_line(tree, tmp_path, monkeypatch, capsys):
    with pytest.raises(ConfigError) as e:
        config(tree, tmp_path, "train.amp=fp16")
    assert "train.amp" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError) as e:
        config(tree, tmp_path, "train.compile=true", "train.compile_mode=reduce-overhead")
    assert "train.compile_mode=reduce-overhead" in str(e.value) and "\n" not in str(e.value)
    config(tree, tmp_path, "train.compile=false", "train.compile_mode=reduce-overhead")  # unused: fine
    monkeypatch.chdir(tmp_path)
    assert main(["train-gan", "stylegan2", "--config", "stylegan2_tiny", f"data.train={tree}", "--run-dir", "R",
                 *FAST, "train.compile=true", "train.compile_mode=max-autotune"]) == 2
    assert "CUDA graphs" in one_error_line(capsys)
    assert not (tmp_path / "R").exists()


def _family(cfg: StyleGAN2Config, run_dir: Path) -> StyleGAN2Family:
    run_dir.mkdir()
    run = Run(cfg, run_dir, DistInfo(device=torch.device("cpu")), RunLogger(run_dir, enabled=False),
              CheckpointManager(run_dir), None)
    family = StyleGAN2Family(cfg)
    family.setup(run)
    return family


def test_compile_wraps_the_main_phases_and_checkpoints_hold_the_eager_modules(tree, tmp_path):
    family = _family(config(tree, tmp_path / "c", "train.compile=true"), tmp_path / "run")
    assert family.loss.D_main is not family.D and family.loss.D_main._orig_mod is family.D
    assert family.loss.synthesis_main._orig_mod is family.G.synthesis
    assert family.modules()["D"] is family.D and family.modules()["G"] is family.G
    eager = _family(config(tree, tmp_path / "c", "train.compile=false"), tmp_path / "eager")
    assert eager.loss.D_main is eager.D and eager.loss.synthesis_main is eager.G.synthesis


@pytest.mark.slow
def test_compiled_training_runs_and_saves_plain_weights(tree, tmp_path):
    result = train(config(tree, tmp_path / "c", "train.steps=2", "train.compile=true"), tmp_path / "run")
    rows = _stats(result.run_dir)
    assert all(np.isfinite(r["loss/G"]) and np.isfinite(r["loss/D"]) for r in rows)
    for name in ("G", "D", "G_ema"):
        keys = load_file(str(result.checkpoint / f"{name}.safetensors")).keys()
        assert keys and not any("_orig_mod" in k for k in keys)
