"""Patient-metadata features, the metadata MLP, and the NIH metadata study on real rows."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from classifiers.config import EvalConfig
from classifiers.metadata import META_FEATURES, MetaStats, metadata_from_columns, metadata_matrix
from classifiers.metadata_study import batch_size_for, official_splits, run_metadata_study, study_config
from classifiers.models import rebuild
from cxr.data.record import NIH14, Sample
from cxr.data.sources.nih import shipped_nih_metadata_path
from cxr.engine.checkpoint import load_module, read_model_args
from cxr.errors import ConfigError, DataError
from cxr.metrics.classification import BINARY_KEYS, COUNT_KEYS


def _sample(i: int, age, sex="M", view="PA", follow_up=0) -> Sample:
    return Sample(image=f"{i:03d}.png", patient_id=f"p{i}", site="nih",
                  labels=np.zeros(len(NIH14)), label_names=NIH14, age=age, sex=sex, view=view,
                  follow_up=follow_up)


def test_missing_ages_imputed_with_train_median_and_counted():
    train = [_sample(0, 20.0), _sample(1, 40.0), _sample(2, None), _sample(3, math.nan),
             _sample(4, 60.0), _sample(5, 412.0)]  # 412 years: a known NIH 2017 data-entry error
    x_train, stats = metadata_matrix(train)
    assert stats.n_imputed_age == 3 and stats.n_rows == 6
    assert stats.age_median == 40.0 and stats.age_mean == pytest.approx(40.0)
    std = np.std([20.0, 40.0, 60.0])
    assert stats.age_std == pytest.approx(std)
    # imputed rows get the median, standardised with the train mean/std: (40 - 40) / std = 0
    assert x_train[[2, 3, 5], 0] == pytest.approx([0.0, 0.0, 0.0])
    assert x_train[0, 0] == pytest.approx((20 - 40) / std)

    test = [_sample(10, 80.0), _sample(11, None)]
    x_test, test_stats = metadata_matrix(test, stats)
    assert test_stats.n_imputed_age == 1 and test_stats.n_rows == 2
    assert test_stats.age_mean == stats.age_mean and test_stats.age_median == stats.age_median
    assert x_test[0, 0] == pytest.approx((80 - 40) / std)  # train statistics, not the test's
    assert x_test[1, 0] == pytest.approx(0.0)


def test_one_hot_sex_view_and_follow_up():
    x, stats = metadata_from_columns([30, 30, 30, 30], ["M", "F", None, "O"], ["PA", "AP", "LL", None],
                                     [0, 3, None, 183])
    cols = {name: x[:, j] for j, name in enumerate(META_FEATURES)}
    assert cols["sex_M"].tolist() == [1, 0, 0, 0] and cols["sex_F"].tolist() == [0, 1, 0, 0]
    assert cols["sex_unknown"].tolist() == [0, 0, 1, 1]
    assert cols["view_PA"].tolist() == [1, 0, 0, 0] and cols["view_AP"].tolist() == [0, 1, 0, 0]
    assert cols["view_other"].tolist() == [0, 0, 1, 1]
    assert stats.n_imputed_follow_up == 1
    logs = np.log1p([0, 3, 183])
    assert stats.follow_up_mean == pytest.approx(logs.mean())
    assert cols["follow_up"][3] == pytest.approx((np.log1p(183) - logs.mean()) / logs.std())
    assert x.dtype == np.float32 and x.shape == (4, len(META_FEATURES))


def test_meta_stats_json_round_trip():
    _, stats = metadata_matrix([_sample(0, 20.0), _sample(1, None)])
    again = MetaStats.from_dict(json.loads(json.dumps(stats.to_dict())))
    assert again == stats
    with pytest.raises(ConfigError, match="unknown key 'age_mode'"):
        MetaStats.from_dict({**stats.to_dict(), "age_mode": 1})


def test_official_split_lists(tmp_path):
    (tmp_path / "train_val_list.txt").write_text("a.png\nb.png\n")
    (tmp_path / "test_list.txt").write_text("c.png\n\n")
    assert official_splits(tmp_path) == {"a.png": "train", "b.png": "train", "c.png": "test"}
    (tmp_path / "test_list.txt").write_text("c.png\nb.png\n")
    with pytest.raises(DataError, match=r"test_list.txt:2: image 'b.png' is in both split lists"):
        official_splits(tmp_path)


def test_study_config_is_the_protocol():
    cfg = study_config()
    assert (cfg.task, cfg.model.name, cfg.device, cfg.optim.schedule) == ("nih14", "metadata_mlp", "cpu", "constant")
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.train.epochs, cfg.train.patience) == (2e-3, 1e-5, 40, 5)
    assert (cfg.eval.n_boot, cfg.eval.ci_metrics, cfg.model.options) == (1000, ("auroc",), {"hidden": [64, 64],
                                                                                           "dropout": 0.1})
    # about 50 steps an epoch within 64..1024; a set smaller than a batch is one batch
    assert [batch_size_for(n) for n in (7, 100, 3200, 5000, 78484)] == [7, 64, 64, 100, 1024]
    assert set(EvalConfig.CI_METRICS) == (set(BINARY_KEYS) - COUNT_KEYS) | {"cross_entropy", "balanced_accuracy"}
    with pytest.raises(ConfigError, match="eval.ci_metrics: unknown metric 'aucroc'"):
        study_config(["eval.ci_metrics=[aucroc]"])
    with pytest.raises(ConfigError, match="task must be nih14"):
        run_metadata_study("unused", study_config(["task=tb"]))


def _quiet(msg: str) -> None:
    pass


def _check_results(run_dir, result):
    doc = json.loads((run_dir / "test.json").read_text())
    keys = {"auroc", *(f"auroc/{n}" for n in NIH14)}
    assert keys <= set(doc["metrics"]) and keys <= set(doc["ci_low"])
    csv = pd.read_csv(run_dir / "test.csv")
    assert keys <= set(csv["metric"])
    macro = doc["metrics"]["auroc"]
    assert 0.0 < macro < 1.0  # (a few epochs on 3,000 rows: the signal is the full study's job)
    assert doc["ci_low"]["auroc"] < macro < doc["ci_high"]["auroc"]
    per_label = [doc["metrics"][f"auroc/{n}"] for n in NIH14]
    assert macro == pytest.approx(np.nanmean(per_label))
    assert result["auroc"] == pytest.approx(macro)
    assert (run_dir / "config.yaml").is_file() and (run_dir / "run.json").is_file()
    return doc


def test_metadata_study_on_shipped_rows(tmp_path):
    run = tmp_path / "run"
    cfg = study_config(["seed=0", "train.epochs=3", "eval.n_boot=20", "train.batch_size=256"])
    result = run_metadata_study(run, cfg, max_rows=3000, auto_batch=False, echo=_quiet)
    doc = _check_results(run, result)
    # the study's protocol on the trainer: a constant learning rate, intervals for AUROC alone
    rates = {row["lr"] for row in map(json.loads, (run / "stats.jsonl").read_text().splitlines()) if "lr" in row}
    assert rates == {cfg.optim.lr} == {0.002}
    assert set(doc["ci_low"]) == {"auroc", *(f"auroc/{n}" for n in NIH14)}
    assert doc["official_split"] is False
    assert doc["metadata_csv"] == str(shipped_nih_metadata_path())
    assert sum(c["images"] for c in doc["counts"].values()) == 3000
    # the checkpoint rebuilds in a fresh process: model_args carry the fitted feature statistics
    args = read_model_args(run, "classifier")["model"]  # the classifier trainer's checkpoint
    assert args["name"] == "metadata_mlp" and args["meta_stats"]["n_rows"] == doc["counts"]["train"]["images"]
    model = rebuild(args)
    load_module(run, "classifier", model)
    assert model.meta_stats == MetaStats.from_dict(doc["meta_stats"])
    assert model(torch.zeros(2, len(META_FEATURES))).shape == (2, len(NIH14))


def test_metadata_study_user_csv_with_official_lists(tmp_path):
    data = tmp_path / "nih"
    data.mkdir()
    frame = pd.read_csv(shipped_nih_metadata_path(), nrows=2000, dtype=str)
    frame.loc[frame.index[:5], "Patient Age"] = ""  # missing ages: imputed, counted
    frame.to_csv(data / "Data_Entry_2017_v2020.csv", index=False)
    patients = frame["Patient ID"].astype(int)
    test_mask = patients % 5 == 0  # whole patients in the official test list
    (data / "test_list.txt").write_text("\n".join(frame["Image Index"][test_mask]) + "\n")
    (data / "train_val_list.txt").write_text("\n".join(frame["Image Index"][~test_mask]) + "\n")
    run = tmp_path / "run"
    cfg = study_config(["train.epochs=2", "eval.n_boot=10", "train.batch_size=256"])
    result = run_metadata_study(run, cfg, metadata_csv=data / "Data_Entry_2017_v2020.csv", auto_batch=False,
                                echo=_quiet)
    doc = json.loads((run / "test.json").read_text())
    assert doc["official_split"] is True
    assert doc["counts"]["test"]["images"] == int(test_mask.sum())
    assert sum(doc["imputed_age"].values()) == 5
    assert "auroc/Effusion" in result and "auroc" in result["intervals"]
