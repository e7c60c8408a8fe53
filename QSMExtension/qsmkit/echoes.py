"""From (multi-)echo magnitude and wrapped phase to one total field map (ppm).

Model (per voxel, echo ``e`` at time ``TE_e``)::

    s_e = m_e exp(i (phi0 + omega TE_e)) + noise,   omega = 2 pi gamma B0 field

``phi0`` is the receiver phase offset at TE = 0, ``omega`` the off-resonance (rad/s).

**Single echo**: the phase is unwrapped spatially and scaled, field = phi / (2 pi gamma B0 TE);
``phi0`` cannot be told from the field (a smooth offset is largely removed with the
background field).

**Two or more echoes** (method ``linear``, the default):

1. *Spatial unwrapping of the echo difference.* The Hermitian product of consecutive echoes,
   s_{e+1} conj(s_e), has phase omega dTE: the offset cancels and the range is smaller than
   that of any echo. Products are summed when echoes are equally spaced (else the first pair
   is used), unwrapped spatially with the given unwrapper and made congruent with the wrapped
   data (``restore_congruence``), giving a first estimate omega0.
2. *Offset.* phi0 is estimated per voxel as the phase of sum_e s_e exp(-i omega0 TE_e).
3. *Temporal unwrapping* (``unwrap_temporal``): each echo is unwrapped by predicting its phase
   from the echoes already unwrapped, phi_e ~ phi0 + omega TE_e, and removing
   2 pi round((phi_e - prediction) / 2 pi), echo by echo in TE order; the prediction is
   refitted after each echo. This is the temporal unwrapping of ROMEO (Dymerska et al., Magn
   Reson Med 2021;85:2294) and of the multi-echo methods reviewed by Robinson et al. (NMR Biomed
   2017;30:e3601), here with a fitted instead of an assumed offset.
4. *Weighted least-squares fit* of phi_e = phi0 + omega TE_e (``weighted_line_fit``), with
   weights w_e = |m_e|^2: the phase noise SD of echo e is sigma / |m_e| for complex noise of SD
   sigma per channel (Gudbjartsson & Patz, Magn Reson Med 1995), so |m_e|^2 is the inverse
   variance and the fit is the best linear unbiased estimate. Closed form, vectorised over
   voxels (a loop over echoes only). The fit's standard deviation,
   SD(omega) = sigma / sqrt(sum_e w_e (TE_e - TEbar_w)^2), is returned as ``noise_sd_ppm``
   with sigma estimated from the residuals (pooled over the mask) when there are more than two
   echoes, and ``weights`` = 1 / SD (mean 1 inside the mask) is what background removal by PDF
   expects (Liu et al., NMR Biomed 2011, eq. 3).

Method ``nonlinear`` refines the linear fit by Gauss-Newton on the complex-signal cost
sum_e |m_e|^2 (1 - cos(phi_e - phi0 - omega TE_e)), the maximum-likelihood fit for known
amplitudes (the nonlinear field fit of MEDI: Liu et al., Magn Reson Med 2013;69:467);
insensitive to a single echo's 2 pi error. Method ``difference`` is the echo-difference
estimate alone (step 1), the behaviour of earlier versions.

``offset="none"`` assumes phi0 = 0 (e.g. phase already offset-corrected): the first echo is
unwrapped spatially and the fit goes through the origin.

**Magnitude** combination (``combine_magnitude``): root-mean-square across echoes (default), or
T2*-weighted, w_e = TE_e exp(-TE_e / T2*) with T2* from a log-linear fit of the magnitude
(the weighting that maximises the contrast-to-noise of T2*-weighted signal, Posse et al.,
Magn Reson Med 1999;42:87; cf. multi-echo combination for susceptibility imaging, Wu et al.,
NeuroImage 2012;59:297, and the review of Robinson et al. 2017), or TE-weighted, w_e = TE_e.

**Bad input** (``QSMInputError``): echo times not positive or not increasing, a number of echo
times different from the number of echoes, magnitude/phase shapes that differ, NaN/Inf inside
the mask (NaN/Inf outside the mask are set to 0: no signal, no weight; without a mask every
voxel is inside), an echo whose magnitude or phase is zero everywhere inside the mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import backend
from .backend import get_array_module
from .errors import QSMInputError
from .registry import Registry
from .units import check_positive, hz_to_ppm, larmor_hz, rad_to_ppm

TWO_PI = 2 * np.pi

FIELD_FIT = Registry("field fit", default="linear")
MAGNITUDE_COMBINATION = Registry("magnitude combination", default="rms")
OFFSETS = ("fit", "none")


def _wrap(x):
    """Wrap to [-pi, pi) (numpy or cupy)."""
    return (x + np.pi) % TWO_PI - np.pi


# ------------------------------------------------------------------------- input checks


def as_echoes(array):
    """(X, Y, Z) -> (X, Y, Z, 1); (X, Y, Z, E) unchanged (numpy or cupy)."""
    a = get_array_module(array).asarray(array)
    if a.ndim == 3:
        return a[..., None]
    if a.ndim != 4:
        raise QSMInputError(f"expected a 3-D or 4-D (echoes last) image, got shape {a.shape}")
    return a


def check_echoes(magnitude, phase, te, mask=None):
    """Validate multi-echo input and bring it to float32 (X, Y, Z, E) arrays.

    Parameters
    ----------
    magnitude : (X, Y, Z[, E]) array or None (None: uniform weights).
    phase : (X, Y, Z[, E]) array, rad.
    te : E echo times (s), positive and increasing.
    mask : optional (X, Y, Z) region; default every voxel.

    Returns
    -------
    magnitude, phase : float32 (X, Y, Z, E), with non-finite values outside the mask set to 0.
    te : float64 (E,).
    mask : bool (X, Y, Z).

    Raises
    ------
    QSMInputError
        On any of the problems listed in the module docstring.
    """
    ph = as_echoes(backend.to_numpy(phase)).astype(np.float32)
    if magnitude is None:
        mag = np.ones_like(ph)
    else:
        mag = as_echoes(backend.to_numpy(magnitude)).astype(np.float32)
        if mag.shape != ph.shape:
            raise QSMInputError(f"magnitude shape {mag.shape} and phase shape {ph.shape} differ")
    te = np.atleast_1d(np.asarray(te, dtype=float)).ravel()
    check_positive("echo time (s)", te)
    n_e = ph.shape[3]
    if te.size != n_e:
        raise QSMInputError(f"{te.size} echo time(s) given for {n_e} phase echo(es)")
    if np.any(np.diff(te) <= 0):
        raise QSMInputError(f"echo times must increase, got {[float(t) for t in te]}")
    if mask is None:
        m = np.ones(ph.shape[:3], dtype=bool)
    else:
        m = backend.to_numpy(mask).astype(bool)
        if m.shape != ph.shape[:3]:
            raise QSMInputError(f"mask shape {m.shape} does not match image shape {ph.shape[:3]}")
        if not m.any():
            raise QSMInputError("mask is empty")
    for name, arr in (("magnitude", mag), ("phase", ph)):
        bad = ~np.isfinite(arr)
        if bad.any():
            n_in = int(np.count_nonzero(bad & m[..., None]))
            if n_in:
                where = "inside the mask" if mask is not None else "(no mask given: all voxels count)"
                raise QSMInputError(f"{name} has {n_in} NaN/Inf voxel value(s) {where}")
            arr[bad] = 0  # outside the mask: no signal, no weight
    for e in range(n_e):
        if magnitude is not None and not np.any(mag[..., e][m]):
            raise QSMInputError(f"magnitude of echo {e + 1} of {n_e} is zero everywhere inside the mask")
        if not np.any(ph[..., e][m]):
            raise QSMInputError(f"phase of echo {e + 1} of {n_e} is zero everywhere inside the mask")
    return mag, ph, te, m


# ------------------------------------------------------------------- magnitude and T2*


def fit_t2star(magnitude, te, mask=None):
    """T2* (s) and M0 per voxel from a weighted log-linear fit, ln m_e = ln M0 - TE_e / T2*.

    Weights m_e^2: Var(ln m) ~ sigma^2 / m^2 at moderate SNR, so this is the inverse-variance
    weighted fit. Voxels with no decay (or growth) get T2* = inf; voxels with fewer than two
    non-zero echoes or outside ``mask`` get T2* = 0 and M0 = 0.

    Returns
    -------
    t2star, m0 : float32 (X, Y, Z).
    """
    mag = as_echoes(magnitude)
    xp = get_array_module(mag)
    te = np.asarray(te, dtype=float).ravel()
    if te.size != mag.shape[3] or te.size < 2:
        raise QSMInputError(f"T2* fit needs >= 2 echoes with one echo time each, got {te.size} "
                            f"echo time(s) for {mag.shape[3]} echo(es)")
    m = xp.abs(mag.astype(xp.float32))
    w = m * m
    logm = xp.log(xp.where(m > 0, m, 1)).astype(xp.float32)
    slope, intercept, _, _ = weighted_line_fit(logm, te, w)
    valid = xp.count_nonzero(m > 0, axis=3) >= 2
    if mask is not None:
        valid &= xp.asarray(mask).astype(bool)
    r2 = -slope
    with np.errstate(divide="ignore"):
        t2 = xp.where(r2 > 0, 1 / xp.where(r2 > 0, r2, 1), xp.inf)
    t2 = xp.where(valid, t2, 0).astype(xp.float32)
    m0 = xp.where(valid, xp.exp(intercept), 0).astype(xp.float32)
    return t2, m0


def magnitude_noise_sigma(magnitude, te, mask=None):
    """Noise SD (per real/imaginary channel) from the magnitude's scatter about its T2* decay.

    With ln m_e = ln M0 - TE_e / T2* and Var(ln m_e) ~ sigma^2 / m_e^2, the weighted residuals
    of ``fit_t2star``'s fit give sigma^2 chi-square(E - 2) per voxel (``estimate_sigma``). This
    uses the radial noise component, independent of the phase (tangential) noise, so it checks
    the sigma estimated from the phase fit. Needs >= 3 echoes; None otherwise.
    """
    mag = as_echoes(magnitude)
    xp = get_array_module(mag)
    m = xp.abs(mag.astype(xp.float32))
    keep = xp.all(m > 0, axis=3)
    if mask is not None:
        keep &= xp.asarray(mask).astype(bool)
    m = m[keep]
    _, _, _, chi2 = weighted_line_fit(xp.log(m), te, m * m)
    return estimate_sigma(chi2, m.shape[-1] - 2)


def t2star_weights(te, t2star):
    """Echo weights w_e = TE_e exp(-TE_e / T2*) normalised to sum 1 per voxel (Posse 1999).

    ``t2star`` (s) is a map or a scalar; T2* = inf gives w_e proportional to TE_e, T2* <= 0
    (no signal) gives equal weights. Returns float32 (..., E).
    """
    xp = get_array_module(t2star)
    t2 = xp.asarray(t2star, dtype=xp.float64)[..., None]
    te = xp.asarray(np.asarray(te, dtype=float))
    with np.errstate(divide="ignore", invalid="ignore"):
        rate = xp.where(t2 > 0, 1 / xp.where(t2 > 0, t2, 1), 0)
        w = te * xp.exp(-te * rate)
        w = xp.where(t2 > 0, w, 1.0)
    return (w / w.sum(axis=-1, keepdims=True)).astype(xp.float32)


@MAGNITUDE_COMBINATION.register("rms", "root-mean-square across echoes")
def combine_rms(magnitude, te=None, mask=None):
    """Root-mean-square across echoes (last axis)."""
    m = as_echoes(magnitude).astype(np.float32)
    xp = get_array_module(m)
    return xp.sqrt(xp.mean(m**2, axis=3)), {"magnitude_combination": "rms"}


@MAGNITUDE_COMBINATION.register("t2star", "T2*-weighted sum, w = TE exp(-TE/T2*) (Posse 1999)")
def combine_t2star(magnitude, te, mask=None):
    """T2*-weighted average across echoes with T2* from ``fit_t2star`` (single echo: as is)."""
    m = as_echoes(magnitude).astype(np.float32)
    if m.shape[3] == 1:
        return m[..., 0], {"magnitude_combination": "single echo"}
    t2, _ = fit_t2star(m, te, mask)
    w = t2star_weights(te, t2)
    return (w * m).sum(axis=3), {"magnitude_combination": "t2star",
                                 "t2star_fit": "log-linear, weights |m|^2"}


@MAGNITUDE_COMBINATION.register("te", "TE-weighted sum, w = TE")
def combine_te(magnitude, te, mask=None):
    """TE-weighted average across echoes, w_e = TE_e / sum TE (T2* = inf in ``t2star_weights``)."""
    m = as_echoes(magnitude).astype(np.float32)
    xp = get_array_module(m)
    te = np.asarray(te, dtype=float).ravel()
    w = xp.asarray((te / te.sum()).astype(np.float32))
    return (m * w).sum(axis=3), {"magnitude_combination": "te"}


def combine_magnitude(magnitude, te=None, method="rms", mask=None):
    """One magnitude image from (X, Y, Z, E); 3-D passes through.

    ``method``: ``rms`` (default, needs no echo times), ``t2star`` or ``te`` (need ``te``).
    """
    m = as_echoes(magnitude)
    if m.shape[3] == 1:
        return m[..., 0].astype(np.float32)
    name = MAGNITUDE_COMBINATION.resolve(method)
    if name != "rms" and te is None:
        raise QSMInputError(f"magnitude combination {name!r} needs the echo times")
    out, _ = MAGNITUDE_COMBINATION.get(name).func(m, te, mask)
    return out


# ------------------------------------------------------------------------ fitting blocks


def weighted_line_fit(y, te, weights, *, offset=True):
    """Per-voxel weighted least squares of y_e = a + b TE_e (or y_e = b TE_e), closed form.

    Parameters
    ----------
    y : (..., E) data (e.g. unwrapped phase, rad).
    te : (E,) echo times (s).
    weights : (..., E) inverse variances (up to one common factor sigma^2).
    offset : fit the intercept ``a``; False fits through the origin (a = 0).

    Returns
    -------
    slope, intercept : (...) float32 (intercept 0 when ``offset`` is False).
    var_factor : (...) Var(slope) / sigma^2 = 1 / sum w (TE - TEbar_w)^2 (or 1 / sum w TE^2);
        inf where the slope is undetermined (fewer than two weighted echoes, or no weight).
    chi2 : (...) weighted residual sum of squares, sum w r^2 (sigma^2 chi-square with
        E - 2 (E - 1 through the origin) degrees of freedom).

    Notes
    -----
    With the weighted mean time TEbar = sum w TE / sum w the normal equations decouple:
    b = sum w (TE - TEbar) y / sum w (TE - TEbar)^2, a = ybar_w - b TEbar. Accumulated
    over echoes in float64 (no per-voxel loop; the centring avoids cancellation).
    """
    xp = get_array_module(y)
    te = [float(t) for t in np.asarray(te, dtype=float).ravel()]
    n_e = len(te)
    f64 = xp.float64
    s0 = xp.zeros(y.shape[:-1], dtype=f64)
    s1 = xp.zeros_like(s0)
    for e in range(n_e):
        we = weights[..., e].astype(f64)
        s0 += we
        s1 += we * te[e]
    safe = xp.where(s0 > 0, s0, 1)
    tbar = s1 / safe if offset else xp.zeros_like(s0)
    stt = xp.zeros_like(s0)
    sty = xp.zeros_like(s0)
    sy = xp.zeros_like(s0)
    for e in range(n_e):
        we = weights[..., e].astype(f64)
        dt = te[e] - tbar
        ye = y[..., e].astype(f64)
        stt += we * dt * dt
        sty += we * dt * ye
        sy += we * ye
    ok = (s0 > 0) & (stt > 1e-12 * max(te) ** 2 * s0)  # at least two echoes with weight
    stt_safe = xp.where(ok, stt, 1)
    b = xp.where(ok, sty / stt_safe, 0)
    a = xp.where(ok, (sy / safe - b * tbar), 0) if offset else xp.zeros_like(b)
    chi2 = xp.zeros_like(s0)
    for e in range(n_e):
        r = y[..., e].astype(f64) - a - b * te[e]
        chi2 += weights[..., e].astype(f64) * r * r
    var = xp.where(ok, 1 / stt_safe, xp.inf)
    return (b.astype(xp.float32), a.astype(xp.float32), var.astype(xp.float32),
            xp.where(ok, chi2, 0).astype(xp.float32))


def slope_coefficients(te, weights, *, offset=True):
    """Coefficients c_e (..., E) with slope = sum_e c_e y_e for ``weighted_line_fit``.

    c_e = w_e (TE_e - TEbar_w) / sum w (TE - TEbar_w)^2 (TEbar = 0 through the origin). Any
    linear combination of such fits (e.g. the difference of fits on two echo subsets, with
    zero weight for echoes left out) then has variance sigma^2 sum_e c_e^2 / w_e.
    """
    xp = get_array_module(weights)
    te_a = xp.asarray(np.asarray(te, dtype=float).ravel())
    w = weights.astype(xp.float64)
    s0 = w.sum(axis=-1, keepdims=True)
    tbar = (w * te_a).sum(axis=-1, keepdims=True) / xp.where(s0 > 0, s0, 1) if offset else 0.0
    dt = te_a - tbar
    stt = (w * dt * dt).sum(axis=-1, keepdims=True)
    return xp.where(stt > 0, w * dt / xp.where(stt > 0, stt, 1), 0)


def estimate_sigma(chi2, dof, mask=None):
    """Noise SD sigma from per-voxel weighted residuals ``chi2``, pooled over ``mask``.

    chi2 / sigma^2 follows a chi-square law with ``dof`` degrees of freedom, so
    sigma^2 = median(chi2) / median(chi-square_dof): the median keeps voxels where the linear
    model fails (vessels, unwrapping errors) from inflating the estimate. None when dof < 1.
    """
    if dof < 1:
        return None
    from scipy.special import gammaincinv

    values = backend.to_numpy(chi2)
    if mask is not None:
        values = values[backend.to_numpy(mask).astype(bool)]
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    chi2_median = 2 * gammaincinv(dof / 2, 0.5)  # median of the chi-square law with dof
    return float(np.sqrt(np.median(values) / chi2_median))


def restore_congruence(unwrapped, wrapped, weights=None, mask=None):
    """Make a spatially unwrapped phase congruent with the wrapped data (differ by 2 pi k).

    First the constant that best aligns the two (the weighted circular mean of
    wrapped - unwrapped over ``mask``) is added: non-congruent unwrappers (Laplacian) return
    the phase up to a constant and a smooth bias; then each voxel is moved to the nearest
    value congruent with ``wrapped``. A congruent unwrapper's output is returned unchanged.

    Returns (phase, shift) with ``shift`` the constant added (rad).
    """
    xp = get_array_module(unwrapped)
    m = xp.ones(unwrapped.shape, dtype=bool) if mask is None else xp.asarray(mask).astype(bool)
    u = xp.asarray(unwrapped)[m].astype(xp.float64)
    p = xp.asarray(wrapped)[m].astype(xp.float64)
    w = 1.0 if weights is None else xp.asarray(weights)[m].astype(xp.float64)
    d = p - u
    shift = float(xp.angle(xp.sum(w * xp.exp(1j * d))))
    out = xp.zeros(m.shape, dtype=xp.float32)
    out[m] = p - TWO_PI * xp.round((p - u - shift) / TWO_PI)
    return out, shift


def unwrap_temporal(phase, te, omega, offset=0.0, weights=None, *, iterative=True, fit_offset=True):
    """Temporal unwrapping of wrapped echoes from a first field estimate.

    Each echo, in TE order, becomes phase_e - 2 pi round((phase_e - pred_e) / 2 pi) with the
    prediction pred_e = offset + omega TE_e (ROMEO's temporal unwrapping, Dymerska et al.
    2021; the iterative multi-echo prediction reviewed by Robinson et al. 2017).

    Parameters
    ----------
    phase : (..., E) wrapped phase (rad), e.g. (X, Y, Z, E) or the mask's voxels (N, E).
    te : (E,) echo times (s), increasing.
    omega : (...) first estimate of the off-resonance (rad/s), e.g. a spatially unwrapped
        echo difference divided by its dTE.
    offset : (...) or scalar phase at TE = 0 (rad); adding 2 pi to it adds 2 pi to every echo.
    weights : optional (..., E) fit weights for the iterative refit (default uniform).
    iterative : after each echo, refit (offset and) omega to the echoes unwrapped so far, by
        ``weighted_line_fit``, and predict the next echo from that fit: later echoes are then
        predicted from nearby ones rather than extrapolated far from the first estimate. With
        ``fit_offset`` the refit starts once three echoes are unwrapped (a two-echo slope is
        noisier than a good first estimate); otherwise it goes through ``offset``.

    Returns
    -------
    (..., E) float32 phase, each echo congruent with its input (differs by 2 pi k).
    """
    xp = get_array_module(phase)
    ph = xp.asarray(phase, dtype=xp.float32)
    te = np.asarray(te, dtype=float).ravel()
    if te.size != ph.shape[-1]:
        raise QSMInputError(f"{te.size} echo time(s) given for {ph.shape[-1]} phase echo(es)")
    off = xp.asarray(offset, dtype=xp.float64)
    om = xp.asarray(omega, dtype=xp.float64)
    w = xp.ones(ph.shape, dtype=xp.float32) if weights is None else xp.asarray(weights, dtype=xp.float32)
    out = xp.empty_like(ph)
    order = np.argsort(te, kind="stable")
    for i, e in enumerate(order):
        pred = off + om * te[e]
        pe = ph[..., e].astype(xp.float64)
        out[..., e] = (pe - TWO_PI * xp.round((pe - pred) / TWO_PI)).astype(xp.float32)
        done = order[: i + 1]
        if not iterative or i + 1 == te.size:
            continue
        if fit_offset and done.size >= 3:
            om, a, _, _ = weighted_line_fit(out[..., done], te[done], w[..., done])
            off, om = a.astype(xp.float64), om.astype(xp.float64)
        elif not fit_offset:
            y = out[..., done] - (off[..., None] if off.ndim else off).astype(xp.float32)
            om = weighted_line_fit(y, te[done], w[..., done], offset=False)[0].astype(xp.float64)
    return out


def refine_nonlinear(phase, te, weights, omega, phi0=None, max_iter=20, tol=1e-4):
    """Gauss-Newton fit of the complex signal's phase, from a starting (omega, phi0).

    Minimises sum_e w_e (1 - cos(phase_e - phi0 - omega TE_e)) (w_e = |m_e|^2: the complex
    least-squares cost with known amplitudes, cf. MEDI's nonlinear fit, Liu et al. 2013); the
    residual is wrapped, so the wrapped phase can be used directly. In time centred on the
    weighted mean TE the Gauss-Newton normal matrix is diagonal, so each step is closed form.
    ``phi0=None`` fits through the origin (phase 0 at TE = 0, step sum w TE sin d / sum w TE^2).
    Stops when the largest phase change over the echo train is below ``tol`` (rad); each step
    changes the phase by at most 0.5 rad.

    Returns omega, phi0 (float32; zeros through the origin) and the number of iterations run.
    """
    xp = get_array_module(phase)
    te = np.asarray(te, dtype=float).ravel()
    w = weights.astype(xp.float64)
    s0 = w.sum(axis=-1)
    safe0 = xp.where(s0 > 0, s0, 1)
    te_a = xp.asarray(te)
    fit_offset = phi0 is not None
    tbar = (w * te_a).sum(axis=-1) / safe0 if fit_offset else xp.zeros_like(s0)
    stt = (w * (te_a - tbar[..., None]) ** 2).sum(axis=-1)
    ok = stt > 0
    safe_t = xp.where(ok, stt, 1)
    om = xp.asarray(omega, dtype=xp.float64)
    a = (xp.asarray(phi0, dtype=xp.float64) if fit_offset else 0) + om * tbar  # phase at TEbar
    span = float(te.max() - te.min()) or float(te.max())
    it = 0
    while it < max_iter:
        it += 1
        ga = xp.zeros_like(s0)
        gb = xp.zeros_like(s0)
        for e in range(te.size):
            d = _wrap(phase[..., e].astype(xp.float64) - a - om * (te[e] - tbar))
            sd = w[..., e] * xp.sin(d)
            ga += sd
            gb += sd * (te[e] - tbar)
        # steps capped at 0.5 rad over the echo train: a low-SNR voxel cannot jump to another
        # minimum of the periodic cost
        da = xp.clip(xp.where(s0 > 0, ga / safe0, 0), -0.5, 0.5) if fit_offset else 0 * ga
        db = xp.clip(xp.where(ok, gb / safe_t, 0), -0.5 / span, 0.5 / span)
        a += da
        om += db
        if float(xp.max(xp.abs(da) + xp.abs(db) * span)) < tol:
            break
    return om.astype(xp.float32), (a - om * tbar).astype(xp.float32), it


# ------------------------------------------------------------------------------ results


@dataclass(eq=False)
class FieldFit:
    """The total field from (multi-)echo phase and what came with it. Maps are (X, Y, Z).

    Attributes
    ----------
    field_ppm, field_hz : total field (0 outside the mask).
    phase_offset : fitted phase at TE = 0 (rad, wrapped to [-pi, pi)); None for one echo or
        ``offset="none"``.
    noise_sd_ppm : standard deviation of the field estimate from the noise (ppm); absolute
        when ``info["noise_sigma"]`` is a number, else relative (sigma = 1); 0 where undefined.
    weights : 1 / noise_sd_ppm scaled to mean 1 inside the mask, 0 outside: the noise weight
        for background removal (PDF).
    magnitude_combined : one magnitude image (``combine_magnitude``).
    unwrapped_phase : (X, Y, Z, E) spatially and temporally unwrapped echoes (rad, receiver
        offset included), None for the ``difference`` method.
    info : how the field was formed (method names, echo times, sigma), for the sidecar.
    """

    field_ppm: np.ndarray
    field_hz: np.ndarray
    phase_offset: np.ndarray | None
    noise_sd_ppm: np.ndarray
    weights: np.ndarray
    magnitude_combined: np.ndarray
    unwrapped_phase: np.ndarray | None = None
    info: dict = field(default_factory=dict)


def _noise_maps(var_factor, sigma, b0, mask):
    """(noise_sd_ppm, weights) from Var(omega) / sigma^2."""
    finite = np.isfinite(var_factor) & (var_factor > 0)
    sd_rad_s = np.where(finite, np.sqrt(np.where(finite, var_factor, 1)), 0) * (sigma or 1.0)
    sd_ppm = hz_to_ppm(sd_rad_s / TWO_PI, b0).astype(np.float32)
    good = finite & mask
    inv = np.where(good, 1 / np.where(good, sd_ppm, 1), 0)
    scale = inv[good].mean() if good.any() else 1.0
    return sd_ppm, (inv / scale).astype(np.float32)


def _spatial(unwrap, phase3, mask, weights):
    """Spatially unwrap one 3-D phase and make it congruent with the data."""
    u = backend.to_numpy(unwrap(phase3, mask=mask))
    return restore_congruence(u, phase3, weights, mask)


def _echo_difference(mag, ph, te):
    """Summed Hermitian product of consecutive echoes (all pairs when equally spaced).

    Returns the product (complex64), dTE and the pairs used; built one pair at a time."""
    dte = np.diff(te)
    uniform = bool(np.allclose(dte, dte[0], rtol=1e-3))
    pairs = list(range(te.size - 1)) if uniform else [0]
    product = np.zeros(ph.shape[:3], dtype=np.complex64)

    def echo(e):  # complex64 signal without a complex128 temporary
        s = np.empty(ph.shape[:3], dtype=np.complex64)
        s.real = mag[..., e] * np.cos(ph[..., e])
        s.imag = mag[..., e] * np.sin(ph[..., e])
        return s

    previous = echo(pairs[0])
    for e in pairs:
        current = echo(e + 1)
        product += current * np.conj(previous)
        previous = current
    return product, float(dte[0]), pairs


def _scatter(values, mask, fill=0.0):
    """Values at the mask's voxels (N, ...) back into an (X, Y, Z, ...) float32 array."""
    out = np.full(mask.shape + values.shape[1:], fill, dtype=np.float32)
    out[mask] = values
    return out


@FIELD_FIT.register("linear", "noise-weighted linear fit of temporally unwrapped phase vs TE")
def _fit_linear(mag, ph, te, unwrap, mask, offset, nonlinear=False):
    """Steps 1-4 of the module docstring; all but the spatial unwrapping on the mask's voxels."""
    info = {}
    y = ph[mask]  # (N, E)
    w = mag[mask] ** 2
    if offset == "fit":
        product, dte, pairs = _echo_difference(mag, ph, te)
        u, shift = _spatial(unwrap, np.angle(product).astype(np.float32), mask, np.abs(product))
        omega0 = u[mask].astype(np.float64) / dte
        # phi0 = phase of sum_e s_e exp(-i omega0 TE_e)
        phi0 = np.angle((np.sqrt(w) * np.exp(1j * (y - omega0[:, None] * te))).sum(axis=1))
        info.update(spatial_unwrapping="echo-difference phase",
                    echo_pairs=[[int(e), int(e) + 1] for e in pairs], delta_te=dte)
    else:
        u, shift = _spatial(unwrap, ph[..., 0], mask, mag[..., 0])
        omega0 = u[mask].astype(np.float64) / te[0]
        phi0 = 0.0
        info.update(spatial_unwrapping="first echo")
    info["congruence_shift_rad"] = round(shift, 6) + 0.0  # no "-0.0" in the sidecar
    unwrapped = unwrap_temporal(y, te, omega0, phi0, w, fit_offset=offset == "fit")
    omega, a, var, chi2 = weighted_line_fit(unwrapped, te, w, offset=offset == "fit")
    dof = te.size - (2 if offset == "fit" else 1)
    sigma = estimate_sigma(chi2, dof)
    info.update(temporal_unwrapping="iterative prediction (ROMEO-style)",
                field_fit="weighted linear fit, weights |m|^2", fit_dof=dof)
    if nonlinear:
        omega, a, n_it = refine_nonlinear(y, te, w, omega, a if offset == "fit" else None)
        info.update(field_fit="Gauss-Newton complex fit from the weighted linear fit",
                    nonlinear_iterations=n_it)
    phi0_map = _scatter(a, mask) if offset == "fit" else None
    return (_scatter(omega, mask), phi0_map, _scatter(var, mask, np.inf), sigma,
            _scatter(unwrapped, mask), info)


@FIELD_FIT.register("nonlinear", "Gauss-Newton fit of the complex signal (MEDI-style), from the linear fit")
def _fit_nonlinear(mag, ph, te, unwrap, mask, offset):
    return _fit_linear(mag, ph, te, unwrap, mask, offset, nonlinear=True)


@FIELD_FIT.register("difference", "echo-difference phase, spatially unwrapped (no fit)")
def _fit_difference(mag, ph, te, unwrap, mask, offset):
    """The echo-difference estimate alone (earlier versions' behaviour), with its noise SD."""
    product, dte, pairs = _echo_difference(mag, ph, te)
    u = backend.to_numpy(unwrap(np.angle(product).astype(np.float32), mask=mask)).astype(np.float32)
    omega = u / np.float32(dte)
    # noise: the summed product's phase ~ sum_k a_k (phi_{k+1} - phi_k), a_k = |p_k| / sum |p_j|,
    # so omega = sum_e c_e phi_e and Var = sigma^2 sum_e c_e^2 / |m_e|^2
    m = mag[mask].astype(np.float64)
    amp = np.stack([m[:, e + 1] * m[:, e] for e in pairs], axis=-1)
    a = amp / np.maximum(amp.sum(axis=-1, keepdims=True), 1e-300)
    coef = np.zeros(m.shape)
    for k, e in enumerate(pairs):
        coef[:, e + 1] += a[:, k] / dte
        coef[:, e] -= a[:, k] / dte
    w = m * m
    var = np.where(w > 0, coef**2 / np.where(w > 0, w, 1), np.where(coef != 0, np.inf, 0)).sum(axis=1)
    info = {"field_estimate": "echo-difference phase, spatially unwrapped",
            "echo_pairs": [[int(e), int(e) + 1] for e in pairs], "delta_te": dte}
    return omega, None, _scatter(var, mask, np.inf), None, None, info


# --------------------------------------------------------------------------------- API


def fit_field(magnitude, phase, te, b0, unwrap, mask=None, *, method="linear", offset="fit",
              magnitude_combination="rms", noise_sigma=None) -> FieldFit:
    """Total field from magnitude and wrapped phase of one or more echoes.

    Parameters
    ----------
    magnitude : (X, Y, Z[, E]) array, or None for uniform weights.
    phase : (X, Y, Z[, E]) wrapped phase, rad.
    te : E echo times (s), increasing.
    b0 : field strength (T).
    unwrap : callable(phase3d, mask=...) -> spatially unwrapped phase (an ``UNWRAPPING`` method).
    mask : optional brain mask; the field is 0 outside it.
    method : ``linear`` (default), ``nonlinear`` or ``difference`` (``FIELD_FIT``); ignored for
        one echo.
    offset : ``fit`` (estimate the phase at TE = 0) or ``none`` (assume it is 0).
    magnitude_combination : ``rms``, ``t2star`` or ``te`` (``MAGNITUDE_COMBINATION``).
    noise_sigma : noise SD of the real/imaginary parts, if known; else estimated from the fit
        residuals (more echoes than fitted parameters), else ``noise_sd_ppm`` is relative.

    Returns
    -------
    FieldFit
    """
    mag, ph, te, m = check_echoes(magnitude, phase, te, mask)
    check_positive("B0 (tesla)", b0)
    offset = str(offset).lower()
    if offset not in OFFSETS:
        raise QSMInputError(f"unknown phase offset handling {offset!r}; choose one of {', '.join(OFFSETS)}")
    combined, mag_info = MAGNITUDE_COMBINATION.get(magnitude_combination).func(mag, te, m) \
        if te.size > 1 else (mag[..., 0], {"magnitude_combination": "single echo"})
    if noise_sigma is not None:
        check_positive("noise sigma", noise_sigma)
    if te.size == 1:
        u = backend.to_numpy(unwrap(ph[..., 0], mask=mask)).astype(np.float32)
        field_ppm = rad_to_ppm(u, b0, te[0]).astype(np.float32)
        w = mag[..., 0].astype(np.float64) ** 2 * te[0] ** 2
        var = np.where(w > 0, 1 / np.where(w > 0, w, 1), np.inf)
        sd, weights = _noise_maps(var, noise_sigma, b0, m)
        info = {"field_estimate": "single echo, spatially unwrapped", "te_used": [float(te[0])],
                "spatial_unwrap_te": float(te[0]),
                "offset": "not separable from the field with one echo",
                "noise_sigma": noise_sigma, **mag_info}
        return FieldFit(field_ppm, (field_ppm * larmor_hz(b0) * 1e-6).astype(np.float32), None,
                        sd, weights, combined.astype(np.float32), u[..., None], info)
    name = FIELD_FIT.resolve(method)
    omega, phi0, var, sigma, unwrapped, info = FIELD_FIT.get(name).func(mag, ph, te, unwrap, m, offset)
    sigma_source = "given" if noise_sigma is not None else ("fit residuals" if sigma else None)
    sigma = noise_sigma if noise_sigma is not None else sigma
    field_hz = np.where(m, backend.to_numpy(omega) / TWO_PI, 0).astype(np.float32)
    field_ppm = hz_to_ppm(field_hz, b0).astype(np.float32)
    sd, weights = _noise_maps(backend.to_numpy(var), sigma, b0, m)
    if phi0 is not None:
        phi0 = np.where(m, _wrap(backend.to_numpy(phi0).astype(np.float64)), 0).astype(np.float32)
    info = {"field_method": name, "offset": offset if name != "difference" else "cancels in the difference",
            **info, "te_used": [float(t) for t in te], "noise_sigma": sigma,
            "spatial_unwrap_te": float(info.get("delta_te", te[0])),
            "noise_sigma_source": sigma_source, **mag_info}
    if name != "difference":
        info.setdefault("field_estimate", info["field_fit"])
    return FieldFit(field_ppm, field_hz, phi0, sd, weights, np.asarray(combined, dtype=np.float32),
                    unwrapped, info)


def unresolved_field(field_hz, mask, t_spatial):
    """Mask voxels whose field is not known: it differs from that of a 6-neighbour in the mask by
    more than half a cycle over ``t_spatial`` (s), the time over which the spatially unwrapped
    phase accrued (``fit_field``'s ``info["spatial_unwrap_te"]``: the echo time for one echo, TE2
    - TE1 for the echo-difference phase). There the phase changes by more than pi between
    neighbours: it is aliased (the field is steeper than the voxels sample at that time, the
    spatial Nyquist limit), or the unwrapper put a 2 pi step between them; either way the two
    voxels' fields are not known relative to each other. Both voxels of such a pair are flagged.
    On the built-in phantom (3 T, one echo at 20 ms) the rule flags 1028 voxels (0.18 % of the
    mask), 44 of the 46 whose unwrapped field is wrong by 2 pi; on the end-to-end heads 2-459
    voxels (README, "Accuracy and speed today")."""
    f = np.asarray(field_hz, dtype=np.float64)
    m = np.asarray(mask, dtype=bool)
    limit = 0.5 / float(t_spatial)
    out = np.zeros(m.shape, dtype=bool)
    for ax in range(f.ndim):
        lo = [slice(None)] * f.ndim
        hi = [slice(None)] * f.ndim
        lo[ax], hi[ax] = slice(0, -1), slice(1, None)
        lo, hi = tuple(lo), tuple(hi)
        jump = m[lo] & m[hi] & (np.abs(f[hi] - f[lo]) > limit)
        out[lo] |= jump
        out[hi] |= jump
    return out


def field_from_phase(magnitude, phase, te, b0, unwrap, mask=None, *, method="linear", offset="fit",
                     noise_sigma=None):
    """Total field (ppm) from magnitude and wrapped phase: ``fit_field`` returning
    ``(field_ppm, info)``, where ``info`` records how the field was formed (for the sidecar).

    Parameters as ``fit_field``; one echo: spatially unwrapped and scaled; two or more: the
    noise-weighted linear fit with the offset fitted.
    """
    fit = fit_field(magnitude, phase, te, b0, unwrap, mask, method=method, offset=offset,
                    noise_sigma=noise_sigma)
    return fit.field_ppm, fit.info
