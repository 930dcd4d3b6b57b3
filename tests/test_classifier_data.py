"""Which images a classifier trains, validates and is tested on: splits, origins, mixing, labels."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from classifier_helpers import montgomery_tree, nih_tree, shenzhen_tree, tiny_config
from classifiers.data import assemble, load_images, mix, origin_counts, tag_origin
from cxr.data.layouts import load_tree
from cxr.data.record import Sample
from cxr.data.splits import split_records
from cxr.data.tasks import get_task
from cxr.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("trees")
    return {"sz": shenzhen_tree(root / "a", n=40), "mc": montgomery_tree(root / "b", n=12),
            "syn": shenzhen_tree(root / "syn", n=10, seed=7), "nih": nih_tree(root / "nih", n=16)}


def test_a_single_path_becomes_a_one_item_list(trees, tmp_path):
    cfg = tiny_config("tb", trees["sz"], tmp_path, f"data.test={trees['mc']}")
    assert cfg.data.train == (str(trees["sz"]),) and cfg.data.test == (str(trees["mc"]),)
    cfg = tiny_config("tb", [trees["sz"], trees["mc"]], tmp_path)
    assert cfg.data.train == (str(trees["sz"]), str(trees["mc"]))


def test_validation_is_carved_by_patient_and_test_defaults_to_the_heldout_split(trees, tmp_path):
    cfg = tiny_config("tb", trees["sz"], tmp_path)
    a = assemble(cfg.data, get_task("tb"))
    # Exactly the CycleGAN trainer's split of the same tree (same fractions, same seed).
    parts = split_records(load_tree(trees["sz"]).records, (0.7, 0.1, 0.2), seed=0)
    assert [r.image for r in a.train] == [r.image for r in parts["train"]]
    assert [r.image for r in a.val] == [r.image for r in parts["val"]]
    assert [r.image for r in a.test] == [r.image for r in parts["test"]] == [r.image for r in a.heldout]
    assert a.test_is_heldout and set(a.sets()) == {"val", "test"}
    pats = [{r.patient_id for r in s} for s in (a.train, a.val, a.test)]
    assert not (pats[0] & pats[1]) and not (pats[0] & pats[2]) and not (pats[1] & pats[2])
    assert sum(r.labels[0] for r in a.val) == len(a.val) / 2  # stratified: half TB
    assert len(a.train) + len(a.val) + len(a.test) == 40


def test_explicit_val_and_test_trees(trees, tmp_path):
    cfg = tiny_config("tb", trees["sz"], tmp_path, f"data.val={trees['mc']}", f"data.test={trees['mc']}")
    a = assemble(cfg.data, get_task("tb"))
    assert len(a.val) == len(a.test) == 12
    assert len(a.train) == 40 - len(a.heldout)  # train + val parts of the training tree
    assert set(a.sets()) == {"val", "test", "heldout"}
    assert all(r.extra["tree"] == str(trees["mc"]) for r in a.test)


@pytest.mark.parametrize("ratio", [0.5, 2.0])
def test_mixing_ratio_gives_the_requested_counts(trees, tmp_path, ratio):
    cfg = tiny_config("tb", trees["sz"], tmp_path, f"data.synthetic={trees['syn']}", f"data.synthetic_ratio={ratio}")
    a = assemble(cfg.data, get_task("tb"), seed=3)
    counts = origin_counts(a.train)
    assert counts["synthetic"] == round(ratio * counts["real"])
    syn = [r.image for r in a.train if r.source == "synthetic"]
    # 10 synthetic images: drawn without replacement while they suffice, with it beyond.
    assert len(set(syn)) == (len(syn) if len(syn) <= 10 else len(set(syn)))
    assert len(set(syn)) <= 10 and all(str(trees["syn"]) in s for s in syn)
    assert all(r.source == "real" for r in a.val + a.test)  # synthetic data only ever trains
    info = next(t for t in a.trees if t.role == "synthetic")
    assert info.used["train"] == counts["synthetic"]


def test_duplicate_ratio_adds_copies_of_real_training_images_only(trees, tmp_path):
    plain = assemble(tiny_config("tb", trees["sz"], tmp_path).data, get_task("tb"), seed=3)
    a = assemble(tiny_config("tb", trees["sz"], tmp_path, "data.duplicate_ratio=0.5").data, get_task("tb"), seed=3)
    n = len(plain.train)
    assert len(a.train) == n + round(0.5 * n) and [r.image for r in a.train[:n]] == [r.image for r in plain.train]
    extra = [r.image for r in a.train[n:]]
    assert len(set(extra)) == len(extra) and set(extra) <= {r.image for r in plain.train}  # no image twice
    assert [r.image for r in a.val + a.test] == [r.image for r in plain.val + plain.test]
    with pytest.raises(ConfigError, match="data.duplicate_ratio must be >= 0"):
        tiny_config("tb", trees["sz"], tmp_path, "data.duplicate_ratio=-1")


def test_mix_is_seeded_and_pure():
    real, syn = list(range(10)), [f"s{i}" for i in range(6)]
    assert mix(real, syn, 0.4, seed=1) == mix(real, syn, 0.4, seed=1)
    assert mix(real, syn, 0.0, seed=1) == real
    out = mix(real, syn, 1.5, seed=2)
    assert len(out) == 25 and out[:10] == real and set(out[10:]) <= set(syn)
    with pytest.raises(DataError, match="hold none"):
        mix(real, [], 0.5, seed=0)


def test_harmonized_trees_contribute_only_their_training_part(trees, tmp_path):
    # A translated copy (same names and patients, other pixels) goes through the same split,
    # so the translation of a held-out test image never trains.
    copy = trees["sz"].parent.parent / "harm" / "ChinaSet_AllFiles"
    if not copy.exists():
        shenzhen_tree(copy.parent, n=40, seed=9)
    cfg = tiny_config("tb", trees["sz"], tmp_path, f"data.harmonized={copy}")
    a = assemble(cfg.data, get_task("tb"))
    harm = [r for r in a.train if r.source == "harmonized"]
    real = [r for r in a.train if r.source == "real"]
    assert sorted(r.patient_id for r in harm) == sorted(r.patient_id for r in real)
    assert not {r.patient_id for r in harm} & {r.patient_id for r in a.test}
    assert len(harm) == len(real) and all(str(copy) == r.extra["tree"] for r in harm)


def test_an_evaluation_set_sharing_training_images_is_refused(trees, tmp_path):
    cfg = tiny_config("tb", trees["sz"], tmp_path, f"data.test={trees['sz']}")
    with pytest.raises(DataError, match="data.test: .* also training images"):
        assemble(cfg.data, get_task("tb"))


def test_origin_tag_keeps_the_trees_own_source():
    rec = Sample(image="a.png", patient_id="p", site="s", labels=[1.0], label_names=("Tuberculosis",),
                 source="shenzhen")
    tagged = tag_origin([rec], "synthetic", "/x/tree")[0]
    assert (tagged.source, tagged.extra["tree"], tagged.extra["dataset"]) == ("synthetic", "/x/tree", "shenzhen")
    assert rec.source == "shenzhen" and rec.extra == {}  # the loader's record is not modified
    with pytest.raises(ValueError):
        tag_origin([rec], "fake", "/x")


def test_a_tree_without_the_tasks_labels_is_refused_by_name(trees, tmp_path):
    cfg = tiny_config("nih14", trees["sz"], tmp_path)
    with pytest.raises(DataError) as e:
        assemble(cfg.data, get_task("nih14"))
    assert f"data.train={trees['sz']}" in str(e.value) and "has none of the labels of task 'nih14'" in str(e.value)


def test_missing_tree_and_bad_fractions(trees, tmp_path):
    cfg = tiny_config("tb", trees["sz"], tmp_path, f"data.test={tmp_path / 'nope'}")
    with pytest.raises(DataError, match="no such folder"):
        assemble(cfg.data, get_task("tb"))
    with pytest.raises(ConfigError, match="synthetic_ratio > 0 needs data.synthetic"):
        tiny_config("tb", trees["sz"], tmp_path, "data.synthetic_ratio=1")


def test_images_are_stacked_in_record_order(trees, tmp_path):
    cfg = tiny_config("tb", trees["sz"], tmp_path / "cache")
    a = assemble(cfg.data, get_task("tb"))
    sets, skipped = load_images(a, cfg.data, tmp_path / "cache", torch.device("cpu"))
    assert not skipped
    assert sets["train"].images.shape == (len(a.train), 1, 32, 32) and sets["train"].images.dtype == torch.float16
    # TB images carry a bright upper-left blob: the stacked tensor follows the labels.
    blob = sets["train"].images[:, 0, 6:14, 6:14].float().mean((1, 2)).numpy()
    y = sets["train"].targets
    assert blob[y == 1].mean() > blob[y == 0].mean() + 0.1
    assert np.array_equal(sets["val"].labels[:, 0], [r.labels[0] for r in a.val])


def _made(tree: Path, dest: Path, manifest: str) -> Path:
    """A copy of ``tree`` carrying the manifest ``manifest`` (pixels as they are: only the
    manifest decides the origin)."""
    if not dest.exists():
        shutil.copytree(tree, dest)
        (dest / manifest).write_text(json.dumps({"source": str(tree), "created": "2026-01-01T00:00:00+00:00"}))
    return dest


def test_a_trees_manifest_names_its_origin_under_every_key(trees, tmp_path):
    base = trees["sz"].parent.parent
    harm = _made(trees["sz"], base / "made" / "harm" / "ChinaSet_AllFiles", "cxr_harmonization.json")
    trans = _made(trees["mc"], base / "made" / "trans" / "MontgomerySet", "cxr_translation.json")
    gen = _made(trees["syn"], base / "made" / "gen" / "ChinaSet_AllFiles", "cxr_generation.json")
    plain = _made(trees["syn"], base / "made" / "plain" / "ChinaSet_AllFiles", "unrelated.json")
    # A translated tree tests as translated, beside a real one.
    cfg = tiny_config("tb", trees["sz"], tmp_path, f"data.test=[{trees['mc']},{trans}]")
    a = assemble(cfg.data, get_task("tb"))
    assert origin_counts(a.test) == {"real": 12, "translated": 12}
    assert {t.path: t.origin for t in a.trees if t.role == "test"} == {str(trees["mc"]): "real", str(trans): "translated"}
    # A harmonized tree under data.train trains as harmonized; data.synthetic with a generation
    # manifest or none is synthetic; data.harmonized without a manifest stays harmonized.
    cfg = tiny_config("tb", harm, tmp_path, f"data.synthetic=[{gen},{plain}]", "data.synthetic_ratio=0.5",
                      f"data.harmonized={trees['syn']}")
    a = assemble(cfg.data, get_task("tb"))
    used = {t.path: t.used["train"] for t in a.trees}
    assert origin_counts(a.train) == {"synthetic": round(0.5 * used[str(harm)]),
                                      "harmonized": used[str(harm)] + used[str(trees["syn"])]}
    assert origin_counts(a.val) == {"harmonized": len(a.val)}
    assert {t.role: t.origin for t in a.trees if t.role != "synthetic"} == {"train": "harmonized",
                                                                             "harmonized": "harmonized"}
    assert {t.origin for t in a.trees if t.role == "synthetic"} == {"synthetic"}


def test_labels_csv_reads_an_nih_tree_whose_csv_is_kept_elsewhere(trees, tmp_path):
    images = tmp_path / "nih-images"
    shutil.copytree(trees["nih"] / "images", images)
    labels = tmp_path / "downloads" / "entries.csv"
    labels.parent.mkdir()
    shutil.copy(trees["nih"] / "Data_Entry_2017.csv", labels)
    a = assemble(tiny_config("nih14", images, tmp_path, f"data.labels_csv={labels}").data, get_task("nih14"))
    b = assemble(tiny_config("nih14", trees["nih"], tmp_path).data, get_task("nih14"))
    assert a.trees[0].layout == "nih" and len(a.train) + len(a.val) + len(a.test) == 16
    for x, y in zip(a.train + a.val + a.test, b.train + b.val + b.test):  # the same records, split alike
        assert Path(x.image).name == Path(y.image).name and x.patient_id == y.patient_id
        np.testing.assert_array_equal(x.labels, y.labels)
    with pytest.raises(DataError, match=r"^data.labels_csv=.*nope.csv: no such file \(given as the NIH label CSV\)$"):
        assemble(tiny_config("nih14", images, tmp_path, f"data.labels_csv={tmp_path / 'nope.csv'}").data,
                 get_task("nih14"))
