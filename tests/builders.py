"""Writers for the small image files that tests build their dataset trees from.

Every test tree is made of real files in the formats the real datasets use: 8/16-bit grayscale,
palette, RGB-with-equal-channels and gray+alpha PNGs, JPEGs, and DICOM in both photometric
interpretations. Imported by test modules as ``from builders import ...``.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
from PIL import Image


def gradient(h: int = 24, w: int = 20, bits: int = 8, seed: int = 0) -> np.ndarray:
    """A deterministic test image: a diagonal ramp plus a little noise, max value 2**bits-1."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    ramp = (yy / max(h - 1, 1) + xx / max(w - 1, 1)) / 2
    img = np.clip(ramp + rng.normal(0, 0.02, (h, w)), 0, 1)
    dtype = np.uint8 if bits <= 8 else np.uint16
    return np.round(img * (2**bits - 1)).astype(dtype)


def write_png(path: str | Path, h: int = 24, w: int = 20, mode: str = "L", seed: int = 0) -> Path:
    """A PNG in ``mode``: ``L`` (8-bit), ``I;16`` (16-bit), ``P`` (palette), ``RGB`` (equal
    channels), ``LA`` (gray+alpha), ``RGBA``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "I;16":
        Image.fromarray(gradient(h, w, 16, seed)).save(path)
        return path
    gray = Image.fromarray(gradient(h, w, 8, seed), mode="L")
    if mode == "L":
        im = gray
    elif mode == "P":
        im = gray.convert("P", palette=Image.Palette.ADAPTIVE, colors=256)
    elif mode in ("RGB", "RGBA", "LA"):
        im = gray.convert(mode)
    else:
        raise ValueError(mode)
    im.save(path)
    return path


def one_error_line(capsys) -> str:
    """The CLI's stderr, asserted to be exactly one ``cxr: error: ...`` line (no traceback)."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("cxr: error: ")
    return err


def write_lung_masks(folder: str | Path, stem: str, h: int, w: int) -> None:
    """Montgomery's ``ManualMask/{left,right}Mask/<stem>.png`` for an (h, w) image."""
    write_mask(Path(folder) / "ManualMask" / "leftMask" / f"{stem}.png", h, w, left=True)
    write_mask(Path(folder) / "ManualMask" / "rightMask" / f"{stem}.png", h, w, left=False)


def write_mask(path: str | Path, h: int = 24, w: int = 20, left: bool = True) -> Path:
    """A binary 0/255 lung-mask PNG covering the left or right half of the image."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.zeros((h, w), np.uint8)
    if left:
        m[2:-2, 1 : w // 2 - 1] = 255
    else:
        m[2:-2, w // 2 + 1 : -1] = 255
    Image.fromarray(m).save(path)
    return path


def write_dicom(path: str | Path, h: int = 24, w: int = 20, bits_stored: int = 12,
                photometric: str = "MONOCHROME2", slope: float = 1.0, intercept: float = 0.0,
                window: tuple[float, float] | None = None, pixels: bool = True, seed: int = 0,
                **header) -> Path:
    """A minimal valid DICOM file (Secondary Capture) with 16-bit allocated pixels.

    PatientID is the file's stem; ``header`` sets or replaces elements by keyword
    (``PatientID="9RG1", PatientAge="045Y"``; None deletes one)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.PatientID = path.stem
    ds.Rows, ds.Columns = h, w
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    if slope != 1.0 or intercept != 0.0:
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if pixels:
        ds.PixelData = gradient(h, w, bits_stored, seed).astype(np.uint16).tobytes()
    for keyword, value in header.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def zip_tree(folder: str | Path, archive: str | Path, junk: bool = True) -> Path:
    """Zip every file below ``folder`` (paths relative to it); add macOS junk when asked."""
    folder, archive = Path(folder), Path(archive)
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(folder).as_posix())
        if junk:
            zf.writestr("__MACOSX/._junk.png", b"\0\x05\x16\x07")
    return archive


def write_toy_ct(tmp_path: Path, label_shape: tuple[int, int, int] | None = None) -> tuple[Path, Path]:
    """A tiny chest: water body, two air lungs, a heart, a spine; TotalSegmentator ids.
    ``label_shape`` replaces the label map by an empty one of that shape."""
    import nibabel as nib

    shape = (48, 40, 36)  # RAS voxel axes: x toward the patient's right, y anterior, z up
    x, y, z = np.meshgrid(*(np.arange(n) - n / 2 + 0.5 for n in shape), indexing="ij")
    hu = np.full(shape, -1000.0, np.float32)
    lab = np.zeros(shape, np.uint8)
    body = (x / 22) ** 2 + (y / 16) ** 2 <= 1
    hu[body] = 20
    for sx, lid in ((10, 12), (-10, 10)):  # +x: patient's right lung (12), -x: left (10)
        lung = ((x - sx) / 8) ** 2 + (y / 11) ** 2 + (z / 14) ** 2 <= 1
        hu[lung], lab[lung] = -850, lid
    heart = ((x + 3) / 6) ** 2 + ((y + 5) / 6) ** 2 + ((z + 4) / 6) ** 2 <= 1
    hu[heart], lab[heart] = 40, 51
    spine = (x / 3) ** 2 + ((y - 11) / 3) ** 2 <= 1
    hu[spine], lab[spine] = 700, 36
    aff = np.diag([4.0, 4.0, 5.0, 1.0])
    ct_path, lab_path = tmp_path / "ct.nii.gz", tmp_path / "labels.nii.gz"
    nib.save(nib.Nifti1Image(hu, aff), ct_path)
    if label_shape is not None:
        lab = np.zeros(label_shape, np.uint8)
    nib.save(nib.Nifti1Image(lab, aff), lab_path)
    return ct_path, lab_path
