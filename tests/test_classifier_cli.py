"""``cxr train-classifier`` and ``cxr predict``: dry run, bad input as one line, train → predict."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from builders import one_error_line
from classifier_helpers import FAST, montgomery_tree, nih_tree, shenzhen_tree
from classifiers.predict import load_classifier
from classifiers.trainer import forward_all, probabilities
from cxr.cli.main import main
from cxr.configs import shipped_config
from cxr.data.cache import SCALE
from cxr.data.image import load_image
from cxr.data.layouts import load_tree
from cxr.data.preprocess import apply
from cxr.engine.checkpoint import CheckpointManager
from cyclegan_helpers import tiny_config as cyclegan_config
from gan.cyclegan.trainer import build_networks, checkpoint_args
from gan.cyclegan.translate import load_translator, translate_tree
from harmonize.trees import harmonize_tree

TINY = shipped_config("classifier_tiny")


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("trees")
    return {"sz": shenzhen_tree(root / "sz", n=40), "mc": montgomery_tree(root / "mc", n=12),
            "nih": nih_tree(root / "nih", n=16)}


@pytest.fixture(scope="module")
def trained(trees, tmp_path_factory) -> Path:
    """One tiny TB run through the CLI (Shenzhen-like train, Montgomery-like test)."""
    base = tmp_path_factory.mktemp("run")
    run = base / "run"
    rc = main(["train-classifier", "--task", "tb", "--config", str(TINY), "--run-dir", str(run), *FAST,
               f"data.train={trees['sz']}", f"data.test={trees['mc']}", f"data.cache_dir={base / 'cache'}",
               "train.epochs=2"])
    assert rc == 0
    return run



def test_dry_run_prints_the_resolved_config(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train-classifier", "--task", "nih14", "--dry-run", "data.train=/x/nih", "data.val=[/a,/b]"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["task"] == "nih14" and cfg["model"]["name"] == "densenet121" and cfg["data"]["size"] == 224
    assert cfg["data"]["train"] == ["/x/nih"] and cfg["data"]["val"] == ["/a", "/b"]
    assert main(["train-classifier", "--dry-run", "--model", "resnet18"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert (cfg["task"], cfg["model"]["name"], cfg["data"]["train"]) == ("tb", "resnet18", ["data/phantom/ChinaSet_AllFiles"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, expected", [
    (["train.epoch=3"], "unknown config key 'train.epoch' (did you mean 'train.epochs'?)"),
    (["task=pneumonia"], "unknown task 'pneumonia'"),
    (["model.name=vgg"], "unknown model 'vgg'"),
    (["model.options={widht: 4}"], "unknown argument 'widht'"),
    (["data.size=8"], "data.size must be in"),
    (["--model", "metadata_mlp"], "--model metadata_mlp: the metadata study predicts the NIH-14 findings"),
])
def test_config_errors_are_one_line(tmp_path, monkeypatch, capsys, args, expected):
    monkeypatch.chdir(tmp_path)
    assert main(["train-classifier", "--config", str(TINY), *args]) == 2
    assert expected in one_error_line(capsys)
    assert not (tmp_path / "runs").exists()


def test_missing_or_empty_tree_is_one_line(trees, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train-classifier", "--config", str(TINY), f"data.train={tmp_path / 'nope'}"]) == 2
    assert f"data.train={tmp_path / 'nope'}: no such folder or archive" in one_error_line(capsys)
    empty = tmp_path / "empty" / "ChinaSet_AllFiles"
    (empty / "CXR_png").mkdir(parents=True)
    assert main(["train-classifier", "--config", str(TINY), *FAST, f"data.train={empty}"]) == 2
    assert "empty CXR_png folder" in one_error_line(capsys)
    assert main(["train-classifier", "--config", str(TINY), *FAST, f"data.train={trees['sz']}",
                 f"data.test={tmp_path}"]) == 2
    assert "no known dataset layout" in one_error_line(capsys)


def test_task_label_mismatch_is_one_line(trees, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train-classifier", "--task", "nih14", "--config", str(TINY), *FAST,
                 f"data.train={trees['sz']}"]) == 2
    err = one_error_line(capsys)
    assert f"data.train={trees['sz']}: has none of the labels of task 'nih14'" in err and "Tuberculosis" in err


def test_pretrained_weights_of_another_architecture_are_one_line(trees, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    wrong = tmp_path / "resnet.safetensors"
    save_file({"conv1.weight": torch.zeros(64, 1, 7, 7), "fc.weight": torch.zeros(1, 512)}, str(wrong))
    assert main(["train-classifier", "--config", str(TINY), *FAST, f"data.train={trees['sz']}",
                 f"model.pretrained={wrong}"]) == 2
    err = one_error_line(capsys)
    assert str(wrong) in err


def test_train_writes_results_and_predict_matches_the_model(trained, trees, tmp_path, capsys):
    for name in ("val", "test", "heldout"):
        assert (trained / f"{name}.json").exists() and (trained / f"{name}.csv").exists()
    out = tmp_path / "preds.csv"
    assert main(["predict", "--checkpoint", str(trained), "--in", str(trees["mc"]), "--out", str(out),
                 "--evaluate", "--workers", "1"]) == 0
    assert "wrote 12 predictions (montgomery)" in capsys.readouterr().out
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    # Same images, same model, same preprocessing as the trainer's own test predictions.
    with open(trained / "predictions_test.csv", newline="") as f:
        own = {r["image"]: r for r in csv.DictReader(f)}
    assert {r["image"] for r in rows} == set(own)
    for r in rows:
        assert r["p_Tuberculosis"] == own[r["image"]]["p_Tuberculosis"]
        assert r["pred_Tuberculosis"] == own[r["image"]]["pred_Tuberculosis"]
        assert r["true_Tuberculosis"] == own[r["image"]]["true_Tuberculosis"]
    # And equal to the restored network applied to independently decoded images.
    clf = load_classifier(trained)
    recs = load_tree(trees["mc"]).records
    x = np.stack([np.round(apply(load_image(r.image), clf.pre) * SCALE) / SCALE for r in recs])[:, None]
    p = probabilities(clf.task, forward_all(clf.model, torch.as_tensor(x, dtype=torch.float16), None, 8,
                                            torch.device("cpu")))
    by_image = {r["image"]: float(r["p_Tuberculosis"]) for r in rows}
    assert np.allclose([by_image[r.image] for r in recs], p, atol=1e-6)
    thr = clf.thresholds[0]
    assert all(int(r["pred_Tuberculosis"]) == (float(r["p_Tuberculosis"]) >= thr) for r in rows)


def test_predict_bad_input_is_one_line(trained, trees, tmp_path, capsys):
    out = tmp_path / "p.csv"
    assert main(["predict", "--checkpoint", str(trained), "--in", str(trees["mc"]), "--out", str(out),
                 "--task", "nih14"]) == 2
    assert "was trained for task 'tb'" in one_error_line(capsys)
    assert main(["predict", "--checkpoint", str(trained), "--in", str(trees["nih"]), "--out", str(out),
                 "--evaluate", "--workers", "1"]) == 2
    assert "cannot evaluate" in one_error_line(capsys)
    assert main(["predict", "--checkpoint", str(tmp_path / "nope"), "--in", str(trees["mc"]), "--out", str(out)]) == 2
    assert "no such checkpoint" in one_error_line(capsys)
    other = CheckpointManager(tmp_path / "gan").save(1, {"G_ab": torch.nn.Linear(2, 2)})
    assert main(["predict", "--checkpoint", str(other), "--in", str(trees["mc"]), "--out", str(out)]) == 2
    assert "not a classifier checkpoint (it holds G_ab)" in one_error_line(capsys)
    # An unlabelled (for this task) tree is still predicted, with a note.
    assert main(["predict", "--checkpoint", str(trained), "--in", str(trees["nih"]), "--out", str(out),
                 "--workers", "1"]) == 0
    assert "has none of the labels of task 'tb'" in capsys.readouterr().out
    with open(out, newline="") as f:
        header = next(csv.reader(f))
    assert "p_Tuberculosis" in header and "true_Tuberculosis" not in header


def test_resume_of_a_finished_run_only_re_evaluates(trained, capsys):
    assert main(["train-classifier", "--run-dir", str(trained), "--resume"]) == 0
    assert "trained after 2/2 epochs" in capsys.readouterr().out


def test_metadata_study_reads_the_csv_of_an_nih_folder(tmp_path, capsys):
    """`--model metadata_mlp data.train=<NIH folder>` trains on that folder's Data_Entry CSV."""
    import gzip
    import json

    from cxr.data.sources.nih import shipped_nih_metadata_path

    with gzip.open(shipped_nih_metadata_path(), "rt", encoding="utf-8") as f:
        lines = [next(f) for _ in range(601)]  # header + 600 rows
    nih = tmp_path / "nih"
    nih.mkdir()
    (nih / "Data_Entry_2017_v2020.csv").write_text("".join(lines), encoding="utf-8")
    run = tmp_path / "run"
    assert main(["train-classifier", "--task", "nih14", "--model", "metadata_mlp", "--run-dir", str(run),
                 f"data.train={nih}", "eval.n_boot=20"]) == 0
    result = json.loads((run / "test.json").read_text())
    assert 0.0 <= result["metrics"]["auroc"] <= 1.0
    assert str(nih / "Data_Entry_2017_v2020.csv") in (run / "config.yaml").read_text()
    assert main(["train-classifier", "--task", "nih14", "--model", "metadata_mlp", "--run-dir",
                 str(tmp_path / "run2"), f"data.train={tmp_path}"]) == 2
    assert "no Data_Entry_2017*.csv" in capsys.readouterr().err


