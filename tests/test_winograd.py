"""Winograd F(4, 3) convolutions: the same linear map as ``F.conv2d``, forward and backward."""

from __future__ import annotations

import typing

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmark_scripts import load_benchmark
from cxr.engine.config import load_config
from cxr.errors import ConfigError
from gan.cyclegan.config import CycleGANConfig, ModelConfig
from gan.cyclegan.trainer import build_networks
from gan.networks import build_from_model_args, create_generator, model_args
from gan.networks.winograd import WINOGRAD_MODES, WinogradConv2d, use_winograd, winograd_conv3x3, winograd_matrices


def test_matrices_are_lavin_and_grays_f43():
    b, g, a = winograd_matrices(torch.float64)
    assert (b.shape, g.shape, a.shape) == ((36, 36), (36, 9), (16, 36))
    # A (G w ⊙ B d) is the 4×4 valid correlation of one 6×6 tile with one 3×3 kernel
    gen = torch.Generator().manual_seed(0)
    d, w = torch.randn(6, 6, generator=gen, dtype=torch.float64), torch.randn(3, 3, generator=gen, dtype=torch.float64)
    y = (a @ ((g @ w.reshape(9)) * (b @ d.reshape(36)))).view(4, 4)
    torch.testing.assert_close(y, F.conv2d(d[None, None], w[None, None])[0, 0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("n,ci,co,h,w", [(1, 3, 5, 4, 8), (2, 6, 4, 12, 8), (3, 1, 2, 8, 4)])
def test_equals_conv2d_in_float64_forward_and_backward(n, ci, co, h, w):
    gen = torch.Generator().manual_seed(n * 100 + ci)
    xp = torch.randn(n, ci, h + 2, w + 2, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(co, ci, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(co, generator=gen, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(n, co, h, w, generator=gen, dtype=torch.float64)
    ours = winograd_conv3x3(xp, weight, bias)
    grads = torch.autograd.grad(ours, (xp, weight, bias), dy)
    ref = F.conv2d(xp, weight, bias)
    ref_grads = torch.autograd.grad(ref, (xp, weight, bias), dy)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-10)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-9)


def test_gradcheck_and_no_bias():
    gen = torch.Generator().manual_seed(1)
    xp = torch.randn(1, 2, 6, 10, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 2, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(winograd_conv3x3, (xp, weight, None))
    torch.testing.assert_close(winograd_conv3x3(xp, weight), F.conv2d(xp, weight), rtol=0, atol=1e-10)


def test_float32_agrees_with_conv2d_at_working_width():
    gen = torch.Generator().manual_seed(2)
    xp = torch.randn(1, 128, 18, 18, generator=gen)
    weight = torch.randn(128, 128, 3, 3, generator=gen) * 0.05
    ours, ref = winograd_conv3x3(xp, weight), F.conv2d(xp, weight)
    assert (ours - ref).abs().max().item() < 1e-4 * ref.abs().max().item()


def test_refuses_what_it_cannot_compute():
    with pytest.raises(ValueError, match="multiples of 4"):
        winograd_conv3x3(torch.zeros(1, 2, 8, 9), torch.zeros(2, 2, 3, 3))
    with pytest.raises(ValueError, match="3, 3"):
        winograd_conv3x3(torch.zeros(1, 2, 6, 6), torch.zeros(2, 2, 5, 5))
    with pytest.raises(ValueError, match="winograd must be one of"):
        WinogradConv2d(4, 4, winograd="fast")


def test_auto_uses_it_only_where_it_pays():
    big = torch.zeros(1, 256, 64, 64)
    assert use_winograd("auto", big, 256)
    assert not use_winograd("auto", big, 64)  # too few channels
    assert use_winograd("auto", big, 128) and not use_winograd("auto", torch.zeros(1, 128, 32, 32), 128)
    assert use_winograd("auto", torch.zeros(1, 256, 32, 32), 256)
    assert not use_winograd("auto", torch.zeros(1, 256, 16, 16), 256)  # maps too small
    assert not use_winograd("auto", big.double(), 256)
    assert not use_winograd("auto", torch.zeros(1, 256, 64, 66), 256)  # not tiled by 4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not use_winograd("auto", big, 256)
    assert use_winograd("on", torch.zeros(1, 4, 8, 8), 4)
    assert not use_winograd("off", big, 256)


@pytest.mark.parametrize("padding_mode", ["reflect", "zeros"])
def test_layer_matches_nn_conv2d_and_shares_its_state_dict(padding_mode):
    torch.manual_seed(0)
    ours = WinogradConv2d(8, 6, padding_mode=padding_mode, winograd="on")
    ref = nn.Conv2d(8, 6, 3, padding=1, padding_mode=padding_mode)
    ref.load_state_dict(ours.state_dict())
    assert ours.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(2, 8, 12, 16, requires_grad=True)
    y, y_ref = ours(x), ref(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    gx, gw, gb = torch.autograd.grad(y.square().sum(), (x, ours.weight, ours.bias))
    gx_ref, gw_ref, gb_ref = torch.autograd.grad(y_ref.square().sum(), (x, ref.weight, ref.bias))
    torch.testing.assert_close(gx, gx_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(gb, gb_ref, rtol=1e-4, atol=1e-3)
    # sides not tiled by 4: the direct kernel, exactly
    odd = torch.randn(1, 8, 10, 7)
    torch.testing.assert_close(ours(odd), ref(odd), rtol=0, atol=0)


def test_resnet_generator_option_round_trips_and_changes_only_the_arithmetic():
    torch.manual_seed(0)
    on = create_generator("resnet6", ngf=8, winograd="on")
    off = create_generator("resnet6", ngf=8, winograd="off")
    off.load_state_dict(on.state_dict())
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    torch.testing.assert_close(on(x), off(x), rtol=1e-4, atol=1e-5)
    assert sum(isinstance(m, WinogradConv2d) for m in on.modules()) == 12  # 6 blocks × 2 convs
    args = model_args(on)
    assert args["config"]["winograd"] == "on"
    assert build_from_model_args(args).config.winograd == "on"
    with pytest.raises(ConfigError, match="winograd"):
        create_generator("resnet6", winograd="sometimes")


def test_cyclegan_config_carries_the_option_to_both_generators():
    cfg = load_config(CycleGANConfig, None, ["model.generator=resnet6", "model.ngf=8", "model.winograd=off"])
    gens, _ = build_networks(cfg)
    assert {m.winograd for m in gens.modules() if isinstance(m, WinogradConv2d)} == {"off"}
    default = build_networks(load_config(CycleGANConfig, None, ["model.generator=resnet6", "model.ngf=8"]))[0]
    assert {m.winograd for m in default.modules() if isinstance(m, WinogradConv2d)} == {"auto"}
    with pytest.raises(ConfigError):
        load_config(CycleGANConfig, None, ["model.winograd=fast"])
    # the config's choices (kept torch-free) are the layer's
    assert typing.get_args(typing.get_type_hints(ModelConfig)["winograd"]) == WINOGRAD_MODES


def test_layer_benchmark_prints_one_row_per_shape(capsys):
    bench = load_benchmark("bench_winograd")
    assert bench.main(["--sides", "4", "8", "--channels", "4", "--repeats", "1", "--warmup", "0", "--threads", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 4 |")]
    assert [r.split("|")[2].strip() for r in rows] == ["4²", "8²"]
    assert all(r.rstrip(" |").endswith("no") for r in rows)  # 4 channels: auto keeps the direct kernel
    assert all(float(r.split("|")[3]) > 0 and float(r.split("|")[4]) > 0 for r in rows)
    assert bench.main(["--sides", "6"]) == 2
