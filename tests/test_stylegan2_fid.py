"""FID snapshots during StyleGAN2 training: when they run, what they log, and best/ by the lowest FD."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from builders import one_error_line
from cxr.cli.main import main
from cxr.configs import shipped_config
from cxr.engine.checkpoint import list_checkpoints, load_state, read_meta
from cxr.engine.config import load_config
from cxr.errors import ConfigError
from cyclegan_helpers import nlm_site
from eval.gan_features import EXTRACTORS
from eval.gan_snapshots import ENCODER_DIR, FidMetrics, fid_metrics, isolated_global_state
from gan.stylegan2.trainer import FID_EXTRACTORS, Snapshot, StyleGAN2Config, StyleGAN2Family, train

FAST = ("data.size=32", "data.decode_workers=1", "train.batch_size=4", "device=cpu", "train.image_every=0",
        "loss.r1_interval=2", "ada.kimg=0.05", "ada.interval=2", "train.keep_last=0", "train.log_every=2")


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """A Shenzhen-layout tree of 30 patients, TB and normal alternating."""
    return nlm_site(tmp_path_factory.mktemp("nlm"), "shenzhen", 30)


def config(tree: Path, cache: Path, *overrides: str) -> StyleGAN2Config:
    return load_config(StyleGAN2Config, shipped_config("stylegan2_tiny"),
                       [f"data.train={tree}", f"data.cache_dir={cache}", *FAST, *overrides])


class Scripted:
    """A metrics function returning a fixed FD sequence; it records what it was given."""

    def __init__(self, fds: list[float]):
        self.fds, self.calls = list(fds), []

    def __call__(self, snap: Snapshot) -> dict:
        images = snap.sample(snap.n_images)
        self.calls.append((snap.step, snap.kimg, tuple(images.shape), float(images.min()), float(images.max())))
        return {"fd": self.fds[len(self.calls) - 1], "extractor": "scripted", "n_fake": len(images)}


def test_best_checkpoint_is_the_lowest_scripted_fd(tree, tmp_path):
    cfg = config(tree, tmp_path / "cache", "train.steps=8", "train.fid_every=2", "train.fid_images=5",
                 "train.ckpt_every=0")
    fn = Scripted([5.0, 2.0, 3.0, 4.0])
    result = train(cfg, tmp_path / "run", metrics_fn=fn)
    assert [c[0] for c in fn.calls] == [2, 4, 6, 8]
    assert fn.calls[0][1] == pytest.approx(0.008) and fn.calls[0][2] == (5, 1, 32, 32)
    assert all(0.0 <= c[3] <= c[4] <= 1.0 for c in fn.calls)
    run = result.run_dir
    # best/ is step 4's checkpoint (FD 2.0), though step 8 came last
    assert read_meta(run / "checkpoints" / "best")["step"] == 4 and read_meta(run / "checkpoints" / "best")["metric"] == 2.0
    assert result.best == run / "checkpoints" / "best" and result.best_fd == 2.0 and result.fid_extractor == "scripted"
    assert [p.name for p in list_checkpoints(run)][-1] == "step-00000008"
    rows = [json.loads(x) for x in (run / "stats.jsonl").read_text().splitlines()]
    fd_rows = [(r["step"], r["fid/fd"]) for r in rows if "fid/fd" in r]
    assert fd_rows == [(2, 5.0), (4, 2.0), (6, 3.0), (8, 4.0)]
    assert all(r["fid/n_fake"] == 5 for r in rows if "fid/fd" in r)
    with open(run / "summary.csv", newline="") as f:
        summary = list(csv.DictReader(f))
    assert [(int(r["steps"]), float(r["fd"]), r["extractor"]) for r in summary[:4]] == [
        (2, 5.0, "scripted"), (4, 2.0, "scripted"), (6, 3.0, "scripted"), (8, 4.0, "scripted")]
    assert summary[-1]["checkpoint"].endswith("step-00000008")  # the final row keeps its own columns
    log = (run / "log.txt").read_text()
    assert "FID snapshot at 0.016 kimg: FD 2 (scripted, 5 images" in log and log.count("(best)") == 2
    assert load_state(run / "checkpoints" / "best")["extra"]["selection"] == "lowest FD (scripted)"


def test_snapshots_use_the_same_latents_and_leave_training_streams_alone(tree, tmp_path):
    """The FD sampler has its own generator: a run with snapshots trains exactly as one without."""
    base = ("train.steps=4", "train.ckpt_every=0", "train.deterministic=true")
    plain = train(config(tree, tmp_path / "c1", *base), tmp_path / "plain")
    fn = Scripted([1.0, 1.0])
    snap = train(config(tree, tmp_path / "c2", *base, "train.fid_every=2", "train.fid_images=3"), tmp_path / "snap",
                 metrics_fn=fn)
    a = [json.loads(x) for x in (plain.run_dir / "stats.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (snap.run_dir / "stats.jsonl").read_text().splitlines() if "fid/fd" not in x]
    assert [r["loss/G"] for r in a] == [r["loss/G"] for r in b] and [r["loss/D"] for r in a] == [r["loss/D"] for r in b]


def test_the_last_step_is_measured_and_kimg_sets_the_interval(tree, tmp_path):
    cfg = config(tree, tmp_path / "cache", "train.steps=5", "train.fid_kimg=0.008", "train.fid_images=2",
                 "train.ckpt_every=0")
    assert cfg.train.fid_interval == 2
    fn = Scripted([3.0, 2.0, 1.0])
    train(cfg, tmp_path / "run", metrics_fn=fn)
    assert [c[0] for c in fn.calls] == [2, 4, 5]


def test_snapshots_without_a_metrics_function_and_bad_keys_are_refused(tree, tmp_path):
    with pytest.raises(ConfigError, match="train.fid_every"):
        StyleGAN2Family(config(tree, tmp_path, "train.fid_every=2"))
    for bad, where in (("train.fid_every=-1", "fid_every"), ("train.fid_images=1", "fid_images"),
                       ("train.fid_extractor=vgg", "fid_extractor"), ("train.fid_size=8", "fid_size"),
                       ("train.fid_kimg=0", "fid_kimg")):
        with pytest.raises((ConfigError, ValueError), match=where):
            config(tree, tmp_path, bad)
    assert FID_EXTRACTORS == EXTRACTORS  # the trainer's copy of the higher layer's names
    assert fid_metrics(config(tree, tmp_path)) is None  # off in stylegan2_tiny
    with pytest.raises(ConfigError, match="one process only"):
        FidMetrics(tree, extractor="trained", distributed=True)


def test_shipped_configs_turn_snapshots_on_except_tiny():
    tiny, nlm, auto = (load_config(StyleGAN2Config, shipped_config(n)) for n in
                       ("stylegan2_tiny", "stylegan2_nlm", "stylegan2_auto256"))
    assert tiny.train.fid_interval == 0
    assert nlm.train.fid_interval == 625 and nlm.train.fid_images == 1000  # 10 kimg at batch 16
    assert auto.train.fid_interval == 12500 and auto.train.fid_images == 10000  # 200 kimg at batch 16


def test_isolated_global_state_restores_every_stream():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    expect = (random.random(), float(np.random.rand()), float(torch.rand(())))
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    with isolated_global_state():
        random.seed(5), np.random.seed(5), torch.manual_seed(5)
        torch.use_deterministic_algorithms(True, warn_only=True)
        random.random(), torch.rand(3)
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expect
    assert not torch.are_deterministic_algorithms_enabled()


def test_a_real_tiny_run_with_the_trained_extractor_through_the_cli(tree, tmp_path, capsys):
    """`cxr train-gan stylegan2` with snapshots on: the small CNN trained in the run folder, named
    by its hash in every FD row, and best/ the lowest of the logged FDs."""
    run = tmp_path / "run"
    rc = main(["train-gan", "stylegan2", "--config", "stylegan2_tiny", "--run-dir", str(run),
               f"data.train={tree}", *FAST, "train.steps=6", "train.fid_every=3", "train.fid_images=40",
               "train.fid_extractor=trained", "train.fid_size=32", "train.ckpt_every=0"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert (run / ENCODER_DIR / "checkpoints" / "best").is_dir()
    rows = [json.loads(x) for x in (run / "stats.jsonl").read_text().splitlines() if "fid/fd" in x]
    assert [r["step"] for r in rows] == [3, 6] and all(np.isfinite(r["fid/fd"]) and r["fid/fd"] >= 0 for r in rows)
    with open(run / "summary.csv", newline="") as f:
        names = {r["extractor"] for r in csv.DictReader(f) if r["fd"]}
    assert len(names) == 1 and next(iter(names)).startswith("trained-small_cnn-")
    best = read_meta(run / "checkpoints" / "best")
    assert best["metric"] == pytest.approx(min(r["fid/fd"] for r in rows))
    assert "best FD" in out and next(iter(names)) in out
    # a resume reloads the encoder (the same name, its run untouched) instead of training it again
    encoder_log = (run / ENCODER_DIR / "log.txt").read_text()
    rc = main(["train-gan", "stylegan2", "--run-dir", str(run), "--resume", "train.steps=9"])
    assert rc == 0, capsys.readouterr().err
    assert (run / ENCODER_DIR / "log.txt").read_text() == encoder_log
    with open(run / "summary.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["fd"]]
    assert [int(r["steps"]) for r in rows] == [3, 6, 9] and {r["extractor"] for r in rows} == names


def test_a_pretrained_extractor_that_is_not_local_is_one_line(tree, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("eval.gan_features.available", lambda kind: kind == "trained")
    rc = main(["train-gan", "stylegan2", "--config", "stylegan2_tiny", "--run-dir", str(tmp_path / "run"),
               f"data.train={tree}", *FAST, "train.fid_every=3", "train.fid_extractor=inception"])
    assert rc == 2 and "not in the local cache" in one_error_line(capsys)
    assert not (tmp_path / "run").exists()
