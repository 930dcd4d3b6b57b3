"""Discriminators that judge only the centre of each image (``loss.d_field``)."""

from __future__ import annotations

import pytest
import torch

from cxr.engine.config import load_config
from cxr.errors import ConfigError
from gan.cyclegan.config import CycleGANConfig
from gan.cyclegan.loss import PairedDiscriminators, centre_crop
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
