"""The whole CycleGAN training loop on a CUDA device with CUDA graphs
(``train.compile=true train.compile_mode=reduce-overhead``): logging of the images a step
shows, checkpoints, resume and translation.

Excluded from the default run (``-m gpu`` selects it); skipped where no GPU is visible.
"""

from __future__ import annotations

import json

import pytest
import torch

from cyclegan_helpers import nlm_site, tiny_config
from engine_toy import assert_cuda_graphs_ran, reset_compile_counters
from gan.cyclegan.trainer import train
from gan.cyclegan.translate import load_translator

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_training_loop_with_cuda_graphs_checkpoints_resumes_and_translates(tmp_path):
    a, b = nlm_site(tmp_path, "montgomery", 10), nlm_site(tmp_path, "shenzhen", 12)
    graphs = ("device=cuda", "train.compile=true", "train.compile_mode=reduce-overhead", "train.ckpt_every=4",
              "train.image_every=3", "train.log_every=2", "train.keep_last=0")
    cfg = tiny_config(a, b, tmp_path / "cache", "train.steps=8", *graphs)
    reset_compile_counters()
    first = train(cfg, tmp_path / "run")
    assert first.steps_done == 8 and not first.interrupted
    assert_cuda_graphs_ran()
    stats = [json.loads(line) for line in (tmp_path / "run" / "stats.jsonl").read_text().splitlines()]
    losses = [row["loss_G"] for row in stats if "loss_G" in row]
    assert len(losses) == 4 and torch.isfinite(torch.tensor(losses)).all()  # logged every 2 of 8 steps
    # A longer run resumed from the last checkpoint continues where the first one stopped.
    longer = tiny_config(a, b, tmp_path / "cache", "train.steps=12", *graphs)
    resumed = train(longer, tmp_path / "run", resume=True)
    assert resumed.steps_done == 12
    x = torch.linspace(0, 1, 32 * 32).view(1, 1, 32, 32)
    y = load_translator(resumed.run_dir, "a2b").squares(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
