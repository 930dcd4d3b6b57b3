"""Stopping cleanly: NaN guard (last good checkpoint intact), SIGINT (checkpoint, exit 130), OOM hints."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cxr.engine.checkpoint import latest, load
from cxr.engine.guards import EXIT_INTERRUPTED, GracefulInterrupt, NonFiniteLossError, check_finite, is_oom, oom_message
from cxr.errors import CxrError
from engine_toy import ToyNet

TOY = Path(__file__).resolve().parent / "engine_toy.py"


def _toy(run_dir: Path, *extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.Popen([sys.executable, str(TOY), "--run-dir", str(run_dir), *extra], env=env,
                            cwd=run_dir.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _steps(run_dir: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (run_dir / "stats.jsonl").read_text().splitlines()]


def test_check_finite_message_names_step_loss_and_checkpoint():
    check_finite({"loss_G": torch.tensor(0.5), "loss_D": 0.25}, 3)  # finite: no error
    with pytest.raises(NonFiniteLossError) as e:
        check_finite({"loss_G": torch.tensor(float("nan")), "loss_D": torch.tensor(1.0)}, 123,
                     "runs/00001-x/checkpoints/step-00000100")
    assert str(e.value) == ("non-finite loss at step 123: loss_G=nan "
                            "(last good checkpoint: runs/00001-x/checkpoints/step-00000100)")
    assert isinstance(e.value, CxrError)
    with pytest.raises(NonFiniteLossError, match=r"at step 5: loss_D=inf, cycle=-inf \(no checkpoint saved yet\)"):
        check_finite({"loss_G": 1.0, "loss_D": float("inf"), "cycle": torch.tensor(-math.inf)}, 5)


def test_nan_stops_the_run_and_sigint_saves_and_exits_130(tmp_path):
    nan_run, int_run = tmp_path / "nan", tmp_path / "sigint"
    nan_proc = _toy(nan_run, "train.ckpt_every=5", "--nan-at", "7")
    int_proc = _toy(int_run, "train.steps=100000", "train.ckpt_every=1000", "--step-delay", "0.05")

    deadline = time.monotonic() + 120
    while not (int_run / "stats.jsonl").exists() or len(_steps(int_run)) < 3:
        assert int_proc.poll() is None, int_proc.communicate()[1]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    int_proc.send_signal(signal.SIGINT)
    _, err = int_proc.communicate(timeout=120)
    assert int_proc.returncode == EXIT_INTERRUPTED, err
    assert "SIGINT received: saving a checkpoint" in err and "Traceback" not in err
    stopped = _steps(int_run)[-1]
    assert 3 <= stopped < 1000
    assert latest(int_run).name == f"step-{stopped:08d}"  # saved at the step it stopped, not at 1000
    assert f"interrupted at step {stopped}" in (int_run / "log.txt").read_text()
    assert load(int_run, {"net": ToyNet(4)})["step"] == stopped

    _, err = nan_proc.communicate(timeout=120)
    assert nan_proc.returncode == 2
    last_good = nan_run / "checkpoints" / "step-00000005"
    assert err.strip() == f"engine_toy: error: non-finite loss at step 7: loss=nan (last good checkpoint: {last_good})"
    assert latest(nan_run) == last_good and _steps(nan_run) == list(range(1, 7))
    weights = load_file(str(last_good / "net.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert load(nan_run, {"net": ToyNet(4)})["step"] == 5


def test_graceful_interrupt_in_process():
    previous = signal.getsignal(signal.SIGINT)
    with GracefulInterrupt(quiet=True) as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # the handler runs between bytecodes
        assert stop.requested and stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C stops at once
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    assert signal.getsignal(signal.SIGINT) is previous


def test_oom_detection_and_message():
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total)")
    assert is_oom(oom) and is_oom(RuntimeError("CUDA error: out of memory"))
    assert not is_oom(RuntimeError("shape mismatch")) and not is_oom(ValueError("out of memory"))
    msg = oom_message(oom, batch_size=8, size=256)
    assert msg.startswith("out of memory with batch size 8 at 256x256 (CUDA out of memory. Tried to allocate")
    assert "try train.batch_size=4 or data.size=128" in msg and "\n" not in msg
    small = oom_message(oom, batch_size=1, size=64)
    assert "train.batch_size" not in small and "data.size" not in small and "smaller model" in small
