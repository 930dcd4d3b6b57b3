"""Regenerate docs/phantom_contact_sheet.png: the same subjects through both acquisition chains.

    python docs/make_contact_sheet.py

Rows: a normal and a TB subject from the nlm preset, then subjects with other findings from
the nih preset; columns: the Shenzhen-like and the Montgomery-like render of that subject
(lesion boxes outlined on the right).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from cxr.phantom.generate import PhantomConfig, generate
from cxr.phantom.sheet import choose_subjects, paired_sheet

HERE = Path(__file__).resolve().parent


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        nlm, nih = Path(tmp) / "nlm", Path(tmp) / "nih"
        generate(PhantomConfig(preset="nlm", out=nlm, size=256, seed=0, n=40))
        generate(PhantomConfig(preset="nih", out=nih, size=256, seed=0, n=80))
        picks = choose_subjects(nlm, max_rows=2) + choose_subjects(nih, max_rows=4, skip=("",))
        out = paired_sheet(picks, HERE / "phantom_contact_sheet.png", tile=256)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
