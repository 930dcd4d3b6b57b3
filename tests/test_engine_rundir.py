"""Run folders (numbering, run.json, config.yaml), --run-dir/--resume checks, and the run logger."""

from __future__ import annotations

import argparse
import csv
import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest
import torch

from cxr.engine.checkpoint import CheckpointManager
from cxr.engine.cli import add_run_arguments, prepare_run_dir
from cxr.engine.config import StepTrainConfig, load_config
from cxr.engine.logging import RunLogger, image_grid, progress
from cxr.engine.rundir import next_run_dir, write_run_info
from cxr.errors import ConfigError
from engine_toy import ToyNet


@dataclass(frozen=True)
class Cfg:
    seed: int = 11
    device: str = "cpu"
    train: StepTrainConfig = field(default_factory=StepTrainConfig)


def test_run_dirs_are_numbered(tmp_path):
    assert next_run_dir(tmp_path / "runs", "cyclegan").name == "00001-cyclegan"
    assert next_run_dir(tmp_path / "runs", "cyclegan").name == "00002-cyclegan"
    (tmp_path / "runs" / "00041-old").mkdir()
    (tmp_path / "runs" / "notes.txt").write_text("x")
    assert next_run_dir(tmp_path / "runs", "my run/v2").name == "00042-my-run-v2"


def test_run_dirs_are_race_safe(tmp_path):
    with ThreadPoolExecutor(8) as pool:
        made = list(pool.map(lambda _: next_run_dir(tmp_path, "x"), range(16)))
    assert len(set(made)) == 16 and all(p.is_dir() for p in made)
    assert sorted(int(p.name[:5]) for p in made) == list(range(1, 17))


def test_write_run_info(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["cxr", "train-gan", "cyclegan", "train.steps=5"])
    cfg = load_config(Cfg, None, ["train.batch_size=4"])
    write_run_info(tmp_path, cfg, torch.device("cpu"), {"world_size": 1})
    assert load_config(Cfg, tmp_path / "config.yaml") == cfg
    info = json.loads((tmp_path / "run.json").read_text())
    assert info["seed"] == 11 and info["world_size"] == 1
    assert info["command"] == ["cxr", "train-gan", "cyclegan", "train.steps=5"]
    assert info["packages"]["torch"] == torch.__version__.split("+")[0]
    assert set(info["packages"]) == {"torch", "torchvision", "numpy", "cxr-gan"}
    assert info["device"].startswith("cpu") and info["python"].count(".") == 2
    assert info["git_revision"] is None or re.fullmatch(r"[0-9a-f]{40}(-dirty)?", info["git_revision"])
    assert re.match(r"\d{4}-\d\d-\d\dT", info["start_time"])
    write_run_info(tmp_path, cfg, "cpu")  # a resumed run keeps the first run's record
    assert json.loads((tmp_path / "run-1.json").read_text())["world_size"] == 1
    assert "world_size" not in json.loads((tmp_path / "run.json").read_text())


def _args(*argv):
    return add_run_arguments(argparse.ArgumentParser()).parse_args(list(argv))


def _with_checkpoint(path):
    CheckpointManager(path).save(1, {"net": ToyNet(2)})
    return path


def test_prepare_run_dir(tmp_path):
    runs = tmp_path / "runs"
    assert prepare_run_dir(_args(), "toy", runs_dir=runs) == runs / "00001-toy"
    given = prepare_run_dir(_args("--run-dir", str(tmp_path / "mine")), "toy", runs_dir=runs)
    assert given == tmp_path / "mine" and given.is_dir()
    _with_checkpoint(given)
    with pytest.raises(ConfigError, match="already holds checkpoints; pass --resume"):
        prepare_run_dir(_args("--run-dir", str(given)), "toy", runs_dir=runs)
    assert prepare_run_dir(_args("--run-dir", str(given), "--resume"), "toy", runs_dir=runs) == given
    with pytest.raises(ConfigError, match="--resume needs --run-dir"):
        prepare_run_dir(_args("--resume"), "toy", runs_dir=runs)
    with pytest.raises(ConfigError, match="no such run folder"):
        prepare_run_dir(_args("--resume", "--run-dir", str(tmp_path / "nope")), "toy", runs_dir=runs)
    half = tmp_path / "half" / "checkpoints" / "step-00000010"
    half.mkdir(parents=True)  # killed while writing its only checkpoint
    with pytest.raises(ConfigError, match="holds no complete checkpoint"):
        prepare_run_dir(_args("--resume", "--run-dir", str(tmp_path / "half")), "toy", runs_dir=runs)


