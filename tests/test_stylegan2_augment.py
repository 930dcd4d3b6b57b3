"""The discriminator's augmentations (gan.stylegan2.augment): ADA's pipe, its p controller, DiffAugment."""

from __future__ import annotations

import math

import pytest
import torch

from cxr.engine.config import load_config
from cxr.errors import ConfigError
from gan.stylegan2.augment import (
    AUGMENTATIONS,
    AugmentConfig,
    AugmentParams,
    AugmentPipe,
    ada_step,
    apply_params,
    diffaugment,
    initial_p,
    inverse_geometry,
    real_sign_stats,
    sample_params,
    update_p,
)

SIZE = 64


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def square_image(n: int = 8, top: int = 28, left: int = 28, side: int = 8) -> torch.Tensor:
    """Black (−1) images with a white (1) square."""
    x = -torch.ones(n, 1, SIZE, SIZE)
    x[:, :, top:top + side, left:left + side] = 1.0
    return x


def smooth_images(n: int = 8, seed: int = 0) -> torch.Tensor:
    """Random images in (−0.9, 0.9) with structure at every scale (no two pixels alike)."""
    g = gen(seed)
    low = torch.nn.functional.interpolate(torch.rand(n, 1, 8, 8, generator=g), size=SIZE, mode="bilinear")
    return (0.6 * low + 0.3 * torch.rand(n, 1, SIZE, SIZE, generator=g)) * 2.0 - 0.9


def only(*augment: str, **kw) -> AugmentConfig:
    return AugmentConfig(mode="fixed", augment=augment, **kw)


def centroid(img: torch.Tensor) -> torch.Tensor:
    """(x, y) of an image's bright mass, in pixels about the centre."""
    w = (img[0] + 1.0).clamp(min=0)
    ys, xs = torch.meshgrid(torch.arange(SIZE, dtype=torch.float32), torch.arange(SIZE, dtype=torch.float32),
                            indexing="ij")
    c = (SIZE - 1) / 2
    return torch.stack([(w * (xs - c)).sum() / w.sum(), (w * (ys - c)).sum() / w.sum()])


# --- the pipe ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["ada", "fixed", "none"])
def test_p_zero_is_the_identity(mode):
    x = smooth_images()
    cfg = AugmentConfig(mode=mode, xflip=True, rotate90=True)
    assert torch.equal(AugmentPipe(cfg)(x, 0.0, gen()), x)


def test_integer_translation_shifts_the_square_by_whole_pixels():
    x = square_image()
    params = sample_params(only("translate"), 8, SIZE, SIZE, 1.0, gen(1))
    t = params.translate
    assert torch.equal(t, t.round()) and t.abs().max() <= 0.125 * SIZE and (t != 0).any()
    out = apply_params(x, params)
    for i in range(8):
        tx, ty = int(t[i, 0]), int(t[i, 1])
        expected = torch.roll(x[i], shifts=(ty, tx), dims=(1, 2))  # background is −1 at every border
        torch.testing.assert_close(out[i], expected, atol=1e-4, rtol=0)
        torch.testing.assert_close(centroid(out[i]) - centroid(x[i]), torch.tensor([tx, ty], dtype=torch.float32),
                                   atol=1e-3, rtol=0)


def test_bfloat16_images_are_resampled_on_a_float32_grid():
    x = -torch.ones(2, 1, 256, 256, dtype=torch.bfloat16)  # bf16 grid steps near ±1: 2⁻⁷, a pixel at 256²
    x[:, :, 101:157, 77:133] = 1.0
    params = AugmentParams(translate=torch.tensor([[7.0, -5.0], [-3.0, 6.0]]))
    out = apply_params(x, params)
    assert out.dtype == torch.bfloat16
    for i, (tx, ty) in enumerate([(7, -5), (-3, 6)]):
        assert torch.equal(out[i], torch.roll(x[i], shifts=(ty, tx), dims=(1, 2)))


def test_the_pipe_draws_the_parameters_sample_params_draws():
    x = smooth_images()
    cfg = AugmentConfig(mode="ada")
    direct = apply_params(x, sample_params(cfg, 8, SIZE, SIZE, 0.7, gen(3)))
    torch.testing.assert_close(AugmentPipe(cfg)(x, 0.7, gen(3)), direct, atol=0, rtol=0)


