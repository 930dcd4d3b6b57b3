"""StyleGAN2-ADA training on a tiny phantom tree: steps, checkpoints, ADA's p, resume, labels, the CLI."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from builders import one_error_line
from cxr.cli.main import main
from cxr.configs import shipped_config
from cxr.data.layouts import load_tree
from cxr.data.record import NIH14, NINE, TB, Sample
from cxr.data.splits import split_records
from cxr.engine.checkpoint import list_checkpoints, load_state
from cxr.engine.config import load_config
from cxr.errors import ConfigError
from cyclegan_helpers import nlm_site
from gan.stylegan2.networks import build_from_model_args
from gan.stylegan2.trainer import StyleGAN2Config, label_space, resolve, train

ROOT = Path(__file__).resolve().parents[1]
_DIST_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
FAST = ("data.size=32", "data.decode_workers=1", "train.batch_size=4", "device=cpu", "train.image_every=2", "loss.r1_interval=2",
        "loss.pl_weight=2", "loss.pl_interval=2", "ada.kimg=0.05", "ada.interval=2")


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """A Shenzhen-layout tree of 12 patients, TB and normal alternating."""
    return nlm_site(tmp_path_factory.mktemp("nlm"), "shenzhen", 12)


def config(tree: Path, cache: Path, *overrides: str) -> StyleGAN2Config:
    return load_config(StyleGAN2Config, shipped_config("stylegan2_tiny"),
                       [f"data.train={tree}", f"data.cache_dir={cache}", *FAST, *overrides])


@pytest.fixture(scope="module")
def trained(tree, tmp_path_factory):
    base = tmp_path_factory.mktemp("run")
    cfg = config(tree, base / "cache", "train.steps=6", "train.log_every=2", "train.ckpt_every=3", "train.keep_last=0")
    return cfg, train(cfg, base / "run")


def test_a_run_writes_three_networks_and_finite_losses(trained, tree):
    cfg, result = trained
    run = result.run_dir
    assert result.steps_done == 6 and result.kimg == pytest.approx(0.024) and not result.interrupted
    assert [p.name for p in list_checkpoints(run)] == ["step-00000003", "step-00000006"]
    rows = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6] and rows[-1]["kimg"] == pytest.approx(0.024)
    for r in rows:
        for key in ("loss/G", "loss/D", "loss/r1_penalty", "loss/pl_penalty", "ada/p", "ada/r_t", "pl_mean"):
            assert np.isfinite(r[key]), (key, r)
        assert -1.0 <= r["ada/r_t"] <= 1.0
    assert rows[-1]["loss/r1_penalty"] > 0 and rows[-1]["loss/pl_penalty"] > 0 and rows[-1]["pl_mean"] > 0
    ckpt = run / "checkpoints" / "step-00000006"
    args = {}
    for name in ("G", "D", "G_ema"):
        with safe_open(str(ckpt / f"{name}.safetensors"), framework="pt") as f:
            args[name] = json.loads(f.metadata()["model_args"])
        assert args[name]["family"] == "stylegan2" and args[name]["label_names"] == ["normal", "Tuberculosis"]
        assert args[name]["c_dim"] == 2 and args[name]["label_kind"] == "single"
        assert args[name]["input"] == {"size": 32, "fit": "pad", "channels": 1, "range": [-1.0, 1.0]}
    # G_ema rebuilds from its record and makes an image per class label
    g = build_from_model_args(args["G_ema"])
    g.load_state_dict(load_file(str(ckpt / "G_ema.safetensors")))
    out = g(torch.randn(2, g.config.z_dim), torch.eye(2), noise_mode="const")
    assert out.shape == (2, 1, 32, 32) and torch.isfinite(out).all()
    assert any((run / "tb").iterdir())
    info = json.loads((run / "run.json").read_text())
    assert info["family"] == "stylegan2" and info["labels"] == {"kind": "single", "names": ["normal", "Tuberculosis"]}


def test_images_seen_is_the_training_split_with_its_classes(trained, tree):
    _, result = trained
    lines = [line.split("\t") for line in (result.run_dir / "images_seen.txt").read_text().splitlines()]
    split = split_records(load_tree(tree).records, seed=0)
    assert [img for img, _ in lines] == [r.image for r in split["train"]]
    assert [cls for _, cls in lines] == ["Tuberculosis" if r.label("Tuberculosis") == 1 else "normal"
                                         for r in split["train"]]
    assert not {r.image for r in split["test"] + split["val"]} & {img for img, _ in lines}


def test_p_moves_under_ada_and_stays_under_fixed(trained, tree, tmp_path):
    _, result = trained
    rows = [json.loads(line) for line in (result.run_dir / "stats.jsonl").read_text().splitlines()]
    assert rows[-1]["ada/p"] > 0 and result.p == rows[-1]["ada/p"]  # a tiny set is memorised at once: p rises
    fixed = train(config(tree, tmp_path / "cache", "train.steps=4", "train.log_every=2", "ada.mode=fixed",
                         "ada.p=0.3", "model.conditional=false"), tmp_path / "fixed")
    rows = [json.loads(line) for line in (fixed.run_dir / "stats.jsonl").read_text().splitlines()]
    assert fixed.p == 0.3 and [r["ada/p"] for r in rows] == [0.3, 0.3]
    with safe_open(str(fixed.checkpoint / "G.safetensors"), framework="pt") as f:
        args = json.loads(f.metadata()["model_args"])
    assert args["c_dim"] == 0 and args["config"]["c_dim"] == 0 and args["label_kind"] == "none"


def test_resume_after_kill_is_bit_identical(trained, tree, tmp_path):
    cfg, straight = trained
    killed = tmp_path / "killed"
    src = straight.run_dir / "checkpoints"
    shutil.copytree(src / "step-00000003", killed / "checkpoints" / "step-00000003")
    half = killed / "checkpoints" / "step-00000005"
    shutil.copytree(src / "step-00000006", half)
    (half / "COMPLETE").unlink()  # a half-written later checkpoint is ignored
    resumed = train(cfg, killed, resume=True)
    assert resumed.steps_done == 6 and resumed.p == straight.p
    a, b = src / "step-00000006", killed / "checkpoints" / "step-00000006"
    for name in ("G", "D", "G_ema"):
        wa, wb = load_file(str(a / f"{name}.safetensors")), load_file(str(b / f"{name}.safetensors"))
        assert set(wa) == set(wb)
        for key in wa:
            assert torch.equal(wa[key], wb[key]), f"{name}.{key} differs after resume"
    sa, sb = load_state(a)["extra"]["family_state"], load_state(b)["extra"]["family_state"]
    assert sa["cur_nimg"] == sb["cur_nimg"] == 24 and sa["p"] == sb["p"] > 0
    assert sa["ema"] == sb["ema"] and sa["loss"] == sb["loss"]
    for key in ("z_gen", "loss_gen", "aug_gen", "ada_stats"):
        assert torch.equal(sa[key], sb[key]), key


def _sample(i: int, labels, names) -> Sample:
    return Sample(image=f"img{i}.png", patient_id=str(i), site="x", labels=np.asarray(labels, np.float32),
                  label_names=names)


def test_label_spaces_single_nine_multi_and_one_class():
    tb = label_space([_sample(i, [i % 2], TB) for i in range(4)], True, "T")
    assert tb.names == ("normal", "Tuberculosis") and tb.kind == "single"
    assert tb.c.tolist() == [[1, 0], [0, 1], [1, 0], [0, 1]]
    nine = label_space([_sample(i, np.eye(9)[i % 9], NINE) for i in range(9)], True, "T")
    assert nine.kind == "single" and nine.c_dim == 9 and (nine.c.argmax(1) == np.arange(9) % 9).all()
    nih_rows = [np.eye(14)[0] + np.eye(14)[3], np.zeros(14), np.full(14, np.nan)]
    nih = label_space([_sample(i, r, NIH14) for i, r in enumerate(nih_rows)], True, "T")
    assert nih.kind == "multi" and nih.c.sum(1).tolist() == [2, 0, 0]
    assert [n for n, _ in nih.grid_rows()] == ["Atelectasis", "Infiltration", "No Finding"]
    assert label_space([_sample(0, [1], TB)], False, "T").c.shape == (1, 0)
    with pytest.raises(ConfigError) as e:
        label_space([_sample(i, [1], TB) for i in range(3)], True, "data.train=T")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("data.train=T: a conditional run needs at least two classes")
    assert "(Tuberculosis)" in msg and "model.conditional=false" in msg


def test_cli_end_to_end_and_a_one_class_tree_is_one_line(tree, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc = main(["train-gan", "stylegan2", f"data.train={tree}", "--config", "stylegan2_tiny", "--run-dir", "R",
               "train.steps=2", *FAST])
    assert rc == 0, capsys.readouterr().err
    assert "trained 2/2 steps" in capsys.readouterr().out
    assert [c.name for c in list_checkpoints(tmp_path / "R")] == ["step-00000002"]
    assert main(["train-gan", "stylegan2", "--run-dir", "R", "--resume", "train.steps=3"]) == 0
    assert [c.name for c in list_checkpoints(tmp_path / "R")][-1] == "step-00000003"
    capsys.readouterr()
    normal_only = tmp_path / "ChinaSet_AllFiles"
    shutil.copytree(tree, normal_only)
    for png in (normal_only / "CXR_png").glob("*_1.png"):
        png.unlink()
    assert main(["train-gan", "stylegan2", "--config", "stylegan2_tiny", f"data.train={normal_only}", "--run-dir",
                 "one", *FAST]) == 2
    err = one_error_line(capsys)
    assert "a conditional run needs at least two classes" in err and "(normal)" in err
    assert not (tmp_path / "one").exists()


def test_shipped_configs_resolve_to_their_recipes():
    auto = load_config(StyleGAN2Config, shipped_config("stylegan2_auto256"))
    r = resolve(auto, 2)
    assert (auto.data.size, auto.train.batch_size, r.g.mapping_layers) == (256, 16, 2)
    assert r.loss.r1_gamma == pytest.approx(0.8192) and r.ema_kimg == 5.0 and r.g.channel_base == 16384
    assert auto.train.total_steps == 25_000_000 // 16
    with pytest.raises(ConfigError, match="power of two"):
        load_config(StyleGAN2Config, None, ["data.size=48"])


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _launch(run_dir: Path, args: list[str], extra_env: dict[str, str]) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in _DIST_KEYS}
    env.update(extra_env, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "cxr.cli.main", "train-gan", "stylegan2", "--run-dir", str(run_dir),
                             *args], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_gloo_processes_match_one_at_the_first_steps(tree, tmp_path):
    """Ranks draw their share of one global batch of latents and average their gradients: with
    the per-process streams out of play (no ADA, no style mixing) and minibatch-std groups
    within a process's share (here of one image), the first G loss is one process's; after G's
    first step the synthesis noise, drawn per process, enters, and the losses stay close."""
    overrides = [f"data.train={tree}", f"data.cache_dir={tmp_path / 'cache'}", *FAST, "ada.mode=none",
                 "loss.style_mixing_prob=0", "model.mbstd_group_size=1", "train.steps=2", "train.log_every=1", "train.image_every=0",
                 "--config", "stylegan2_tiny"]
    single = _launch(tmp_path / "single", overrides, {})
    assert single.wait(timeout=300) == 0, single.stderr.read()
    dist = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": _free_port(), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    ranks = [_launch(tmp_path / "ddp", overrides, {**dist, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in (0, 1)]
    for proc in ranks:
        assert proc.wait(timeout=300) == 0, proc.stderr.read()
    one, two = ([json.loads(line) for line in (tmp_path / k / "stats.jsonl").read_text().splitlines()]
                for k in ("single", "ddp"))
    assert [r["step"] for r in two] == [1, 2]
    assert two[0]["loss/G"] == pytest.approx(one[0]["loss/G"], rel=1e-5)
    for key in ("loss/G", "loss/D", "loss/r1_penalty"):  # path length: per process, on its own share
        for step in (0, 1):
            assert two[step][key] == pytest.approx(one[step][key], rel=2e-2), (step, key)
    assert [c.name for c in list_checkpoints(tmp_path / "ddp")] == ["step-00000002"]
