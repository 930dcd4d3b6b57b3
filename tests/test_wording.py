"""The repository speaks of the project alone: no word of how the work was organised.

Every git-tracked text file is searched for the words below; history lives in git, measured
figures in docs/results/ with their date, commit and machine. A hit prints ``file:line: text``.
The forbidden words are assembled from pieces so that this file does not match itself.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_SESSION = "sess" + "ions?"
_ORDINALS = ("first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|eleventh|"
             "twelfth|thirteenth|fourteenth|fifteenth|sixteenth|seventeenth|eighteenth|"
             "nineteenth|twentieth")

FORBIDDEN: dict[str, re.Pattern[str]] = {
    "work-organisation word": re.compile(rf"\b{_SESSION}\b", re.IGNORECASE),
    "numbered work period": re.compile(
        rf"\b(?:{_ORDINALS}|\d+(?:st|nd|rd|th))\s+{_SESSION}\b", re.IGNORECASE),
    "an issue number": re.compile(r"\b" + "iss" + r"ues?\s*#?\d+", re.IGNORECASE),
    "a numbered paragraph sign": re.compile("\u00a7" + r"\s*\d"),
    "a numbered docs section": re.compile(r"\bdocs?\s+" + "sect" + r"ions?\s+\d", re.IGNORECASE),
}

# Exact (file, pattern name) pairs allowed, each with its reason, e.g. a library class whose
# name holds a forbidden word:
#   {("path/in/repo.py", "work-organisation word"): "the library's class"}
ALLOWED: dict[tuple[str, str], str] = {}


def tracked_text_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                         check=True).stdout
    files = []
    for name in out.decode().split("\0"):
        path = ROOT / name
        if not name or not path.is_file():  # deleted in the working tree, or a submodule
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue  # binary
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        files.append(path)
    return files


def offending_lines() -> list[str]:
    hits = []
    for path in tracked_text_files():
        rel = path.relative_to(ROOT).as_posix()
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for name, pattern in FORBIDDEN.items():
                if (rel, name) not in ALLOWED and pattern.search(line):
                    hits.append(f"{rel}:{number}: {name}: {line.strip()}")
    return hits


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(),
                    reason="needs a git checkout")
def test_no_word_of_how_the_work_was_organised():
    hits = offending_lines()
    for hit in hits:
        print(hit)
    assert not hits, "\n" + "\n".join(hits)


@pytest.mark.parametrize("text, name", [
    ("measured in the " + "sixteenth sess" + "ion", "numbered work period"),
    ("the 15th sess" + "ion's host", "numbered work period"),
    ("as asked in iss" + "ue 4", "an issue number"),
    ("iss" + "ues #12 and 13", "an issue number"),
    ("see \u00a7" + "5", "a numbered paragraph sign"),
    ("docs sect" + "ion 26", "a numbered docs section"),
])
def test_patterns_catch_what_they_name(text, name):
    assert FORBIDDEN[name].search(text)


@pytest.mark.parametrize("text", [
    "Zhu et al. 2017, section 5.2",       # a paper's section
    "pytorch#128218",                     # an upstream bug reference
    "sessile nodules",                    # a word that merely starts alike
    "the issue of grain",                 # the word without a number
])
def test_patterns_leave_ordinary_text(text):
    assert not any(p.search(text) for p in FORBIDDEN.values())
