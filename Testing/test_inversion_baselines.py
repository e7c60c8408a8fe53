"""Baseline dipole inversions (``qsmkit.inversion_baselines``): LSQR and TV-ADMM.

Each is checked against an independent implementation on a small problem (scipy's LSQR; a
smoothed-TV objective minimised by L-BFGS), then for accuracy on the built-in phantom and the
2016 QSM challenge, and for bad input. Bars are measured values plus a margin; measured
figures are quoted beside each.

Phantom: ``make_phantom`` on a 128 x 128 x 32 grid (1.875 x 1.875 x 5 mm: the default field of
view at half the resolution, for speed), local field plus Gaussian noise of 6.2e-4 ppm (phase
noise 1/SNR at SNR 100, TE 20 ms, 3 T), truth ``chi_brain``, as in
benchmarks/inversion_methods.py.
"""

import json
import math

import numpy as np
import pytest
import scipy.optimize
import scipy.sparse.linalg as spla

from qsmkit import inversion, metrics, units
from qsmkit import inversion_baselines as ib
from qsmkit.dipole import dipole_kernel, forward_field
from qsmkit.errors import QSMInputError
from qsmkit.simulate import make_phantom

NOISE_PPM = float(units.rad_to_ppm(0.01, 3.0, 0.020))  # 6.2e-4 ppm


def _smooth_random(shape, seed, width=3):
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.standard_normal(shape), width)


# ------------------------------------------------------- independent reference implementations


def test_lsqr_matches_scipy_lsqr():
    """After k iterations our float32 LSQR equals scipy's float64 LSQR (Paige & Saunders)
    on the same weighted, masked operator, built here from a full complex FFT."""
    shape, vox, b0 = (32, 30, 24), (1.0, 1.1, 1.3), (0.2, 0.1, 1.0)
    mask = np.ones(shape, bool)
    mask[:3, :3, :] = False  # the bounding box is still the whole volume: no cropping
    chi = _smooth_random(shape, 1) * 0.1
    field = (forward_field(chi, vox, b0) + 1e-3 * np.random.default_rng(2).standard_normal(shape))
    field = (field * mask).astype(np.float32)
    mag = (0.5 + np.random.default_rng(3).random(shape)).astype(np.float32)

    d = dipole_kernel(shape, vox, b0, real=False, dtype=np.float64)
    w = mag * mask / mag[mask].mean()
    m = mask.astype(float)

    def conv(x):
        return np.fft.ifftn(np.fft.fftn(x) * d).real

    n = int(np.prod(shape))
    op = spla.LinearOperator((n, n), dtype=np.float64,
                             matvec=lambda x: (w * conv(m * x.reshape(shape))).ravel(),
                             rmatvec=lambda y: (m * conv(w * y.reshape(shape))).ravel())
    for k in (3, 12):
        ref = spla.lsqr(op, (w * field).ravel().astype(np.float64), atol=0, btol=0, conlim=0,
                        iter_lim=k)
        ours, info = ib.lsqr(field, mask, vox, b0, mag, max_iter=k, pad_mm=0)
        assert info["grid"] == list(shape) and info["iterations"] == k
        ref_x = ref[0].reshape(shape) * mask
        err = np.linalg.norm(ours - ref_x) / np.linalg.norm(ref_x)
        assert err < 1e-5, (k, err)  # measured 3e-7 (k = 3), 5e-7 (k = 12)
        # the residual norm LSQR tracks (phibar) is the true residual
        assert info["relative_residual"] == pytest.approx(
            ref[3] / np.linalg.norm(w * field), rel=1e-3)