def test_brightness_adds_one_offset_per_image():
    x = smooth_images()
    params = sample_params(only("brightness"), 8, SIZE, SIZE, 1.0, gen(2))
    delta = apply_params(x, params) - x
    torch.testing.assert_close(delta, params.brightness[:, None, None, None].expand_as(x), atol=1e-6, rtol=0)
    raised = params.brightness > 0
    assert raised.any() and (~raised).any()
    assert (delta.mean(dim=(1, 2, 3))[raised] > 0).all()  # the mean goes up by b where b > 0
    assert params.brightness.std() == pytest.approx(0.2, abs=0.15)


def test_contrast_scales_about_mid_grey_and_gamma_bends_the_curve():
    x = smooth_images()
    params = sample_params(only("contrast", "gamma"), 8, SIZE, SIZE, 1.0, gen(4))
    c, gamma = params.contrast[:, None, None, None], params.gamma[:, None, None, None]
    expected = c * ((((x + 1) / 2) ** gamma) * 2 - 1)
    torch.testing.assert_close(apply_params(x, params), expected, atol=1e-5, rtol=0)
    assert (params.contrast != 1).all() and (params.gamma != 1).all()
    # black and white stay put under gamma alone: it bends the [0, 1] curve between them
    ends = torch.tensor([-1.0, 1.0]).reshape(1, 1, 1, 2).expand(8, 1, 1, 2)
    bent = apply_params(ends, AugmentParams(gamma=params.gamma))
    torch.testing.assert_close(bent, ends, atol=1e-6, rtol=0)


def test_cutout_zeroes_one_square_of_half_the_side():
    x = torch.ones(8, 1, SIZE, SIZE)
    params = sample_params(only("cutout"), 8, SIZE, SIZE, 1.0, gen(5))
    out = apply_params(x, params)
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    zeroed = (out == 0).float().mean(dim=(1, 2, 3))
    assert (zeroed > 0).all() and (zeroed <= 0.25 + 1e-6).all()  # a (SIZE/2)² square, clipped at the border
    centred = AugmentParams(cutout_center=torch.full((1, 2), 0.5), cutout_size=torch.tensor([0.5]))
    assert (apply_params(x[:1], centred) == 0).float().mean() == pytest.approx(0.25)


def test_isotropic_scaling_scales_a_disc_area_by_s_squared():
    ys, xs = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    c = (SIZE - 1) / 2
    disc = torch.where((xs - c) ** 2 + (ys - c) ** 2 < 10**2, 1.0, -1.0).float().expand(8, 1, SIZE, SIZE)
    params = sample_params(only("scale"), 8, SIZE, SIZE, 1.0, gen(6))
    area = ((apply_params(disc, params) + 1) / 2).sum(dim=(1, 2, 3))
    expected = ((disc + 1) / 2).sum(dim=(1, 2, 3)) * params.scale**2
    torch.testing.assert_close(area, expected, rtol=0.08, atol=0)


