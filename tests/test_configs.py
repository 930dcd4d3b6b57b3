"""Every YAML file shipped in cxr/configs/ loads into its trainer's config: a renamed or misspelt
key in a shipped recipe fails here, not in a researcher's hour-long run. Configs are found by name
from any folder (:func:`cxr.configs.resolve_config`)."""

from __future__ import annotations

import pytest

from classifiers.config import ClassifierConfig
from classifiers.detector import DetectorConfig
from classifiers.segmenter import SegmenterConfig
from cxr.configs import CONFIG_DIR, config_names, shipped_config
from cxr.engine.config import load_config
from gan.cut.config import CUTConfig
from gan.cyclegan.config import CycleGANConfig
from gan.stylegan2.trainer import StyleGAN2Config

KINDS = {"cyclegan": CycleGANConfig, "classifier": ClassifierConfig, "stylegan2": StyleGAN2Config,
         "segmenter": SegmenterConfig, "detector": DetectorConfig, "cut": CUTConfig, "fastcut": CUTConfig}


def test_every_config_has_a_known_kind():
    names = config_names()
    assert len(names) >= 8 and names == sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    unknown = [n for n in names if n.split("_")[0] not in KINDS]
    assert unknown == []


@pytest.mark.parametrize("name", config_names())
def test_shipped_config_loads(name):
    cfg = load_config(KINDS[name.split("_")[0]], shipped_config(name))
    assert cfg.seed == 0


def test_paired128_is_the_documented_recipe():
    cfg = load_config(CycleGANConfig, shipped_config("cyclegan_paired128"))
    assert (cfg.data.size, cfg.model.ndf, cfg.model.ngf, cfg.train.steps) == (128, 64, 16, 4500)
    assert (cfg.loss.d_augment, cfg.loss.lambda_border, cfg.loss.lambda_structure, cfg.loss.d_field) == (0.1, 10.0, 5.0, 0.7)
    assert (cfg.data.prematch, cfg.data.prematch_field) == ("histogram", 1.0)  # the whole recipe, prematch included


def test_configs_are_found_by_name_from_any_folder(tmp_path, monkeypatch):
    from cxr.configs import resolve_config
    from cxr.errors import ConfigError

    monkeypatch.chdir(tmp_path)  # no configs/ folder here
    tiny = shipped_config("cyclegan_tiny")
    assert tiny.is_file() and tiny.parent == CONFIG_DIR
    assert resolve_config("cyclegan_tiny") == resolve_config("cyclegan_tiny.yaml") == tiny
    assert resolve_config("configs/cyclegan_tiny.yaml") == tiny  # the old in-repository spelling
    # An existing file wins over a shipped name, and any path to a YAML file works.
    own = tmp_path / "cyclegan_tiny.yaml"
    own.write_text("seed: 5\n")
    assert resolve_config("cyclegan_tiny.yaml") == own.relative_to(tmp_path)
    assert resolve_config(own) == own
    (tmp_path / "classifier_tb").mkdir()  # a folder of the same name does not hide the config
    assert resolve_config("classifier_tb") == shipped_config("classifier_tb")
    for bad in ("cyclegan_tinny", "nope/cyclegan_tiny.yaml", "../configs/cyclegan_tiny"):
        with pytest.raises(ConfigError) as e:
            resolve_config(bad)
        message = str(e.value)
        assert "\n" not in message and "no such config file, nor a shipped config name" in message
        assert all(n in message for n in config_names())
    assert config_names("cyclegan_") == [n for n in config_names() if n.startswith("cyclegan_")]
