"""What the discriminators see: only the centre of each image (``loss.d_field``) and randomly
re-framed images (``loss.d_augment``); and their own normalization (``model.d_norm``)."""

from __future__ import annotations

import pytest
import torch

from cxr.engine.config import load_config
from cxr.errors import ConfigError
from gan.cyclegan.config import CycleGANConfig
from gan.cyclegan.loss import PairedDiscriminators, centre_crop, random_framing
from gan.cyclegan.trainer import build_networks
from gan.networks import create_discriminator


def test_centre_crop_keeps_the_middle():
    x = torch.arange(2 * 1 * 8 * 10, dtype=torch.float32).reshape(2, 1, 8, 10)
    assert centre_crop(x, 1.0) is x
    c = centre_crop(x, 0.5)
    assert c.shape == (2, 1, 4, 5) and torch.equal(c, x[..., 2:6, 2:7])


def test_borders_outside_the_field_do_not_reach_the_discriminators():
    torch.manual_seed(0)
    d = PairedDiscriminators(create_discriminator("patchgan", 32, ndf=8, n_layers=1),
                             create_discriminator("patchgan", 32, ndf=8, n_layers=1), field=0.5)
    x = torch.rand(2, 1, 32, 32)
    marked = x.clone()
    marked[..., :6, :] = 1.0  # a bright collimation blade along the top
    marked[..., 26:, 26:] = 0.0  # and a marker in a corner
    a0, b0 = d(x, x)
    a1, b1 = d(marked, marked)
    assert torch.equal(a0, a1) and torch.equal(b0, b1)
    full = PairedDiscriminators(d.d_a, d.d_b)  # field 1: the same change is seen
    assert not torch.equal(full(x, x)[0], full(marked, marked)[0])


@pytest.mark.parametrize("value", ["0", "1.5"])
def test_field_out_of_range_is_a_config_error(value):
    with pytest.raises(ConfigError, match="d_field"):
        load_config(CycleGANConfig, None, [f"loss.d_field={value}"])


def test_random_framing_moves_and_zooms_each_image_reproducibly():
    x = torch.zeros(3, 1, 32, 32)
    x[:, :, 14:18, 14:18] = 1.0  # a bright square in the middle
    assert torch.allclose(random_framing(x, 0.0, torch.Generator().manual_seed(0)), x, atol=1e-6)
    y1 = random_framing(x, 0.2, torch.Generator().manual_seed(1))
    y2 = random_framing(x, 0.2, torch.Generator().manual_seed(1))
    assert torch.equal(y1, y2)  # the caller's generator decides everything
    centres = []
    for img in y1[:, 0]:
        rows, cols = torch.nonzero(img > 0.5, as_tuple=True)
        centres.append((rows.float().mean().item(), cols.float().mean().item()))
    assert len({(round(r), round(c)) for r, c in centres}) == 3  # each image framed on its own
    assert all(abs(r - 15.5) <= 0.2 * 32 + 1 and abs(c - 15.5) <= 0.2 * 32 + 1 for r, c in centres)
    # Differentiable in the image: a translator gets gradients through it.
    z = x.clone().requires_grad_(True)
    random_framing(z, 0.2, torch.Generator().manual_seed(2)).sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_augmented_discriminators_need_a_generator_and_vary_with_it():
    torch.manual_seed(0)
    d = PairedDiscriminators(create_discriminator("patchgan", 32, ndf=8, n_layers=1),
                             create_discriminator("patchgan", 32, ndf=8, n_layers=1), augment=0.2)
    x = torch.rand(2, 1, 32, 32)
    with pytest.raises(ValueError, match="needs a torch.Generator"):
        d(x, x)
    a1, _ = d(x, x, generator=torch.Generator().manual_seed(0))
    a2, _ = d(x, x, generator=torch.Generator().manual_seed(0))
    a3, _ = d(x, x, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a1, a2) and not torch.equal(a1, a3)
    with pytest.raises(ValueError, match="augmentation strength"):
        PairedDiscriminators(d.d_a, d.d_b, augment=0.5)