def test_rotation_turns_an_off_centre_blob_about_the_centre():
    x = square_image(top=28, left=40, side=6)
    params = sample_params(only("rotate"), 8, SIZE, SIZE, 1.0, gen(7))
    out = apply_params(x, params)
    before = centroid(x[0])
    for i in range(8):
        th = float(params.rotate[i])
        rot = torch.tensor([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
        torch.testing.assert_close(centroid(out[i]), rot @ before, atol=0.3, rtol=0)
    assert params.rotate.abs().max() > 0.5


def test_anisotropic_scaling_keeps_the_area_and_stretches_along_its_axis():
    params = sample_params(only("aniso"), 8, SIZE, SIZE, 1.0, gen(8))
    m = inverse_geometry(params, 8, "cpu")[:, :, :2]
    torch.testing.assert_close(torch.linalg.det(m), torch.ones(8), atol=1e-5, rtol=0)
    sv = torch.linalg.svdvals(m)  # the stretch factors a and 1/a, in some order
    a = params.aniso
    torch.testing.assert_close(sv.max(-1).values, torch.maximum(a, 1 / a), atol=1e-5, rtol=0)


def test_x_flip_is_off_by_default_and_mirrors_when_asked():
    for seed in range(5):
        params = sample_params(AugmentConfig(), 64, SIZE, SIZE, 1.0, gen(seed))
        assert params.xflip is None and params.rotate90 is None
        assert (torch.linalg.det(inverse_geometry(params, 64, "cpu")[:, :, :2]) > 0).all()  # never a mirror image
    x = smooth_images()
    params = sample_params(only(xflip=True), 8, SIZE, SIZE, 1.0, gen(9))
    assert (params.xflip == -1).all()  # p = 1: every image
    torch.testing.assert_close(apply_params(x, params), x.flip(-1), atol=1e-5, rtol=0)
    half = sample_params(only(xflip=True), 256, SIZE, SIZE, 0.5, gen(9))
    assert 0.35 < (half.xflip == -1).float().mean() < 0.65


def test_rotate90_gives_quarter_turns_when_asked():
    x = smooth_images()
    params = sample_params(only(rotate90=True), 8, SIZE, SIZE, 1.0, gen(10))
    out = apply_params(x, params)
    for i in range(8):
        expected = torch.rot90(x[i], k=-int(params.rotate90[i]), dims=(1, 2))  # y points down
        torch.testing.assert_close(out[i], expected, atol=1e-5, rtol=0)
    assert len(set(params.rotate90.tolist())) > 1


def test_one_resample_for_all_geometric_augmentations(monkeypatch):
    calls = []
    real = torch.nn.functional.grid_sample
    monkeypatch.setattr(torch.nn.functional, "grid_sample", lambda *a, **k: calls.append(1) or real(*a, **k))
    AugmentPipe(AugmentConfig(xflip=True, rotate90=True))(smooth_images(), 1.0, gen())
    assert len(calls) == 1


# --- gradients -----------------------------------------------------------------------------------


def test_gradients_reach_the_images_and_double_backward_works():
    """The R1 penalty ‖∇ₓ D(A(x))‖² backpropagates to D's weights through the pipe."""
    x = smooth_images(4).requires_grad_(True)
    conv = torch.nn.Conv2d(1, 4, 3)
    d = lambda img: conv(img).square().mean(dim=(1, 2, 3))
    for cfg in (AugmentConfig(xflip=True, rotate90=True), AugmentConfig(mode="diffaugment")):
        conv.zero_grad()
        scores = d(AugmentPipe(cfg)(x, 0.9, gen(11)))
        (grad,) = torch.autograd.grad(scores.sum(), x, create_graph=True)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
        grad.square().sum(dim=(1, 2, 3)).mean().backward()
        assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()
        assert conv.weight.grad.abs().sum() > 0


def test_the_pipe_passes_gradcheck_and_gradgradcheck():
    cfg = AugmentConfig(xflip=True, rotate90=True)
    params = sample_params(cfg, 2, 8, 8, 0.9, gen(12))
    x = (torch.rand(2, 1, 8, 8, generator=gen(13), dtype=torch.float64) * 1.6 - 0.8).requires_grad_(True)
    f = lambda img: apply_params(img, params)
    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))


# --- reproducibility ---------------------------------------------------------------------------------


def test_same_seed_same_augmentation_and_the_global_rng_is_untouched():
    x = smooth_images()
    for cfg in (AugmentConfig(xflip=True), AugmentConfig(mode="diffaugment")):
        pipe = AugmentPipe(cfg)
        state = torch.get_rng_state()
        a, b = pipe(x, 0.6, gen(42)), pipe(x, 0.6, gen(42))
        assert torch.equal(torch.get_rng_state(), state)
        assert torch.equal(a, b)
        assert not torch.equal(a, pipe(x, 0.6, gen(43)))


def test_the_generator_advances_the_same_whatever_p():
    """A resumed run restores the stream: it must not depend on p or on the enabled set."""
    g1, g2, g3 = gen(5), gen(5), gen(5)
    x = smooth_images()
    AugmentPipe(AugmentConfig())(x, 0.0, g1)
    AugmentPipe(AugmentConfig())(x, 0.9, g2)
    AugmentPipe(only("cutout", xflip=True))(x, 0.3, g3)
    assert torch.equal(g1.get_state(), g2.get_state()) and torch.equal(g1.get_state(), g3.get_state())


def test_a_batch_of_eight_at_64_is_one_vectorized_call():
    x = smooth_images(8)
    out = AugmentPipe(AugmentConfig(xflip=True, rotate90=True))(x, 1.0, gen())
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert all(not torch.equal(out[i], x[i]) for i in range(8))


# --- DiffAugment -------------------------------------------------------------------------------------


