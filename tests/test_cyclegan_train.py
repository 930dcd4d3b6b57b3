"""CycleGAN training on tiny NLM-layout trees: steps, run folder, checkpoints, resume, guards."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from classifier_helpers import nih_tree
from cxr.data.layouts import load_tree
from cxr.data.splits import split_records
from cxr.engine.checkpoint import CheckpointError, latest, list_checkpoints
from cxr.engine.config import config_to_dict
from cxr.engine.guards import NonFiniteLossError
from cxr.errors import ConfigError, DataError
from cyclegan_helpers import nlm_site, tiny_config
from gan.cyclegan import trainer as trainer_mod
from gan.cyclegan.data import load_domain, to_model_range
from gan.cyclegan.trainer import CycleGANSteps, train
from gan.cyclegan.translate import load_translator

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("nlm")
    return nlm_site(root, "montgomery", 10), nlm_site(root, "shenzhen", 12)


@pytest.fixture(scope="module")
def trained(trees, tmp_path_factory):
    """One short run shared by the tests that only read its results."""
    a, b = trees
    base = tmp_path_factory.mktemp("run")
    cfg = tiny_config(a, b, base / "cache", "train.steps=30", "train.log_every=10", "train.image_every=15",
                      "train.ckpt_every=15", "model.ngf=8", "model.ndf=8")
    return cfg, train(cfg, base / "run")


def _weights(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every network the checkpoint holds (G_ab, G_ba, D_a, D_b, and the EMA copies if kept)."""
    return {f.stem: load_file(str(f)) for f in sorted(path.glob("*.safetensors"))}


def test_one_step_changes_every_network(trees, tmp_path):
    cfg = tiny_config(*trees, tmp_path / "cache")
    steps = CycleGANSteps(cfg)
    before = {k: [p.detach().clone() for p in m.parameters()] for k, m in steps.modules().items()}
    a, b = to_model_range(torch.rand(2, 1, 32, 32)), to_model_range(torch.rand(2, 1, 32, 32))
    losses, shown = steps.step(a, b, 0)
    for name, module in steps.modules().items():
        changed = [not torch.equal(p0, p) for p0, p in zip(before[name], module.parameters())]
        assert all(changed), f"{name}: {changed.count(False)} parameter tensors did not move"
    assert {"loss_G", "loss_D", "cycle_a", "cycle_b", "idt_a", "idt_b", "adv_ab", "adv_ba"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    assert shown["fake_b"].shape == (2, 1, 32, 32)
    assert len(steps.pool_a) == 2 and len(steps.pool_b) == 2
    assert all(p.requires_grad for p in steps.d.parameters())  # D unfrozen again after the G phase


def test_cycle_loss_falls_and_run_folder_is_complete(trained, trees):
    cfg, result = trained
    run = result.run_dir
    assert result.steps_done == 30 and not result.interrupted
    rows = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30]
    first, last = rows[0]["cycle_a"] + rows[0]["cycle_b"], rows[-1]["cycle_a"] + rows[-1]["cycle_b"]
    assert last < 0.75 * first, (first, last)
    assert rows[0]["lr"] == pytest.approx(0.002) and rows[-1]["lr"] < 0.002  # linear decay in the 2nd half
    # The resolved config and the run facts.
    assert yaml.safe_load((run / "config.yaml").read_text()) == config_to_dict(cfg)
    info = json.loads((run / "run.json").read_text())
    assert info["seed"] == 0 and info["domains"]["a"]["layout"] == "montgomery"
    assert any((run / "tb").iterdir())
    # Checkpoints: safetensors per network, each with model_args to rebuild it.
    assert [p.name for p in list_checkpoints(run)] == ["step-00000015", "step-00000030"]
    with safe_open(str(latest(run) / "G_ab.safetensors"), framework="pt") as f:
        args = json.loads(f.metadata()["model_args"])
    assert args["name"] == "resnet6" and args["config"]["ngf"] == 8
    assert args["input"] == {"size": 32, "fit": "pad", "channels": 1, "range": [-1.0, 1.0]}


def test_images_seen_is_the_training_split_only(trained, trees):
    _, result = trained
    lines = (result.run_dir / "images_seen.txt").read_text().splitlines()
    seen = {tuple(line.split("\t")) for line in lines}
    for name, tree in zip("ab", trees):
        split = split_records(load_tree(tree).records, seed=0)
        assert {(name, r.image) for r in split["train"]} == {s for s in seen if s[0] == name}
        assert not {r.image for r in split["test"] + split["val"]} & {s[1] for s in seen}


