"""Every YAML file shipped in configs/ loads into its trainer's config: a renamed or misspelt key
in a shipped recipe fails here, not in a researcher's hour-long run."""

from __future__ import annotations

from pathlib import Path

import pytest

from classifiers.config import ClassifierConfig
from cxr.engine.config import load_config
from gan.cyclegan.config import CycleGANConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
KINDS = {"cyclegan": CycleGANConfig, "classifier": ClassifierConfig}


def test_every_config_has_a_known_kind():
    files = sorted(CONFIGS.glob("*.yaml"))
    assert len(files) >= 8
    unknown = [f.name for f in files if f.name.split("_")[0] not in KINDS]
    assert unknown == []


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_config_loads(path):
    cfg = load_config(KINDS[path.name.split("_")[0]], path)
    assert cfg.seed == 0


def test_paired128_is_the_documented_recipe():
    cfg = load_config(CycleGANConfig, CONFIGS / "cyclegan_paired128.yaml")
    assert (cfg.data.size, cfg.model.ndf, cfg.model.ngf, cfg.train.steps) == (128, 64, 16, 4500)
    assert (cfg.loss.d_augment, cfg.loss.lambda_border, cfg.loss.lambda_structure, cfg.loss.d_field) == (0.1, 10.0, 5.0, 0.7)
