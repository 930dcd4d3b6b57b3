"""Networks, GAN losses, image pool and the CycleGAN objective."""

from __future__ import annotations

import math

import pytest
import torch

from cxr.errors import ConfigError
from gan.cyclegan.loss import CycleGANLoss, CycleGenerators, PairedDiscriminators, contrast_structure
from gan.image_pool import ImagePool
from gan.losses import GANLoss
from gan.networks import build_from_model_args, create_discriminator, create_generator, model_args, names
from gan.networks.patchgan import output_size, receptive_field
from gan.networks.unet import depth_for_size


def _check_backward(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = net(x)
    (y.float() ** 2).mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
    assert torch.isfinite(y).all()
    return y


@pytest.mark.parametrize("name", names("generator"))
@pytest.mark.parametrize("size", [32, 64])
def test_every_generator_forward_backward(name, size):
    torch.manual_seed(0)
    g = create_generator(name, image_size=size, ngf=4)
    x = torch.rand(2, 1, size, size) * 2 - 1
    y = _check_backward(g, x)
    assert y.shape == (2, 1, size, size)
    assert y.min() >= -1 and y.max() <= 1  # tanh output range


@pytest.mark.parametrize("name", names("discriminator"))
@pytest.mark.parametrize("n_layers", [1, 2, 3])
def test_every_discriminator_forward_backward(name, n_layers):
    d = create_discriminator(name, ndf=4, n_layers=n_layers)
    y = _check_backward(d, torch.randn(2, 1, 64, 64))
    side = output_size(64, n_layers)
    assert y.shape == (2, 1, side, side)


@pytest.mark.parametrize("name", names("generator"))
def test_residual_generator_starts_as_identity_then_learns_a_change(name):
    torch.manual_seed(0)
    g = create_generator(name, image_size=32, ngf=4, residual=True)
    x = torch.nn.functional.interpolate(torch.rand(2, 1, 4, 4), size=32, mode="bilinear") * 2 - 1
    assert torch.equal(g(x), x)  # zero-initialised last layer: the untranslated image
    assert not any(isinstance(m, torch.nn.Tanh) for m in g.modules())
    opt = torch.optim.Adam(g.parameters(), lr=2e-4)
    target = (x * 0.5).clamp(-1, 1)  # a gray-level change to learn
    before = (g(x) - target).abs().mean().item()
    for _ in range(5):
        opt.zero_grad()
        loss = (g(x) - target).abs().mean()
        loss.backward()
        opt.step()
    y = g(x)
    assert not torch.equal(y, x) and (y - target).abs().mean().item() < before
    # Not clamped: every pixel keeps a gradient, also where the output leaves the image range.
    z = x.clone().requires_grad_(True)
    (g(z) + 5.0).sum().backward()
    assert (z.grad != 0).all()
    # Nothing follows the last layer: a bias on it shifts the whole output (a normalization
    # there would take the mean back out, and the generator could never change brightness).
    fresh = create_generator(name, image_size=32, ngf=4, residual=True)
    last = [m for m in fresh.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))][-1]
    with torch.no_grad():
        last.bias.fill_(0.1)
    assert torch.allclose(fresh(x), x + 0.1, atol=1e-6)
    # The option is part of the network's description, so a checkpoint rebuilds it.
    rebuilt = build_from_model_args(model_args(g))
    assert rebuilt.config.residual
    with pytest.raises(ConfigError, match="in_channels == out_channels"):
        create_generator(name, image_size=32, ngf=4, residual=True, out_channels=2)


def test_unet_bilinear_upsampling_replaces_transposed_convolutions():
    torch.manual_seed(0)
    g = create_generator("unet256", image_size=32, ngf=4, upsample="bilinear", residual=True)
    assert not any(isinstance(m, torch.nn.ConvTranspose2d) for m in g.modules())
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    assert torch.equal(g(x), x)  # still the identity at start: its last convolution is zeroed
    y = _check_backward(create_generator("unet256", image_size=32, ngf=4, upsample="bilinear"), x)
    assert y.shape == x.shape
    with pytest.raises(ConfigError, match="upsample must be one of"):
        create_generator("unet256", image_size=32, ngf=4, upsample="nearest")
    with pytest.raises(ConfigError, match="no option 'upsample'"):
        create_generator("resnet6", ngf=4, upsample="bilinear")


