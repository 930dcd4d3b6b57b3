"""StyleGAN2 networks and losses: shapes, conditioning, truncation, style mixing, R1 and path
length against finite differences, the EMA and γ rules, and rebuilding from model_args."""

from __future__ import annotations

import math

import pytest
import torch

from cxr.engine.ema import WeightAverage, ema_beta
from cxr.errors import ConfigError
from gan.stylegan2.config import DiscriminatorConfig, GeneratorConfig, LossConfig, auto_ema_kimg, auto_gamma, preset
from gan.stylegan2.loss import (
    StyleGAN2Loss,
    d_logistic_loss,
    g_nonsaturating_loss,
    lazy_adam,
    path_length_penalty,
    path_lengths,
    r1_penalty,
)
from gan.stylegan2.networks import (
    Discriminator,
    Generator,
    build_from_model_args,
    minibatch_stddev,
    model_args,
    modulated_conv2d,
)

TINY = {"channel_base": 128, "channel_max": 16}


def _g(res: int = 32, c_dim: int = 0, **kw) -> Generator:
    return Generator(GeneratorConfig(resolution=res, c_dim=c_dim, z_dim=8, w_dim=8, mapping_layers=2, **TINY, **kw))


def _d(res: int = 32, c_dim: int = 0, **kw) -> Discriminator:
    return Discriminator(DiscriminatorConfig(resolution=res, c_dim=c_dim, **TINY, **kw))


def _onehot(labels: list[int], k: int) -> torch.Tensor:
    return torch.eye(k)[labels]


