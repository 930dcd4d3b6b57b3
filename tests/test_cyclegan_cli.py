"""``cxr train-gan cyclegan`` and ``cxr translate``: dry run, bad input, train → resume → translate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from builders import one_error_line
from cxr.cli.main import main
from cxr.configs import shipped_config
from cxr.data.layouts import load_tree
from cxr.engine.checkpoint import latest
from cyclegan_helpers import nlm_site

TINY = shipped_config("cyclegan_tiny")
FAST = ["data.size=32", "data.decode_workers=1", "model.ngf=4", "model.ndf=4", "model.d_layers=2",
        "train.batch_size=2", "train.log_every=1", "train.image_every=0", "train.ckpt_every=2", "device=cpu"]


@pytest.fixture
def trees(tmp_path, monkeypatch) -> tuple[Path, Path]:
    monkeypatch.chdir(tmp_path)  # runs/ and the cache land in the test's folder
    return nlm_site(tmp_path / "data", "montgomery", 8), nlm_site(tmp_path / "data", "shenzhen", 8)



def test_dry_run_prints_the_resolved_config_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train-gan", "cyclegan", "--config", str(TINY), "--dry-run", "train.steps=7", "data.a=/x/A"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["train"]["steps"] == 7 and cfg["data"]["a"] == "/x/A" and cfg["data"]["size"] == 64
    assert cfg["loss"] == {"gan_mode": "lsgan", "lambda_cycle": 10.0, "lambda_identity": 0.5, "pool_size": 50,
                           "lambda_structure": 10.0, "d_field": 0.7, "d_augment": 0.0,
                           "lambda_border": 0.0}
    assert list(tmp_path.iterdir()) == []
    # Without --config the nlm config (the paper's settings) is the default.
    assert main(["train-gan", "cyclegan", "--dry-run"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert (cfg["model"]["generator"], cfg["data"]["size"], cfg["optim"]["lr"]) == ("resnet9", 256, 0.0002)
    # ... with none of the options added after the paper switched on.
    assert (cfg["model"]["residual"], cfg["model"]["d_norm"], cfg["model"]["upsample"]) == (False, None, "transpose")
    assert (cfg["loss"]["lambda_structure"], cfg["loss"]["d_field"], cfg["loss"]["d_augment"]) == (0.0, 1.0, 0.0)


@pytest.mark.parametrize("args, expected", [
    (["train.stepz=3"], "unknown config key 'train.stepz' (did you mean 'train.steps'?)"),
    (["loss.gan_mode=wgan"], "config key 'loss.gan_mode': expected one of 'lsgan', 'vanilla', 'hinge'"),
    (["data.size=30"], "data.size must be a multiple of 4"),
    (["model.generator=resnet7", "data.a=.", "data.b=."], None),
])
def test_config_errors_are_one_line(tmp_path, monkeypatch, capsys, args, expected):
    monkeypatch.chdir(tmp_path)
    rc = main(["train-gan", "cyclegan", "--config", str(TINY), *args])
    err = one_error_line(capsys)
    assert rc == 2
    assert (expected or "unknown generator 'resnet7'") in err


def test_missing_or_empty_dataset_is_one_line(trees, tmp_path, capsys):
    a, b = trees
    assert main(["train-gan", "cyclegan", "--config", str(TINY), f"data.a={tmp_path / 'nope'}", f"data.b={b}"]) == 2
    err = one_error_line(capsys)
    assert f"data.a={tmp_path / 'nope'}: no such folder" in err
    empty = tmp_path / "empty" / "MontgomerySet"
    (empty / "CXR_png").mkdir(parents=True)
    assert main(["train-gan", "cyclegan", "--config", str(TINY), *FAST, f"data.a={empty}", f"data.b={b}"]) == 2
    assert "empty CXR_png folder" in one_error_line(capsys)


def test_train_resume_translate_end_to_end(trees, tmp_path, capsys):
    a, b = trees
    run = tmp_path / "runs" / "tiny"
    common = ["--config", str(TINY), "--run-dir", str(run)]
    assert main(["train-gan", "cyclegan", *common, *FAST, f"data.a={a}", f"data.b={b}", "train.steps=2"]) == 0
    assert "trained 2/2 steps" in capsys.readouterr().out
    assert latest(run).name == "step-00000002"
    # Same folder again without --resume: refused; with --resume: continues from the saved config.
    assert main(["train-gan", "cyclegan", *common, *FAST, f"data.a={a}", f"data.b={b}"]) == 2
    assert "--resume" in one_error_line(capsys)
    assert main(["train-gan", "cyclegan", "--run-dir", str(run), "--resume", "train.steps=4"]) == 0
    assert latest(run).name == "step-00000004"
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["steps"] == 4
    capsys.readouterr()
    out = tmp_path / "translated"
    assert main(["translate", "--checkpoint", str(run), "--direction", "a2b", "--in", str(a), "--out", str(out),
                 "--batch-size", "3"]) == 0
    printed = capsys.readouterr().out
    assert "translated 8 images (montgomery)" in printed and "with G_ab of" in printed  # no average kept
    src, dst = load_tree(a), load_tree(out)
    assert len(dst) == 8 and np.array_equal(src.label_matrix(), dst.label_matrix())


def test_resume_and_translate_errors_are_one_line(trees, tmp_path, capsys):
    empty_run = tmp_path / "runs" / "none"
    empty_run.mkdir(parents=True)
    assert main(["train-gan", "cyclegan", "--run-dir", str(empty_run), "--resume"]) == 2
    assert "holds no complete checkpoint" in one_error_line(capsys)
    a, _ = trees
    assert main(["translate", "--checkpoint", str(tmp_path / "missing"), "--direction", "a2b", "--in", str(a),
                 "--out", str(tmp_path / "o")]) == 2
    assert "no such checkpoint or run folder" in one_error_line(capsys)
    assert not (tmp_path / "o").exists()
    # --weights ema on a run trained without train.ema: one line naming the missing average.
    run = tmp_path / "runs" / "raw"
    assert main(["train-gan", "cyclegan", "--config", str(TINY), "--run-dir", str(run), *FAST, f"data.a={a}",
                 f"data.b={trees[1]}", "train.steps=1"]) == 0
    capsys.readouterr()
    assert main(["translate", "--checkpoint", str(run), "--direction", "a2b", "--in", str(a),
                 "--out", str(tmp_path / "o"), "--weights", "ema"]) == 2
    assert "no weight average 'G_ab_ema'" in one_error_line(capsys)
    assert not (tmp_path / "o").exists()