def test_tv_admm_reaches_the_minimum_of_its_objective():
    """Converged TV-ADMM against L-BFGS on the same objective (1) with |t| smoothed to
    sqrt(t^2 + eps^2), eps tiny: ADMM's objective is no higher than L-BFGS's (2000 iterations)
    and the maps agree within 1 % (data everywhere, no padding: both solve the same problem)."""
    shape, vox, b0 = (24, 24, 20), (1.0, 1.0, 1.5), (0.0, 0.3, 1.0)
    labels = (_smooth_random(shape, 4, 2) > 0.05).astype(float) - (_smooth_random(shape, 5, 2) > 0.1)
    chi = (0.05 * labels).astype(np.float32)
    rng = np.random.default_rng(6)
    field = (forward_field(chi, vox, b0) + 2e-3 * rng.standard_normal(shape)).astype(np.float32)
    mag = (1.0 + 0.5 * labels + 0.05 * rng.standard_normal(shape)).astype(np.float32)
    mask = np.ones(shape, bool)
    alpha = 2e-4
    ours, info = ib.tv(field, mask, vox, b0, mag, alpha=alpha, mu1_factor=100.0, max_iter=600, tol=1e-6,
                       pad_mm=0)
    assert info["grid"] == list(shape)
    assert info["primal_residual"] < 1e-3 and info["dual_residual"] < 1e-2, info

    d = dipole_kernel(shape, vox, b0, real=False, dtype=np.float64)
    w2 = (mag / mag.mean()).astype(np.float64) ** 2
    mg = ib.edge_mask(mag, mask, vox, ib.edge_share(vox))  # tv's default share at these voxels
    eps = 1e-7

    def conv(x):
        return np.fft.ifftn(np.fft.fftn(x) * d).real

    def grad(x, ax):
        return (np.roll(x, -1, ax) - x) / vox[ax]

    def grad_t(y, ax):
        return (np.roll(y, 1, ax) - y) / vox[ax]

    def objective(x, smooth):
        x = x.reshape(shape)
        r = conv(x) - field
        val = 0.5 * np.sum(w2 * r * r)
        g = np.zeros(shape)
        for ax in range(3):
            gx = grad(x, ax)
            mag_t = np.sqrt(gx * gx + eps * eps) if smooth else np.abs(gx)
            val += alpha * np.sum(mg[ax] * mag_t)
            g += alpha * grad_t(mg[ax] * gx / np.sqrt(gx * gx + eps * eps), ax)
        g += conv(w2 * r)
        return val, g.ravel()

    x0 = inversion.l2(field, mask, vox, b0)[0].astype(np.float64).ravel()
    ref = scipy.optimize.minimize(objective, x0, args=(True,), jac=True, method="L-BFGS-B",
                                  options={"maxiter": 2000, "maxcor": 30, "ftol": 1e-15, "gtol": 1e-12})
    j_ours = objective(ours.astype(np.float64).ravel(), False)[0]
    j_ref = objective(ref.x, False)[0]
    assert j_ours <= j_ref * (1 + 1e-4), (j_ours, j_ref)  # measured: ours 5e-6 lower
    a = ours - ours.mean()
    b = ref.x.reshape(shape) - ref.x.mean()  # the mean is not determined (D(0) = 0, TV)
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 0.01  # measured 0.24 %


# ------------------------------------------------------------------------- built-in phantom


@pytest.fixture(scope="module")
def phantom_runs():
    ph = make_phantom(shape=(128, 128, 32), voxel_size=(1.875, 1.875, 5.0))
    rng = np.random.default_rng(0)
    field = ((ph.field_local + NOISE_PPM * rng.standard_normal(ph.chi.shape)) * ph.mask)
    field = field.astype(np.float32)
    args = (field, ph.mask, ph.voxel_size, ph.b0_dir)
    runs = {}
    for name, call in [
        ("tkd", lambda: inversion.tkd(*args)),
        ("lsqr", lambda: ib.lsqr(*args, ph.magnitude)),
        ("lsqr_30", lambda: ib.lsqr(*args, ph.magnitude, max_iter=30)),
        ("lsqr_discrepancy", lambda: ib.lsqr(*args, ph.magnitude, max_iter=100, noise=NOISE_PPM)),
        ("tv", lambda: ib.tv(*args, ph.magnitude)),
        ("tv_no_magnitude", lambda: ib.tv(*args)),
        ("tv_lcurve", lambda: ib.tv(*args, ph.magnitude, alpha="lcurve")),
    ]:
        chi, info = call()
        runs[name] = {"nrmse": metrics.nrmse(chi, ph.chi_brain, ph.mask),
                      "hfen": metrics.hfen(chi, ph.chi_brain, ph.mask), "info": info}
        print(f"phantom {name}: NRMSE {runs[name]['nrmse']:.2f} % HFEN {runs[name]['hfen']:.2f} %")
    runs["voxel_size"] = tuple(ph.voxel_size)
    return runs


