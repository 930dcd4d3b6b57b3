"""Speed helpers' decisions that depend on the GPU, checked on a CPU by standing in for the
CUDA queries (the GPU tests run them for real)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from cxr.engine import speed
from cxr.errors import ConfigError

pytestmark = pytest.mark.filterwarnings("ignore:CUDA is not available")


def _gpu(monkeypatch, major: int, emulates: bool = True) -> None:
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (major, 0))
    monkeypatch.setattr(torch.cuda, "device", lambda dev: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: major >= 8 or (including_emulation and emulates))


def test_auto_uses_bf16_only_where_the_gpu_has_it_in_hardware(monkeypatch):
    _gpu(monkeypatch, major=7)  # V100 / T4: torch can emulate bf16, slower than fp32
    assert not speed.native_bf16(torch.device("cuda"))
    assert isinstance(speed.autocast_context("cuda", "auto"), contextlib.nullcontext)
    explicit = speed.autocast_context("cuda:0", "bf16")  # asked for: emulated, but allowed
    assert isinstance(explicit, torch.autocast) and explicit.fast_dtype == torch.bfloat16
    _gpu(monkeypatch, major=8)  # A100 and later
    assert speed.native_bf16(torch.device("cuda:0"))
    auto = speed.autocast_context("cuda", "auto")
    assert isinstance(auto, torch.autocast) and auto.fast_dtype == torch.bfloat16


def test_explicit_bf16_on_a_gpu_without_it_is_one_clear_error(monkeypatch):
    _gpu(monkeypatch, major=6, emulates=False)
    with pytest.raises(ConfigError, match="bf16 is not supported by this GPU; use amp=off"):
        speed.autocast_context("cuda", "bf16")
    assert isinstance(speed.autocast_context("cuda", "auto"), contextlib.nullcontext)


def test_cpu_autocast_only_when_asked():
    assert isinstance(speed.autocast_context("cpu", "auto"), contextlib.nullcontext)
    assert isinstance(speed.autocast_context("cpu", "bf16"), torch.autocast)
    with pytest.raises(ConfigError, match="train.amp"):
        speed.autocast_context("cpu", "fp16")


def test_cudagraphs_under_ddp_get_a_warning_line():
    note = speed.cudagraphs_ddp_warning(True, 2)
    assert note is not None and "train.compile_mode=default" in note and "\n" not in note
    assert speed.cudagraphs_ddp_warning(True, 1) is None  # one GPU: graphs as tested
    assert speed.cudagraphs_ddp_warning(False, 4) is None  # DDP without graphs
    assert speed.uses_cudagraphs(True, "reduce-overhead", "cuda") and not speed.uses_cudagraphs(True, "default", "cuda")
    assert not speed.uses_cudagraphs(True, "reduce-overhead", "cpu")


def test_to_device_async_on_the_host_is_the_plain_copy():
    idx = torch.tensor([3, 1, 2])
    out = speed.to_device_async(idx, "cpu")
    assert torch.equal(out, idx) and out.device.type == "cpu"
