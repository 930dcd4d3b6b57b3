"""``data.prematch: histogram``: domain A histogram-matched to domain B's training images before
training (written into the run folder), and the same match applied by ``cxr translate``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cxr.cli.main import main
from cxr.data.image import load_image
from cxr.data.layouts import load_tree
from cxr.data.splits import split_records
from cxr.engine.checkpoint import latest, read_model_args
from cxr.engine.config import load_config
from cxr.errors import ConfigError
from cyclegan_helpers import nlm_site, tiny_config
from gan.cyclegan import prematch
from gan.cyclegan.config import CycleGANConfig
from gan.cyclegan.trainer import train
from gan.cyclegan.translate import MANIFEST, load_translator, translate_images, translate_tree
from harmonize.histogram import fit_reference, match_histogram
from harmonize.trees import MANIFEST as MATCH_MANIFEST


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("prematch")
    a, b = nlm_site(root / "data", "montgomery", 12), nlm_site(root / "data", "shenzhen", 12)
    cfg = tiny_config(a, b, root / "cache", "data.prematch=histogram", "data.prematch_field=0.8", "train.steps=2",
                      "train.ema=0.5")
    result = train(cfg, root / "run")
    return cfg, result.run_dir, a, b


def test_config_keys_and_checks():
    assert CycleGANConfig().data.prematch is None and CycleGANConfig().data.prematch_field == 1.0
    cfg = load_config(CycleGANConfig, None, ["data.prematch=histogram", "data.prematch_field=0.85"])
    assert (cfg.data.prematch, cfg.data.prematch_field) == ("histogram", 0.85)
    with pytest.raises(ConfigError, match="data.prematch"):
        load_config(CycleGANConfig, None, ["data.prematch=clahe"])
    with pytest.raises(ConfigError, match=r"data.prematch_field must be in \(0, 1\]"):
        load_config(CycleGANConfig, None, ["data.prematch=histogram", "data.prematch_field=0"])
    with pytest.raises(ConfigError, match="data.prematch_field needs data.prematch"):
        load_config(CycleGANConfig, None, ["data.prematch_field=0.5"])


def test_domain_a_is_matched_to_b_training_split_into_the_run_folder(trained):
    cfg, run, a, b = trained
    matched = run / "prematched" / "MontgomerySet"
    assert prematch.prematched_tree(cfg, run) == matched
    names = sorted(p.name for p in (matched / "CXR_png").iterdir())
    assert names == sorted(p.name for p in (a / "CXR_png").iterdir())
    assert len(load_tree(matched).records) == len(load_tree(a).records)  # same layout, labels, masks
    # The reference is fitted on domain B's training split only, over the central field.
    train_b = split_records(load_tree(b).records, seed=0)["train"]
    expected = fit_reference((load_image(r.image) for r in train_b), field=0.8)
    manifest = json.loads((matched / MATCH_MANIFEST).read_text())
    assert manifest["reference_images"] == len(train_b) < len(load_tree(b).records)
    assert np.array_equal(np.asarray(manifest["quantiles"]), expected.quantiles) and manifest["field"] == 0.8
    every_b = fit_reference((load_image(r.image) for r in load_tree(b).records), field=0.8)
    assert not np.array_equal(every_b.quantiles, expected.quantiles)  # the held-out images would change it
    # Each matched image is the source matched to that reference (as the file format stores it).
    name = names[0]
    src, out = load_image(a / "CXR_png" / name), load_image(matched / "CXR_png" / name)
    assert not np.array_equal(src, out)
    assert np.abs(out - match_histogram(src, expected)).max() <= 0.5 / 255 + 1e-6
    assert not list(matched.parent.glob(".*tmp*"))  # written atomically: no temporary folder left


def test_images_seen_lists_the_matched_images(trained):
    _, run, a, b = trained
    lines = [line.split("\t") for line in (run / "images_seen.txt").read_text().splitlines()]
    seen_a = [img for dom, img in lines if dom == "a"]
    seen_b = [img for dom, img in lines if dom == "b"]
    matched = run / "prematched" / "MontgomerySet"
    train_a = split_records(load_tree(matched).records, seed=0)["train"]
    assert sorted(seen_a) == sorted(r.image for r in train_a)
    assert all(Path(img).is_relative_to(matched) for img in seen_a)
    assert seen_b and all(Path(img).is_relative_to(b) for img in seen_b)


def test_matched_tree_is_reused_on_resume_and_rebuilt_for_other_settings(trained, tmp_path):
    cfg, run, a, b = trained
    manifest = run / "prematched" / "MontgomerySet" / MATCH_MANIFEST
    created = json.loads(manifest.read_text())["created"]
    assert prematch.domain_a(cfg, run) == str(manifest.parent)  # same settings: kept as is
    assert json.loads(manifest.read_text())["created"] == created
    # The other DDP processes only name the tree the main process wrote.
    assert prematch.domain_a(cfg, tmp_path, build=False) == str(tmp_path / "prematched" / "MontgomerySet")
    assert not (tmp_path / "prematched").exists()
    other = tiny_config(a, b, tmp_path / "cache", "data.prematch=histogram")
    prematch.domain_a(other, tmp_path)
    assert json.loads((tmp_path / "prematched" / "MontgomerySet" / MATCH_MANIFEST).read_text())["field"] == 1.0
    assert prematch.domain_a(tiny_config(a, b, tmp_path / "cache"), tmp_path) == str(a)  # no prematch: data.a


def test_generators_reading_a_record_the_match(trained):
    _, run, _, _ = trained
    ckpt = latest(run)
    for name in ("G_ab", "G_ab_ema"):
        recorded = read_model_args(ckpt, name)["input"]["prematch"]
        assert recorded["method"] == "histogram" and recorded["field"] == 0.8 and len(recorded["quantiles"]) > 2
    for name in ("G_ba", "G_ba_ema", "D_a", "D_b"):
        assert "prematch" not in read_model_args(ckpt, name)["input"]
    assert load_translator(run, "b2a").prematch is None


def test_translate_applies_the_runs_match_first(trained, tmp_path, capsys):
    _, run, a, b = trained
    out = tmp_path / "a2b"
    assert main(["translate", "--checkpoint", str(run), "--direction", "a2b", "--in", str(a), "--out", str(out),
                 "--weights", "raw"]) == 0
    n_ref = len(split_records(load_tree(b).records, seed=0)["train"])
    assert json.loads((out / MANIFEST).read_text())["prematch"] == {"method": "histogram", "field": 0.8,
                                                                    "reference_images": n_ref}
    # Exactly what translating the run's matched tree with the plain generator gives.
    t = load_translator(run, "a2b", weights="raw")
    plain = load_translator(run, "a2b", weights="raw")
    plain.prematch = None
    translate_tree(run / "prematched" / "MontgomerySet", tmp_path / "matched_a2b", plain)
    for p in sorted((out / "CXR_png").iterdir()):
        assert np.array_equal(load_image(p), load_image(tmp_path / "matched_a2b" / "CXR_png" / p.name)), p.name
    # In memory, Translator.images matches in float first.
    src = load_image(a / "CXR_png" / p.name)
    expected = translate_images(t.generator, [match_histogram(src, t.prematch)], t.size, t.fit)[0]
    assert np.array_equal(t.images([src])[0], expected)
    assert not np.array_equal(expected, translate_images(t.generator, [src], t.size, t.fit)[0])