def test_phantom_tv(phantom_runs):
    """Measured: TV-ADMM at the noise rule's alpha (0.5 sigma h) with residual balancing 1.32 %
    (HFEN 0.94 %; fixed penalties mu1 = 30 alpha, mu2 = 1 and the former stop at a 1 % change
    of chi gave 3.4 %), without the magnitude 25.1 %, TKD 32.0 %, the L-curve's alpha 1.63 %.
    The phantom's magnitude is noise-free and shares chi's edges, so the MEDI edge mask is exact
    here."""
    r = phantom_runs
    assert r["tv"]["nrmse"] < 1.5 and r["tv"]["hfen"] < 1.1, r["tv"]["nrmse"]
    assert r["tv"]["nrmse"] < r["tkd"]["nrmse"] / 5
    assert r["tv"]["nrmse"] < r["tv_no_magnitude"]["nrmse"] / 5  # the edge mask is what works
    lc = r["tv_lcurve"]
    assert lc["info"]["alpha_from"] == "l-curve" and lc["nrmse"] < 2.0, lc["nrmse"]
    alphas = lc["info"]["lcurve"]["alphas"]
    assert alphas[-1] < lc["info"]["alpha"] < alphas[0]  # a corner, not an end of the grid


def test_phantom_lsqr(phantom_runs):
    """Measured: 30 iterations 25.0 % (better than TKD, 32.0 %); the default 5 iterations,
    meant for in-vivo fields, 40.6 %, *worse* than TKD here; the discrepancy principle with the
    true noise SD stops at 7 iterations, 35.1 %."""
    r = phantom_runs
    assert r["lsqr_30"]["nrmse"] < 28.0 and r["lsqr_30"]["nrmse"] < r["tkd"]["nrmse"] - 4
    assert r["lsqr_30"]["hfen"] < r["tkd"]["hfen"]
    assert r["lsqr"]["nrmse"] < 45.0
    assert r["lsqr"]["nrmse"] > r["tkd"]["nrmse"]  # the documented trade-off of the default
    dp = r["lsqr_discrepancy"]
    assert dp["info"]["stopped_by"] == "discrepancy" and 4 <= dp["info"]["iterations"] <= 12
    n = dp["info"]["residual_history"]
    assert n[-1] < n[-2]  # the residual falls monotonically (LSQR)
    assert dp["nrmse"] < 40.0


def test_info_is_serialisable_and_complete(phantom_runs):
    tv = phantom_runs["tv"]["info"]
    json.dumps(tv)
    # the noise rule: alpha = 0.5 sigma h with sigma estimated near the true noise SD
    assert tv["alpha_from"] == "noise rule" and 0.5 * NOISE_PPM < tv["noise_sd_ppm"] < 2 * NOISE_PPM
    h = float(np.prod(phantom_runs["voxel_size"])) ** (1 / 3)
    assert tv["alpha"] == pytest.approx(ib.ALPHA_KAPPA * tv["noise_sd_ppm"] * h, rel=1e-6)
    # the primal-dual stopping rule: every normalised residual below tol when it stops by tol
    assert tv["stopped_by"] == "tol" and 1 <= tv["iterations"] <= tv["max_iter"] == 60  # measured 60
    assert set(tv["residuals"]) == {"r1", "d1", "r2", "d2"}
    assert 0 < max(tv["residuals"].values()) < tv["tol"]
    assert tv["primal_residual"] == max(tv["residuals"]["r1"], tv["residuals"]["r2"])
    assert 1 <= tv["penalty_changes"] <= ib.TV_MAX_CHANGES
    assert tv["weights"] == "magnitude" and tv["mu1_start"] == pytest.approx(15 * tv["alpha"])
    # residual balancing moves the penalties by powers of 2 only
    for k in ("mu1", "mu2"):
        steps = math.log2(tv[k] / tv[k + "_start"])
        assert steps == pytest.approx(round(steps), abs=1e-9)
    ls = phantom_runs["lsqr"]["info"]
    json.dumps(ls)
    assert ls["iterations"] == 5 and ls["stopped_by"] == "max_iter"
    assert len(ls["residual_history"]) == 5 and ls["relative_residual"] < 1


