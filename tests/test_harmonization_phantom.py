"""experiments.harmonization_phantom: translator seeds are trained, scored one by one and averaged."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from cxr.metrics.cross_domain import ConditionResult
from cxr.phantom.generate import PhantomConfig, generate
from experiments import harmonization_phantom as hp


def _result(name: str, auroc: float, reps: list[float]) -> ConditionResult:
    return ConditionResult(name, 10, 10, auroc, min(reps), max(reps), (auroc,), np.array(reps))


def test_study_row_averages_trees_and_pairs_the_gain_with_as_is():
    as_is = _result("as is", 0.5, [0.4, 0.5, 0.6, 0.5])
    in_domain = _result("in", 0.9, [0.9] * 4)
    trees = [_result("s0", 0.7, [0.6, 0.7, 0.8, 0.7]), _result("s1", 0.8, [0.7, 0.8, 0.9, 0.8])]
    row = hp.study_row(in_domain, as_is, trees)
    assert row["auroc"] == pytest.approx(0.75)
    assert row["auroc_sd"] == pytest.approx(np.std([0.7, 0.8], ddof=1))
    assert row["gain"] == pytest.approx(0.25)
    assert row["recovered"] == pytest.approx(0.25 / 0.4)
    # every replicate's gain is exactly 0.25: the paired interval collapses, an unpaired one would not
    assert (row["gain_lo"], row["gain_hi"]) == pytest.approx((0.25, 0.25))
    assert 0.65 <= row["ci_low"] < 0.7 and 0.8 < row["ci_high"] <= 0.85  # the mean replicates 0.65..0.85


def test_mean_sd_ignores_missing_values():
    assert hp.mean_sd([1.0, None, 3.0, math.nan]) == pytest.approx((2.0, math.sqrt(2)))
    m, sd = hp.mean_sd([0.4])
    assert m == 0.4 and math.isnan(sd)
    assert all(math.isnan(v) for v in hp.mean_sd([None]))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hp")
    generate(PhantomConfig(preset="nlm", out=root / "phantom", size=48, n=48, seed=3, workers=1))
    out = root / "out"
    assert hp.main(["--out", str(out), "--phantom", str(root / "phantom"), "--size", "48", "--seeds", "1",
                    "--gan-seeds", "2", "--gan-steps", "2", "--clf-epochs", "1", "--learned", "fastcut",
                    "--no-prevalence", "--n-boot", "20"]) == 0
    return out


def test_each_translator_seed_is_a_tree_and_the_row_is_their_mean(run):
    res = json.loads((run / "results.json").read_text())
    assert {"fastcut-s0", "fastcut-s1"} <= set(res["rows"]) and "fastcut" not in res["rows"]
    for k in ("fastcut-s0", "fastcut-s1"):
        assert (run / "harmonized" / k / hp.SOURCE_IMAGES).is_dir() and (run / "runs" / k).is_dir()
    ssim = [res["rows"][k]["paired"]["ssim"] for k in ("fastcut-s0", "fastcut-s1")]
    assert ssim[0] != ssim[1]  # two seeds, two different translators
    mean, sd = res["summaries"]["fastcut"]["ssim"]
    assert mean == pytest.approx(np.mean(ssim)) and sd == pytest.approx(np.std(ssim, ddof=1))
    study = res["study"]["rows"]
    assert study["fastcut"]["per_tree"] == pytest.approx([study["fastcut-s0"]["auroc"], study["fastcut-s1"]["auroc"]])
    table = (run / "table.md").read_text()
    assert "| fastcut (2 seeds) |" in table and "| fastcut-s1 |" in table and "fastcut: " in table


def test_reuse_keeps_a_finished_tree_and_bad_seed_counts_are_refused(run, tmp_path):
    tree = run / "harmonized" / "fastcut-s0"
    before = sorted(p.stat().st_mtime_ns for p in tree.rglob("*.png"))
    assert math.isnan(hp.train_translator(run.parent / "phantom", run.parent / "phantom" / hp.TARGET,
                                          tmp_path / "never", tree, 0, 2, "fastcut", reuse=True))
    assert sorted(p.stat().st_mtime_ns for p in tree.rglob("*.png")) == before and not (tmp_path / "never").exists()
    with pytest.raises(SystemExit):
        hp.main(["--out", str(tmp_path / "x"), "--gan-seeds", "0"])
    assert not (tmp_path / "x").exists()