@pytest.mark.parametrize("value", ["-0.1", "0.5"])
def test_d_augment_out_of_range_is_a_config_error(value):
    with pytest.raises(ConfigError, match="d_augment"):
        load_config(CycleGANConfig, None, [f"loss.d_augment={value}"])


def test_discriminator_norm_can_differ_from_the_generators():
    cfg = load_config(CycleGANConfig, None, ["model.d_norm=none", "model.ngf=4", "model.ndf=4", "data.size=32"])
    g, d = build_networks(cfg)
    assert g.g_ab.config.norm == "instance" and d.d_a.config.norm == "none" and d.d_b.config.norm == "none"
    assert not any(isinstance(m, torch.nn.InstanceNorm2d) for m in d.modules())
    same = build_networks(load_config(CycleGANConfig, None, ["model.ngf=4", "model.ndf=4", "data.size=32"]))[1]
    assert same.d_a.config.norm == "instance"


def test_border_tie_charges_only_changes_outside_the_field():
    from gan.cyclegan.loss import CycleGANLoss, border_mask

    m = border_mask(8, 10, 0.5)
    assert m.shape == (1, 1, 8, 10) and m.sum().item() == 80 - 4 * 5
    assert m[..., 2:6, 2:7].sum().item() == 0  # the same box centre_crop keeps
    torch.manual_seed(0)
    d = PairedDiscriminators(create_discriminator("patchgan", 16, ndf=4, n_layers=1),
                             create_discriminator("patchgan", 16, ndf=4, n_layers=1), field=0.5)
    a, b = torch.rand(1, 1, 16, 16) * 2 - 1, torch.rand(1, 1, 16, 16) * 2 - 1
    inside = a.clone()
    inside[..., 4:12, 4:12] += 0.5  # a translation that changes only the judged centre
    out = {"fake_b": inside, "fake_a": b.clone(), "rec_a": a, "rec_b": b, "idt_a": a, "idt_b": b}
    loss = CycleGANLoss("lsgan", 10.0, 0.5, lambda_border=10.0, field=0.5)
    parts = loss.generator(a, b, out, d)
    assert parts["border_ab"].item() == 0.0 and parts["border_ba"].item() == 0.0
    outside = inside.clone()
    outside[..., :2, :] -= 0.4  # and one that also darkens the top two rows
    parts = loss.generator(a, b, {**out, "fake_b": outside}, d)
    assert parts["border_ab"].item() == pytest.approx(0.4 * 2 * 16 / 256, rel=1e-5)
    plain = CycleGANLoss("lsgan", 10.0, 0.5).generator(a, b, {**out, "fake_b": outside}, d)
    assert "border_ab" not in plain
    assert parts["loss_G"].item() == pytest.approx(plain["loss_G"].item() + 10.0 * 0.4 * 32 / 256, rel=1e-5)
    # Without a field there is no border: an error rather than a tie on the whole image.
    with pytest.raises(ValueError, match="field < 1"):
        CycleGANLoss("lsgan", 10.0, 0.5, lambda_border=10.0)


def test_border_weight_config_errors():
    with pytest.raises(ConfigError, match="lambda_border"):
        load_config(CycleGANConfig, None, ["loss.lambda_border=-1"])
    with pytest.raises(ConfigError, match="needs loss.d_field < 1"):
        load_config(CycleGANConfig, None, ["loss.lambda_border=5"])
    cfg = load_config(CycleGANConfig, None, ["loss.lambda_border=5", "loss.d_field=0.7", "model.ngf=4",
                                             "model.ndf=4", "data.size=32", "train.batch_size=1",
                                             "model.d_layers=1"])
    from gan.cyclegan.trainer import CycleGANSteps

    steps = CycleGANSteps(cfg, "cpu")
    assert (steps.loss.lambda_border, steps.loss.field) == (5.0, 0.7)
    torch.manual_seed(0)
    losses, _ = steps.step(torch.rand(1, 1, 32, 32) * 2 - 1, torch.rand(1, 1, 32, 32) * 2 - 1, 0)
    assert losses["border_ab"].item() > 0 and losses["border_ba"].item() > 0  # in the step's log
