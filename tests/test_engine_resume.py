"""Resume after SIGKILL continues the exact loss trajectory of an uninterrupted run (CPU, bit-equal)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

TOY = Path(__file__).resolve().parent / "engine_toy.py"
ARGS = ["train.steps=20", "train.ckpt_every=10", "train.keep_last=0", "train.deterministic=true", "seed=3"]


def _toy(run_dir: Path, *extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.Popen([sys.executable, str(TOY), "--run-dir", str(run_dir), *extra], env=env,
                            cwd=run_dir.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def _trajectory(run_dir: Path) -> list[tuple[int, float, float]]:
    rows = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["lr"]) for r in rows]


def _weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / f"step-{step:08d}" / "net.safetensors"))


def test_resume_after_kill_is_bit_identical(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    a = _toy(straight, *ARGS)
    b = _toy(killed, *ARGS, "--hang-at", "13")  # checkpoint at 10, three more steps logged, then killed
    deadline = time.monotonic() + 120
    while not (killed / "hanging").exists():
        assert b.poll() is None, b.communicate()[1]
        assert time.monotonic() < deadline, "the toy run never reached step 13"
        time.sleep(0.05)
    os.kill(b.pid, signal.SIGKILL)
    assert _finish(b)[0] == -signal.SIGKILL
    rc, err = _finish(a)
    assert rc == 0, err

    assert [s for s, _, _ in _trajectory(killed)] == list(range(1, 14))
    assert [p.name for p in (killed / "checkpoints").iterdir()] == ["step-00000010"]

    rc, err = _finish(_toy(killed, "--resume"))  # the saved config.yaml supplies the settings
    assert rc == 0, err

    want, got = _trajectory(straight), _trajectory(killed)
    assert [s for s, _, _ in got] == list(range(1, 21))  # the killed run's steps 11-13 were replaced
    assert got == want  # every loss and learning rate, exactly
    w_straight, w_resumed = _weights(straight, 20), _weights(killed, 20)
    assert w_straight.keys() == w_resumed.keys()
    assert all(torch.equal(w_straight[k], w_resumed[k]) for k in w_straight)
    s1 = torch.load(straight / "checkpoints" / "step-00000020" / "state.pt", weights_only=True)
    s2 = torch.load(killed / "checkpoints" / "step-00000020" / "state.pt", weights_only=True)
    for p, q in zip(s1["optimizers"]["opt"]["state"].values(), s2["optimizers"]["opt"]["state"].values()):
        assert torch.equal(p["exp_avg_sq"], q["exp_avg_sq"])
    assert torch.equal(s1["rng"]["torch"], s2["rng"]["torch"])