def test_registries_hold_the_paper_networks():
    assert {"resnet6", "resnet9", "unet256"} <= set(names("generator"))
    assert "patchgan" in names("discriminator")
    assert receptive_field(3) == 70  # the 70x70 PatchGAN
    assert output_size(256, 3) == 30
    g6, g9 = create_generator("resnet6", ngf=4), create_generator("resnet9", ngf=4)
    assert g6.config.n_blocks == 6 and g9.config.n_blocks == 9
    assert g6.config.in_channels == 1 and g6.config.out_channels == 1  # native grayscale
    assert type(g6.net[1]).__name__ == "InstanceNorm2d"


def test_unet_depth_follows_size():
    assert depth_for_size(256) == 8 and depth_for_size(64) == 6 and depth_for_size(512) == 9
    assert create_generator("unet256", ngf=4).config.num_downs == 8  # the paper's U-Net-256
    assert create_generator("unet256", image_size=64, ngf=4).config.num_downs == 6
    # An explicit setting wins over the size rule.
    assert create_generator("unet256", image_size=64, ngf=4, num_downs=4).config.num_downs == 4


def test_resnet9_parameter_count_matches_the_paper_network():
    # The CycleGAN ResNet-9 with 64 filters has 11,378,179 parameters at 3 channels; one
    # channel in and out removes two 7x7x64 kernels from each end conv, and two output biases.
    n = sum(p.numel() for p in create_generator("resnet9").parameters())
    assert n == 11_378_179 - 2 * 2 * 7 * 7 * 64 - 2  # and two output biases


@pytest.mark.parametrize("name", names("generator") + names("discriminator"))
def test_model_args_rebuild_the_same_network(name):
    kind = "generator" if name in names("generator") else "discriminator"
    make = create_generator if kind == "generator" else create_discriminator
    net = make(name, image_size=32, **({"ngf": 4} if kind == "generator" else {"ndf": 4})).eval()
    args = model_args(net)
    assert args["kind"] == kind and args["name"] == name
    rebuilt = build_from_model_args(args).eval()
    rebuilt.load_state_dict(net.state_dict())
    x = torch.rand(1, 1, 32, 32)
    assert torch.equal(net(x), rebuilt(x))


def test_shape_checks_and_bad_options():
    g = create_generator("resnet6", ngf=4)
    with pytest.raises(ValueError, match=r"shape \(1, 3, 32, 32\), expected \(\*, 1, \*, \*\)"):
        g(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="divisible by 4"):
        g(torch.zeros(1, 1, 30, 32))
    with pytest.raises(ValueError, match="divisible by 32"):
        create_generator("unet256", image_size=32, ngf=4)(torch.zeros(1, 1, 48, 48))
    with pytest.raises(ValueError, match="needs a larger input"):
        create_discriminator("patchgan", ndf=4)(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ConfigError, match="unknown generator 'resnet7'"):
        create_generator("resnet7")
    with pytest.raises(ConfigError, match="no option 'nblocks'"):
        create_generator("resnet9", nblocks=3)
    with pytest.raises(ConfigError, match="norm must be one of"):
        create_generator("resnet9", norm="group")
    with pytest.raises(ConfigError, match="not a network description"):
        build_from_model_args({"name": "resnet9"})


def test_gan_losses_numbers():
    s = torch.tensor([[0.5, -0.5]])
    ls, va, hi = GANLoss("lsgan"), GANLoss("vanilla"), GANLoss("hinge")
    assert ls(s, True).item() == pytest.approx((0.25 + 2.25) / 2)
    assert ls(s, False).item() == pytest.approx(0.25)
    assert va(torch.zeros(3), True).item() == pytest.approx(math.log(2))
    assert va(torch.tensor([10.0]), True).item() == pytest.approx(math.log1p(math.exp(-10)), rel=1e-4)
    assert hi(s, True).item() == pytest.approx((0.5 + 1.5) / 2)  # relu(1 - s)
    assert hi(s, False).item() == pytest.approx((1.5 + 0.5) / 2)  # relu(1 + s)
    assert hi(torch.tensor([3.0, 1.0]), True).item() == 0.0
    assert hi(s, True, for_discriminator=False).item() == pytest.approx(0.0)  # -mean(s)
    with pytest.raises(ValueError, match="gan mode"):
        GANLoss("wgan")