@pytest.fixture(scope="module")
def made(trees, tmp_path_factory) -> dict[str, Path]:
    """The Montgomery-like tree harmonized (``cxr harmonize``) and translated (``cxr translate``
    with an untrained CycleGAN checkpoint: provenance needs no training)."""
    base = tmp_path_factory.mktemp("made")
    harmonize_tree(trees["mc"], base / "harmonized", trees["sz"])
    cfg = cyclegan_config(trees["mc"], trees["sz"], base / "cache")
    torch.manual_seed(0)
    g, d = build_networks(cfg)
    modules = {"G_ab": g.g_ab, "G_ba": g.g_ba, "D_a": d.d_a, "D_b": d.d_b}
    CheckpointManager(base / "gan").save(1, modules, model_args=checkpoint_args(g, d, cfg))
    translate_tree(trees["mc"], base / "translated", load_translator(base / "gan", "a2b"))
    return {"harmonized": base / "harmonized", "translated": base / "translated"}


def test_predict_writes_the_trees_own_origin(trained, trees, made, tmp_path, capsys):
    for origin, tree in [("real", trees["mc"]), *made.items()]:
        out = tmp_path / f"{origin}.csv"
        assert main(["predict", "--checkpoint", str(trained), "--in", str(tree), "--out", str(out)]) == 0
        assert capsys.readouterr().out.startswith(f"wrote 12 predictions (montgomery) to {out}; origin {origin}\n")
        with open(out, newline="") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 12 and {r["origin"] for r in rows} == {origin}