@pytest.mark.parametrize("res", [32, 64, 128, 256])
def test_shapes_at_every_resolution(res):
    torch.manual_seed(0)
    g, d = _g(res, c_dim=2), _d(res, c_dim=2)
    z, c = torch.randn(2, 8), _onehot([0, 1], 2)
    with torch.no_grad():
        img = g(z, c)
        logits = d(img, c)
    assert g.num_ws == 2 * int(math.log2(res)) - 2
    assert img.shape == (2, 1, res, res)
    assert logits.shape == (2, 1)
    assert torch.isfinite(img).all() and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="image has shape"):
        d(torch.zeros(2, 1, res // 2, res // 2), c)


@pytest.mark.parametrize("c_dim", [0, 3])
def test_every_parameter_gets_a_gradient_and_nothing_is_nan(c_dim):
    torch.manual_seed(0)
    g, d = _g(32, c_dim=c_dim), _d(32, c_dim=c_dim)
    c = _onehot([0, 2, 1, 0], 3) if c_dim else None
    loss = d(g(torch.randn(4, 8), c), c).square().mean()
    loss.backward()
    for net in (g, d):
        for name, p in net.named_parameters():
            assert p.grad is not None, f"{name} got no gradient"
            assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
            assert p.grad.abs().sum() > 0, f"{name} got an all-zero gradient"


def test_conditioning_changes_the_output_single_and_multi_label():
    torch.manual_seed(0)
    g, d = _g(32, c_dim=14), _d(32, c_dim=14)
    z = torch.randn(1, 8).expand(3, -1)
    c = torch.zeros(3, 14)
    c[0, 0] = 1  # one class
    c[1, 1] = 1
    c[2, [0, 5, 9]] = 1  # multi-hot, as NIH's 14 findings
    with torch.no_grad():
        img = g(z, c, noise_mode="const")
        for i, j in [(0, 1), (0, 2), (1, 2)]:
            assert (img[i] - img[j]).abs().max() > 1e-3
        same = img[:1].expand(3, -1, -1, -1)
        logits = d(same, c)
        assert logits.unique().numel() == 3
        # an all-zero row ("no finding") is a valid label, not a NaN
        assert torch.isfinite(g(z[:1], torch.zeros(1, 14))).all()
    with pytest.raises(ValueError, match="needs labels"):
        g(z, None)
    unconditional = _g(32)
    assert torch.equal(unconditional(z[:1], None, noise_mode="const"),
                       unconditional(z[:1], torch.ones(1, 0), noise_mode="const"))


def test_truncation_psi_zero_gives_one_image_for_any_z():
    torch.manual_seed(0)
    g = _g(32)
    with torch.no_grad():
        for _ in range(3):
            g.mapping(torch.randn(16, 8), None, update_w_avg=True)  # w_avg tracked away from 0
        assert g.mapping.w_avg.abs().sum() > 0
        z = torch.randn(4, 8)
        img = g(z, psi=0.0, noise_mode="const")
        assert torch.allclose(img, img[:1].expand_as(img), atol=1e-6)
        assert (g(z, psi=1.0, noise_mode="const")[0] - g(z, psi=1.0, noise_mode="const")[1]).abs().max() > 1e-3
        cut = g(z, psi=0.0, cutoff=4, noise_mode="const")  # coarse styles fixed, fine ones free
        assert (cut[0] - cut[1]).abs().max() > 1e-4
        half = g(z, psi=0.5, noise_mode="const")
        assert (half - img).abs().mean() < (g(z, noise_mode="const") - img).abs().mean()
    with pytest.raises(ValueError, match="psi"):
        g(z, psi=1.5)


def test_class_centre_truncation_keeps_the_class():
    torch.manual_seed(0)
    g = _g(32, c_dim=2)
    with torch.no_grad():
        centres = g.class_w_avg(torch.eye(2), n=64, generator=torch.Generator().manual_seed(1))
        assert centres.shape == (2, 8)
        z = torch.randn(4, 8)
        c = _onehot([0, 0, 1, 1], 2)
        img = g(z, c, psi=0.0, w_center=centres[[0, 0, 1, 1]], noise_mode="const")
    assert torch.allclose(img[0], img[1], atol=1e-6) and torch.allclose(img[2], img[3], atol=1e-6)
    assert (img[0] - img[2]).abs().max() > 1e-3


def test_w_avg_is_a_running_mean_of_w():
    torch.manual_seed(0)
    g = _g(32, w_avg_beta=0.75)
    z = torch.randn(8, 8)
    with torch.no_grad():
        w = g.mapping(z, None, update_w_avg=True)
    assert torch.allclose(g.mapping.w_avg, 0.25 * w.mean(0), atol=1e-6)  # 0.75·0 + 0.25·mean


def test_style_mixing_takes_over_from_a_cutoff():
    torch.manual_seed(0)
    g = _g(64)
    z = torch.randn(3, 8)
    with torch.no_grad():
        plain = g.sample_ws(z, None, mixing_prob=0.0)
        assert torch.equal(plain, plain[:, :1].expand_as(plain))
        mixed = g.sample_ws(z, None, mixing_prob=1.0, generator=torch.Generator().manual_seed(3))
    first = mixed[:, :1]
    k = int((mixed - first).abs().amax(dim=(0, 2)).gt(0).nonzero()[0])  # first style from z₂
    assert 1 <= k < g.num_ws
    assert torch.allclose(mixed[:, :k], plain[:, :k])
    assert torch.equal(mixed[:, k:], mixed[:, k:k + 1].expand(-1, g.num_ws - k, -1))
    assert not torch.allclose(mixed[:, k], plain[:, k])


def test_noise_modes():
    torch.manual_seed(0)
    g = _g(32)
    for name, p in g.named_parameters():
        if name.endswith("noise_strength"):
            p.data.fill_(0.5)
    z = torch.randn(2, 8)
    with torch.no_grad():
        assert not torch.equal(g(z), g(z))  # fresh noise every call
        assert torch.equal(g(z, noise_mode="const"), g(z, noise_mode="const"))
        assert torch.equal(g(z, noise_mode="none"), g(z, noise_mode="none"))
        assert not torch.equal(g(z, noise_mode="const"), g(z, noise_mode="none"))
    with pytest.raises(ValueError, match="noise_mode"):
        g(z, noise_mode="fixed")


def test_modulated_conv_is_per_sample_and_has_a_double_backward():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    s = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    out = modulated_conv2d(x, w, s, demodulate=True, padding=1)
    for n in range(2):  # the grouped form equals one ordinary convolution per sample
        wn = w * s[n].view(1, 3, 1, 1)
        wn = wn / wn.square().sum(dim=(1, 2, 3), keepdim=True).add(1e-8).sqrt()
        ref = torch.nn.functional.conv2d(x[n:n + 1], wn, padding=1)
        assert torch.allclose(out[n:n + 1], ref, atol=1e-10)
    for grouped in (True, False):
        fn = lambda x, w, s: modulated_conv2d(x, w, s, demodulate=True, padding=1, grouped=grouped)
        assert torch.autograd.gradcheck(fn, (x, w, s))
        assert torch.autograd.gradgradcheck(fn, (x, w, s))
    for demodulate in (True, False):  # the batched form gives the same numbers
        batched = modulated_conv2d(x, w, s, demodulate=demodulate, padding=1, grouped=False)
        assert torch.allclose(batched, modulated_conv2d(x, w, s, demodulate=demodulate, padding=1), atol=1e-10)


def test_batched_modconv_generator_equals_the_grouped_one():
    torch.manual_seed(0)
    grouped, batched = _g(64, c_dim=2).double(), _g(64, c_dim=2, modconv="batched").double()
    batched.load_state_dict(grouped.state_dict())
    z, c = torch.randn(2, 8, dtype=torch.float64), torch.eye(2, dtype=torch.float64)
    a, b = grouped(z, c, noise_mode="const"), batched(z, c, noise_mode="const")
    assert torch.allclose(a, b, atol=1e-10)
    a.square().sum().backward()
    b.square().sum().backward()
    for (name, p), q in zip(grouped.named_parameters(), batched.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-8, atol=1e-10), name


def test_minibatch_stddev_by_hand():
    x = torch.zeros(4, 2, 1, 1)
    x[:, 0, 0, 0] = torch.tensor([0.0, 1.0, 2.0, 5.0])  # groups of 2: samples (0, 2) and (1, 3)
    y = minibatch_stddev(x, group_size=2, num_channels=1)
    assert y.shape == (4, 3, 1, 1)
    # group (0, 2): std of channel 0 is 1, of channel 1 is 0 → mean 0.5; group (1, 3): (2 + 0)/2 = 1
    expected = torch.tensor([0.5, 1.0, 0.5, 1.0])
    assert torch.allclose(y[:, 2, 0, 0], expected, atol=1e-4)
    assert minibatch_stddev(torch.zeros(3, 2, 1, 1), 4, 1).shape == (3, 3, 1, 1)  # group shrinks to divide N


def _finite_difference(f, p: torch.Tensor, index: tuple[int, ...], eps: float = 1e-6) -> float:
    """Central difference of ``f()`` in one entry of ``p`` (f may take gradients itself)."""
    old = p[index].item()
    values = []
    for value in (old + eps, old - eps):
        p.data[index] = value
        values.append(f().item())
    p.data[index] = old
    return (values[0] - values[1]) / (2 * eps)


def test_r1_penalty_matches_finite_differences():
    torch.manual_seed(0)
    d = _d(32, c_dim=2).double()
    x = torch.randn(2, 1, 32, 32, dtype=torch.float64, requires_grad=True)
    c = _onehot([0, 1], 2).double()
    # the input gradient that R1 squares: compare with a central difference along a direction
    (grad,) = torch.autograd.grad(d(x, c).sum(), x)
    v = torch.randn_like(x)
    with torch.no_grad():
        eps = 1e-6
        fd = (d(x + eps * v, c).sum() - d(x - eps * v, c).sum()) / (2 * eps)
    assert torch.allclose((grad * v).sum(), fd, rtol=1e-6, atol=1e-9)
    # the penalty's gradient with respect to D's weights (the double backward D trains on)
    penalty = lambda: r1_penalty(d(x, c), x).sum()
    params = dict(d.named_parameters())
    penalty().backward()
    for name in ["fromrgb.weight", "blocks.0.conv0.weight", "blocks.1.skip.weight", "conv.weight",
                 "fc.weight", "out.weight", "embed.weight"]:
        p = params[name]
        for index in [tuple(0 for _ in p.shape), tuple(s - 1 for s in p.shape)]:
            fd = _finite_difference(penalty, p, index)
            assert math.isclose(p.grad[index].item(), fd, rel_tol=1e-5, abs_tol=1e-10), (name, index)


def test_r1_loss_phase_scales_by_gamma_and_interval():
    torch.manual_seed(0)
    g, d = _g(32), _d(32)
    loss = StyleGAN2Loss(g, d, LossConfig(r1_gamma=0.5, r1_interval=4), augment=lambda t: t.flip(-1))
    real = torch.randn(2, 1, 32, 32)
    value, stats = loss.d_reg(real, None)
    x = real.clone().requires_grad_(True)
    expected = r1_penalty(d(x.flip(-1), None), x).mean() * 0.25 * 4  # through the augmentation
    assert torch.allclose(value, expected)
    assert stats["loss/r1_penalty"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_path_length_regularization_matches_finite_differences():
    torch.manual_seed(0)
    g = _g(32).double()
    ws = g.truncate(g.mapping(torch.randn(2, 8, dtype=torch.float64), None)).detach().requires_grad_(True)

    def mean_length() -> torch.Tensor:
        img = g.synthesis(ws, noise_mode="const")
        return path_lengths(img, ws, generator=torch.Generator().manual_seed(5)).mean()

    mean_length().backward()
    params = dict(g.named_parameters())
    for name in ["synthesis.blocks.1.conv0.weight", "synthesis.blocks.2.conv1.affine.weight",
                 "synthesis.blocks.3.torgb.weight"]:
        p = params[name]
        index = tuple(0 for _ in p.shape)
        fd = _finite_difference(mean_length, p, index)
        assert math.isclose(p.grad[index].item(), fd, rel_tol=1e-5, abs_tol=1e-10), name
    lengths = torch.tensor([1.0, 3.0])
    penalty, new_mean = path_length_penalty(lengths, torch.tensor(0.0), decay=0.5)
    assert new_mean.item() == pytest.approx(1.0)  # 0 + 0.5·(2 − 0)
    assert penalty.item() == pytest.approx((0.0 + 4.0) / 2)


def test_loss_phases_run_and_train():
    torch.manual_seed(0)
    g, d = _g(32, c_dim=2), _d(32, c_dim=2)
    loss = StyleGAN2Loss(g, d, LossConfig(pl_weight=2.0), generator=torch.Generator().manual_seed(0))
    z, c, real = torch.randn(4, 8), _onehot([0, 1, 0, 1], 2), torch.randn(4, 1, 32, 32)
    for phase, args in [("g_main", (z, c)), ("g_reg", (z, c)), ("d_main", (real, c, z, c)), ("d_reg", (real, c))]:
        value, stats = getattr(loss, phase)(*args)
        assert value.ndim == 0 and torch.isfinite(value), phase
        value.backward()
        assert all(v.ndim == 0 and not v.requires_grad and torch.isfinite(v) for v in stats.values()), phase
    assert loss.state()["pl_mean"] > 0
    assert loss.real_logits.shape == (4, 1) and not loss.real_logits.requires_grad  # for ADA's r_t
    assert g.mapping.w_avg.abs().sum() > 0  # G's main phase tracks w_avg
    zero = torch.zeros(3, 1)
    assert g_nonsaturating_loss(zero).item() == pytest.approx(math.log(2))
    assert d_logistic_loss(zero, zero).item() == pytest.approx(2 * math.log(2))
    lr, betas = lazy_adam(0.0025, (0.0, 0.99), 16)
    assert lr == pytest.approx(0.0025 * 16 / 17) and betas == pytest.approx((0.0, 0.99 ** (16 / 17)))


def test_ema_beta_maths():
    assert ema_beta(16, 5.0, None, 0) == pytest.approx(0.5 ** (16 / 5000))
    assert ema_beta(16, 5.0, None, 0) ** (5000 / 16) == pytest.approx(0.5)  # half-life of 5 kimg
    assert ema_beta(16, 5.0, 0.05, 0) == 0.0  # no images yet: copy the weights
    assert ema_beta(16, 5.0, 0.05, 1000) == pytest.approx(0.5 ** (16 / 50))  # ramp-up: 0.05 · 1000 images
    assert ema_beta(16, 5.0, 0.05, 10**7) == ema_beta(16, 5.0, None, 0)  # past the ramp
    with pytest.raises(ValueError):
        ema_beta(0, 5.0, None, 0)
    net = torch.nn.Linear(2, 1)
    avg = WeightAverage(net, decay=0.5)
    avg.update(net, decay=0.0)
    w0 = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(4.0)
    avg.update(net, decay=0.75)
    assert torch.allclose(avg.module.weight, w0 + 1.0)  # 0.75·w0 + 0.25·(w0 + 4)
    assert avg.state()["updates"] == 2
    with pytest.raises(ValueError):
        avg.update(net, decay=1.0)


def test_gamma_auto_rule_and_presets():
    assert auto_gamma(256, 16) == pytest.approx(0.8192)
    assert auto_gamma(64, 32) == pytest.approx(0.0256)
    assert auto_ema_kimg(16) == 5.0
    auto = preset("auto", 256, 16, c_dim=2)
    assert auto.generator.mapping_layers == 2 and auto.loss.r1_gamma == pytest.approx(0.8192)
    assert auto.ema_kimg == 5.0 and auto.generator.channel_base == 16384 and auto.loss.pl_weight == 0
    assert auto.discriminator.c_dim == 2 and auto.discriminator.mbstd_group_size == 4
    full = preset("stylegan2", 1024, 32)
    assert full.generator.mapping_layers == 8 and full.loss.pl_weight == 2.0 and full.loss.r1_gamma == 10.0
    with pytest.raises(ConfigError, match="unknown StyleGAN2 preset"):
        preset("stylegan3", 256, 16)


def test_config_f_generator_has_the_papers_parameter_count():
    with torch.device("meta"):  # shapes only, no memory
        g = Generator(GeneratorConfig(resolution=1024, img_channels=3))
    assert sum(p.numel() for p in g.parameters()) == 30_370_060  # NVlabs' FFHQ 1024² config F


def test_model_args_round_trip_and_bad_configs():
    torch.manual_seed(0)
    g, d = _g(64, c_dim=2), _d(64, c_dim=2, mbstd_num_channels=2)
    for net in (g, d):
        args = model_args(net)
        assert args["name"] == "stylegan2"
        again = build_from_model_args(args)
        assert type(again) is type(net) and again.config == net.config
        again.load_state_dict(net.state_dict())
    rebuilt = build_from_model_args(model_args(g))
    rebuilt.load_state_dict(g.state_dict())
    z, c = torch.randn(2, 8), torch.eye(2)
    with torch.no_grad():
        assert torch.equal(rebuilt(z, c, noise_mode="const"), g(z, c, noise_mode="const"))
    with pytest.raises(ConfigError, match="not a StyleGAN2 one"):
        build_from_model_args({"kind": "generator", "name": "resnet9", "config": {}})
    with pytest.raises(ConfigError, match="no option 'ngf'"):
        build_from_model_args({"kind": "generator", "name": "stylegan2", "config": {"ngf": 4}})
    with pytest.raises(ConfigError, match="modconv must be one of"):
        GeneratorConfig(modconv="fused")
    with pytest.raises(ConfigError, match="power of two in 32–1024"):
        GeneratorConfig(resolution=48)
    with pytest.raises(ConfigError, match="must divide"):
        DiscriminatorConfig(resolution=32, channel_base=128, channel_max=16, mbstd_num_channels=3)