def test_image_pool_fills_then_swaps_with_seeded_generator():
    pool = ImagePool(3)
    g = torch.Generator().manual_seed(0)
    first = torch.arange(3.0).view(3, 1, 1, 1)
    assert torch.equal(pool.query(first, g), first)  # filling: everything passes through
    assert len(pool) == 3
    seen_old = seen_new = 0
    for k in range(40):
        new = torch.full((1, 1, 1, 1), 100.0 + k)
        out = pool.query(new, g)
        if out.item() == 100.0 + k:
            seen_new += 1
        else:
            seen_old += 1
            assert out.item() < 100.0 + k  # an earlier image came back
            assert (torch.stack(pool.images) == 100.0 + k).any()  # and the new one took its place
    assert seen_old > 5 and seen_new > 5  # about half each
    assert len(pool) == 3
    assert torch.equal(ImagePool(0).query(first, g), first)


def test_image_pool_state_round_trip_continues_identically():
    def run(pool, g, start, n):
        return [pool.query(torch.full((2, 1, 2, 2), float(i)), g).clone() for i in range(start, start + n)]

    p1, g1 = ImagePool(4), torch.Generator().manual_seed(5)
    run(p1, g1, 0, 6)
    state, rng = p1.state_dict(), g1.get_state()
    straight = run(p1, g1, 6, 8)
    p2, g2 = ImagePool(4), torch.Generator()
    p2.load_state_dict(state)
    g2.set_state(rng)
    assert all(torch.equal(a, b) for a, b in zip(straight, run(p2, g2, 6, 8)))
    with pytest.raises(ValueError, match="size 4"):
        ImagePool(5).load_state_dict(state)


def _tiny_cyclegan() -> tuple[CycleGenerators, PairedDiscriminators, torch.Tensor, torch.Tensor]:
    """Seeded tiny generators and discriminators, and one random batch per domain."""
    torch.manual_seed(0)
    g = CycleGenerators(create_generator("resnet6", ngf=4), create_generator("resnet6", ngf=4))
    d = PairedDiscriminators(create_discriminator("patchgan", ndf=4, n_layers=2),
                             create_discriminator("patchgan", ndf=4, n_layers=2))
    a, b = torch.rand(2, 1, 32, 32) * 2 - 1, torch.rand(2, 1, 32, 32) * 2 - 1
    return g, d, a, b