def test_registered():
    for name, func in (("lsqr", ib.lsqr), ("tv", ib.tv)):
        assert inversion.INVERSION.get(name).func is func


# ----------------------------------------------------------------------- 2016 QSM challenge


def test_qsm2016_challenge():
    """Measured (NRMSE vs chi_33 / COSMOS, HFEN vs chi_33): TKD 110.6 / 86.4 / 100.1; LSQR
    (5 iterations) 90.9 / 71.0 / 83.1; TV-ADMM at the noise rule's alpha, residual balancing,
    60 iterations 94.2 / 78.0 (fixed penalties and the former 1 % change stop: 93.5 / 77.1 / 80.0;
    with the former alpha 2e-3 and mu1 = 100 alpha 87.0 / 71.2 / 77.0). For context: L2
    (lambda 0.05) 84.8 / 65.1."""
    from conftest import load_qsm2016

    d = load_qsm2016()
    field, magn, mask = d["field"], d["magnitude"], d["mask"]
    refs = {"chi_33": d["chi_33"], "cosmos": d["cosmos"]}
    vox, b0 = d["voxel_size"], d["b0_dir"]
    res = {}
    for name, call in [("tkd", lambda: inversion.tkd(field, mask, vox, b0)),
                       ("lsqr", lambda: ib.lsqr(field, mask, vox, b0, magn)),
                       ("tv", lambda: ib.tv(field, mask, vox, b0, magn))]:
        chi, info = call()
        res[name] = {k: metrics.nrmse(chi, ref, mask) for k, ref in refs.items()}
        res[name]["hfen"] = metrics.hfen(chi, refs["chi_33"], mask)
        res[name]["info"] = info
        res[name]["chi"] = chi
        print(f"qsm2016 {name}: NRMSE {res[name]['chi_33']:.1f} % vs chi_33, "
              f"{res[name]['cosmos']:.1f} % vs COSMOS, HFEN {res[name]['hfen']:.1f} %")
    bars = {"lsqr": (95.0, 75.0, 10.0), "tv": (95.0, 79.0, 5.0)}
    for name, (b33, bc, margin) in bars.items():
        assert res[name]["chi_33"] < b33 and res[name]["cosmos"] < bc, (name, res[name])
        # the ordering users expect: both baselines beat TKD, by a margin
        assert res[name]["chi_33"] < res["tkd"]["chi_33"] - 10
        assert res[name]["cosmos"] < res["tkd"]["cosmos"] - margin
        assert res[name]["hfen"] < res["tkd"]["hfen"] - 10
    # in vivo the residual rule is not met within the 60-iteration budget (160^3 in ~15 s)
    tvi = res["tv"]["info"]
    assert tvi["stopped_by"] == "max_iter" and tvi["iterations"] == 60
    assert max(tvi["residuals"].values()) < 0.03, tvi["residuals"]
    # tv is the default because it keeps deep-gray contrast: the 11 ROI means (relative to the
    # mask's mean) against chi_33's, slope 0.95 and mean error 15.7 ppb measured (FOCUSS 0.66 /
    # 22.2 ppb). The references disagree by 12.7 ppb between themselves (COSMOS vs chi_33),
    # mostly in the white-matter ROIs 9 and 11, where chi_33 carries anisotropy.
    labels = d["labels"]

    def roi_means(x):
        x = np.where(mask, x - x[mask].mean(), 0)
        return np.array([x[labels == k].mean() for k in range(1, 12)])

    ref_means, tv_means = roi_means(refs["chi_33"]), roi_means(res["tv"]["chi"])
    slope = np.polyfit(ref_means, tv_means, 1)[0]
    assert 0.9 < slope < 1.1, slope
    assert 1000 * np.abs(tv_means - ref_means).mean() < 18.0


