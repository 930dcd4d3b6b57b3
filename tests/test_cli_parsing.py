"""The ``cxr`` command line: options and ``key=value`` overrides in any order, configs found by
name from any folder, errors with the usage of the subcommand they belong to, and every listed
subcommand module present."""

from __future__ import annotations

import importlib

import pytest
import yaml

from cxr.cli.main import SUBCOMMANDS, build_parser, main
from cyclegan_helpers import nlm_site

FAST = ["data.size=32", "data.decode_workers=1", "model.ngf=4", "model.ndf=4", "model.d_layers=2",
        "train.batch_size=2", "train.log_every=1", "train.image_every=0", "train.ckpt_every=2", "device=cpu"]


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_listed_subcommand_module_imports(name):
    assert callable(importlib.import_module(name).add_parser)


def test_the_parser_lists_every_subcommand():
    commands = build_parser()._subparsers._group_actions[0].choices
    assert {"demo", "datasets", "phantom", "train-gan", "translate", "harmonize", "train-classifier",
            "predict", "evaluate", "generate", "train-segmenter", "segment", "train-detector",
            "detect", "explain"} == set(commands)


@pytest.mark.parametrize("argv", [
    ["--config", "cyclegan_tiny", "data.a=/x/A", "--run-dir", "R", "data.b=/x/B", "--dry-run", "train.steps=6"],
    ["data.a=/x/A", "--config", "cyclegan_tiny.yaml", "data.b=/x/B", "train.steps=6", "--dry-run"],
    ["--dry-run", "data.a=/x/A", "data.b=/x/B", "--config", "cyclegan_tiny", "train.steps=6", "--run-dir", "R"],
])
def test_overrides_and_options_in_any_order_with_a_config_name(tmp_path, monkeypatch, capsys, argv):
    monkeypatch.chdir(tmp_path)  # no configs/ folder here: the name is looked up among the shipped ones
    assert main(["train-gan", "cyclegan", *argv]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert (cfg["data"]["a"], cfg["data"]["b"], cfg["train"]["steps"]) == ("/x/A", "/x/B", 6)
    assert cfg["data"]["size"] == 64 and cfg["model"]["generator"] == "resnet6"  # cyclegan_tiny's own
    assert list(tmp_path.iterdir()) == []


def test_classifier_overrides_in_any_order(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["train-classifier", "data.size=32", "--config", "classifier_tiny", "train.epochs=2", "--task", "tb",
            "--dry-run", "data.train=/x/T"]
    assert main(argv) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert (cfg["data"]["size"], cfg["train"]["epochs"], cfg["data"]["train"], cfg["task"]) == (32, 2, ["/x/T"], "tb")


def test_training_with_intermixed_arguments_uses_every_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    a, b = nlm_site(tmp_path / "data", "montgomery", 8), nlm_site(tmp_path / "data", "shenzhen", 8)
    rc = main(["train-gan", "cyclegan", "--config", "cyclegan_tiny", f"data.a={a}", "--run-dir", "R", f"data.b={b}",
               "train.steps=2", *FAST])
    assert rc == 0, capsys.readouterr().err
    saved = yaml.safe_load((tmp_path / "R" / "config.yaml").read_text())
    assert (saved["data"]["a"], saved["data"]["b"], saved["train"]["steps"]) == (str(a), str(b), 2)
    assert (tmp_path / "R" / "images_seen.txt").is_file() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("argv, usage", [
    (["train-gan", "cyclegan", "--config", "cyclegan_tiny", "--run-dri", "R"], "usage: cxr train-gan cyclegan "),
    (["train-gan", "cyclegan", "--resume=yes"], "usage: cxr train-gan cyclegan "),
    (["train-classifier", "--task", "pneumonia"], "usage: cxr train-classifier "),
    (["train-classifier", "--dry-run", "--bogus"], "usage: cxr train-classifier "),
    (["translate", "--checkpoint", "R", "--in", "A", "--out", "B", "--direction", "a2b", "--extra"],
     "usage: cxr translate "),
    (["harmonize", "--reference", "R", "--in", "A", "--out", "B", "stray"], "usage: cxr harmonize "),
    (["train-gan", "stylegan"], "usage: cxr train-gan "),
])
def test_an_error_inside_a_subcommand_prints_that_subcommands_usage(capsys, argv, usage):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(usage), err
    assert "usage: cxr [-h]" not in err


def test_top_level_errors_keep_the_top_level_usage(capsys):
    with pytest.raises(SystemExit) as e:
        main(["trian-gan"])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("usage: cxr [-h]")


def test_a_typo_key_still_names_the_closest_key(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train-gan", "cyclegan", "data.a=A", "--config", "cyclegan_tiny", "train.stepz=3", "--dry-run"]) == 2
    assert "unknown config key 'train.stepz' (did you mean 'train.steps'?)" in capsys.readouterr().err


def test_unknown_config_name_is_one_line_listing_the_shipped_ones(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train-gan", "cyclegan", "--config", "cyclegan_tinny", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("cxr: error: cyclegan_tinny: no such config file")
    assert "cyclegan_tiny" in err and "cyclegan_paired128" in err


def test_list_configs_and_help_name_the_shipped_configs(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train-gan", "cyclegan", "--list-configs"])
    assert e.value.code == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == ["cyclegan_nlm", "cyclegan_paired128", "cyclegan_paired64",
                                                  "cyclegan_tiny"]
    assert "CPU demo" in next(line for line in out if line.startswith("cyclegan_tiny"))
    with pytest.raises(SystemExit):
        main(["train-classifier", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "classifier_tb" in text and "classifier_tiny" in text and "cyclegan_tiny" not in text
