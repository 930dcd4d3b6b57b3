"""Classifier training: the loss goes down for every task, thresholds come from validation
only, results and predictions are written, an interrupted run resumes to the same result."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import classifiers.trainer as trainer_mod
import cxr.engine.loop as loop_mod
from classifier_helpers import montgomery_tree, nih_tree, nine_tree, shenzhen_tree, tiny_config
from classifiers.config import ClassifierTrainConfig
from classifiers.trainer import balanced_weights, epoch_order, masked_bce, positive_weights, train
from cxr.data.tasks import get_task
from cxr.engine.checkpoint import read_meta
from cxr.metrics.classification import choose_thresholds


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("trees")
    return {"tb": shenzhen_tree(root / "sz", n=40), "mc": montgomery_tree(root / "mc", n=12),
            "nih14": nih_tree(root / "nih", n=48), "nine": nine_tree(root / "nine", per_class=14)}


def summary_rows(run: Path) -> list[dict[str, str]]:
    with open(run / "summary.csv", newline="") as f:
        return [r for r in csv.DictReader(f) if r.get("train_loss")]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# -- pure pieces ---------------------------------------------------------------------------------

def test_masked_bce_ignores_unlabelled_entries():
    z = torch.tensor([[2.0, -1.0], [0.5, 3.0]])
    y = torch.tensor([[1.0, float("nan")], [0.0, float("nan")]])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor([2.0, 0.5]), torch.tensor([1.0, 0.0]))
    assert torch.isclose(masked_bce(z, y), expected)
    assert masked_bce(z, torch.full_like(z, float("nan"))) == 0


def test_weights_and_order():
    t = np.array([[1, 0], [0, 0], [0, np.nan], [0, 1]], dtype=np.float32)
    assert np.allclose(positive_weights(t), [3.0, 2.0])
    w = balanced_weights(get_task("tb"), np.array([1, 0, 0, 0], dtype=np.float32))
    assert np.isclose(w[0], 0.5) and np.allclose(w[1:], 0.5 / 3)  # each class half the mass
    assert torch.equal(epoch_order(10, 3, 1), epoch_order(10, 3, 1))
    assert sorted(epoch_order(10, 3, 1).tolist()) == list(range(10))
    draws = epoch_order(1000, 0, 0, balanced_weights(get_task("tb"), np.r_[np.ones(100), np.zeros(900)]))
    assert 400 < int((draws < 100).sum()) < 600  # the rare class drawn about half the time


# -- training ------------------------------------------------------------------------------------

@pytest.mark.parametrize("task", ["tb", "nih14", "nine"])
def test_loss_decreases_for_each_task(trees, tmp_path, task):
    cfg = tiny_config(task, trees[task], tmp_path / "cache", "train.epochs=4")
    run = tmp_path / "run"
    result = train(cfg, run)
    rows = summary_rows(run)
    assert len(rows) == 4 == result.epochs_done
    losses = [float(r["train_loss"]) for r in rows]
    assert losses[-1] < 0.8 * losses[0], losses
    assert float(rows[-1]["val_loss"]) < float(rows[0]["val_loss"])
    for name in ("val", "test"):
        doc = json.loads((run / f"{name}.json").read_text())
        assert doc["task"] == task and (run / f"{name}.csv").exists()
        assert (run / f"predictions_{name}.csv").exists()
    headline = "cross_entropy" if task == "nine" else "auroc"
    assert headline in result.results["test"] and np.isfinite(result.results["test"][headline])


def test_thresholds_come_from_validation_only(trees, tmp_path, monkeypatch):
    calls = []
    real = trainer_mod.choose_thresholds

    def spy(task, targets, probs):
        calls.append(len(targets))
        return real(task, targets, probs)

    monkeypatch.setattr(trainer_mod, "choose_thresholds", spy)
    cfg = tiny_config("tb", trees["tb"], tmp_path / "cache", f"data.test={trees['mc']}", "train.epochs=2")
    run = tmp_path / "run"
    train(cfg, run)
    val_rows = read_csv(run / "predictions_val.csv")
    assert set(calls) == {len(val_rows)}  # every call saw the validation set, never a test set
    y = np.array([float(r["true_Tuberculosis"]) for r in val_rows])
    p = np.array([float(r["p_Tuberculosis"]) for r in val_rows])
    expected = choose_thresholds(get_task("tb"), y, p)[0]
    stored = json.loads((run / "thresholds.json").read_text())
    assert stored["thresholds"] == [pytest.approx(expected, abs=1e-6)] and stored["chosen_on"] == "validation"
    assert json.loads((run / "checkpoints" / "best" / "thresholds.json").read_text()) == stored
    for name in ("test", "heldout"):
        doc = json.loads((run / f"{name}.json").read_text())
        assert doc["thresholds"] == stored["thresholds"]
        assert doc["metrics"]["threshold"] == pytest.approx(expected, abs=1e-6)
        rows = read_csv(run / f"predictions_{name}.csv")
        assert all(int(r["pred_Tuberculosis"]) == (float(r["p_Tuberculosis"]) >= expected) for r in rows)
    assert "ci_low" in json.loads((run / "test.json").read_text())


def test_single_class_validation_falls_back_to_val_loss(tmp_path):
    neg = shenzhen_tree(tmp_path / "neg", n=24, positives=False)
    pos_test = montgomery_tree(tmp_path / "mc", n=8)
    cfg = tiny_config("tb", neg, tmp_path / "cache", f"data.test={pos_test}", "train.epochs=2")
    result = train(cfg, tmp_path / "run")
    assert any("only one class for Tuberculosis (AUROC undefined)" in n for n in result.notes)
    assert any("validation loss instead" in n for n in result.notes)
    assert "early stopping" in (tmp_path / "run" / "log.txt").read_text()
    assert np.isfinite(result.results["test"]["auroc"])  # the test tree has both classes


def test_early_stopping_with_patience(trees, tmp_path):
    cfg = tiny_config("tb", trees["tb"], tmp_path / "cache", "train.epochs=30", "train.patience=1", "optim.lr=0.0001")
    result = train(cfg, tmp_path / "run")
    assert result.stopped_early and result.epochs_done < 30


def test_select_last_keeps_the_last_epoch(trees, tmp_path):
    # lr 1e-4 over 6 epochs: the best validation AUROC is rarely the last epoch's
    cfg = tiny_config("tb", trees["tb"], tmp_path / "cache", "train.epochs=6", "train.select=last", "optim.lr=0.0001")
    result = train(cfg, tmp_path / "run")
    ckpts = tmp_path / "run" / "checkpoints"
    assert result.best == ckpts / "best" and read_meta(result.best)["step"] == result.steps_done
    assert (result.best / "classifier.safetensors").read_bytes() == \
        (ckpts / f"step-{result.steps_done:08d}" / "classifier.safetensors").read_bytes()
    assert json.loads((tmp_path / "run" / "thresholds.json").read_text())["checkpoint"] == str(result.best)
    with pytest.raises(ValueError, match="needs train.patience=0"):
        ClassifierTrainConfig(select="last", patience=2)
    with pytest.raises(ValueError, match="train.select must be best or last"):
        ClassifierTrainConfig(select="first")


def test_interrupted_run_resumes_to_the_same_result(trees, tmp_path, monkeypatch):
    overrides = ("train.epochs=3", "augment.enabled=true", "model.options={width: 4, dropout: 0.2}")
    cfg = tiny_config("tb", trees["tb"], tmp_path / "cache", *overrides)
    train(cfg, tmp_path / "full")

    class StopAfter:
        """Ask to stop at the 4th check of the flag (the loop checks it once per step): after
        step 4, mid-way through epoch 2 (3 steps an epoch)."""
        def __init__(self, *a, **k):
            self.calls = 0

        @property
        def requested(self):
            self.calls += 1
            return self.calls >= 4

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

    monkeypatch.setattr(loop_mod, "GracefulInterrupt", StopAfter)
    first = train(cfg, tmp_path / "resumed")
    assert first.interrupted and first.steps_done == 4 and not first.results
    monkeypatch.undo()
    second = train(cfg, tmp_path / "resumed", resume=True)
    assert not second.interrupted and second.steps_done == 9
    full = read_csv(tmp_path / "full" / "predictions_test.csv")
    resumed = read_csv(tmp_path / "resumed" / "predictions_test.csv")
    assert [r["p_Tuberculosis"] for r in full] == [r["p_Tuberculosis"] for r in resumed]


def test_fusion_imputes_missing_ages_and_counts_them(tmp_path):
    tree = nih_tree(tmp_path / "nih", n=32, ages=[40, "", 55, ""])
    cfg = tiny_config("nih14", tree, tmp_path / "cache", "model.name=fusion",
                      "model.options={backbone: small_cnn, backbone_args: {width: 4}}", "train.epochs=1")
    result = train(cfg, tmp_path / "run")
    assert "auroc" in result.results["test"]
    from classifiers.data import assemble

    n_missing = sum(r.age is None for r in assemble(cfg.data, get_task("nih14")).train)
    assert n_missing > 0
    log = (tmp_path / "run" / "log.txt").read_text()
    assert f"metadata: {n_missing} of " in log and "ages missing or implausible" in log
