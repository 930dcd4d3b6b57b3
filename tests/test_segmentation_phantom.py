"""The segmentation phantom experiment at toy size: the chain trees carry the truth lungs under
the same names, a run scores both chains (and each harmonizer across), and the demo's cheap
function returns one Dice per chain."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from cxr.cli.main import main
from cxr.data.layouts import load_tree
from cxr.data.masks import TRUTH_DIR, load_lung_mask, read_label_mask
from cxr.errors import DataError
from experiments import segmentation_phantom as sp


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("segphantom") / "phantom"
    assert main(["phantom", "--preset", "nlm", "--out", str(out), "--size", "48", "--n", "30",
                 "--workers", "0", "--seed", "5"]) == 0
    return out


def test_chain_trees_hold_the_same_subjects_and_truth(phantom, tmp_path):
    trees = sp.write_chain_trees(phantom, tmp_path / "trees")
    rows = sp.truth_rows(phantom)
    recs = {c: load_tree(t).records for c, t in trees.items()}
    assert [len(v) for v in recs.values()] == [len(rows)] * 2
    assert [Path(r.image).name for r in recs["shenzhen"]] == [Path(r.image).name for r in recs["montgomery"]]
    i = 3
    truth = read_label_mask(str(phantom / rows[i]["lung_mask"]))
    for c in sp.CHAINS:
        r = next(r for r in recs[c] if Path(r.image).name.startswith(f"MCUCXR_{i + 1:04d}_"))
        np.testing.assert_array_equal(load_lung_mask(r), truth)
        assert (phantom / rows[i][f"render_{c}"]).read_bytes() == Path(r.image).read_bytes()
    with pytest.raises(DataError, match="an nlm phantom"):
        sp.truth_rows(tmp_path)
    assert (phantom / TRUTH_DIR).is_dir()


def test_run_scores_both_chains_and_each_harmonizer(phantom, tmp_path):
    res = sp.run(phantom, tmp_path / "out", size=32, epochs=1, width=4, depth=2, batch=4,
                 methods=["histogram", "clahe"], echo=lambda _s: None)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(saved["train"]) == set(sp.CHAINS)
    for train_chain, entry in saved["train"].items():
        other = next(c for c in sp.CHAINS if c != train_chain)
        assert set(entry["test"][train_chain]) == {"none"}
        assert set(entry["test"][other]) == {"none", "histogram", "clahe"}
        for s in entry["test"][other].values():
            assert 0.0 <= s["dice"] <= 1.0 and s["n"] == entry["test"][train_chain]["none"]["n"] > 0
    table = (tmp_path / "out" / "table.md").read_text().splitlines()
    assert len(table) == 2 + 2 * (1 + 3)
    assert res["train"]["shenzhen"]["epochs_done"] == 1


def test_chain_dice_gives_one_dice_per_chain(phantom, tmp_path):
    d = sp.chain_dice(phantom, tmp_path / "work", train_chain="montgomery", size=32, epochs=1, depth=2, width=4,
                      batch=4)
    assert set(d) == set(sp.CHAINS) and all(0.0 <= v <= 1.0 and not math.isnan(v) for v in d.values())
    with pytest.raises(DataError, match="not a chain"):
        sp.chain_dice(phantom, tmp_path / "w2", train_chain="vindr")
