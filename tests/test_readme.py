"""The README stays a user's page: its Quick start and CI in step (CI runs exactly the README's
test command), at most 300 lines, and every relative link in it and in docs/ resolving."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quick_start_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1)
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


README_MAX_LINES = 300


def test_readme_stays_short():
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines (at most {README_MAX_LINES}): "
        "move detail to docs/ and figures to docs/results/")


# --- every relative link in README.md and docs/ resolves ------------------------------------

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.DOTALL | re.MULTILINE)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$", re.MULTILINE)


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def prose(text: str) -> str:
    """The text without fenced code blocks (whose `#` lines are comments, not headings) and
    without inline code (whose brackets are not links)."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed
    (letters, digits, '_', '-' and spaces kept), spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for match in HEADING.finditer(FENCE.sub("", path.read_text())):
        slug = github_slug(match.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def broken_links() -> list[str]:
    broken = []
    for md in markdown_files():
        for target in LINK.findall(prose(md.read_text())):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:
                continue
            path_part, _, anchor = target.partition("#")
            dest = (md.parent / path_part).resolve() if path_part else md
            where = f"{md.relative_to(ROOT)}: ({target})"
            if not dest.exists():
                broken.append(f"{where}: no file {path_part}")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{where}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    return broken


def test_relative_links_resolve():
    broken = broken_links()
    assert not broken, "\n" + "\n".join(broken)


def test_github_slugs():
    assert (github_slug("`cxr demo`: the whole study in one command")
            == "cxr-demo-the-whole-study-in-one-command")
    assert github_slug("Does it harmonize? The paired proof") == "does-it-harmonize-the-paired-proof"
    assert github_slug("Training speed (`bench_cyclegan.py`)") == "training-speed-bench_cycleganpy"
    assert github_slug("Where is X") == "where-is-x"
