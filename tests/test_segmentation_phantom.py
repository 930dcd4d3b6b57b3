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
    assert set(saved["train"]) == set(sp.CHAINS) and saved["complete"] is True
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


def test_learned_rows_train_a_translator_or_take_a_run(phantom, tmp_path):
    """A FastCUT trained Montgomery-like -> Shenzhen-like on the training parts gives a row for the
    Shenzhen-like model only; the same run given back as ``learned_runs`` gives the same row."""
    res = sp.run(phantom, tmp_path / "a", size=32, epochs=1, width=4, depth=2, batch=4, methods=[],
                 train_learned=["fastcut"], gan_steps=2, gan_size=32, echo=lambda _s: None)
    trained = res["train"]["shenzhen"]["test"]["montgomery"]
    assert set(trained) == {"none", "fastcut"} and 0.0 <= trained["fastcut"]["dice"] <= 1.0
    assert trained["fastcut"]["n"] == trained["none"]["n"] > 0
    assert set(res["train"]["montgomery"]["test"]["shenzhen"]) == {"none"}
    src = tmp_path / "a" / "trees" / "montgomery" / "CXR_png"
    moved = tmp_path / "a" / "translated" / "montgomery_to_shenzhen_fastcut" / "CXR_png"
    names = sorted(p.name for p in src.glob("*.png"))
    assert names == sorted(p.name for p in moved.glob("*.png"))
    assert any((src / n).read_bytes() != (moved / n).read_bytes() for n in names)
    run_dir = tmp_path / "a" / "translators" / "montgomery_to_shenzhen_fastcut"
    again = sp.run(phantom, tmp_path / "b", size=32, epochs=1, width=4, depth=2, batch=4, methods=[],
                   learned_runs={"fastcut": run_dir}, echo=lambda _s: None)
    row = again["train"]["shenzhen"]["test"]["montgomery"]["fastcut"]
    assert row["dice"] == pytest.approx(trained["fastcut"]["dice"], abs=1e-6)
    assert len((tmp_path / "b" / "table.md").read_text().splitlines()) == 2 + 2 + 1 + 2


def test_learned_options_are_checked(phantom, tmp_path):
    with pytest.raises(DataError, match="not a learned harmonizer"):
        sp.run(phantom, tmp_path / "x", size=32, epochs=1, train_learned=["unet"], echo=lambda _s: None)
    with pytest.raises(DataError, match="choose one"):
        sp.run(phantom, tmp_path / "x", size=32, epochs=1, train_learned=["cut"], learned_runs={"cut": tmp_path},
               echo=lambda _s: None)
    for bad in (["--learned", "cyclegan"], ["--train-learned", "unet"], ["--learned-into", "vindr"]):
        with pytest.raises(SystemExit) as e:
            sp.main(["--out", str(tmp_path / "y"), "--phantom", str(phantom), *bad])
        assert e.value.code == 2
