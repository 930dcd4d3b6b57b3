"""DDP on CPU (gloo): 2 processes with the torchrun environment equal 1 process with the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

TOY = Path(__file__).resolve().parent / "engine_toy.py"
# noise=0: per-process noise draws cannot match a single process's draws; the data stream can.
ARGS = ["train.steps=4", "train.batch_size=8", "train.ckpt_every=0", "noise=0", "lr=0.05", "seed=1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_DIST_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _launch(run_dir: Path, env_extra: dict[str, str]) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in _DIST_KEYS}
    env.update(env_extra)
    return subprocess.Popen([sys.executable, str(TOY), "--run-dir", str(run_dir), *ARGS], env=env,
                            cwd=run_dir.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "stats.jsonl").read_text().splitlines()]


def test_two_gloo_processes_equal_one_process(tmp_path):
    port = str(_free_port())
    dist_env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    if Path("/sys/class/net/lo").exists():
        dist_env["GLOO_SOCKET_IFNAME"] = "lo"
    procs = [
        _launch(tmp_path / "ddp", {**dist_env, "RANK": "0", "LOCAL_RANK": "0"}),
        _launch(tmp_path / "ddp", {**dist_env, "RANK": "1", "LOCAL_RANK": "1"}),
        _launch(tmp_path / "single", {}),  # no torchrun variables: one process
    ]
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err

    ddp, single = tmp_path / "ddp", tmp_path / "single"
    assert json.loads((ddp / "run.json").read_text())["world_size"] == 2
    l_ddp, l_single = _losses(ddp), _losses(single)
    assert len(l_ddp) == len(l_single) == 4  # rank 1 wrote nothing of its own
    assert l_ddp[-1] < l_ddp[0]  # it trained
    for a, b in zip(l_ddp, l_single):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b))
    w_ddp = load_file(str(ddp / "checkpoints" / "step-00000004" / "net.safetensors"))
    w_single = load_file(str(single / "checkpoints" / "step-00000004" / "net.safetensors"))
    for k in w_single:
        assert torch.allclose(w_ddp[k], w_single[k], atol=1e-5, rtol=0), k
    # rank 0 stored both ranks' RNG streams (seeded seed + rank), so each resumes its own
    state = torch.load(ddp / "checkpoints" / "step-00000004" / "state.pt", weights_only=True)
    assert isinstance(state["rng"], list) and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