# ------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("method", [ib.lsqr, ib.tv])
def test_bad_input(method):
    shape, vox, b0 = (16, 16, 16), (1.0, 1.0, 1.0), (0, 0, 1)
    mask = np.zeros(shape, bool)
    mask[4:12, 4:12, 4:12] = True
    field = (_smooth_random(shape, 7, 2) * mask).astype(np.float32)
    with pytest.raises(QSMInputError, match="mask is empty"):
        method(field, np.zeros(shape, bool), vox, b0)
    with pytest.raises(QSMInputError, match="all zeros"):
        method(np.zeros(shape, np.float32), mask, vox, b0)
    with pytest.raises(QSMInputError, match="magnitude shape"):
        method(field, mask, vox, b0, np.ones((16, 16, 15), np.float32))
    with pytest.raises(QSMInputError, match="mask shape"):
        method(field, mask[:, :, :8], vox, b0)
    bad = field.copy()
    bad[8, 8, 8] = np.nan
    with pytest.raises(QSMInputError, match="NaN"):
        method(bad, mask, vox, b0)
    with pytest.raises(QSMInputError, match="voxel size"):
        method(field, mask, (1.0, 0.0, 1.0), b0)
    with pytest.raises(QSMInputError, match="max_iter") as exc:
        method(field, mask, vox, b0, max_iter=0)
    assert "\n" not in str(exc.value) and str(exc.value).startswith(method.__name__)


def test_bad_parameters():
    shape, vox, b0 = (16, 16, 16), (1.0, 1.0, 1.0), (0, 0, 1)
    mask = np.ones(shape, bool)
    field = _smooth_random(shape, 8, 2).astype(np.float32)
    with pytest.raises(QSMInputError, match="alpha"):
        ib.tv(field, mask, vox, b0, alpha=-1.0)
    with pytest.raises(QSMInputError, match="alpha"):
        ib.tv(field, mask, vox, b0, alpha="gcv")
    with pytest.raises(QSMInputError, match="edge_fraction"):
        ib.tv(field, mask, vox, b0, edge_fraction=1.5)
    with pytest.raises(QSMInputError, match="lcurve_alphas"):
        ib.tv(field, mask, vox, b0, alpha="lcurve", lcurve_alphas=[1e-3, 1e-2])
    with pytest.raises(QSMInputError, match="noise"):
        ib.lsqr(field, mask, vox, b0, noise=-1.0)
    with pytest.raises(QSMInputError, match="tau"):
        ib.lsqr(field, mask, vox, b0, noise=1e-3, tau=0.5)
    with pytest.raises(QSMInputError, match="magnitude is zero"):
        ib.lsqr(field, mask, vox, b0, np.zeros(shape, np.float32))


def test_noise_sd_physical_laplacian_at_thick_slices():
    """``noise_sd`` with the voxel size (the physical Laplacian, per mm^2) recovers white noise's SD
    under a dipole field sampled at 0.94 x 0.94 x 2.5 mm, where the voxel Laplacian counts the
    field's curvature across the thick slices as noise; for isotropic voxels both are the same.
    The field: smooth chi (SD 0.05 ppm, Gaussian width 3.75 / 3.75 / 3.75 mm) through the dipole
    kernel, SD 13x the noise's. Measured: physical 1.06x, voxel 1.49x the true SD (1e-3 ppm)."""
    from scipy import ndimage

    from qsmkit.inversion_base import noise_sd

    vox = (0.9375, 0.9375, 2.5)
    shape = (64, 64, 32)
    rng = np.random.default_rng(3)
    chi = ndimage.gaussian_filter(rng.standard_normal(shape), (4, 4, 1.5))
    chi *= 0.05 / chi.std()
    sigma = 1e-3
    noise = sigma * rng.standard_normal(shape)
    f = (np.asarray(forward_field(chi.astype(np.float32), vox, (0, 0, 1))) + noise).astype(np.float32)
    mask = np.zeros(shape, bool)
    mask[6:-6, 6:-6, 4:-4] = True
    phys, per_voxel = noise_sd(f, mask, voxel_size=vox), noise_sd(f, mask)
    assert phys == pytest.approx(sigma, rel=0.09), phys
    assert per_voxel > 1.35 * sigma, per_voxel
    # isotropic voxels (any size): the physical Laplacian is the voxel one scaled, same estimate
    iso = noise.astype(np.float32)
    assert noise_sd(iso, mask, voxel_size=(1.3,) * 3) == pytest.approx(noise_sd(iso, mask), rel=1e-5)
    # tv takes it when asked, and says so
    m = np.zeros((24, 24, 12), bool)
    m[4:-4, 4:-4, 3:-3] = True
    fld = (1e-3 * np.random.default_rng(4).standard_normal(m.shape) * m).astype(np.float32)
    _, info = ib.tv(fld, m, vox, (0, 0, 1), noise_laplacian="physical", max_iter=3)
    assert info["noise_laplacian"] == "physical"
    assert info["alpha"] == pytest.approx(ib.ALPHA_KAPPA * info["noise_sd_ppm"] * ib.alpha_length(vox),
                                          rel=1e-6)
    with pytest.raises(QSMInputError, match="noise_laplacian"):
        ib.tv(fld, m, vox, (0, 0, 1), noise_laplacian="mm")


