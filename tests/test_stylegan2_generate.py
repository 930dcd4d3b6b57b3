"""`cxr generate`: synthetic trees that the loaders read back, deterministic bytes, the manifest,
and one-line refusals of bad input (nothing written)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import gan.stylegan2.generate as generate_module
from cxr.cli.main import main
from cxr.data.layouts import load_tree
from cxr.data.provenance import tree_origin
from cxr.data.record import NIH14
from cxr.engine.checkpoint import CheckpointManager
from cxr.phantom.writers import write_bytes
from gan.stylegan2.config import DiscriminatorConfig, GeneratorConfig
from gan.stylegan2.generate import LABELS_CSV, MANIFEST, image_seed, read_labels_csv
from gan.stylegan2.networks import Discriminator, Generator, model_args

TB_LABELS = ["normal", "Tuberculosis"]


def make_run(root: Path, label_names: list[str], family: str = "stylegan2", ema: bool = True,
             label_kind: str | None = "single") -> Path:
    """A StyleGAN2 run folder holding one checkpoint of a random tiny generator (no training)."""
    torch.manual_seed(0)
    c_dim = len(label_names)
    g = Generator(GeneratorConfig(resolution=32, c_dim=c_dim, z_dim=16, w_dim=16, mapping_layers=2,
                                  channel_base=256, channel_max=16))
    d = Discriminator(DiscriminatorConfig(resolution=32, c_dim=c_dim, channel_base=256, channel_max=16))
    extra = {"family": family, "label_names": label_names, "c_dim": c_dim,
             "input": {"size": 32, "fit": "pad", "channels": 1, "range": [-1, 1]}}
    if label_kind is not None:  # the trainer's record; older checkpoints may lack it
        extra["label_kind"] = label_kind
    modules = {"G": g, "D": d}
    if ema:
        g_ema = Generator(g.config)
        g_ema.load_state_dict(g.state_dict())
        with torch.no_grad():
            g_ema.synthesis.blocks[-1].torgb.bias.add_(0.25)  # G_ema's images differ from G's
        modules["G_ema"] = g_ema
    args = {name: {**model_args(m), **extra} for name, m in modules.items()}
    CheckpointManager(root).save(1, modules, model_args=args)
    return root


@pytest.fixture(scope="module")
def tb_run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("run") / "00001-stylegan2", TB_LABELS)


def generate(*argv: str) -> int:
    return main(["generate", "--device", "cpu", *argv])


def class_counts(root: Path, layout: str | None = None) -> dict[str, int]:
    ds = load_tree(root, layout=layout)
    counts: dict[str, int] = {}
    for r in ds.records:
        on = [n for n, v in zip(r.label_names, r.labels) if v > 0.5 and n != "No Finding"]
        key = "|".join(on) if on else "normal"
        counts[key] = counts.get(key, 0) + 1
    return counts


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


@pytest.mark.parametrize("layout", ["shenzhen", "montgomery", "folders"])
def test_loaders_read_back_the_requested_class_counts(tb_run, tmp_path, layout):
    out = tmp_path / "synthetic"
    assert generate("--checkpoint", str(tb_run), "--n", "10", "--class", "Tuberculosis=0.3,normal=0.7",
                    "--truncation", "0.7", "--seed", "0", "--layout", layout, "--out", str(out)) == 0
    ds = load_tree(out)  # detected: the NLM sets' folder below the root reads as "nlm"
    assert ds.layout == {"shenzhen": "nlm", "montgomery": "nlm"}.get(layout, layout)
    assert len(ds.records) == 10
    assert class_counts(out) == class_counts(out, layout) == {"Tuberculosis": 3, "normal": 7}
    assert ds.origin == "synthetic" and tree_origin(out) == "synthetic"
    for r in ds.records:
        assert r.age is None and r.sex is None  # no invented patient


def test_nih_layout_with_a_multi_hot_run(tmp_path):
    run = make_run(tmp_path / "run", list(NIH14), label_kind="multi")
    out = tmp_path / "nih"
    assert generate("--checkpoint", str(run), "--n", "8", "--class", "Effusion=0.5,No Finding=0.25,Mass|Nodule=0.25",
                    "--layout", "nih", "--out", str(out)) == 0
    assert (out / "Data_Entry_2017.csv").is_file()
    ds = load_tree(out)
    assert ds.layout == "nih" and ds.origin == "synthetic"
    assert class_counts(out) == {"Effusion": 4, "normal": 2, "Mass|Nodule": 2}
    rows = read_labels_csv(out)
    assert {r["class"] for r in rows} == {"Effusion", "No Finding", "Mass|Nodule"}
    mass = next(r for r in rows if r["class"] == "Mass|Nodule")
    assert (mass["Mass"], mass["Nodule"], mass["Effusion"]) == ("1", "1", "0")


def test_same_seed_same_bytes_whatever_the_batch_size(tb_run, tmp_path):
    common = ["--checkpoint", str(tb_run), "--n", "7", "--class", "Tuberculosis=0.5,normal=0.5",
              "--truncation", "0.5", "--seed", "3", "--layout", "shenzhen"]
    assert generate(*common, "--batch-size", "4", "--out", str(tmp_path / "a")) == 0
    assert generate(*common, "--batch-size", "4", "--out", str(tmp_path / "b")) == 0
    assert generate(*common, "--batch-size", "1", "--out", str(tmp_path / "c")) == 0
    a, b, c = (tree_bytes(tmp_path / k) for k in "abc")
    assert len([k for k in a if k.endswith(".png")]) == 7
    assert a == b == c
    other = [x if x != "3" else "4" for x in common]
    assert generate(*other, "--out", str(tmp_path / "d")) == 0
    d = tree_bytes(tmp_path / "d")
    assert {k: v for k, v in a.items() if k.endswith(".png")} != {k: v for k, v in d.items() if k.endswith(".png")}


def test_manifest_records_checkpoint_seeds_classes_and_code(tb_run, tmp_path):
    out = tmp_path / "synthetic"
    assert generate("--checkpoint", str(tb_run), "--n", "5", "--class", "tuberculosis=0.6,Normal=0.4",
                    "--truncation", "0.7", "--seed", "11", "--layout", "folders", "--out", str(out)) == 0
    m = json.loads((out / MANIFEST).read_text())
    ckpt = tb_run / "checkpoints" / "step-00000001"
    assert m["checkpoint"] == str(ckpt)
    assert m["module"] == "G_ema"
    assert m["weights_sha256"] == hashlib.sha256((ckpt / "G_ema.safetensors").read_bytes()).hexdigest()
    assert m["layout"] == "folders" and m["n"] == 5 and m["seed"] == 11 and m["truncation"] == 0.7
    assert m["class_counts"] == {"Tuberculosis": 3, "normal": 2}
    assert m["code_version"] is None or len(m["code_version"]) >= 40
    assert [r["seed"] for r in m["images"]] == [image_seed(11, i) for i in range(5)]
    assert len({r["seed"] for r in m["images"]}) == 5
    for r in m["images"]:
        assert (out / r["image"]).is_file() and r["image"].startswith(r["class"] + "/")
    rows = read_labels_csv(out)
    assert [(r["image"], r["class"], int(r["seed"])) for r in rows] == \
        [(r["image"], r["class"], r["seed"]) for r in m["images"]]
    assert all(r["Tuberculosis"] == ("1" if r["class"] == "Tuberculosis" else "0") for r in rows)
    assert tree_origin(out) == "synthetic"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def test_g_when_no_ema_and_g_ema_differs(tmp_path):
    run = make_run(tmp_path / "run", TB_LABELS, ema=False)
    out = tmp_path / "g"
    assert generate("--checkpoint", str(run), "--n", "2", "--layout", "folders", "--out", str(out)) == 0
    assert json.loads((out / MANIFEST).read_text())["module"] == "G"


def test_match_prevalence_copies_a_trees_mix(tb_run, tmp_path):
    src = tmp_path / "src"
    assert generate("--checkpoint", str(tb_run), "--n", "8", "--class", "Tuberculosis=0.25,normal=0.75",
                    "--layout", "montgomery", "--out", str(src)) == 0
    out = tmp_path / "copy"
    assert generate("--checkpoint", str(tb_run), "--n", "12", "--match-prevalence", str(src),
                    "--layout", "shenzhen", "--out", str(out)) == 0
    assert class_counts(out) == {"Tuberculosis": 3, "normal": 9}


def test_single_column_tb_run_and_grid_and_walk(tmp_path):
    run = make_run(tmp_path / "run", ["Tuberculosis"], label_kind=None)
    out = tmp_path / "tb"
    grid, walk = tmp_path / "sheet.png", tmp_path / "walk.png"
    assert generate("--checkpoint", str(run), "--n", "4", "--class", "Tuberculosis=0.5,normal=0.5",
                    "--layout", "shenzhen", "--out", str(out), "--grid", str(grid), "--grid-columns", "3",
                    "--interpolate", str(walk), "--interpolate-steps", "5", "--truncation", "0.8") == 0
    assert class_counts(out) == {"Tuberculosis": 2, "normal": 2}
    with Image.open(grid) as im:
        assert im.size == (3 * 32 + 2 * 2, 2 * 32 + 2)
    with Image.open(walk) as im:
        assert im.size == (5 * 32 + 4 * 2, 2 * 32 + 2)
        px = np.asarray(im)
    assert not np.array_equal(px[:32, :32], px[:32, -32:])  # the walk moves


@pytest.mark.parametrize("argv, message", [
    (["--class", "Pneumonia=0.5,normal=0.5"], "class 'Pneumonia' is not in the checkpoint's label set"),
    (["--class", "Tuberculosis=0.5,normal=0.4"], "the proportions sum to 0.9, not 1"),
    (["--n", "0"], "--n must be > 0, got 0"),
    (["--n", "-3"], "--n must be > 0, got -3"),
    (["--truncation", "1.5"], "--truncation must be in [0, 1], got 1.5"),
    (["--truncation", "-0.1"], "--truncation must be in [0, 1], got -0.1"),
])
def test_bad_input_one_line_exit_2_nothing_written(tb_run, tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    base = {"--n": "4", "--class": "Tuberculosis=0.5,normal=0.5", "--truncation": "0.7"}
    for k, v in zip(argv[::2], argv[1::2]):
        base[k] = v
    flat = [x for kv in base.items() for x in kv]
    assert generate("--checkpoint", str(tb_run), *flat, "--layout", "shenzhen", "--out", str(out)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cxr: error: ") and "\n" not in err and message in err
    assert list(tmp_path.iterdir()) == []


def test_another_model_family_is_refused(tmp_path, capsys):
    run = make_run(tmp_path / "cyclegan-run", TB_LABELS, family="cyclegan")
    out = tmp_path / "out"
    assert generate("--checkpoint", str(run), "--n", "2", "--out", str(out)) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "not a StyleGAN2 generator (family 'cyclegan'" in err
    assert not out.exists()


def test_a_cyclegan_run_is_refused(tmp_path, capsys):
    g = Generator(GeneratorConfig(resolution=32, z_dim=8, w_dim=8, mapping_layers=1, channel_base=64, channel_max=8))
    run = tmp_path / "00001-cyclegan"
    CheckpointManager(run).save(1, {"G_ab": g}, model_args={"G_ab": {"family": "cyclegan", "kind": "generator"}})
    out = tmp_path / "out"
    assert generate("--checkpoint", str(run), "--n", "2", "--out", str(out)) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "not a StyleGAN2 checkpoint (no G or G_ema; family 'cyclegan'" in err
    assert not out.exists()


def test_non_empty_output_is_refused_without_overwrite(tb_run, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert generate("--checkpoint", str(tb_run), "--n", "2", "--out", str(out)) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "output folder is not empty (pass --overwrite" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert generate("--checkpoint", str(tb_run), "--n", "2", "--out", str(out), "--overwrite") == 0
    assert not (out / "keep.txt").exists() and (out / LABELS_CSV).is_file()


def test_a_failed_write_names_the_output_and_leaves_nothing(tb_run, tmp_path, capsys, monkeypatch):
    written = []

    def full_disk(path, data):
        written.append(Path(path))
        if len(written) == 3:
            raise OSError(28, "No space left on device", str(path))
        write_bytes(path, data)

    monkeypatch.setattr(generate_module, "write_bytes", full_disk)
    out = tmp_path / "out"
    assert generate("--checkpoint", str(tb_run), "--n", "5", "--layout", "shenzhen", "--out", str(out)) == 2
    err = capsys.readouterr().err.strip()
    # the temporary folder is gone: the message names the file's place in --out
    assert err == f"cxr: error: {out}/ChinaSet_AllFiles/CXR_png/{written[2].name}: No space left on device"
    assert list(tmp_path.iterdir()) == []


def test_class_that_does_not_fit_the_layout(tmp_path, capsys):
    run = make_run(tmp_path / "run", list(NIH14), label_kind=None)  # no record: NIH's 14 read as multi-hot
    out = tmp_path / "out"
    assert generate("--checkpoint", str(run), "--n", "2", "--class", "Effusion=1", "--layout", "shenzhen",
                    "--out", str(out)) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "class 'Effusion' does not fit" in err
    assert not out.exists()