def test_diffaugment_translation_shifts_by_whole_pixels_with_zero_padding():
    x = torch.ones(8, 1, SIZE, SIZE)
    out = diffaugment(x, "translation", gen(14))
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    for i in range(8):  # a zero band of |t| rows and columns along one side each
        rows = (out[i, 0] == 0).all(dim=1).sum()
        cols = (out[i, 0] == 0).all(dim=0).sum()
        assert rows <= 8 and cols <= 8
        assert (out[i, 0] == 1).sum() == (SIZE - rows) * (SIZE - cols)
    sq = (square_image() + 1) / 2  # a white square on 0, the padding's value
    moved = diffaugment(sq, "translation", gen(14))
    shifts = []
    for i in range(8):
        rows, cols = torch.nonzero(moved[i, 0] == 1, as_tuple=True)
        dy, dx = int(rows.min()) - 28, int(cols.min()) - 28
        assert abs(dx) <= 8 and abs(dy) <= 8
        assert torch.equal(moved[i], torch.roll(sq[i], shifts=(dy, dx), dims=(1, 2)))
        shifts.append((dx, dy))
    assert len(set(shifts)) > 1


def test_diffaugment_is_always_applied_and_its_policy_is_checked():
    x = smooth_images()
    out = AugmentPipe(AugmentConfig(mode="diffaugment", policy="color,cutout"))(x, 0.0, gen(15))
    assert all(not torch.equal(out[i], x[i]) for i in range(8))
    cut = diffaugment(torch.ones(8, 1, SIZE, SIZE), "cutout", gen(16))
    assert ((cut == 0).float().mean(dim=(1, 2, 3)) > 0).all()
    with pytest.raises(ValueError, match="unknown DiffAugment operation 'hue'"):
        AugmentConfig(mode="diffaugment", policy="color,hue")


# --- the p controller ----------------------------------------------------------------------------


def test_the_step_is_batch_times_interval_over_kimg():
    cfg = AugmentConfig()
    assert (cfg.target, cfg.interval, cfg.kimg, cfg.xflip, cfg.rotate90) == (0.6, 4, 500.0, False, False)
    assert ada_step(16, 4, 500) == pytest.approx(16 * 4 / 500_000)


def test_p_rises_while_d_is_sure_of_every_real_and_stops_at_one():
    cfg = AugmentConfig(kimg=0.5)  # a fast controller: 64·4 images per step of 0.512
    logits = torch.full((64,), 3.0)  # D overfits: sign +1 on every real
    p, history = initial_p(cfg), []
    for _ in range(4):
        total = sum(real_sign_stats(logits) for _ in range(cfg.interval))
        p, rt = update_p(p, float(total[0]), float(total[1]), 64, cfg)
        history.append(p)
        assert rt == 1.0
    assert history[0] == pytest.approx(ada_step(64, 4, 0.5)) and history[-1] == 1.0
    assert history == sorted(history)


@pytest.mark.parametrize("signs", [[1, -1] * 32, [-1] * 64])
def test_p_falls_when_d_is_not_sure_and_stops_at_zero(signs):
    cfg = AugmentConfig()
    step = ada_step(32, cfg.interval, cfg.kimg)
    logits = torch.tensor(signs, dtype=torch.float32) * 0.5
    total = real_sign_stats(logits)
    p, rt = update_p(0.5, float(total[0]), float(total[1]), 32, cfg)
    assert rt == pytest.approx(sum(signs) / len(signs)) and p == pytest.approx(0.5 - step)
    assert update_p(step / 2, float(total[0]), float(total[1]), 32, cfg)[0] == 0.0


def test_p_moves_at_most_one_step_and_stays_in_the_unit_interval():
    cfg = AugmentConfig(kimg=2.0)
    step = ada_step(32, cfg.interval, cfg.kimg)
    g = gen(17)
    p = 0.3
    for _ in range(500):
        count = 128
        sign_sum = float(torch.randint(-count, count + 1, (1,), generator=g))
        new, rt = update_p(p, sign_sum, count, 32, cfg)
        assert abs(new - p) <= step + 1e-12 and 0.0 <= new <= 1.0
        assert new == p or (new > p) == (rt > cfg.target)
        p = new
    assert update_p(0.4, 0.6 * 10, 10, 32, cfg)[0] == 0.4  # on target: no move