def test_a_run_tested_on_made_trees_reports_by_origin(trees, made, tmp_path):
    run = tmp_path / "run"
    assert main(["train-classifier", "--task", "tb", "--config", str(TINY), "--run-dir", str(run), *FAST,
                 f"data.train={trees['sz']}", f"data.test=[{trees['mc']},{made['harmonized']},{made['translated']}]",
                 f"data.cache_dir={tmp_path / 'cache'}", "train.epochs=1"]) == 0
    result = yaml.safe_load((run / "test.json").read_text())
    flat = json.dumps(result)
    assert '"origins": {"real": 12, "harmonized": 12, "translated": 12}' in flat
    by_origin = next(v for k, v in _walk(result) if k == "by_origin")
    assert sorted(by_origin) == ["harmonized", "real", "translated"]
    assert all(v["n"] == 12 and 0.0 <= v["auroc"] <= 1.0 for v in by_origin.values())
    with open(run / "predictions_test.csv", newline="") as f:
        assert sorted({r["origin"] for r in csv.DictReader(f)}) == ["harmonized", "real", "translated"]


def _walk(node):
    """Every (key, value) pair of a nested dict."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield k, v
            yield from _walk(v)


def test_predict_with_the_label_csv_given_by_path(trained, trees, tmp_path, capsys):
    outs = []
    for extra in ([str(trees["nih"])], [str(trees["nih"] / "images"), "--labels-csv", str(trees["nih"] / "Data_Entry_2017.csv")]):
        outs.append(tmp_path / f"p{len(outs)}.csv")
        assert main(["predict", "--checkpoint", str(trained), "--in", *extra, "--out", str(outs[-1])]) == 0
        assert "wrote 16 predictions (nih)" in capsys.readouterr().out
    rows = []
    for o in outs:
        with open(o, newline="") as f:
            rows.append({Path(r["image"]).name: r["p_Tuberculosis"] for r in csv.DictReader(f)})
    assert rows[0] == rows[1] and len(rows[0]) == 16
    assert main(["predict", "--checkpoint", str(trained), "--in", str(trees["nih"] / "images"), "--layout", "vindr",
                 "--labels-csv", str(trees["nih"] / "Data_Entry_2017.csv"), "--out", str(tmp_path / "x.csv")]) == 2
    assert "layout 'vindr' takes no label file from outside the tree (layouts that do: nih)" in one_error_line(capsys)
    assert not (tmp_path / "x.csv").exists()