def _ball_scene(h, radius=8.0, size=48.0):
    """A ball of 0.1 ppm (radius ``radius`` mm, voxel-integrated over 4^3 sub-voxels) at the
    centre of a cube of ``size`` mm sampled at ``h`` mm; its noise-free field, a 20 mm mask and the
    distance of each voxel centre from the centre."""
    from qsmkit.dipole import forward_field

    n, s = int(size / h), 4
    x = (np.arange(n) - n / 2 + 0.5) * h
    r = np.sqrt(sum(g * g for g in np.meshgrid(x, x, x, indexing="ij")))
    xs = (np.arange(n * s) - n * s / 2 + 0.5) * h / s
    inside = sum(g * g for g in np.meshgrid(xs, xs, xs, indexing="ij")) <= radius ** 2
    chi = 0.1 * inside.astype(np.float32).reshape(n, s, n, s, n, s).mean(axis=(1, 3, 5))
    mask = r <= 20
    f = np.asarray(forward_field(chi.astype(np.float32), (h,) * 3, (0, 0, 1), pad=[n // 2] * 3))
    return (f * mask).astype(np.float32), mask, r


def test_tv_contrast_loss_at_a_fixed_alpha_does_not_depend_on_the_voxel_size():
    """The premise of ``alpha_h="unit"``: tv's gradients are per mm, so the contrast that the
    penalty takes from a region of a given physical size is the same at any voxel size for the
    same alpha (measured: an 8 mm ball loses 4.01 ppb at 1 mm and 4.16 ppb at 2 mm), and alpha =
    0.5 sigma h (the default) takes twice as much at 2 mm as at 1 mm for the same sigma."""
    losses = {}
    for h in (1.0, 2.0):
        f, m, r = _ball_scene(h)
        chi, _ = ib.tv(f, m, (h,) * 3, (0, 0, 1), alpha=4e-4, edge_fraction=0.0,
                       magnitude_weights=False, max_iter=200, tol=1e-4)
        chi = np.asarray(chi)
        losses[h] = 0.1 - (chi[r <= 5].mean() - chi[(r >= 11) & m].mean())
    print("contrast loss of the 8 mm ball (ppm):", losses)
    assert 0.002 < losses[1.0] < 0.008  # the penalty does take contrast
    assert losses[2.0] == pytest.approx(losses[1.0], rel=0.15)
    _, info = ib.tv(f, m, (2.0,) * 3, (0, 0, 1), alpha_h="unit", max_iter=2)
    assert info["alpha_h_mm"] == 1.0
    assert info["alpha"] == pytest.approx(ib.ALPHA_KAPPA * info["noise_sd_ppm"], rel=1e-6)


def _boundary_crossing_share(vox, seed=5):
    """Share of forward differences (pooled over the axes) that straddle a boundary between 60
    random balls (radius 3-10 mm) in an 80 mm cube sampled at ``vox``."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, 80, (60, 3))
    radii = rng.uniform(3, 10, 60)
    axes = [np.arange(0, 80, d) for d in vox]
    pts = np.stack(np.meshgrid(*axes, indexing="ij"), -1)
    lab = np.zeros(pts.shape[:3], np.int16)
    for k, (c, r) in enumerate(zip(centres, radii)):
        lab[np.sum((pts - c) ** 2, -1) < r * r] = k + 1
    return np.mean([np.mean(np.diff(lab, axis=a) != 0) for a in range(3)])


def test_edge_share_follows_boundary_crossings():
    """``edge_share``'s premise, measured: the share of forward differences that straddle a
    tissue boundary grows with the voxel edge along each axis, so thick slices raise the pooled
    share by mean d / min d. The random balls sampled at 0.9375 mm isotropic and at 0.9375 x
    0.9375 x 2.5 mm: the ratio of boundary-crossing shares against the rule's 1.556 (measured
    1.550)."""
    iso, aniso = (0.9375,) * 3, (0.9375, 0.9375, 2.5)
    ratio = _boundary_crossing_share(aniso) / _boundary_crossing_share(iso)
    rule = ib.edge_share(aniso) / ib.edge_share(iso)
    assert rule == pytest.approx(2.5 / 3 / 0.9375 + 2 / 3, rel=1e-9)  # mean d / min d = 1.556
    assert ratio == pytest.approx(rule, rel=0.08), ratio
    assert ib.edge_share(iso) == ib.edge_share((1.3,) * 3) == pytest.approx(0.3)


def test_edge_share_by_size_follows_the_voxel_edge():
    """``edge_fraction="size"``: the same premise in absolute terms. Against 1 mm voxels (MEDI's
    30 %), the boundary-crossing share of the random balls grows in proportion to the mean voxel
    edge: measured 0.595 / 1.474 / 1.996 / 1.458 at 0.6 / 1.5 / 2 mm and 1.2 x 1.2 x 2 mm, the
    rule 0.6 / 1.5 / 2.0 / 1.467; ``tv`` records the share and the rule it came from."""
    base = _boundary_crossing_share((1.0,) * 3)
    for vox in ((0.6,) * 3, (1.5,) * 3, (2.0,) * 3, (1.2, 1.2, 2.0)):
        rule = ib.edge_share(vox, "size") / ib.edge_share((1.0,) * 3, "size")
        assert rule == pytest.approx(_boundary_crossing_share(vox) / base, rel=0.03)
    assert ib.edge_share((1.0,) * 3, "size") == pytest.approx(0.3)
    assert ib.edge_share((4.0,) * 3, "size") == pytest.approx(ib.EDGE_FRACTION_MAX)
    m = np.zeros((20, 20, 12), bool)
    m[4:-4, 4:-4, 3:-3] = True
    fld = (1e-3 * np.random.default_rng(3).standard_normal(m.shape) * m).astype(np.float32)
    mag = (1 + 0.5 * (np.indices(m.shape)[0] > 10)).astype(np.float32)
    _, info = ib.tv(fld, m, (1.5, 1.5, 1.5), (0, 0, 1), mag, max_iter=2, edge_fraction="size")
    assert info["edge_fraction"] == pytest.approx(0.45) and info["edge_fraction_rule"] == "size"
    with pytest.raises(QSMInputError, match="'voxel', 'size' or 'noise'"):
        ib.tv(fld, m, (1.5, 1.5, 1.5), (0, 0, 1), mag, edge_fraction="large")


@pytest.mark.parametrize("vox", [(1.0, 1.0, 1.0), (1.3, 1.3, 1.3), (0.9375, 0.9375, 2.5)])
def test_thick_slice_rule_is_the_identity_at_isotropic_voxels(vox):
    """``tv``'s thick-slice rules, its defaults since session 13 (``noise_laplacian="physical"``,
    ``edge_fraction="voxel"``), give the former default's chi (``"voxel"``, 0.3) to float32
    rounding for isotropic voxels of any size, and differ at thick slices (sigma and the edge
    share both change)."""
    rng = np.random.default_rng(7)
    m = np.zeros((24, 24, 16), bool)
    m[4:-4, 4:-4, 3:-3] = True
    fld = (1e-3 * rng.standard_normal(m.shape) * m).astype(np.float32)
    mag = (1 + 0.5 * (np.indices(m.shape)[0] > 12) + 0.01 * rng.standard_normal(m.shape)).astype(np.float32)
    old, info_old = ib.tv(fld, m, vox, (0, 0, 1), mag, max_iter=3, noise_laplacian="voxel",
                          edge_fraction=0.3)
    new, info = ib.tv(fld, m, vox, (0, 0, 1), mag, max_iter=3)
    assert info_old["noise_laplacian"] == "voxel" and info_old["edge_fraction"] == pytest.approx(0.3)
    assert info["noise_laplacian"] == "physical"
    assert info["edge_fraction"] == pytest.approx(ib.edge_share(vox))
    if len(set(vox)) == 1:
        assert info["noise_sd_ppm"] == pytest.approx(info_old["noise_sd_ppm"], rel=1e-5)
        assert info["edge_fraction"] == pytest.approx(0.3)
        np.testing.assert_allclose(new, old, rtol=0, atol=1e-4 * float(np.abs(old).max()))
    else:
        assert info["edge_fraction"] > 0.45
        assert info["noise_sd_ppm"] != pytest.approx(info_old["noise_sd_ppm"], rel=1e-3)
        assert np.abs(new - old).max() > 1e-3 * float(np.abs(old).max())


def _noise_gradient_tail(q):
    """P(|g|^2 / sigma^2 > q) for the forward-difference gradient of white noise of SD sigma:
    the three differences share their voxel's noise, covariance sigma^2 (I + 1 1^T), so
    |g|^2 / sigma^2 = 4 X1 + Y with X1 chi-square 1 and Y chi-square 2 (P(Y > y) = exp(-y / 2))."""
    from scipy import integrate
    from scipy.stats import chi2

    inner, _ = integrate.quad(lambda x: chi2.pdf(x, 1) * np.exp(-(q - 4 * x) / 2), 0, q / 4)
    return inner + chi2.sf(q / 4, 1)


def test_edge_share_from_noise_counts_the_gradients_that_stand_out_of_the_noise():
    """``edge_fraction="noise"``: on a flat magnitude with white noise the share of voxels past
    the threshold is the noise's own tail, computed in closed form (about 2 %); on two halves
    with a step of 50 noise SDs every step voxel passes as well. The noise SD is recovered
    within 15 % (the step planes raise the robust estimate a little), and ``tv`` records the
    share's rule and the noise SD."""
    rng = np.random.default_rng(11)
    shape, sd = (32, 32, 24), 0.02
    m = np.zeros(shape, bool)
    m[2:-2, 2:-2, 2:-2] = True
    interior = m & np.all([np.roll(m, -1, axis=a) for a in range(3)], axis=0)  # all 3 counted
    for step in (0.0, 1.0):
        clean = np.where(np.indices(shape)[0] >= 16, 1.0 + step, 1.0)
        mag = (clean + sd * rng.standard_normal(shape)).astype(np.float32)
        share, sigma = ib.edge_share_from_noise(mag, m)
        assert sigma == pytest.approx(sd, rel=0.15)
        p_noise = _noise_gradient_tail((ib.EDGE_NOISE_SIGMAS * sigma / sd) ** 2)
        n_step = int((m[15] & m[16]).sum()) if step else 0
        # the mask's border voxels miss a difference or two (fewer noise terms): bracket them
        lo = (n_step + (interior.sum() - n_step) * p_noise) / m.sum()
        hi = (n_step + (m.sum() - n_step) * p_noise) / m.sum()
        assert lo - 0.003 <= share <= hi + 0.003, (step, share, lo, hi)
        if not step:
            assert 0.01 < p_noise < 0.04
    fld = (1e-3 * rng.standard_normal(shape) * m).astype(np.float32)
    _, info = ib.tv(fld, m, (1.0, 1.0, 2.0), (0, 0, 1), mag, max_iter=2, edge_fraction="noise")
    assert info["edge_fraction_rule"] == "noise" and info["edge_fraction"] == pytest.approx(share)
    assert info["magnitude_noise_sd"] == pytest.approx(sd, rel=0.15)