def test_run_logger_files_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = RunLogger(tmp_path)
    log.scalars(1, {"loss_G": torch.tensor(0.5), "lr": 2e-4})
    log.scalars(2, {"loss_G": 0.25, "lr": 2e-4, "bad": float("nan")})
    log.images(2, "translations", torch.rand(4, 1, 8, 8) * 2 - 1, nrow=2)
    log.summary({"step": 2, "loss_G": 0.25, "ssim": 0.5})
    log.summary({"step": 4, "loss_G": 0.125, "unknown": 1})
    log.text("hello")
    log.close()

    rows = [json.loads(x) for x in (tmp_path / "stats.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss_G"]) for r in rows] == [(1, 0.5), (2, 0.25)]
    assert rows[1]["bad"] == "nan"  # still valid JSON
    with open(tmp_path / "summary.csv", newline="") as f:
        table = list(csv.reader(f))
    assert table == [["step", "loss_G", "ssim"], ["2", "0.25", "0.5"], ["4", "0.125", ""]]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d hello\n", (tmp_path / "log.txt").read_text())

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("loss_G")] == [0.5, 0.25]
    assert acc.Tags()["images"] == ["translations"]
    img = acc.Images("translations")[0]
    assert (img.width, img.height) == (2 * 8 + 3 * 2, 2 * 8 + 3 * 2)  # 2x2 grid, 2-px padding

    again = RunLogger(tmp_path)  # a resumed run keeps the summary header
    again.summary({"ssim": 0.7, "step": 6})
    assert (tmp_path / "summary.csv").read_text().splitlines()[-1] == "6,,0.7"


def test_resume_truncates_lines_after_the_checkpoint(tmp_path):
    log = RunLogger(tmp_path, tensorboard=False)
    for s in range(1, 8):
        log.scalars(s, {"loss": float(s)})
    with open(tmp_path / "stats.jsonl", "a") as f:
        f.write('{"step": 8, "lo')  # torn by the kill
    RunLogger(tmp_path, resume_step=5, tensorboard=False).scalars(6, {"loss": 60.0})
    rows = [json.loads(x) for x in (tmp_path / "stats.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 5.0), (6, 60.0)]


def test_disabled_logger_writes_nothing(tmp_path):
    log = RunLogger(tmp_path / "rank1", enabled=False)
    log.scalars(1, {"a": 1.0})
    log.images(1, "x", torch.rand(1, 1, 4, 4))
    log.summary({"a": 1})
    log.text("x")
    log.close()
    assert not (tmp_path / "rank1").exists()
    assert log.progress(10).disable


def test_image_grid_and_progress():
    g = image_grid(torch.tensor([-1.0, 0.0, 1.0]).reshape(1, 1, 1, 3), nrow=1, padding=0)
    assert g.shape == (3, 1, 3) and g[0, 0].tolist() == [0.0, 0.5, 1.0]  # [-1, 1] mapped to [0, 1]
    g01 = image_grid(torch.tensor([0.0, 0.25]).reshape(1, 1, 1, 2), nrow=1, padding=0)
    assert g01[0, 0].tolist() == [0.0, 0.25]  # already [0, 1]: unchanged
    with pytest.raises(ValueError, match="expected an"):
        image_grid(torch.rand(1, 4, 4))
    bar = progress(100, initial=40, desc="train")
    assert bar.n == 40 and bar.total == 100 and bar.disable  # stderr is not a terminal under pytest
    bar.close()


def test_checked_run_dir_makes_a_folder_only_after_the_inputs_pass(tmp_path, monkeypatch):
    from cxr.engine.cli import prepare_checked_run_dir
    from cxr.errors import ConfigError, DataError

    parser = add_run_arguments(argparse.ArgumentParser())
    runs = tmp_path / "runs"

    def bad() -> None:
        raise DataError("data.train=/nope", "no such folder or archive")

    with pytest.raises(DataError):
        prepare_checked_run_dir(parser.parse_args([]), "toy", bad, runs_dir=runs)
    assert not runs.exists() or not any(runs.iterdir())  # no empty numbered folder left behind
    made = prepare_checked_run_dir(parser.parse_args([]), "toy", lambda: None, runs_dir=runs)
    assert made.parent == runs and made.is_dir()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="--run-dir"):
        prepare_checked_run_dir(parser.parse_args([]), "toy", lambda: None, runs_dir=runs)
