"""The CycleGAN timing harnesses: the reference's contract without its code, and our own benchmark."""

from __future__ import annotations

import json
import sys

from benchmark_scripts import load_benchmark


def _load():
    return load_benchmark("bench_reference_cyclegan")


def test_missing_reference_folder_is_one_line_and_exit_2(tmp_path, capsys):
    rc = _load().main(["--ref", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "nowhere" in err[0] and "cycle_gan_model.py" in err[0]


def test_options_are_the_benchmarks_equal_maths(tmp_path):
    opt = _load().reference_options(False, str(tmp_path))
    assert (opt.which_model_netG, opt.which_model_netD, opt.norm) == ("resnet_9blocks", "basic", "instance")
    assert (opt.input_nc, opt.output_nc, opt.batch_size, opt.pool_size) == (1, 1, 1, 50)
    assert not opt.no_lsgan and opt.lambda_identity == 0.5 and opt.lambda_A == opt.lambda_B == 10.0
    assert opt.gpu_ids == [] and _load().reference_options(True, str(tmp_path)).gpu_ids == [0]


def _stand_in(tmp_path):
    """A stand-in with the reference's factory and step API, so the timing loop itself is tested."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "cycle_gan_model.py").write_text("")
    (tmp_path / "models" / "__init__.py").write_text(
        "calls = []\n"
        "class M:\n"
        "    def setup(self, opt): print('setup noise')\n"
        "    def set_input(self, d): calls.append(tuple(d['A'].shape))\n"
        "    def optimize_parameters(self): pass\n"
        "def create_model(opt): return M()\n")


def test_times_a_stand_in_model_and_prints_one_json_line(tmp_path, capsys, monkeypatch):
    _stand_in(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the harness prepends --ref; undone after
    monkeypatch.delitem(sys.modules, "models", raising=False)
    rc = _load().main(["--ref", str(tmp_path), "--size", "8", "--steps", "3", "--warmup", "1"])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and len(out) == 1
    r = json.loads(out[0])
    assert r["impl"] == "reference" and r["size"] == 8 and r["steps"] == 3 and len(r["all"]) == 3
    assert sys.modules["models"].calls == [(1, 1, 8, 8)] * 4
    del sys.modules["models"]  # the stand-in must not outlive the test


def test_our_benchmark_times_and_profiles_a_tiny_step(capsys):
    """benchmarks/bench_cyclegan.py: its JSON line, and with --profile the op table first."""
    rc = load_benchmark("bench_cyclegan").main(
        ["--device", "cpu", "--size", "32", "--generator", "resnet6", "--steps", "1", "--warmup", "1",
         "--amp", "off", "--threads", "1", "--profile", "1", "model.ngf=4", "model.ndf=4"])
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert rc == 0 and result["steps"] == 1 and result["s_per_pair"] > 0 and result["compile_mode"] is None
    assert len(result["all"]) == 1 and result["median_s"] == result["all"][0] > 0  # per-step times, as the reference's
    assert result["winograd"] == "auto"
    table = "\n".join(out[:-1])
    assert "Self CPU time total" in table and "aten::convolution_backward" in table


def test_interleave_times_our_step_after_each_reference_step(tmp_path, capsys, monkeypatch):
    _stand_in(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "models", raising=False)
    rc = _load().main(["--ref", str(tmp_path), "--size", "32", "--steps", "2", "--warmup", "1", "--threads", "1",
                       "--interleave", "model.ngf=4", "model.ndf=4", "model.winograd=off"])
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and len(r["all"]) == len(r["ours_all"]) == 2 and r["ours_median_s"] > 0
    assert 0 <= r["ratio_median"] < 1 and r["ours_winograd"] == "off"  # reference / ours: the stand-in does nothing
    del sys.modules["models"]