def test_only_ada_moves_p_and_nothing_counted_leaves_it():
    assert update_p(0.3, 10, 10, 32, AugmentConfig(mode="fixed", p=0.3)) == (0.3, 1.0)
    p, rt = update_p(0.3, 0, 0, 32, AugmentConfig())
    assert p == 0.3 and math.isnan(rt)
    assert initial_p(AugmentConfig(mode="fixed", p=0.25)) == 0.25
    assert initial_p(AugmentConfig(mode="diffaugment")) == 1.0 and initial_p(AugmentConfig(mode="none")) == 0.0


def run_d_with_ada(fakes_like_reals: bool, p: float, steps: int = 64, seed: int = 20) -> tuple[float, list[float]]:
    """A small D trained by the logistic loss on augmented reals and fakes, p under the controller.

    Reals: four fixed 16² images (a tiny set D can memorise). Fakes: noise, or, when
    ``fakes_like_reals``, fresh draws from the distribution the reals are drawn from each step.
    """
    cfg = AugmentConfig(kimg=0.2)  # a fast controller: 0.16 per update at batch 8
    pipe, g = AugmentPipe(cfg), gen(seed)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        d = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, 2, 1), torch.nn.LeakyReLU(0.2),
                                torch.nn.Conv2d(8, 8, 3, 2, 1), torch.nn.LeakyReLU(0.2),
                                torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 1))
    smooth = lambda n: torch.nn.functional.interpolate(torch.rand(n, 1, 4, 4, generator=g) * 2 - 1, size=16,
                                                       mode="bilinear")
    tiny_set = smooth(4)
    stats, rts = torch.zeros(2, dtype=torch.float64), []
    for step in range(1, steps + 1):
        reals = smooth(8) if fakes_like_reals else tiny_set[torch.randint(0, 4, (8,), generator=g)]
        fakes = smooth(8) if fakes_like_reals else torch.randn(8, 1, 16, 16, generator=g) * 0.5
        real_logits, fake_logits = d(pipe(reals, p, g)), d(pipe(fakes, p, g))
        loss = torch.nn.functional.softplus(-real_logits).mean() + torch.nn.functional.softplus(fake_logits).mean()
        d.zero_grad()
        loss.backward()
        with torch.no_grad():  # sign descent: Adam's direction without its state (or torch.optim's imports)
            for w in d.parameters():
                w -= 3e-3 * w.grad.sign()
        stats += real_sign_stats(real_logits)
        if step % cfg.interval == 0:
            p, rt = update_p(p, float(stats[0]), float(stats[1]), 8, cfg)
            rts.append(rt)
            stats.zero_()
    return p, rts


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread (pytest-xdist workers have one already; a plain run on a busy
    2-core machine spent 24 s instead of 1 s spinning two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_p_rises_when_d_memorises_a_tiny_real_set_and_falls_when_it_cannot(one_thread):
    p, rts = run_d_with_ada(fakes_like_reals=False, p=0.0)
    assert rts[0] == 1.0 and p > 0.15  # D memorises the four reals; p goes up, then holds r_t near 0.6
    assert sum(rts[8:]) / len(rts[8:]) == pytest.approx(0.6, abs=0.15)
    p, rts = run_d_with_ada(fakes_like_reals=True, p=0.5)
    assert p == 0.0 and sum(rts) / len(rts) < 0.3  # D cannot tell: p falls to 0 and stays


# --- the config --------------------------------------------------------------------------------------


def test_the_config_loads_as_a_run_config_section(tmp_path):
    path = tmp_path / "ada.yaml"
    path.write_text("mode: fixed\np: 0.2\naugment: [translate, cutout]\n", encoding="utf-8")
    cfg = load_config(AugmentConfig, path, ["xflip=true"])
    assert (cfg.mode, cfg.p, cfg.augment, cfg.xflip) == ("fixed", 0.2, ("translate", "cutout"), True)
    assert AugmentConfig().augment == AUGMENTATIONS
    with pytest.raises(ConfigError, match="unknown augmentation 'hue'"):
        load_config(AugmentConfig, None, ["augment=[translate, hue]"])
    with pytest.raises(ConfigError, match=r"p must be in \[0, 1\]"):
        load_config(AugmentConfig, None, ["p=1.5"])
    with pytest.raises(ConfigError, match="mode"):
        load_config(AugmentConfig, None, ["mode=sometimes"])
