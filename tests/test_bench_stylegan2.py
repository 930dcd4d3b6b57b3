"""benchmarks/bench_stylegan2.py: its JSON line on a tiny setting, and its per-device defaults."""

from __future__ import annotations

import json

import pytest
import torch

from benchmark_scripts import load_benchmark
from cyclegan_helpers import nlm_site


def test_times_a_tiny_step_and_prints_one_json_line(tmp_path, capsys):
    tree = nlm_site(tmp_path, "shenzhen", 8)
    rc = load_benchmark("bench_stylegan2").main(
        ["--device", "cpu", "--config", "stylegan2_tiny", "--size", "32", "--batch-size", "4", "--steps", "2",
         "--warmup", "1", "--threads", "1", "--phantom", str(tree)])
    out = capsys.readouterr().out.strip().splitlines()
    r = json.loads(out[-1])
    assert rc == 0 and r["steps"] == 2 and r["size"] == 32 and r["batch_size"] == 4
    assert r["config"] == "stylegan2_tiny" and r["channel_base"] == 256 and r["device"] == "cpu (1 threads)"
    assert r["s_per_kimg"] > 0 and r["s_per_kimg"] == pytest.approx(r["seconds"] / 0.008, rel=0.01)
    assert r["images_per_s"] > 0 and r["peak_memory_mb"] > 0 and r["s_per_step"] > 0


def test_the_default_setting_is_nvlabs_auto_on_cuda_and_the_nlm_widths_on_a_cpu():
    bench = load_benchmark("bench_stylegan2")
    assert bench.default_setting(torch.device("cuda")) == ("stylegan2_auto256", 256, 16)
    assert bench.default_setting(torch.device("cpu")) == ("stylegan2_nlm", 64, 16)
