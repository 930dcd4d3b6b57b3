"""Configs: defaults < YAML < overrides, typed, typos named with a suggestion, one-line errors."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest

from cxr.engine.cli import add_run_arguments, print_dry_run, resolve_run
from cxr.engine.config import StepTrainConfig, config_keys, config_to_dict, format_config, load_config, save_config
from cxr.errors import ConfigError


@dataclass(frozen=True)
class Data:
    size: int = 64
    a: str = "phantom/shenzhen"
    b: Optional[str] = None
    crop: Optional[tuple[int, int]] = None


@dataclass(frozen=True)
class Model:
    generator: Literal["resnet6", "resnet9", "unet256"] = "resnet9"
    lambda_cycle: float = 10.0
    betas: tuple[float, float] = (0.5, 0.999)
    widths: list[int] = field(default_factory=lambda: [64, 128])


@dataclass(frozen=True)
class Cfg:
    seed: int = 0
    device: str = "auto"
    lr: float = 2e-4
    out: Path = Path("out")
    data: Data = field(default_factory=Data)
    model: Model = field(default_factory=Model)
    # The family's own defaults for the shared section must survive partial overrides.
    train: StepTrainConfig = field(default_factory=lambda: StepTrainConfig(batch_size=2, steps=500))


def test_defaults_then_yaml_then_overrides(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("seed: 3\nlr: 1e-3\ndata:\n  size: 128\ntrain:\n  batch_size: 4\n")
    cfg = load_config(Cfg, cfg_file, ["train.batch_size=8", "data.a=2024", "model.betas=[0.1, 0.2]",
                                      "train.amp=off", "train.compile=true", "data.crop=[10, 20]"])
    assert cfg.seed == 3 and cfg.lr == pytest.approx(1e-3) and isinstance(cfg.lr, float)
    assert cfg.data.size == 128
    assert cfg.data.a == "2024"  # string keys take the text as written, not the YAML int
    assert cfg.data.crop == (10, 20)
    assert cfg.model.betas == (0.1, 0.2) and isinstance(cfg.model.betas, tuple)
    assert cfg.train.batch_size == 8 and cfg.train.amp == "off" and cfg.train.compile is True
    assert cfg.train.steps == 500  # the family default, not StepTrainConfig's 10_000
    assert cfg.model.generator == "resnet9" and cfg.model.widths == [64, 128]
    assert cfg.out == Path("out")


def test_numbers_in_yaml_forms(tmp_path):
    cfg = load_config(Cfg, None, ["lr=2e-4", "train.steps=1e3", "seed=7", "data.b=null"])
    assert cfg.lr == 2e-4 and cfg.train.steps == 1000 and isinstance(cfg.train.steps, int)
    assert cfg.data.b is None


def test_save_and_reload_round_trip(tmp_path):
    cfg = load_config(Cfg, None, ["train.batch_size=3", "model.widths=[8, 16, 32]", "data.crop=[1, 2]"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(Cfg, path) == cfg
    text = format_config(cfg)
    assert "batch_size: 3" in text and "widths:" in text
    d = config_to_dict(cfg)
    assert d["model"]["betas"] == [0.5, 0.999] and d["out"] == "out"
    assert not list((tmp_path / "run").glob(".*"))  # atomic: no temporary left behind


@pytest.mark.parametrize("override, message", [
    ("train.batch_sise=4", "unknown config key 'train.batch_sise' (did you mean 'train.batch_size'?)"),
    ("batch_size=4", "unknown config key 'batch_size' (did you mean 'train.batch_size'?)"),
    ("data.sise=4", "unknown config key 'data.sise' (did you mean 'data.size'?)"),
    ("seed.x=1", "unknown config key 'seed.x'"),
    ("zzzzzz=1", "unknown config key 'zzzzzz'"),
])
def test_unknown_override_names_key_and_suggestion(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(Cfg, None, [override])
    assert str(e.value).startswith(message)
    assert "\n" not in str(e.value)


def test_unknown_key_in_yaml_names_key_and_suggestion(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  batch_size: 4\n  lerning_rate: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.lerning_rate'"):
        load_config(Cfg, f)
    f.write_text("modle:\n  generator: resnet6\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'modle' \(did you mean 'model'\?\)"):
        load_config(Cfg, f)


@pytest.mark.parametrize("override, message", [
    ("train.batch_size=four", "config key 'train.batch_size': expected int, got 'four'"),
    ("seed=1.5", "config key 'seed': expected int, got 1.5"),
    ("seed=true", "config key 'seed': expected int, got True"),
    ("lr=fast", "config key 'lr': expected float, got 'fast'"),
    ("train.compile=maybe", "config key 'train.compile': expected bool, got 'maybe'"),
    ("train.amp=fp16", "config key 'train.amp': expected one of 'auto', 'bf16', 'off', got 'fp16'"),
    ("train.compile_mode=fast", "config key 'train.compile_mode': expected one of 'default', 'reduce-overhead'"),
    ("model.generator=resnet7", "config key 'model.generator': expected one of 'resnet6'"),
    ("model.betas=[0.5]", "config key 'model.betas': expected"),
    ("model.widths=[8, x]", "config key 'model.widths': expected"),
    ("data=3", "config key 'data' is a section, not a value"),
])
def test_wrong_type_names_key_value_and_type(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(Cfg, None, [override])
    assert str(e.value).startswith(message), str(e.value)


def test_malformed_override_syntax():
    with pytest.raises(ConfigError, match="override 'train.batch_size' is not of the form key=value"):
        load_config(Cfg, None, ["train.batch_size"])


def test_malformed_yaml_names_file_and_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("seed: 1\ntrain:\n  batch_size: 4\n  steps: [1, 2\nlr: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(Cfg, f)
    msg = str(e.value)
    assert msg.startswith(f"{f}:") and "malformed YAML" in msg and "\n" not in msg
    line = int(msg[len(str(f)) + 1:].split(":")[0])
    assert 4 <= line <= 5  # the unclosed list, where PyYAML notices it


def test_yaml_must_be_a_mapping_and_must_exist(tmp_path):
    f = tmp_path / "list.yaml"
    f.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(Cfg, f)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Cfg, tmp_path / "missing.yaml")
    (tmp_path / "empty.yaml").write_text("")
    assert load_config(Cfg, tmp_path / "empty.yaml") == Cfg()


def test_required_key_without_default():
    @dataclass(frozen=True)
    class Needs:
        path: str
        n: int = 1

    with pytest.raises(ConfigError, match="missing required config key 'path'"):
        load_config(Needs, None, ["n=2"])
    assert load_config(Needs, None, ["path=x"]).path == "x"


def test_config_keys_lists_nested():
    keys = config_keys(Cfg)
    assert "train.batch_size" in keys and "data.size" in keys and "model" in keys and "seed" in keys


def _parse(argv):
    return add_run_arguments(argparse.ArgumentParser()).parse_args(argv)


def test_cli_resolve_and_dry_run(tmp_path, capsys):
    default = tmp_path / "default.yaml"
    default.write_text("seed: 5\n")
    other = tmp_path / "other.yaml"
    other.write_text("seed: 9\n")
    args = _parse(["--dry-run", "train.steps=7"])
    cfg = resolve_run(args, Cfg, default)
    assert (cfg.seed, cfg.train.steps) == (5, 7)
    assert print_dry_run(args, cfg) is True
    printed = capsys.readouterr().out
    assert load_config(Cfg, _write(tmp_path / "p.yaml", printed)) == cfg
    cfg2 = resolve_run(_parse(["--config", str(other)]), Cfg, default)
    assert cfg2.seed == 9 and print_dry_run(_parse([]), cfg2) is False


def test_cli_resume_reads_the_saved_config(tmp_path):
    run = tmp_path / "run"
    save_config(load_config(Cfg, None, ["seed=42", "train.batch_size=6"]), run / "config.yaml")
    cfg = resolve_run(_parse(["--run-dir", str(run), "--resume", "train.steps=99"]), Cfg, None)
    assert (cfg.seed, cfg.train.batch_size, cfg.train.steps) == (42, 6, 99)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_yaml_off_means_the_string_off_for_string_choices(tmp_path):
    f = _write(tmp_path / "c.yaml", "train:\n  amp: off\n  compile: on\n")
    cfg = load_config(Cfg, f)
    assert cfg.train.amp == "off" and cfg.train.compile is True
    assert load_config(Cfg, None, ["train.amp=off"]).train.amp == "off"


def test_shared_data_section_is_extended_by_each_family(tmp_path):
    from classifiers.config import ClassifierConfig, ClassifierDataConfig
    from cxr.engine.config import DataConfig
    from gan.cyclegan.config import CycleGANConfig, CycleGANDataConfig

    shared = set(config_keys(DataConfig))
    assert {"size", "fit", "split", "split_fractions", "split_seed", "cache_dir", "decode_workers", "skip_bad",
            "on_device", "lung_crop", "lung_crop_margin"} == shared
    for family, own in ((CycleGANDataConfig, {"a", "b", "layout_a", "layout_b", "augment"}),
                        (ClassifierDataConfig, {"train", "val", "test", "synthetic", "synthetic_ratio",
                                                "harmonized", "layout", "balanced"})):
        assert issubclass(family, DataConfig) and shared | own <= set(config_keys(family))
    # Per-family defaults and sizes; the shared keys validated once.
    assert (CycleGANConfig().data.size, ClassifierConfig().data.size) == (256, 128)
    with pytest.raises(ConfigError, match=r"data.size must be a multiple of 4 in 32..1024, got 30"):
        load_config(CycleGANConfig, None, ["data.size=30"])
    with pytest.raises(ConfigError, match=r"data.size must be in 16..1024, got 8"):
        load_config(ClassifierConfig, None, ["data.size=8"])
    assert load_config(ClassifierConfig, None, ["data.size=30"]).data.size == 30
    for family in (CycleGANConfig, ClassifierConfig):
        with pytest.raises(ConfigError, match=r"data.split_fractions must be non-negative and sum to 1"):
            load_config(family, None, ["data.split_fractions=[0.5, 0.4, 0.2]"])
        with pytest.raises(ConfigError, match=r"'data.fitt' \(did you mean 'data.fit'\?\)"):
            load_config(family, None, ["data.fitt=crop"])
    # A saved config round-trips through the extended section.
    cfg = load_config(CycleGANConfig, None, ["data.a=A", "data.fit=crop", "data.split_seed=3"])
    assert load_config(CycleGANConfig, save_config(cfg, tmp_path / "c.yaml")) == cfg


@dataclass(frozen=True)
class Retiring:
    RETIRED_KEYS = {"old": 0.0}  # a plain class attribute: not a config key
    kept: int = 1


@dataclass(frozen=True)
class RetiringRoot:
    section: Retiring = field(default_factory=Retiring)


def test_retired_keys_load_at_their_old_default_only(tmp_path):
    assert "section.old" not in config_keys(RetiringRoot)
    # A config saved before the key was removed (every key listed, the removed one off) still loads.
    saved = tmp_path / "old.yaml"
    saved.write_text("section:\n  kept: 2\n  old: 0.0\n")
    assert load_config(RetiringRoot, saved) == RetiringRoot(Retiring(kept=2))
    assert load_config(RetiringRoot, None, ["section.old=0"]) == RetiringRoot()
    saved.write_text("section:\n  old: 0.3\n")
    with pytest.raises(ConfigError, match=r"config key 'section.old' was removed; only its old default 0.0"):
        load_config(RetiringRoot, saved)
    with pytest.raises(ConfigError, match=r"'section.old' was removed"):
        load_config(RetiringRoot, None, ["section.old=0.2"])


def test_removed_cyclegan_options_load_only_when_off():
    from gan.cyclegan.config import CycleGANConfig

    assert load_config(CycleGANConfig, None, ["data.zoom_out=0.0", "loss.border_sigma=0"]) == CycleGANConfig()
    for key in ("data.zoom_out", "loss.border_sigma"):
        with pytest.raises(ConfigError, match=f"'{key}' was removed"):
            load_config(CycleGANConfig, None, [f"{key}=0.2"])
