"""The README's Quick start and CI stay in step: CI runs exactly the README's test command."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quick_start_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_quick_start_is_exactly_two_commands():
    cmds = quick_start_commands()
    assert len(cmds) == 2
    assert all("-c constraints.txt" in c for c in cmds)


def test_ci_runs_the_readme_test_command():
    test_cmd = quick_start_commands()[1]
    ci = (ROOT / ".ci" / "run").read_text()
    ci_cmd = re.search(r"TEST_COMMAND='(.*)'", ci).group(1)
    # CI makes its own fresh venv first; the rest must be the README's command verbatim.
    assert test_cmd.endswith(ci_cmd)


def test_constraints_pin_the_tested_torch():
    pins = (ROOT / "constraints.txt").read_text().split()
    assert "torch==2.14.1" in pins and "torchvision==0.29.1" in pins