def test_cyclegan_loss_terms_and_weights():
    g, d, a, b = _tiny_cyclegan()
    loss = CycleGANLoss("lsgan", lambda_cycle=10.0, lambda_identity=0.5)
    out = g(a, b, identity=True)
    assert set(out) == {"fake_a", "fake_b", "rec_a", "rec_b", "idt_a", "idt_b"}
    parts = loss.generator(a, b, out, d)
    expected = (parts["adv_ab"] + parts["adv_ba"] + 10 * (parts["cycle_a"] + parts["cycle_b"])
                + 5 * (parts["idt_a"] + parts["idt_b"]))
    assert parts["loss_G"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert parts["cycle_a"].item() == pytest.approx((out["rec_a"] - a).abs().mean().item(), rel=1e-6)
    no_idt = CycleGANLoss("lsgan", 10.0, 0.0)
    assert "idt_a" not in no_idt.generator(a, b, g(a, b, identity=False), d)
    dl = loss.discriminator(a, b, out["fake_a"], out["fake_b"], d)
    sa = d.d_a(a)
    real_part = ((sa - 1) ** 2).mean()
    fake_part = (d.d_a(out["fake_a"].detach()) ** 2).mean()
    assert dl["loss_D_a"].item() == pytest.approx(0.5 * (real_part + fake_part).item(), rel=1e-5)
    assert dl["loss_D"].item() == pytest.approx((dl["loss_D_a"] + dl["loss_D_b"]).item(), rel=1e-6)


def test_contrast_structure_sees_structure_not_gray_levels():
    torch.manual_seed(0)
    x = torch.nn.functional.interpolate(torch.rand(2, 1, 8, 8), size=32, mode="bilinear") * 1.6 - 0.8
    x = x + 0.1 * torch.randn_like(x)  # texture everywhere
    assert torch.allclose(contrast_structure(x, x), torch.ones_like(x), atol=1e-4)
    # A brighter copy keeps its structure; a milder-contrast one nearly so ...
    assert contrast_structure(x, x + 0.3).mean().item() > 0.999
    assert contrast_structure(x, 0.7 * x).mean().item() > 0.9
    # ... an inverted copy has the opposite structure, unrelated texture little in common, and a
    # textured region flattened into a uniform one is charged for (the correlation alone is not).
    assert contrast_structure(x, -x).mean().item() < -0.85  # not -1: C2 weighs in where texture is faint
    assert abs(contrast_structure(x, torch.rand_like(x) * 2 - 1).mean().item()) < 0.2
    assert contrast_structure(x, torch.full_like(x, 0.9)).mean().item() < 0.3


def test_contrast_structure_stays_fp32_under_bf16_autocast():
    # The trainer runs the loss inside bf16 autocast (GPU by default, CPU with train.amp=bf16).
    # Local variances are E[x²] − E[x]² of nearly equal window means; blurred in bf16 they came
    # out wrong by up to 0.014 here, and a paired run trained that way lost 0.06 SSIM.
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 64, 64, generator=g) * 2 - 1
    y = (x + 0.05 * torch.randn(2, 1, 64, 64, generator=g)).clamp(-1, 1)
    ref = contrast_structure(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = contrast_structure(x, y)
    assert got.dtype == torch.float32
    assert torch.allclose(got, ref, atol=1e-6)


def test_structure_term_joins_the_generator_loss_with_its_weight():
    g, d, a, b = _tiny_cyclegan()
    out = g(a, b, identity=True)
    plain = CycleGANLoss("lsgan", 10.0, 0.5).generator(a, b, out, d)
    assert "struct_ab" not in plain
    parts = CycleGANLoss("lsgan", 10.0, 0.5, lambda_structure=3.0).generator(a, b, out, d)
    assert parts["struct_ab"].item() == pytest.approx(1 - contrast_structure(a, out["fake_b"]).mean().item(), rel=1e-5)
    assert 0.0 < parts["struct_ba"].item() < 2.0
    extra = 3.0 * (parts["struct_ab"] + parts["struct_ba"])
    assert parts["loss_G"].item() == pytest.approx((plain["loss_G"] + extra).item(), rel=1e-5)
    with pytest.raises(ConfigError, match="lambda_structure"):
        from cxr.engine.config import load_config
        from gan.cyclegan.config import CycleGANConfig
        load_config(CycleGANConfig, None, ["loss.lambda_structure=-1"])


@pytest.mark.parametrize("kind", ["generator", "discriminator"])
def test_activations_after_norms_are_out_of_place_and_change_nothing(kind):
    """Out-of-place activations (no autograd CopySlices after instance norm's view): the same numbers, bit for bit."""
    import copy

    torch.manual_seed(0)
    net = create_generator("resnet6", ngf=8) if kind == "generator" else create_discriminator("patchgan", ndf=8)
    acts = [m for m in net.modules() if isinstance(m, (torch.nn.ReLU, torch.nn.LeakyReLU))]
    assert acts and sum(not m.inplace for m in acts) >= len(acts) - 1  # PatchGAN's first one has no norm before it
    twin = copy.deepcopy(net)
    for m in twin.modules():
        if isinstance(m, (torch.nn.ReLU, torch.nn.LeakyReLU)):
            m.inplace = True
    x = torch.rand(2, 1, 32, 32) * 2 - 1 if kind == "generator" else torch.rand(2, 1, 64, 64)
    y, y_twin = net(x), twin(x)
    y.square().sum().backward()
    y_twin.square().sum().backward()
    assert torch.equal(y, y_twin)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(net.parameters(), twin.parameters()))
