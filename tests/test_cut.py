"""CUT and FastCUT: the PatchNCE loss, the trainer on tiny NLM trees, resume, and harmonizing a
tree with a run (``cxr harmonize --method cut|fastcut``)."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from benchmark_scripts import load_benchmark
from builders import one_error_line
from cxr.cli.main import main
from cxr.configs import shipped_config
from cxr.data.image import load_image
from cxr.data.layouts import load_tree
from cxr.data.provenance import tree_origin
from cxr.engine.config import load_config
from cxr.errors import ConfigError
from cyclegan_helpers import nlm_site, tiny_config
from gan.cut.config import CUTConfig
from gan.cut.nce import PatchHeads, gather_patches, multilayer_patch_nce, patch_nce, sample_locations
from gan.cut.trainer import CUTSteps, build_networks, run_layers, train, train_cut
from gan.cyclegan.trainer import train as train_cyclegan
from gan.cyclegan.translate import MANIFEST, checkpoint_method, load_translator

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.size=32", "data.decode_workers=1", "model.generator=resnet6", "model.ngf=4", "model.ndf=4",
        "model.d_layers=2", "model.nce_layers=[0,4,8,12]", "model.head_channels=16", "loss.num_patches=32",
        "train.batch_size=2", "train.steps=4", "train.log_every=2", "train.image_every=2", "train.ckpt_every=2",
        "train.channels_last=false", "optim.lr=0.002", "device=cpu"]


def cut_config(a: Path, b: Path, cache: Path, *overrides: str) -> CUTConfig:
    """A CUT config small enough for a CPU test: 32², 4-filter ResNet-6, a few steps."""
    return load_config(CUTConfig, None, [f"data.a={a}", f"data.b={b}", f"data.cache_dir={cache}", *TINY, *overrides])


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("nlm")
    return nlm_site(root, "montgomery", 10), nlm_site(root, "shenzhen", 12)


@pytest.fixture(scope="module")
def trained(trees, tmp_path_factory):
    """One short CUT run shared by the tests that only read its results."""
    a, b = trees
    base = tmp_path_factory.mktemp("cut")
    cfg = cut_config(a, b, base / "cache", "train.steps=24", "train.log_every=6", "train.ckpt_every=12",
                     "train.image_every=12")
    return cfg, train(cfg, base / "run")


# ----------------------------------------------------------------------------------------------
# PatchNCE


def _unit(*shape: int, seed: int) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_patch_nce_is_the_cross_entropy_of_matching_locations():
    q, k = _unit(2, 5, 8, seed=0), _unit(2, 5, 8, seed=1)
    tau = 0.07
    expected = []
    for n in range(2):  # by hand: -log softmax over the P keys of the same image, positive = same location
        for s in range(5):
            logits = [float(q[n, s] @ k[n, t]) / tau for t in range(5)]
            expected.append(-(logits[s] - math.log(sum(math.exp(v) for v in logits))))
    assert patch_nce(q, k, tau).item() == pytest.approx(np.mean(expected), rel=1e-5)
    # Identical embeddings are recognised; shuffled locations are not.
    same = patch_nce(k, k, tau).item()
    shuffled = patch_nce(k[:, torch.tensor([1, 2, 3, 4, 0])], k, tau).item()
    assert same < 0.5 < math.log(5) < shuffled
    # Uninformative queries (all equal) give exactly log P.
    flat = torch.nn.functional.normalize(torch.ones(1, 4, 8), dim=-1)
    assert patch_nce(flat, flat, tau).item() == pytest.approx(math.log(4))
    with pytest.raises(ValueError, match=r"\(N, P, C\)"):
        patch_nce(q, k[:, :4])


def test_keys_get_no_gradient_and_layers_are_averaged():
    q, k = _unit(1, 6, 4, seed=3).requires_grad_(), _unit(1, 6, 4, seed=4).requires_grad_()
    patch_nce(q, k).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0 and k.grad is None
    qs, ks = [_unit(1, 6, 4, seed=5), _unit(1, 3, 4, seed=6)], [_unit(1, 6, 4, seed=7), _unit(1, 3, 4, seed=8)]
    assert multilayer_patch_nce(qs, ks).item() == pytest.approx(
        (patch_nce(qs[0], ks[0]) + patch_nce(qs[1], ks[1])).item() / 2)


def test_heads_sample_the_same_locations_of_every_image():
    feats = [torch.arange(2 * 3 * 16, dtype=torch.float32).view(2, 3, 4, 4), torch.randn(2, 5, 2, 2)]
    locs = sample_locations([(4, 4), (2, 2)], 6, torch.Generator().manual_seed(0))
    assert [len(ids) for ids in locs] == [6, 4] and len(set(locs[0].tolist())) == 6  # all 4 of a 2×2 map
    patches = gather_patches(feats[0], locs[0])
    assert patches.shape == (2, 6, 3)
    y, x = locs[0][0] // 4, locs[0][0] % 4
    assert torch.equal(patches[1, 0], feats[0][1, :, y, x])
    heads = PatchHeads([3, 5], width=7)
    out = heads(feats, locs)
    assert [tuple(o.shape) for o in out] == [(2, 6, 7), (2, 4, 7)]
    assert torch.allclose(out[0].norm(dim=-1), torch.ones(2, 6))


def test_encoder_taps_are_the_generators_own_layers(tmp_path):
    cfg = cut_config(tmp_path / "a", tmp_path / "b", tmp_path / "c", "model.residual=true")
    nets, _ = build_networks(cfg)
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        out, feats = run_layers(nets.g, x, nets.layers)
        _, enc = run_layers(nets.g, x, nets.layers, full=False)
        assert torch.equal(out, nets.g(x))
    assert [tuple(f.shape[1:]) for f in feats] == [(1, 32, 32), (8, 16, 16), (16, 8, 8), (16, 8, 8)]
    assert nets.heads.channels == (1, 8, 16, 16)
    assert all(torch.equal(a, b) for a, b in zip(feats, enc))
    with pytest.raises(ConfigError, match="model.nce_layers.*past the encoder of resnet6"):
        build_networks(cut_config(tmp_path / "a", tmp_path / "b", tmp_path / "c", "model.nce_layers=[0,16]"))
    with pytest.raises(ConfigError, match="ResNet generator"):
        cut_config(tmp_path / "a", tmp_path / "b", tmp_path / "c", "model.generator=unet256")


# ----------------------------------------------------------------------------------------------
# Training


def test_fastcut_has_no_identity_term(tmp_path):
    cfg = cut_config(tmp_path / "a", tmp_path / "b", tmp_path / "c", "model.mode=fastcut")
    assert (cfg.lambda_nce, cfg.nce_identity) == (10.0, False)
    steps = CUTSteps(cfg)
    calls = []
    steps.nets.register_forward_pre_hook(lambda _m, args: calls.append(args[1]))
    a, b = torch.rand(2, 1, 32, 32) * 2 - 1, torch.rand(2, 1, 32, 32) * 2 - 1
    losses, shown = steps.step(a, b, 0)
    assert calls == [None]  # B images never go through G
    assert "nce_y" not in losses and "idt_b" not in shown
    assert losses["loss_G"].item() == pytest.approx(losses["adv"].item() + 10.0 * losses["nce_x"].item(), rel=1e-5)
    cut = CUTSteps(cut_config(tmp_path / "a", tmp_path / "b", tmp_path / "c"))
    losses, shown = cut.step(a, b, 0)
    assert shown["idt_b"].shape == (2, 1, 32, 32)
    assert losses["loss_G"].item() == pytest.approx(
        losses["adv"].item() + 0.5 * (losses["nce_x"].item() + losses["nce_y"].item()), rel=1e-5)


def test_cut_lowers_its_nce_loss_and_writes_a_complete_run(trained, trees):
    cfg, result = trained
    run = result.run_dir
    assert result.steps_done == 24 and not result.interrupted
    rows = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [6, 12, 18, 24]
    assert rows[-1]["nce_x"] < 0.8 * rows[0]["nce_x"], [r["nce_x"] for r in rows]
    assert rows[-1]["nce_y"] < 0.8 * rows[0]["nce_y"]
    assert math.log(32) * 0.5 < rows[0]["nce_x"] < math.log(32) * 1.2  # starts near log P
    info = json.loads((run / "run.json").read_text())
    assert (info["family"], info["mode"], info["domains"]["a"]["layout"]) == ("cut", "cut", "montgomery")
    assert any((run / "tb").iterdir()) and (run / "images_seen.txt").is_file()
    ckpt = run / "checkpoints" / "step-00000024"
    assert sorted(p.stem for p in ckpt.glob("*.safetensors")) == ["D_b", "G_ab", "H"]
    assert checkpoint_method(run) == "cut"
    t = load_translator(run, "a2b", method="cut")
    x = torch.linspace(0, 1, 32 * 32).view(1, 1, 32, 32)
    assert t.squares(x).shape == x.shape and t.model_args["input"]["size"] == 32


@pytest.mark.parametrize("mode", ["cut", "fastcut"])
def test_resume_after_kill_is_bit_identical(trees, tmp_path, mode):
    a, b = trees
    cfg = cut_config(a, b, tmp_path / "cache", f"model.mode={mode}", "train.steps=6", "train.ckpt_every=3",
                     "train.keep_last=0", *(["train.ema=0.5"] if mode == "fastcut" else []))
    straight = train(cfg, tmp_path / "straight")
    killed = tmp_path / "killed"  # only the step-3 checkpoint survived, plus a half-written later one
    shutil.copytree(straight.run_dir / "checkpoints" / "step-00000003", killed / "checkpoints" / "step-00000003")
    half = killed / "checkpoints" / "step-00000005"
    shutil.copytree(straight.run_dir / "checkpoints" / "step-00000006", half)
    (half / "COMPLETE").unlink()
    assert train(cfg, killed, resume=True).steps_done == 6
    names = {"G_ab", "D_b", "H"} | ({"G_ab_ema"} if mode == "fastcut" else set())
    for name in names:
        w1 = load_file(str(straight.run_dir / "checkpoints" / "step-00000006" / f"{name}.safetensors"))
        w2 = load_file(str(killed / "checkpoints" / "step-00000006" / f"{name}.safetensors"))
        assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1), name


# ----------------------------------------------------------------------------------------------
# The command line and harmonizing with a run


def test_cli_train_resume_and_harmonize(trees, tmp_path, monkeypatch, capsys):
    a, b = trees
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "fast"
    args = ["train-gan", "cut", "--config", "cut_tiny", "--run-dir", str(run), f"data.a={a}", f"data.b={b}",
            "model.mode=fastcut", *TINY]
    assert main(args) == 0
    assert "trained fastcut 4/4 steps" in capsys.readouterr().out
    assert main(["train-gan", "cut", "--run-dir", str(run), "--resume", "train.steps=6"]) == 0
    assert "trained fastcut 6/6 steps" in capsys.readouterr().out
    out = tmp_path / "mc_fastcut"
    assert main(["harmonize", "--method", "fastcut", "--checkpoint", str(run), "--in", str(a), "--out", str(out),
                 "--device", "cpu"]) == 0
    assert "harmonized 10 images (montgomery, fastcut of" in capsys.readouterr().out
    src, got = load_tree(a), load_tree(out)
    assert [(Path(r.image).name, r.labels, r.patient_id) for r in src.records] == \
           [(Path(r.image).name, r.labels, r.patient_id) for r in got.records]
    assert (got.layout, tree_origin(out)) == ("montgomery", "translated")
    manifest = json.loads((out / MANIFEST).read_text())
    assert (manifest["method"], manifest["command"], manifest["module"]) == \
           ("fastcut", "cxr harmonize --method fastcut", "G_ab")
    first = Path(src.records[0].image).name
    assert not np.array_equal(load_image(src.records[0].image), load_image(out / "CXR_png" / first))


def test_wrong_family_or_method_is_one_line(trained, trees, tmp_path, capsys):
    _, result = trained
    a, b = trees
    cyclegan = train_cyclegan(tiny_config(a, b, tmp_path / "cache", "train.steps=1"), tmp_path / "cg").run_dir
    cases = [(["--method", "fastcut", "--checkpoint", str(result.run_dir)], "a CUT checkpoint, not a FastCUT one"),
             (["--method", "cut", "--checkpoint", str(cyclegan)], "a CycleGAN checkpoint, not a CUT one"),
             (["--method", "cyclegan", "--checkpoint", str(result.run_dir)], "apply it with --method cut"),
             (["--method", "cut"], "--method cut needs --checkpoint RUN"),
             (["--method", "cut", "--checkpoint", str(result.run_dir), "--reference", str(b)],
              "--reference does not apply to --method cut"),
             (["--method", "histogram", "--checkpoint", str(result.run_dir), "--reference", str(b)],
              "--checkpoint applies to the learned methods")]
    for i, (flags, message) in enumerate(cases):
        out = tmp_path / f"out{i}"
        assert main(["harmonize", *flags, "--in", str(a), "--out", str(out), "--device", "cpu"]) == 2, flags
        assert message in one_error_line(capsys), flags
        assert not out.exists()
    # `cxr translate` stays the CycleGAN shorthand and names the method to use instead.
    assert main(["translate", "--checkpoint", str(result.run_dir), "--direction", "a2b", "--in", str(a),
                 "--out", str(tmp_path / "t"), "--device", "cpu"]) == 2
    assert "a CUT checkpoint, not a CycleGAN one" in one_error_line(capsys)
    # ... and a CUT run has no b2a generator; resuming it with the CycleGAN trainer is refused.
    with pytest.raises(ConfigError, match="a2b only"):
        load_translator(result.run_dir, "b2a", method="cut")
    assert main(["train-gan", "cyclegan", "--run-dir", str(result.run_dir), "--resume"]) == 2
    assert "this is a cut run, not a cyclegan one" in one_error_line(capsys)


def test_library_entry_points_and_shipped_configs(trees, tmp_path):
    a, b = trees
    result = train_cut(a, b, tmp_path / "run", [*TINY, f"data.cache_dir={tmp_path / 'cache'}", "train.steps=2"],
                       config="fastcut_nlm")
    assert result.steps_done == 2 and checkpoint_method(result.run_dir) == "fastcut"
    for name, mode, lam in (("cut_nlm", "cut", 1.0), ("fastcut_nlm", "fastcut", 10.0), ("cut_tiny", "cut", 1.0)):
        cfg = load_config(CUTConfig, shipped_config(name))
        assert (cfg.model.mode, cfg.lambda_nce) == (mode, lam)
    assert load_config(CUTConfig, shipped_config("cut_nlm"), ["model.mode=fastcut"]).lambda_nce == 10.0
    paper = load_config(CUTConfig, shipped_config("cut_nlm"))
    assert (paper.model.nce_layers, paper.loss.num_patches, paper.model.head_channels, paper.loss.temperature,
            paper.model.generator, paper.data.size) == ((0, 4, 8, 12, 16), 256, 256, 0.07, "resnet9", 256)


def test_benchmark_times_one_model(capsys):
    rc = load_benchmark("bench_cut").main(["--model", "fastcut", "--device", "cpu", "--size", "32", "--steps", "1",
                                           "--warmup", "0", "--threads", "1", "model.ngf=4", "model.ndf=4",
                                           "model.d_layers=2"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and result["model"] == "fastcut" and result["size"] == 32
    assert result["images_per_s"] == pytest.approx(2 / result["s_per_pair"], rel=0.01) and result["peak_memory_mb"] > 0


@pytest.mark.slow
def test_two_gloo_processes_equal_one(tmp_path):
    """DDP (gloo, CPU): the two ranks' half-batches, averaged, give the single process's step
    (the patch locations are drawn alike on every rank)."""
    a, b = nlm_site(tmp_path / "data", "montgomery", 8), nlm_site(tmp_path / "data", "shenzhen", 8)
    overrides = [f"data.a={a}", f"data.b={b}", f"data.cache_dir={tmp_path / 'cache'}", *TINY, "train.batch_size=4",
                 "train.steps=3", "train.log_every=1", "train.image_every=0"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                                            "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))

    def launch(run: str, extra: dict[str, str]) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "cxr.cli.main", "train-gan", "cut", "--run-dir",
                                 str(tmp_path / run), *overrides], env={**env, **extra}, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    single = launch("single", {})
    assert single.wait(timeout=300) == 0, single.stderr.read()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    dist = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    ranks = [launch("ddp", {**dist, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in (0, 1)]
    for proc in ranks:
        assert proc.wait(timeout=300) == 0, proc.stderr.read()
    stats = {k: [json.loads(line) for line in (tmp_path / k / "stats.jsonl").read_text().splitlines()]
             for k in ("single", "ddp")}
    assert [r["step"] for r in stats["ddp"]] == [1, 2, 3]
    for one, two in zip(stats["single"], stats["ddp"]):
        for key in ("adv", "nce_x", "nce_y", "loss_G", "loss_D"):
            assert two[key] == pytest.approx(one[key], rel=1e-3), (one["step"], key)