def test_checkpoint_reloads_in_a_fresh_process(trained):
    _, result = trained
    x = torch.linspace(0, 1, 32 * 32).view(1, 1, 32, 32)
    here = load_translator(result.run_dir, "a2b").squares(x)
    script = ("import sys, torch; from gan.cyclegan.translate import load_translator\n"
              "t = load_translator(sys.argv[1], 'a2b')\n"
              "x = torch.linspace(0, 1, 32 * 32).view(1, 1, 32, 32)\n"
              "torch.save(t.squares(x), sys.argv[2])\n")
    out = result.run_dir.parent / "fresh.pt"
    proc = subprocess.run([sys.executable, "-c", script, str(result.run_dir), str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    there = torch.load(out, weights_only=True)
    assert torch.equal(here, there)
    assert not torch.allclose(here, x, atol=0.05)  # a trained translator, not the identity


@pytest.mark.parametrize("options", [(), ("loss.d_augment=0.1", "model.residual=true", "model.d_norm=none",
                                          "data.augment=true"),
                                     ("train.ema=0.5",), ("model.winograd=on",)],
                         ids=["paper", "augmented-residual", "ema", "winograd"])
def test_resume_after_kill_is_bit_identical(trees, tmp_path, options):
    a, b = trees
    cfg = tiny_config(a, b, tmp_path / "cache", "train.steps=6", "train.ckpt_every=3", "train.keep_last=0",
                      "loss.pool_size=3", *options)
    straight = train(cfg, tmp_path / "straight")
    assert straight.steps_done == 6
    # A "killed" run: only the step-3 checkpoint survived, plus a half-written later one.
    killed = tmp_path / "killed"
    shutil.copytree(straight.run_dir / "checkpoints" / "step-00000003", killed / "checkpoints" / "step-00000003")
    half = killed / "checkpoints" / "step-00000005"
    shutil.copytree(straight.run_dir / "checkpoints" / "step-00000006", half)
    (half / "COMPLETE").unlink()
    resumed = train(cfg, killed, resume=True)
    assert resumed.steps_done == 6
    w1, w2 = _weights(straight.run_dir / "checkpoints" / "step-00000006"), _weights(killed / "checkpoints" / "step-00000006")
    expected = {"G_ab", "G_ba", "D_a", "D_b"} | ({"G_ab_ema", "G_ba_ema"} if "train.ema=0.5" in options else set())
    assert set(w1) == set(w2) == expected
    for name in w1:
        for key in w1[name]:
            assert torch.equal(w1[name][key], w2[name][key]), f"{name}.{key} differs after resume"


def test_resume_with_another_architecture_is_a_clear_error(trained, tmp_path):
    cfg, result = trained
    run = tmp_path / "copy"
    shutil.copytree(latest(result.run_dir), run / "checkpoints" / latest(result.run_dir).name)
    other = tiny_config(cfg.data.a, cfg.data.b, Path(cfg.data.cache_dir), "model.ngf=4", "train.steps=50")
    with pytest.raises(CheckpointError) as e:
        train(other, run, resume=True)
    msg = str(e.value)
    assert "module 'G_ab'" in msg and "shape mismatch" in msg and "\n" not in msg


def test_non_finite_loss_stops_with_step_and_keeps_last_checkpoint(trees, tmp_path, monkeypatch):
    cfg = tiny_config(*trees, tmp_path / "cache", "train.steps=6")
    real = trainer_mod.CycleGANLoss.discriminator
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        calls["n"] += 1
        out = real(self, *args, **kwargs)
        if calls["n"] == 3:
            out["loss_D_a"] = out["loss_D_a"] * float("nan")
            out["loss_D"] = out["loss_D_a"] + out["loss_D_b"]
        return out

    monkeypatch.setattr(trainer_mod.CycleGANLoss, "discriminator", poisoned)
    with pytest.raises(NonFiniteLossError) as e:
        train(cfg, tmp_path / "run")
    assert str(e.value).startswith("non-finite loss at step 3: loss_D_a=nan")
    assert "step-00000002" in str(e.value)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-00000002"]


def sigint_at(monkeypatch, at: int) -> None:
    """Raise SIGINT while domain A's batch for step ``at`` is drawn, as Ctrl-C would."""
    real = trainer_mod.DomainStream.batch

    def batch(self, step):
        if step == at and self.domain.name == "a":
            signal.raise_signal(signal.SIGINT)
        return real(self, step)

    monkeypatch.setattr(trainer_mod.DomainStream, "batch", batch)


def test_sigint_saves_a_checkpoint_and_stops(trees, tmp_path, monkeypatch):
    cfg = tiny_config(*trees, tmp_path / "cache", "train.steps=50", "train.ckpt_every=100")
    sigint_at(monkeypatch, 2)
    result = train(cfg, tmp_path / "run")
    assert result.interrupted and result.steps_done == 3
    assert latest(tmp_path / "run").name == "step-00000003"


def test_ckpt_every_zero_keeps_only_the_final_checkpoint(trees, tmp_path, monkeypatch):
    cfg = tiny_config(*trees, tmp_path / "cache", "train.steps=3", "train.ckpt_every=0")
    train(cfg, tmp_path / "run")
    assert [c.name for c in list_checkpoints(tmp_path / "run")] == ["step-00000003"]
    # interrupted: still one checkpoint where it stopped
    sigint_at(monkeypatch, 1)
    result = train(tiny_config(*trees, tmp_path / "cache", "train.steps=5", "train.ckpt_every=0"), tmp_path / "run2")
    assert result.interrupted and [c.name for c in list_checkpoints(tmp_path / "run2")] == ["step-00000002"]


def test_mixed_sizes_are_resized_and_split_by_patient(tmp_path):
    tree = nlm_site(tmp_path, "montgomery", 10, sizes=[(40, 34), (64, 30), (33, 71), (50, 50)], mode="I;16")
    cfg = tiny_config(tree, tree, tmp_path / "cache")
    dom = load_domain("a", tree, None, cfg.data, tmp_path / "cache", torch.device("cpu"), workers=1)
    train_split = split_records(load_tree(tree).records, seed=0)["train"]
    assert dom.images.shape == (len(train_split), 1, 32, 32) and dom.n_tree == 10
    assert [r.image for r in dom.records] == [r.image for r in train_split]
    assert 0 <= float(dom.images.min()) and float(dom.images.max()) <= 1
    all_cfg = tiny_config(tree, tree, tmp_path / "cache", "data.split=all")
    assert len(load_domain("a", tree, None, all_cfg.data, tmp_path / "cache", torch.device("cpu"), workers=1)) == 10


def test_an_nih_images_folder_with_its_label_csv_given_by_path(tmp_path):
    # The patients of the split come from the CSV: the same training images as the tree holding it.
    tree = nih_tree(tmp_path / "nih", n=12)
    images = tmp_path / "nih-images"
    shutil.copytree(tree / "images", images)
    labels = tree / "Data_Entry_2017.csv"
    cfg = tiny_config(images, tree, tmp_path / "cache", f"data.labels_csv_a={labels}")
    dom = load_domain("a", images, None, cfg.data, tmp_path / "cache", torch.device("cpu"), workers=1,
                      labels_csv=cfg.data.labels_csv_a)
    train_split = split_records(load_tree(tree).records, seed=0)["train"]
    assert dom.layout == "nih" and dom.n_tree == 12
    assert [(Path(r.image).name, r.patient_id) for r in dom.records] == [(Path(r.image).name, r.patient_id)
                                                                         for r in train_split]
    with pytest.raises(ConfigError, match="data.prematch writes a copy of domain A.s tree, which must hold its label CSV"):
        tiny_config(images, tree, tmp_path / "cache", f"data.labels_csv_a={labels}", "data.prematch=histogram")


def test_tree_without_images_is_one_line(tmp_path):
    empty = tmp_path / "MontgomerySet"
    (empty / "CXR_png").mkdir(parents=True)
    cfg = tiny_config(empty, empty, tmp_path / "cache")
    with pytest.raises(DataError) as e:
        load_domain("a", empty, None, cfg.data, tmp_path / "cache", torch.device("cpu"))
    assert "CXR_png" in str(e.value) and "\n" not in str(e.value)
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    with pytest.raises(DataError, match="no known dataset layout"):
        load_domain("b", nothing, None, cfg.data, tmp_path / "cache", torch.device("cpu"))
