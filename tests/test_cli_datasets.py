"""`cxr datasets ...` end to end: exit codes, one-line errors, files written."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from builders import write_png
from cxr.cli.main import main


def make_montgomery(root, n=4):
    site = root / "MontgomerySet"
    for i in range(1, n + 1):
        stem = f"MCUCXR_{i:04d}_{i % 2}"
        write_png(site / "CXR_png" / f"{stem}.png", 40, 32, seed=i)
        (site / "ClinicalReadings").mkdir(parents=True, exist_ok=True)
        (site / "ClinicalReadings" / f"{stem}.txt").write_text(
            f"Patient's Sex: {'MF'[i % 2]} \nPatient's Age: 0{30 + i}Y\n{'normal' if i % 2 == 0 else 'TB right apex'}\n")
        for side in ("leftMask", "rightMask"):
            m = Image.new("L", (32, 40), 0)
            m.save((site / "ManualMask" / side).mkdir(parents=True, exist_ok=True) or site / "ManualMask" / side / f"{stem}.png")
    return site


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "datasets" in capsys.readouterr().out


def test_inspect_clean_tree_exits_zero_with_counts(tmp_path, capsys):
    site = make_montgomery(tmp_path)
    assert main(["datasets", "inspect", str(site), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["layout"] == "montgomery" and summary["images"] == 4 and summary["patients"] == 4
    assert summary["labels"]["Tuberculosis"] == {"positive": 2, "negative": 2, "unlabelled": 0}
    assert summary["image_size"]["min"] == [32, 40] and summary["bit_depth"] == {"8": 4}
    assert summary["problems"] == []


def test_inspect_reports_every_problem_and_exits_nonzero(tmp_path, capsys):
    site = make_montgomery(tmp_path)
    (site / "CXR_png" / "MCUCXR_0001_1.png").write_bytes(b"")  # zero bytes
    good = (site / "CXR_png" / "MCUCXR_0002_0.png").read_bytes()
    (site / "CXR_png" / "MCUCXR_0003_1.png").write_bytes(good[: len(good) - 30])  # truncated
    assert main(["datasets", "inspect", str(site)]) == 1
    out = capsys.readouterr().out
    assert "problems: 2" in out
    assert "MCUCXR_0001_1.png: empty file (0 bytes)" in out
    assert "MCUCXR_0003_1.png" in out and "truncated" in out


def test_inspect_unknown_path_is_one_line_exit_2(tmp_path, capsys):
    assert main(["datasets", "inspect", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nope: path does not exist" in err


def test_preview_writes_a_sheet(tmp_path, capsys):
    site = make_montgomery(tmp_path)
    out = tmp_path / "sheet.png"
    assert main(["datasets", "preview", str(site), "--out", str(out), "--n", "4", "--size", "64"]) == 0
    with Image.open(out) as im:
        assert im.size == (4 * 64, 64 + 14)


def test_cache_skip_bad_writes_report(tmp_path, capsys):
    site = make_montgomery(tmp_path)
    (site / "CXR_png" / "MCUCXR_0004_0.png").write_text("not an image")
    cache = tmp_path / "cache"
    # Strict: one line naming the file, exit 2, nothing reported as built for the bad file.
    assert main(["datasets", "cache", str(site), "--cache-dir", str(cache), "--size", "16", "--workers", "1"]) == 2
    assert "MCUCXR_0004_0.png: not an image file" in capsys.readouterr().err
    assert main(["datasets", "cache", str(site), "--cache-dir", str(cache), "--size", "16", "--workers", "1",
                 "--skip-bad"]) == 0
    out = capsys.readouterr().out
    assert "3 built, 0 reused, 0 failed" in out  # the loader already set the bad file aside
    report = next(cache.rglob("skipped.csv")).read_text().splitlines()
    assert report[0] == "where,problem" and "MCUCXR_0004_0.png" in report[1]


def test_build_nine_cli_prints_counts_and_caveat(tmp_path, capsys):
    from test_nine import EXPECTED, make_sources

    src = make_sources(tmp_path)
    out = tmp_path / "nine"
    argv = ["datasets", "build-nine", "--nih", str(src["nih"]), "--covid", str(src["covid"]),
            "--pneumonia", str(src["pneumonia"]), "--tb", str(src["tb"]), "--out", str(out)]
    assert main(argv) == 0
    cap = capsys.readouterr()
    for name, n in EXPECTED.items():
        assert any(line.split() == name.split() + [str(n)] for line in cap.out.splitlines()), name
    assert "confounded" in cap.err
    assert main(["datasets", "inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == sum(EXPECTED.values())
    # A second build into the now non-empty folder is refused with one line.
    assert main(argv) == 2
    assert capsys.readouterr().err.count("\n") == 1
