"""Background removal against scenes with a known answer: local sources inside a "brain" mask,
strong air-like sources outside it (the background, harmonic inside the mask), on isotropic and
anisotropic grids, oblique B0, masks cut by the field of view and masks with holes.

Truth follows ``qsmkit.headmodel``: local field = D * (M (chi - mean_M chi)); everything else is
background. Two measures: NRMSE of the local field, and the *residual background*, the output
of the method given the background field alone (every method here is linear, or nearly so for
CG, so this is exactly the background it leaves in its result), relative to the local field."""

import numpy as np
import pytest
from scipy import ndimage

from qsmkit import background, dipole, metrics


def ball(shape, voxel, centre, radius):
    g = np.meshgrid(*[(np.arange(n) - n / 2) * v for n, v in zip(shape, voxel)], indexing="ij")
    return sum((q - c) ** 2 for q, c in zip(g, centre)) <= radius**2


# Measured (foundation): 3.9 % (1 mm) and 13.6 % (2.5 mm slices: the small spheres near the edge
# are coarse in z, and the air is 7 mm from the brain).
@pytest.mark.parametrize("voxel, bar", [((1.0, 1.0, 1.0), 6.0), ((0.9375, 0.9375, 2.5), 18.0)])
def test_vsharp_removes_harmonic_background(voxel, bar):
    shape = tuple(int(120 / v) for v in voxel)
    mask = ball(shape, voxel, (0, 0, 0), 40)
    local_chi = 0.1 * ball(shape, voxel, (5, 0, 0), 8)
    air = 9.4 * ball(shape, voxel, (0, 0, 52), 5)  # just above the "brain"
    pad = [n // 2 for n in shape]
    local = dipole.forward_field(local_chi.astype(np.float32), voxel, (0, 0, 1), pad=pad)
    bg = dipole.forward_field(air.astype(np.float32), voxel, (0, 0, 1), pad=pad)
    assert np.abs(bg[mask]).max() > 5 * np.abs(local[mask]).max()  # background dominates
    est, valid, info = background.vsharp(local + bg, mask, voxel)
    assert valid.sum() > 0.7 * mask.sum() and not (valid & ~mask).any()
    assert metrics.nrmse(est, local, valid) < bar
    assert info["radii_mm"][0] == 12.0


def test_ball_weights_are_isotropic_on_anisotropic_voxels():
    """The SMV ball's second moments at the voxel centres are equal along every axis, even on
    0.9375 x 0.9375 x 2.5 mm voxels (r^2/5 + d_min^2/12); this keeps V-SHARP from leaving
    shells of residual background."""
    voxel, r = (0.9375, 0.9375, 2.5), 6.0
    w = background.ball_weights(voxel, r)
    assert w.sum() == pytest.approx(1.0)
    grids = np.meshgrid(*[(np.arange(n) - n // 2) * v for n, v in zip(w.shape, voxel)],
                        indexing="ij")
    moments = [float((w * g**2).sum()) for g in grids]
    np.testing.assert_allclose(moments, r**2 / 5 + 0.9375**2 / 12, rtol=0.02)


def scene(voxel, b0_dir=(0, 0, 1), cut=False, hole=False):
    """(total, local, background, mask) on a 120 mm field of view; ``cut``: the mask runs out of
    the top of the field of view and air sources lie beyond it; ``hole``: an air bubble inside a
    hole in the mask."""
    fov = 120
    extra = 40 if cut else 0  # simulate on a taller grid, then crop to the field of view
    shape = tuple(int(round(n / v)) for n, v in zip((fov, fov, fov + 2 * extra), voxel))
    cz = 28.0 if cut else 0.0
    g = np.meshgrid(*[(np.arange(n) - n / 2 + 0.5) * v for n, v in zip(shape, voxel)], indexing="ij")

    def ell(c, semi):
        return sum(((q - ci) / si) ** 2 for q, ci, si in zip(g, c, semi)) <= 1

    mask = ell((0, 0, cz), (40, 45, 35))
    chi = np.zeros(shape, np.float32)
    chi[ell((10, 0, cz), (8, 8, 8))] = 0.1
    chi[ell((-15, 10, cz - 5), (6, 6, 6))] = -0.08
    chi[ell((-20, -15, cz + 8), (3, 12, 3))] = 0.3  # a vein-like rod
    chi[ell((0, 0, cz - 30), (30, 35, 10)) & ~mask] = 0.05  # tissue touching the mask
    chi = np.where(mask, chi, 0).astype(np.float32)
    air = ell((0, 35, cz - 45), (15, 10, 8)) | ell((0, -52, cz), (6, 6, 6))
    if cut:
        air |= ell((0, 0, cz + 60), (20, 20, 8))  # beyond the top of the field of view
    if hole:
        bubble = ell((-5, -20, cz + 5), (4, 4, 4))
        mask &= ~ell((-5, -20, cz + 5), (6, 6, 6))
        air |= bubble
    pad = [n // 2 for n in shape]
    chi_local = np.where(mask, chi - chi[mask].mean(), 0).astype(np.float32)
    local = dipole.forward_field(chi_local, voxel, b0_dir, pad=pad)
    # Partial-volume (smoothed) air edges: a binary 9.4 ppm sphere puts so much energy at the
    # Nyquist frequency that, with oblique B0, its sampled field is no longer harmonic on the grid.
    air = np.where(mask, 0, ndimage.gaussian_filter(air.astype(np.float32), 1.0))
    chi_bg = np.where(mask, chi[mask].mean(), chi) + 9.4 * air
    bg = dipole.forward_field(chi_bg.astype(np.float32), voxel, b0_dir, pad=pad)
    if cut:
        keep = (slice(None), slice(None), slice(extra * shape[2] // (fov + 2 * extra),
                                                (fov + extra) * shape[2] // (fov + 2 * extra)))
        local, bg, mask = local[keep], bg[keep], mask[keep]
    return local + bg, local * mask, bg, mask


OBLIQUE = tuple(np.array([0.3, -0.2, 1.0]) / np.linalg.norm([0.3, -0.2, 1.0]))
CASES = {
    "iso": dict(voxel=(1.5, 1.5, 1.5)),
    "aniso": dict(voxel=(1.0, 1.0, 2.5)),
    "oblique": dict(voxel=(1.5, 1.5, 1.5), b0_dir=OBLIQUE),
    "cut": dict(voxel=(1.5, 1.5, 1.5), cut=True),
    "hole": dict(voxel=(1.5, 1.5, 1.5), hole=True),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    kw = CASES[request.param]
    return request.param, kw.get("voxel"), kw.get("b0_dir", (0, 0, 1)), scene(**kw)


# Measured over the five scenes (residual background / NRMSE, %): PDF <= 1.5 / 22-26 (whole mask),
# V-SHARP <= 3.9 / 13-22 (its eroded mask, about 80 % of the voxels), RESHARP <= 1.7 / 24-31.
# The NRMSE floor of the harmonic methods is not background: it is the part of the local
# sources' own field that looks harmonic inside the mask, which they remove with the background.
# TFI (PDF, then a joint fit with a TV prior on the sources inside the mask; no magnitude here,
# so plain TV) gets past it: <= 0.17 / 6.0-9.7 (its parameters were chosen on the head model,
# not on these scenes).
RESIDUAL_BAR = {"pdf": 3.0, "vsharp": 6.0, "resharp": 3.0, "tfi": 1.0, "tfi-fast": 3.0}
NRMSE_BAR = {"pdf": 30.0, "vsharp": 26.0, "resharp": 35.0, "tfi": 15.0, "tfi-fast": 20.0}


@pytest.mark.parametrize("method", ["pdf", "vsharp", "resharp", "tfi", "tfi-fast"])
def test_background_scenes(case, method):
    name, voxel, b0_dir, (total, local, bg, mask) = case
    assert np.abs(bg[mask]).max() > 5 * np.abs(local[mask]).max()  # background dominates
    func = background.BACKGROUND.get(method).func
    est, valid, info = func(total, mask, voxel, b0_dir)
    assert not (valid & ~mask).any() and valid.sum() > 0.6 * mask.sum()
    left, _, _ = func(bg, mask, voxel, b0_dir)
    residual = 100 * np.linalg.norm(left[valid]) / np.linalg.norm(local[valid])
    err = metrics.nrmse(est, local, valid)
    print(f"{name} {method}: NRMSE {err:.1f}% residual background {residual:.1f}% {info}")
    assert residual < RESIDUAL_BAR[method], f"{name} {method}: residual background {residual:.1f}%"
    assert err < NRMSE_BAR[method], f"{name} {method}: NRMSE {err:.1f}%"


@pytest.mark.parametrize("method", ["pdf", "vsharp", "resharp", "tfi", "tfi-fast"])
def test_bad_input(method):
    from qsmkit.errors import QSMInputError

    func = background.BACKGROUND.get(method).func
    voxel = (2.0, 2.0, 2.0)
    shape = (40, 40, 40)
    mask = ball(shape, voxel, (0, 0, 0), 28)
    field = dipole.forward_field((9.4 * ball(shape, voxel, (0, 0, 34), 4)).astype(np.float32),
                                 voxel, (0, 0, 1), pad=20)
    with pytest.raises(QSMInputError, match="mask is empty"):
        func(field, np.zeros(shape, bool), voxel, (0, 0, 1))
    with pytest.raises(QSMInputError, match=r"mask shape \(40, 40, 39\) does not match"):
        func(field, mask[:, :, :-1], voxel, (0, 0, 1))
    bad = field.copy()
    bad[20, 20, 20] = np.nan
    with pytest.raises(QSMInputError, match="1 NaN/Inf voxels inside the mask"):
        func(bad, mask, voxel, (0, 0, 1))
    # NaN outside the mask is ignored: the same result as the field set to 0 there
    outside = field.copy()
    outside[~mask] = np.nan
    a, _, _ = func(outside, mask, voxel, (0, 0, 1))
    b, _, _ = func(np.where(mask, field, 0), mask, voxel, (0, 0, 1))
    np.testing.assert_array_equal(a, b)
    if method.startswith("tfi"):
        with pytest.raises(QSMInputError, match="magnitude shape"):
            func(field, mask, voxel, (0, 0, 1), magnitude=np.ones((4, 4, 4)))
        with pytest.raises(QSMInputError, match="magnitude is all zeros"):
            func(field, mask, voxel, (0, 0, 1), magnitude=np.zeros(shape))
        with pytest.raises(QSMInputError, match="lam must be a positive"):
            func(field, mask, voxel, (0, 0, 1), lam=-1.0)
        with pytest.raises(QSMInputError, match="edge_fraction"):
            func(field, mask, voxel, (0, 0, 1), edge_fraction=1.5)
    if method == "tfi-fast":
        with pytest.raises(QSMInputError, match="relax"):
            func(field, mask, voxel, (0, 0, 1), relax=2.5)
        with pytest.raises(QSMInputError, match="box_mm"):
            func(field, mask, voxel, (0, 0, 1), box_mm=0)
    if method in ("pdf", "tfi", "tfi-fast"):
        with pytest.raises(QSMInputError, match="weights shape"):
            func(field, mask, voxel, (0, 0, 1), weights=np.ones((4, 4, 4)))
        with pytest.raises(QSMInputError, match="weights are zero"):
            func(field, mask, voxel, (0, 0, 1), weights=np.zeros(shape))


def test_pdf_weights_follow_noise():
    """With noise that is 10x stronger in half the brain, weighting by 1/SD fits the background
    to the clean half and gives a better local field than the unweighted fit."""
    voxel = (2.0, 2.0, 2.0)
    shape = (64, 64, 64)
    mask = ball(shape, voxel, (0, 0, 0), 40)
    local_chi = np.where(ball(shape, voxel, (8, 0, 0), 10), 0.1, 0).astype(np.float32)
    local = dipole.forward_field(np.where(mask, local_chi - local_chi[mask].mean(), 0)
                                 .astype(np.float32), voxel, (0, 0, 1), pad=32)
    air = ndimage.gaussian_filter(9.4 * ball(shape, voxel, (0, 0, 52), 8).astype(np.float32), 1)
    bg = dipole.forward_field(np.where(mask, 0, air).astype(np.float32), voxel, (0, 0, 1), pad=32)
    sd = np.where(np.arange(shape[0])[:, None, None] < shape[0] // 2, 0.002, 0.02) * np.ones(shape)
    noisy = local + bg + np.random.default_rng(0).normal(0, 1, shape) * sd
    clean = mask & (sd < 0.01)
    plain, _, _ = background.pdf(noisy, mask, voxel, (0, 0, 1))
    weighted, _, info = background.pdf(noisy, mask, voxel, (0, 0, 1), weights=1 / sd)
    assert info["weighted"]
    # noise is not background: the ideal output is local + noise; what differs is the fitted
    # background, which the noisy half drags off in the unweighted fit
    target = noisy - bg
    e_plain = metrics.nrmse(plain, target, clean)
    e_weighted = metrics.nrmse(weighted, target, clean)
    assert e_weighted < 0.8 * e_plain, (e_weighted, e_plain)


def test_pdf_padding_only_where_the_mask_nears_the_border():
    voxel = (1.0, 1.0, 2.5)
    mask = np.zeros((100, 100, 40), bool)
    mask[30:70, 5:95, 2:30] = True  # 30 mm from the x borders, 5 mm in y, 5 mm below in z
    # 12 mm margin: x needs none, y 12 - 5 = 7 voxels, z ceil(12 / 2.5) - 2 = 3 slices
    assert background.default_pdf_pad(mask, voxel) == [0, 7, 3]
    assert background.default_pdf_pad(mask, voxel, margin_mm=40) == [10, 35, 14]


def test_pipeline_gives_tfi_the_magnitude():
    """The pipeline hands its combined magnitude to background methods that take one (tfi's
    edge prior) and the field fit's noise weights to all of them."""
    from qsmkit.pipeline import PipelineConfig, run_pipeline
    from qsmkit.simulate import make_phantom, simulate_acquisition

    ph = make_phantom(shape=(48, 48, 24), voxel_size=(4.0, 4.0, 6.0))
    acq = simulate_acquisition(ph, te=(0.02,), b0=3.0)
    res = run_pipeline(acq.magnitude, acq.phase, acq.te, acq.b0, ph.voxel_size, ph.b0_dir,
                       mask=ph.mask, config=PipelineConfig(
                           background="tfi", background_params={"max_iter": 5}))
    info = next(r for r in res.stages if r["stage"] == "background")["info"]
    assert info["fallback"] is None and info["weighted"] and info["iterations"] == 5


def test_tfi_edge_mask_of_a_noise_free_magnitude():
    """A piecewise-constant magnitude has edges on far fewer voxels than edge_fraction: only
    those are freed (the percentile alone would be 0 and free every voxel, which turns TFI's
    prior off)."""
    from qsmkit.tfi import edge_free_mask

    mag = np.ones((20, 20, 20), np.float32)
    mag[10:, :, :] = 2.0  # one plane of edges: 5 % of the voxels
    mask = np.ones(mag.shape, bool)
    free = edge_free_mask(mag, mask, 0.3)
    assert free.dtype == np.float32
    assert np.array_equal(free == 0, np.abs(np.roll(mag, -1, 0) - mag) > 0)
    noisy = mag + np.random.default_rng(0).normal(0, 0.01, mag.shape).astype(np.float32)
    assert abs((edge_free_mask(noisy, mask, 0.3) == 0).mean() - 0.3) < 0.01


def test_cap_weights_lowers_only_the_bright_voxels():
    """Weights above the mask's median go down to it; those below keep their ratio to the rest
    (they mark unreliable voxels); the result has mean 1 in the mask and is unchanged outside
    the rule's reach (cap 0, no weights)."""
    from qsmkit.background_base import cap_weights

    m = np.ones(100, bool)
    w = np.r_[np.full(40, 3.0), np.full(50, 1.0), np.full(10, 0.1)].astype(np.float32)
    out, share = cap_weights(w.copy(), m, 1.0)
    assert share == pytest.approx(0.4)
    assert out.mean() == pytest.approx(1.0, rel=1e-6)
    assert np.ptp(out[:90]) == 0  # the bright voxels now weigh what the median voxel weighs
    assert out[95] / out[0] == pytest.approx(0.1, rel=1e-6)  # the low ones are still 10x lower
    assert cap_weights(None, m, 1.0) == (None, 0.0)
    np.testing.assert_array_equal(cap_weights(w.copy(), m, 0.0)[0], w)


def test_tfi_fast_bright_rim_weights():
    """A rim of voxels twice as bright as the rest at the mask's edge (CSF next to the skull:
    less noise there, but no smaller background misfit) pulls the raw-weighted fit (the
    default) towards it and raises the local-field error; with the weights capped at their
    median (``weight_cap=1``) the error is the unweighted fit's. Measured: 6.97 % raw, 5.85 %
    capped and unweighted."""
    voxel = (1.5, 1.5, 1.5)
    total, local, _, mask = scene(voxel)
    w = np.where(ndimage.distance_transform_edt(mask) <= 2, 2.0, 1.0).astype(np.float32)
    func = background.BACKGROUND.get("tfi-fast").func
    raw, _, info0 = func(total, mask, voxel, (0, 0, 1), weights=w)
    capped, _, info = func(total, mask, voxel, (0, 0, 1), weights=w, weight_cap=1.0)
    plain, _, _ = func(total, mask, voxel, (0, 0, 1))
    e_raw, e_cap, e_plain = (metrics.nrmse(x, local, mask) for x in (raw, capped, plain))
    assert info0["weights_capped_share"] == 0 and 0.1 < info["weights_capped_share"] < 0.3
    assert e_cap < 0.9 * e_raw, (e_cap, e_raw)
    assert abs(e_cap - e_plain) < 0.2, (e_cap, e_plain)


def test_tfi_edge_mask_inside_only_ignores_the_mask_boundary():
    """A uniform, noisy magnitude inside a ball: by default the mask's own boundary (bright
    inside, zero outside) holds the largest forward differences and most of its voxels are freed
    (measured 74 %); with ``inside_only`` it is no edge and its voxels are freed about as often
    as the rest."""
    from qsmkit.tfi import edge_free_mask

    mask = ball((32, 32, 32), (1.0, 1.0, 1.0), (0, 0, 0), 12)
    rim = mask & ~ndimage.binary_erosion(mask)
    mag = 1 + np.random.default_rng(1).normal(0, 0.01, mask.shape).astype(np.float32)
    default = edge_free_mask(mag, mask, 0.3) == 0
    inside = edge_free_mask(mag, mask, 0.3, inside_only=True) == 0
    for free in (default, inside):
        assert abs(free[mask].mean() - 0.3) < 0.01
    assert default[rim].mean() > 0.7, default[rim].mean()
    assert inside[rim].mean() < 0.4, inside[rim].mean()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tfi_fused_admm_matches_the_array_code(dtype):
    """The numba kernel that fuses an ADMM iteration's work between its FFTs
    (``tfi._admm_rows_py``, run on one-row blocks, every row a seam between blocks) against the
    whole-array code it replaces on the CPU
    (``tfi._admm_step_xp``, cupy's path): one step on random arrays with a periodic wrap on every
    axis agrees to rounding, and ``tfi-fast`` on the analytic scene gives the same local field
    either way (local-field NRMSE against the truth: measured 6.38 % in float32, 6.32 % in
    float64)."""
    from qsmkit import backend, tfi

    rng = np.random.default_rng(3)
    shape = (7, 6, 5)

    def arrays():
        a = [rng.standard_normal(s + shape).astype(dtype) for s in ((), (), (), (), (3,), (3,))]
        pen = (rng.random((3,) + shape) > 0.3).astype(dtype)
        w2f, u_den = rng.standard_normal(shape).astype(dtype), rng.random(shape).astype(dtype)
        consts = [dtype(x) for x in (0.05, 1.7, -0.7, 0.3)]
        return a + [pen, w2f, u_den] + consts + [np.zeros(shape, dtype), np.zeros(shape, dtype)]

    state = rng.bit_generator.state
    ref = arrays()
    rng.bit_generator.state = state
    out = arrays()
    tfi._admm_step_xp(*ref)
    step = tfi._FusedAdmmStep(shape, dtype)
    step(*out)
    step.close()
    assert len(step.blocks) == shape[0]
    rng.bit_generator.state = state
    again = arrays()
    serial = tfi._FusedAdmmStep(shape, dtype)
    serial.close()
    serial.pool = None  # the same blocks one after another: the same sums, bit for bit
    serial(*again)
    for x, y in zip(out, again):
        if isinstance(x, np.ndarray):
            np.testing.assert_array_equal(y, x)
    names = "chi dchi u eta g nu pen w2f u_den rho a b thr buf r".split()
    for name, x, y in zip(names, ref, out):
        if isinstance(x, np.ndarray) and name != "dchi":  # dchi: scratch in the array code
            np.testing.assert_allclose(y, x, rtol=0, atol=1e-5 * max(1.0, np.abs(x).max()),
                                       err_msg=name)
    assert np.abs(out[-1]).max() > 0.1  # grad^T (g + nu) was formed

    voxel = (2.0, 2.0, 2.0)
    total, local, _, mask = scene(voxel)
    func = background.BACKGROUND.get("tfi-fast").func
    admm = tfi._admm
    res = {}
    try:
        with backend.precision(dtype):
            for fused in (False, True):
                tfi._admm = lambda *a, fused=fused: admm(*a, fused=fused)
                res[fused] = func(total, mask, voxel, (0, 0, 1), magnitude=mask + 1.0)[0]
    finally:
        tfi._admm = admm
    assert res[True].dtype == dtype
    e = metrics.nrmse(res[True], local, mask)
    assert np.linalg.norm(res[True] - res[False]) < 1e-4 * np.linalg.norm(res[False])
    print(f"tfi-fast on the scene ({np.dtype(dtype).name}): local-field NRMSE {e:.2f} %")
    assert 5.5 < e < 7.2, e
