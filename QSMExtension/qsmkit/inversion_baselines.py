"""LSQR and TV-ADMM dipole inversions; ``tv`` is the default inversion (``qsmkit.inversion``).

Both solve for chi (ppm) from the tissue field delta (ppm) with the forward model
A chi = F^-1 D F chi (``qsmkit.dipole``), the data term restricted to the mask M and
optionally weighted by W (noise weights from the magnitude: the field's noise SD is
proportional to 1 / magnitude, so W = magnitude / its mean in the mask).

``lsqr``
    min_chi || W M (A M chi - delta) ||_2 by LSQR (Paige & Saunders, ACM TOMS 8:43, 1982):
    Golub-Kahan bidiagonalisation, mathematically CG on the normal equations but stabler in
    float32. The problem has no regulariser: LSQR's iterates first fit the well-determined
    part of the spectrum and only later the noise amplified near the magic-angle cone
    (semi-convergence), so the iteration count *is* the regularisation. It stops at the
    discrepancy principle (Morozov 1966) when the field's noise SD is given or estimated
    (``noise``: weighted residual <= tau * noise * sqrt(voxels in the mask)), otherwise after
    ``max_iter`` iterations. This is the first step of iLSQR (Li, Wang, Wu et al., NeuroImage
    108:111, 2015: the LSQR solution of the weighted, masked least-squares problem); iLSQR's
    later steps (estimating the streaking artefact from the ill-conditioned cone region and
    subtracting it) are *not* implemented, hence the name ``lsqr``. With no regulariser, the
    best iteration count depends on the data (see ``lsqr``'s ``max_iter``).

    Measured (NRMSE vs truth; default 5 iterations): 2016 challenge 90.9 % vs chi_33, 71.0 %
    vs COSMOS (TKD 110.6 / 86.4 %); built-in phantom (128 x 128 x 32, noisy) 40.6 %, worse
    than TKD's 32.0 %, 25.0 % with ``max_iter=30``.

``tv``
    min_chi 1/2 || W M (A chi - delta) ||^2 + alpha || M_g G chi ||_1              (1)

    G the forward differences (per mm), anisotropic l1 (each component), M_g the edge mask of
    MEDI (morphology enabled dipole inversion: Liu T et al., MRM 66:777, 2011; Liu J et al.,
    NeuroImage 59:2560, 2012): gradients of chi where the magnitude's gradient is among the
    strongest (the top ``edge_fraction`` of |G_i m| in the mask, default 30 %) are taken as
    anatomical edges and not penalised (weight ``edge_weight``, default 0); elsewhere weight 1.
    Without a magnitude M_g = 1 (plain TV). Solved by ADMM as in FANSI's linear, weighted-TV
    variant (Milovic, Bilgic, Zhao, Acosta-Cabronero, Tejos, MRM 80:814, 2018): with two
    splittings z = G chi and v = A chi every update is closed form, whether W is uniform or
    not (so no inner CG is needed),

        chi <- F^-1 [ (mu1 conj(E) . F(z - s1) + mu2 D F(v - s2)) / (mu1 |E|^2 + mu2 D^2) ]
        z   <- shrink(G chi + s1, alpha M_g / mu1)                 (soft threshold per component)
        v   <- (W^2 M delta + mu2 (A chi + s2)) / (W^2 M + mu2)     (voxel-wise)
        s1  <- s1 + G chi - z,   s2 <- s2 + A chi - v                (scaled dual updates)

    E_i(k) the symbol of the forward difference, chi(k = 0) := 0 (the mean is not
    determined). alpha by default follows the field's noise (alpha = 0.5 sigma h, ``tv``'s
    ``alpha="auto"``). chi is free outside the mask (the data term is zero there, the TV term
    is not). Four real FFTs per iteration.

    Penalties and stopping. The penalties start at mu1 = 15 alpha (``mu1_factor``; FANSI's default
    is 100) and mu2 = 1/8 (W has mean 1 in the mask) and are then set by residual balancing
    (Boyd, Parikh, Chu, Peleato, Eckstein, Found Trends Mach Learn 3:1, 2011, sec. 3.4.1): every
    3 iterations, per block, mu is doubled when the block's primal residual exceeds twice its
    dual residual and halved in the reverse case, the scaled duals divided accordingly;
    balancing stops after 10 changes so that the penalties end fixed (Boyd's condition for
    convergence; the suite's cases change them 3-6 times in 60 iterations). The residuals are
    normalised per block (Wohlberg, arXiv:1704.06209, 2017):
    r1 = ||G chi - z|| / max(||G chi||, ||z||), d1 = ||G^T dz|| / ||G^T s1||, r2 = ||A chi - v|| /
    max(||A chi||, ||v||), d2 = ||A dv|| / ||A s2||. It stops when all four are below ``tol``
    (5e-3) or after ``max_iter`` (60) iterations. The start values lie where balancing ends on
    the tuning cases (our phantom mu1 30-60 alpha, mu2 1/16-1/8; the noisy 1 mm head 7.5-15
    alpha, 1/16-1/8; the 2016 challenge 15-30 alpha, 1/8-1/4). Why: with fixed penalties (mu1 =
    30 alpha, mu2 = 1) the error of our phantom oscillated between 0.8 and 2.5 % over the
    iterations and the former stop (relative change of chi < 1 %) caught it at 2.3 % after 19;
    balanced, it falls steadily and the residual rule stops at 0.8 % after 51
    (``benchmarks/eval``). ``max_iter`` is the time budget (160^3 in about 15 s on 2 cores): on
    the heads, the FANSI phantom and the 2016 challenge the rule is not met by then (largest
    residual 0.006-0.018); the noisy head meets it after 100-120 iterations at 27.5 % (27.6 %
    at 60).
    ``alpha="lcurve"`` picks alpha at the corner of the L-curve (log data residual vs log TV
    term; the point of largest Menger curvature) over a log-spaced grid, as ``l_curve_lambda``
    does for the L2 method; each grid point is a fixed number of ADMM iterations warm-started
    from the previous (larger) alpha's solution.

    Measured before the noise rule (NRMSE vs truth; alpha 2e-3, mu1 = 100 alpha, binary edge
    mask, tol 1 %; the suite in ``benchmarks/eval`` has the current figures): 2016 challenge
    87.0 % vs chi_33, 71.2 % vs COSMOS (35 iterations); built-in phantom (128 x 128 x 32,
    noisy, noise-free magnitude) 1.9 % (0.5 % when run to convergence). On the challenge the
    real magnitude's edges only partly match chi's, and running ADMM to convergence is *worse*
    (150 iterations: 91.5 / 75.7 %); plain TV without the magnitude does better there (75.0 /
    65.0 %), but is no better than TKD on the phantom (30.5 %). The L-curve picks alpha 1e-3 on
    both (challenge 94.2 / 75.7 %, phantom 3.1 %).

Both work on the mask's bounding box plus ``pad_mm`` of zero padding, rounded to fast FFT
lengths, in float32 with float64 reductions; numpy or cupy arrays run the same code.
"""

from __future__ import annotations

import math
import numbers
import time

import numpy as np

from . import backend
from .backend import get_array_module
from .dipole import MaskGrid, dipole_kernel
from .errors import QSMInputError
from .inversion_base import INVERSION, check_inputs, gradient_symbol_sq, noise_sd
from .solvers import dot

# ----------------------------------------------------------------------------- shared helpers


def _real(v):
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _pad_voxels(pad_mm, vox, method):
    if not (_real(pad_mm) and pad_mm >= 0):
        raise QSMInputError(f"{method}: pad_mm must be >= 0, got {pad_mm!r}")
    return [int(math.ceil(pad_mm / d)) for d in vox]


def _data_weights(xp, m, magnitude, noise_weights, use_magnitude):
    """W (zero outside the mask, mean 1 inside): explicit noise weights, else the magnitude
    (noise SD of the field ~ 1 / magnitude), else uniform. Returns (W, source)."""
    if noise_weights is not None:
        w, src = noise_weights, "noise_weights"
    elif magnitude is not None and use_magnitude:
        w, src = magnitude, "magnitude"
    else:
        return m.astype(backend.FLOAT), "uniform"
    w = w * m
    mean = float(xp.mean(w[m]))
    if mean <= 0:
        raise QSMInputError(f"{src.replace('_', ' ')} is zero everywhere in the mask: no data weights")
    return (w * backend.FLOAT(1 / mean)).astype(backend.FLOAT), src


def _conv(x, kernel, shape):
    """F^-1 K F x on the working grid (real FFTs)."""
    t = backend.rfftn(x)
    t *= kernel
    return backend.irfftn(t, s=shape).astype(backend.FLOAT, copy=False)


def _norm(xp, a):
    return dot(xp, a, a) ** 0.5


# --------------------------------------------------------------------------------- LSQR


@INVERSION.register("lsqr", "LSQR on the weighted, masked dipole model, early stopping (iLSQR step 1, "
                            "Li 2015)")
def lsqr(field, mask, voxel_size, b0_dir, magnitude=None, max_iter=5, noise=None, tau=1.0,
         magnitude_weights=True, noise_weights=None, pad_mm=10.0):
    """LSQR dipole inversion, regularised by early stopping (see the module docstring).

    Parameters
    ----------
    field : (X, Y, Z) tissue field, ppm (numpy or cupy).
    mask : (X, Y, Z) bool; chi is sought, and the field fitted, inside it.
    voxel_size : 3 floats, mm.  b0_dir : B0 direction in voxel axes.
    magnitude : optional; with ``magnitude_weights`` it gives the noise weights W.
    max_iter : int
        Iterations (each: one forward and one adjoint operator, four real FFTs). The
        regularisation when ``noise`` is None, and a cap otherwise. Default 5, for in-vivo
        fields: on the 2016 challenge data NRMSE vs chi_33 is lowest at 2-3 iterations (82 %)
        and grows fast after (5: 91 %, 8: 107 %, 30: 212 %), the fit turning to the model
        errors of a real field; on the built-in phantom (noise only) it is lowest near 30
        (25 %, against 40 % at 5), so use ``max_iter=30`` or ``noise`` for simulations.
    noise : None, float (ppm) or "auto"
        SD of the (weighted) field noise for the discrepancy principle: stop at the first
        iteration whose weighted residual ||W (A chi - delta)|| <= tau * noise * sqrt(n),
        n the voxels in the mask. ``"auto"``: estimated from the weighted field (robust
        Laplacian MAD, ``inversion_base.noise_sd``). With as many unknowns as data the residual
        reaches the noise level early (phantom: 7 iterations, 33 % NRMSE; challenge, "auto":
        8 iterations, 107 %).
    tau : float >= 1 (Morozov's safety factor).
    magnitude_weights : use the magnitude for W when given (default True).
    noise_weights : optional explicit W (overrides the magnitude).
    pad_mm : zero padding around the mask's bounding box (mm).

    Returns
    -------
    chi (ppm, zero outside the mask), info dict: iterations, stopped_by ("max_iter",
    "discrepancy" or "exact"), relative_residual ||W (A chi - delta)|| / ||W delta|| and its
    history, the solution norm history, noise SD used, weights source, grid, seconds.
    """
    t0 = time.perf_counter()
    xp, f, m, vox, b0, mag, nw = check_inputs(field, mask, voxel_size, b0_dir, magnitude,
                                              noise_weights, method="lsqr",
                                              nonnegative_magnitude=True)
    b0 = tuple(b0)
    if isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or max_iter < 1:
        raise QSMInputError(f"lsqr: max_iter must be a positive integer, got {max_iter!r}")
    if not (_real(tau) and tau >= 1):
        raise QSMInputError(f"lsqr: tau must be >= 1, got {tau!r}")
    if not (noise is None or noise == "auto" or (_real(noise) and noise > 0)):
        raise QSMInputError(f"lsqr: noise must be a positive SD in ppm, 'auto' or None, got {noise!r}")
    grid = MaskGrid(m, _pad_voxels(pad_mm, vox, "lsqr"), xp)
    shape = grid.shape
    mg = grid.put(m, dtype=bool)
    mf = mg.astype(backend.FLOAT)
    w_full, w_src = _data_weights(xp, m, mag, nw, bool(magnitude_weights))
    w = grid.put(w_full)
    D = dipole_kernel(shape, vox, b0, xp=xp, dtype=backend.FLOAT)
    n_mask = int(m.sum())

    def op(x):  # K x = W M A M x
        return _conv(x * mf, D, shape) * w

    def op_t(y):  # K^T y = M A M W y (A is symmetric: D is real and even)
        return _conv(y * w, D, shape) * mf

    b = grid.put(f) * w
    sigma = None
    if noise == "auto":
        sigma = noise_sd(b, mg)
    elif noise is not None:
        sigma = float(noise)
    target = None if sigma is None else float(tau) * sigma * math.sqrt(n_mask)

    # Paige & Saunders 1982, algorithm LSQR (section 4.1), without damping
    beta = b_norm = _norm(xp, b)
    if beta == 0:
        raise QSMInputError("lsqr: the weighted field is zero inside the mask (weights vanish where "
                            "the field does not): nothing to invert")
    u = b / backend.FLOAT(beta)
    v = op_t(u)
    alpha = _norm(xp, v)
    v /= backend.FLOAT(max(alpha, 1e-30))
    wdir = v.copy()
    x = xp.zeros(shape, backend.FLOAT)
    phibar, rhobar = beta, alpha
    history, x_norms = [], []
    stop = "max_iter"
    it = 0
    if target is not None and phibar <= target:
        stop = "discrepancy"
    elif alpha == 0:  # the field is orthogonal to the operator's range: chi = 0
        stop = "exact"
    else:
        while it < int(max_iter):
            u = op(v) - backend.FLOAT(alpha) * u
            beta = _norm(xp, u)
            if beta > 0:
                u /= backend.FLOAT(beta)
            v = op_t(u) - backend.FLOAT(beta) * v
            alpha = _norm(xp, v)
            if alpha > 0:
                v /= backend.FLOAT(alpha)
            rho = math.hypot(rhobar, beta)
            c, s = rhobar / rho, beta / rho
            theta = s * alpha
            rhobar = -c * alpha
            phi = c * phibar
            phibar = s * phibar  # = ||W M (A chi - delta)|| of the current iterate
            x += backend.FLOAT(phi / rho) * wdir
            wdir = v - backend.FLOAT(theta / rho) * wdir
            it += 1
            history.append(phibar)
            x_norms.append(_norm(xp, x))
            if target is not None and phibar <= target:
                stop = "discrepancy"
                break
            if alpha == 0 or beta == 0:  # exact solution in the Krylov space
                stop = "exact"
                break
    chi = grid.take(x * mf) * m
    info = {"method": "lsqr", "iterations": it, "stopped_by": stop, "max_iter": int(max_iter),
            "noise_sd_ppm": sigma, "noise_estimated": noise == "auto", "tau": float(tau),
            "weights": w_src, "grid": [int(n) for n in shape],
            "relative_residual": phibar / b_norm if b_norm else 0.0,
            "residual_history": [round(h / b_norm, 6) for h in history],
            "solution_norm_history": [round(v, 6) for v in x_norms],
            "seconds": round(time.perf_counter() - t0, 3)}
    return chi, info


# ------------------------------------------------------------------------------ TV-ADMM

#: alpha = ALPHA_KAPPA * noise SD * voxel size (``tv``'s ``alpha="auto"``)
ALPHA_KAPPA = 0.5


#: MEDI's edge share (Liu et al. 2012: 30 %, at any isotropic resolution); ``edge_fraction="voxel"``
#: scales it with the voxels' anisotropy, ``"size"`` with the mean voxel edge against
#: ``EDGE_REFERENCE_MM`` (``edge_share``)
EDGE_FRACTION_ISO = 0.3
EDGE_FRACTION_MAX = 0.9
EDGE_REFERENCE_MM = 1.0
#: ``edge_fraction="noise"``: an edge is a voxel whose magnitude gradient is longer than this many
#: noise SDs of the magnitude (4.76 = sqrt(2 x 11.34), 11.34 the 99th percentile of chi-square
#: with 3 degrees of freedom; pure noise passes it in about 2 % of the voxels, since the three
#: forward differences share their voxel's noise: |g|^2 / sigma^2 = 4 X1 + X2 + X3, X
#: chi-square with 1 degree of freedom)
EDGE_NOISE_SIGMAS = math.sqrt(2 * 11.3449)


def edge_share(voxel_size, rule="voxel"):
    """The edge mask's share for ``voxel_size``, at most EDGE_FRACTION_MAX. A forward difference
    along axis i straddles a tissue boundary with a probability proportional to d_i (for
    boundary area S with normal n, S |n_i| / A_i of the V / (A_i d_i) differences, A_i the voxel
    face normal to i), so the pooled share of edge differences is proportional to mean d.

    ``rule="voxel"``: EDGE_FRACTION_ISO x mean_i d_i / min_i d_i, MEDI's 30 % for isotropic voxels
    of any size, raised for thick slices (0.47 at 0.94 x 0.94 x 2.5 mm, 0.36 at 0.94 x 0.94 x
    1.5 mm). ``rule="size"``: EDGE_FRACTION_ISO x mean_i d_i / EDGE_REFERENCE_MM, MEDI's 30 % at
    1 mm voxels and in proportion to the voxel edge elsewhere (0.45 at 1.5 mm, 0.60 at 2 mm,
    0.44 at 0.94 x 0.94 x 2.5 mm, 0.19 at 0.64 mm)."""
    d = [float(v) for v in voxel_size]
    mean = sum(d) / len(d)
    if rule == "size":
        return min(EDGE_FRACTION_ISO * mean / EDGE_REFERENCE_MM, EDGE_FRACTION_MAX)
    return min(EDGE_FRACTION_ISO * mean / min(d), EDGE_FRACTION_MAX)


def edge_share_from_noise(magnitude, mask):
    """The edge mask's share as the magnitude's own noise sets it (``edge_fraction="noise"``):
    the share of mask voxels whose magnitude gradient (forward differences per voxel, each
    taken where both voxels are in the mask) is longer than EDGE_NOISE_SIGMAS times the
    magnitude's noise SD sigma_m (which white noise alone passes in about 2 % of the voxels),
    at most EDGE_FRACTION_MAX. MEDI's percentile is a share of voxels in the same sense (Liu et
    al., MRM 2012). sigma_m: ``noise_sd`` of the magnitude (robust Laplacian estimate). A noisy
    magnitude then frees only the boundaries that stand out of its noise, a clean one every
    boundary it shows. Returns (share, sigma_m)."""
    xp = get_array_module(magnitude)
    m = xp.asarray(mask).astype(bool)
    mag = xp.asarray(magnitude, dtype=backend.FLOAT) * m
    sigma = noise_sd(mag, m)
    t2 = (EDGE_NOISE_SIGMAS * sigma) ** 2
    g2 = xp.zeros(mag.shape, backend.FLOAT)
    for ax in range(mag.ndim):
        d = backend.periodic_diff(mag, ax)
        d *= m & xp.roll(m, -1, axis=ax)
        g2 += d * d
    share = float((g2[m] > t2).mean()) if bool(m.any()) else 0.0
    return min(share, EDGE_FRACTION_MAX), sigma


def alpha_length(voxel_size, kind="geometric"):
    """h of alpha's rule (mm): the geometric or the harmonic mean voxel size, or 1 mm
    (``"unit"``)."""
    d = [float(v) for v in voxel_size]
    if kind == "unit":
        return 1.0
    if kind == "harmonic":
        return len(d) / sum(1.0 / v for v in d)
    return float(np.prod(d)) ** (1.0 / len(d))


def _grad(x, ax, d, xp):
    """Periodic forward difference (x[j + 1] - x[j]) / d along ``ax`` (per mm)."""
    out = backend.periodic_diff(x, ax)
    out *= backend.FLOAT(1 / d)
    return out


def _grad_t(y, ax, d, xp):
    """Adjoint of ``_grad``: (y[j - 1] - y[j]) / d."""
    out = backend.periodic_diff_adjoint(y, ax)
    out *= backend.FLOAT(1 / d)
    return out


def _shrink(x, t, xp):
    """Soft threshold sign(x) max(|x| - t, 0) (the prox of t |.|_1)."""
    return xp.sign(x) * xp.maximum(xp.abs(x) - t, backend.FLOAT(0))


def edge_mask(magnitude, mask, voxel_size, edge_fraction=0.3, edge_weight=0.0):
    """MEDI's gradient mask (Liu et al., MRM 2012): per axis i, weight ``edge_weight`` where
    |G_i m| (forward difference of the masked magnitude, per mm) is among the largest
    ``edge_fraction`` of the values in the mask (pooled over the three axes), 1 elsewhere.

    Returns a list of three float32 arrays of the magnitude's shape (numpy or cupy)."""
    xp = get_array_module(magnitude)
    m = xp.asarray(mask).astype(bool)
    mag = xp.asarray(magnitude, dtype=backend.FLOAT) * m
    grads = [xp.abs(_grad(mag, ax, d, xp)) for ax, d in enumerate(voxel_size)]
    pooled = xp.concatenate([g[m] for g in grads])
    thr = float(xp.percentile(pooled, 100.0 * (1.0 - edge_fraction)))
    low, one = backend.FLOAT(edge_weight), backend.FLOAT(1)
    return [xp.where(g > thr, low, one).astype(backend.FLOAT) for g in grads]


class _TVState:
    """ADMM variables on the working grid (chi, z = G chi, v = A chi, the scaled duals s1, s2)
    and the penalties mu1, mu2 (adapted by residual balancing, so kept with the duals)."""

    def __init__(self, xp, shape, v0, mu1, mu2):
        self.chi = xp.zeros(shape, backend.FLOAT)
        self.z = [xp.zeros(shape, backend.FLOAT) for _ in range(3)]
        self.s1 = [xp.zeros(shape, backend.FLOAT) for _ in range(3)]
        self.v = v0.copy()
        self.s2 = xp.zeros(shape, backend.FLOAT)
        self.mu1, self.mu2 = float(mu1), float(mu2)

    def rescale(self, mu1, mu2):
        """New penalties; the scaled duals s = y / mu follow so that y is unchanged."""
        for s in self.s1:
            s *= backend.FLOAT(self.mu1 / mu1)
        self.s2 *= backend.FLOAT(self.mu2 / mu2)
        self.mu1, self.mu2 = float(mu1), float(mu2)


#: residual balancing (Boyd et al. 2011, sec. 3.4.1, eq. 3.13, on normalised residuals as in
#: Wohlberg, arXiv:1704.06209, 2017): a penalty is multiplied (divided) by TV_BALANCE_STEP when
#: its block's primal residual exceeds its dual residual (or the reverse) by TV_BALANCE_RATIO,
#: checked every TV_CHECK_EVERY iterations, at most TV_MAX_CHANGES times, so that the penalties
#: are eventually fixed (the condition for Boyd's convergence proof).
TV_BALANCE_RATIO = 2.0
TV_BALANCE_STEP = 2.0
TV_CHECK_EVERY = 3
TV_MAX_CHANGES = 10


def _sum_grad_t(ys, vox, xp):
    """G^T y = sum_i G_i^T y_i."""
    t = None
    for ax in range(3):
        g = _grad_t(ys[ax], ax, vox[ax], xp)
        t = g if t is None else t + g
    return t


def _kspace_norm(xp, spec, n_last):
    """||x|| from its real FFT (Parseval; the half spectrum's bins other than 0 and Nyquist
    stand for two)."""
    total = 2.0 * float(xp.vdot(spec, spec).real) - float(xp.vdot(spec[..., 0], spec[..., 0]).real)
    if n_last % 2 == 0:
        total -= float(xp.vdot(spec[..., -1], spec[..., -1]).real)
    n = n_last
    for s in spec.shape[:-1]:
        n *= s
    return (total / n) ** 0.5


def _fast_norm(xp, *arrays):
    """sqrt(sum ||a||^2) by BLAS dot in float32: a stopping rule at 5e-3 needs 3 digits, not the
    float64 accumulation of ``solvers.dot`` (which costs more than an FFT here)."""
    return math.sqrt(sum(max(float(xp.vdot(a, a)), 0.0) for a in arrays))


def _tv_residuals(state, g, s1_old, z_prev, a_chi, v_prev, D, vox, xp):
    """Normalised primal and dual residuals of the two constraint blocks (Boyd et al. 2011,
    sec. 3.3; each relative to its own scale as in Wohlberg 2017):

        r1 = ||G chi - z|| / max(||G chi||, ||z||)      d1 = ||G^T (z - z_prev)|| / ||G^T s1||
        r2 = ||A chi - v|| / max(||A chi||, ||v||)      d2 = ||A (v - v_prev)|| / ||A s2||

    (the penalty cancels in d1 and d2). g = G chi, s1_old the duals before this iteration (so
    G chi - z = s1 - s1_old)."""
    nrm = _fast_norm
    r1 = nrm(xp, *[s - so for s, so in zip(state.s1, s1_old)]) / max(nrm(xp, *g), nrm(xp, *state.z), 1e-30)
    d1 = (nrm(xp, _sum_grad_t([a - b for a, b in zip(state.z, z_prev)], vox, xp))
          / max(nrm(xp, _sum_grad_t(state.s1, vox, xp)), 1e-30))
    r2 = nrm(xp, a_chi - state.v) / max(nrm(xp, a_chi), nrm(xp, state.v), 1e-30)
    n_last = state.v.shape[-1]
    dv = backend.rfftn(state.v - v_prev)
    dv *= D
    ds = backend.rfftn(state.s2)
    ds *= D
    d2 = _kspace_norm(xp, dv, n_last) / max(_kspace_norm(xp, ds, n_last), 1e-30)
    return r1, d1, r2, d2


def _tv_admm(state, delta, w2, mg, D, e2, vox, alpha, tol, max_iter, xp, balance=True):
    """FANSI's linear weighted-TV ADMM (module docstring) from ``state``, in place, with
    residual balancing of mu1 and mu2 (``balance``) and the primal-dual stopping rule: stop when
    all four normalised residuals (``_tv_residuals``) are below ``tol`` (tol 0: run
    ``max_iter`` iterations).

    Returns (iterations, stopped_by, residuals dict, number of penalty changes)."""
    shape = delta.shape
    f32 = backend.FLOAT

    def factors():
        den = f32(state.mu1) * e2 + f32(state.mu2) * D * D
        den[(0,) * 3] = 1  # k = 0: the mean of chi is not determined; its numerator is 0 below
        inv_den = (1 / den).astype(f32)
        thr = [f32(alpha / state.mu1) * g for g in mg]
        inv_w = (1 / (w2 + f32(state.mu2))).astype(f32)
        return inv_den, thr, [-t for t in thr], inv_w

    inv_den, thr, neg_thr, inv_w = factors()
    w2d = w2 * delta
    stop, it, changes = "max_iter", 0, 0
    res = {"r1": float("nan"), "d1": float("nan"), "r2": float("nan"), "d2": float("nan")}
    while it < max_iter:
        it += 1
        check = it % TV_CHECK_EVERY == 0 or it == max_iter
        # chi-update, closed form in k-space (FANSI eq. 9)
        num = backend.rfftn(_sum_grad_t([z - s for z, s in zip(state.z, state.s1)], vox, xp))
        num *= f32(state.mu1)
        vs = backend.rfftn(state.v - state.s2)
        vs *= D
        vs *= f32(state.mu2)
        num += vs
        del vs
        num *= inv_den
        num[(0,) * 3] = 0
        state.chi = backend.irfftn(num, s=shape).astype(f32, copy=False)
        num *= D
        a_chi = backend.irfftn(num, s=shape).astype(f32, copy=False)
        del num
        # z-update: soft threshold of u = G chi + s1 at alpha M_g / mu1 (eq. 10); the dual
        # update s1 + G chi - z (eq. 12) is then u - z = clip(u, -thr, thr)
        z_prev, s1_old, v_prev = state.z, state.s1, state.v
        g = [_grad(state.chi, ax, vox[ax], xp) for ax in range(3)]
        state.s1, state.z = [], []
        for gi, s, lo, hi in zip(g, s1_old, neg_thr, thr):
            u = gi + s
            c = xp.clip(u, lo, hi)
            u -= c
            state.s1.append(c)
            state.z.append(u)
        # v-update: voxel-wise weighted least squares (eq. 11), then its dual
        u = a_chi + state.s2
        v = u * f32(state.mu2)
        v += w2d
        v *= inv_w
        u -= v
        state.v, state.s2 = v, u
        del u, v
        if not check:
            continue
        r1, d1, r2, d2 = _tv_residuals(state, g, s1_old, z_prev, a_chi, v_prev,
                                       D, vox, xp)
        res = {"r1": r1, "d1": d1, "r2": r2, "d2": d2}
        if tol > 0 and max(r1, d1, r2, d2) < tol:
            stop = "tol"
            break
        if balance and changes < TV_MAX_CHANGES:
            mu1, mu2 = state.mu1, state.mu2
            if r1 > TV_BALANCE_RATIO * d1:
                mu1 *= TV_BALANCE_STEP
            elif d1 > TV_BALANCE_RATIO * r1:
                mu1 /= TV_BALANCE_STEP
            if r2 > TV_BALANCE_RATIO * d2:
                mu2 *= TV_BALANCE_STEP
            elif d2 > TV_BALANCE_RATIO * r2:
                mu2 /= TV_BALANCE_STEP
            if (mu1, mu2) != (state.mu1, state.mu2):
                state.rescale(mu1, mu2)
                inv_den, thr, neg_thr, inv_w = factors()
                changes += 1
    return it, stop, res, changes


def _tv_terms(state, delta, w2, mg, D, vox, xp):
    """(||W (A chi - delta)||_2, ||M_g G chi||_1) of the current chi: the L-curve's axes."""
    r = _conv(state.chi, D, delta.shape) - delta
    res = dot(xp, r * w2, r) ** 0.5
    reg = sum(float(xp.sum(xp.abs(_grad(state.chi, ax, vox[ax], xp) * mg[ax]), dtype=xp.float64))
              for ax in range(3))
    return res, reg


def _menger_corner(res, reg):
    """Index of the L-curve corner: the largest Menger curvature (inverse radius of the circle
    through three consecutive points) of (log res, log reg), axes scaled to unit range."""
    u, v = np.log(np.asarray(res)), np.log(np.asarray(reg))
    u = (u - u.min()) / max(np.ptp(u), 1e-30)
    v = (v - v.min()) / max(np.ptp(v), 1e-30)
    curv = []
    for i in range(1, len(u) - 1):
        a = np.hypot(u[i] - u[i - 1], v[i] - v[i - 1])
        b = np.hypot(u[i + 1] - u[i], v[i + 1] - v[i])
        c = np.hypot(u[i + 1] - u[i - 1], v[i + 1] - v[i - 1])
        area2 = abs((u[i] - u[i - 1]) * (v[i + 1] - v[i - 1]) - (u[i + 1] - u[i - 1]) * (v[i] - v[i - 1]))
        k = 2 * area2 / max(a * b * c, 1e-30)
        curv.append(float(k))
    best = 1 + int(np.argmax(curv))
    return best, curv


def _tv_check(alpha, mu1_factor, mu2, tol, max_iter, lcurve_iter, noise_laplacian, alpha_h,
              edge_weight):
    """``tv``'s scalar parameters checked; returns (L-curve wanted, noise rule wanted)."""
    auto = isinstance(alpha, str) and alpha.lower() == "lcurve"
    rule = isinstance(alpha, str) and alpha.lower() == "auto"
    if isinstance(alpha, str) and not (auto or rule):
        raise QSMInputError(f"tv: alpha must be a positive number, 'auto' or 'lcurve', got {alpha!r}")
    if not isinstance(alpha, str) and not (_real(alpha) and alpha > 0):
        raise QSMInputError(f"tv: alpha must be a positive number, 'auto' or 'lcurve', got {alpha!r}")
    for name, val in (("mu1_factor", mu1_factor), ("mu2", mu2), ("tol", tol)):
        if not (_real(val) and val > 0):
            raise QSMInputError(f"tv: {name} must be > 0, got {val!r}")
    for name, val in (("max_iter", max_iter), ("lcurve_iter", lcurve_iter)):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 1:
            raise QSMInputError(f"tv: {name} must be a positive integer, got {val!r}")
    if noise_laplacian not in ("physical", "voxel"):
        raise QSMInputError(f"tv: noise_laplacian must be 'physical' or 'voxel', got {noise_laplacian!r}")
    if alpha_h not in ("geometric", "harmonic", "unit"):
        raise QSMInputError(f"tv: alpha_h must be 'geometric', 'harmonic' or 'unit', got {alpha_h!r}")
    if not (_real(edge_weight) and 0 <= edge_weight <= 1):
        raise QSMInputError(f"tv: edge_weight must be in [0, 1], got {edge_weight!r}")
    return auto, rule


def _tv_edge_share(edge_fraction, vox, mag, m):
    """The edge mask's share: a number as given, or by its rule (``edge_share``,
    ``edge_share_from_noise``). Returns (share, rule or None, the magnitude's noise SD or None)."""
    rule = edge_fraction if isinstance(edge_fraction, str) else None
    magnitude_noise = None
    if rule in ("voxel", "size"):
        edge_fraction = edge_share(vox, rule)
    elif rule == "noise":
        edge_fraction, magnitude_noise = (edge_share_from_noise(mag, m) if mag is not None
                                          else (0.0, None))
    if not (_real(edge_fraction) and 0 <= edge_fraction < 1):
        raise QSMInputError(f"tv: edge_fraction must be in [0, 1), 'voxel', 'size' or 'noise', "
                            f"got {edge_fraction!r}")
    return edge_fraction, rule, magnitude_noise


def _tv_alpha_rule(delta, m, vox, noise_laplacian, alpha_h):
    """alpha = ALPHA_KAPPA sigma h (``tv``'s ``alpha="auto"``); returns (alpha, sigma)."""
    xp = get_array_module(delta)
    sigma = noise_sd(delta, m, voxel_size=vox if noise_laplacian == "physical" else None)
    if not (math.isfinite(sigma) and sigma > 0):
        sigma = 1e-3 * float(xp.std(delta[m]))
    return ALPHA_KAPPA * sigma * alpha_length(vox, alpha_h), sigma


def _tv_lcurve(delta, w2, mg, D, e2, vox, xp, lcurve_alphas, lcurve_iter, mu1_factor, mu2, balance):
    """alpha at the L-curve's corner (``tv``'s ``alpha="lcurve"``): ``lcurve_iter`` ADMM
    iterations per value, strong to weak with warm starts. Returns (alpha, the curve)."""
    grid_a = (np.logspace(-4, -2, 7) if lcurve_alphas is None
              else np.asarray(lcurve_alphas, dtype=float))
    if grid_a.ndim != 1 or grid_a.size < 3 or not np.all(grid_a > 0):
        raise QSMInputError("tv: lcurve_alphas must be at least 3 positive values")
    grid_a = np.sort(grid_a)[::-1]  # strong to weak: warm starts move from smooth to detailed
    res, reg = [], []
    state = _TVState(xp, delta.shape, delta, float(mu1_factor) * grid_a[0], float(mu2))
    for a in grid_a:
        # a fixed number of iterations per point (no tolerance), so the points are comparable
        state.rescale(float(mu1_factor) * a, float(mu2))
        _tv_admm(state, delta, w2, mg, D, e2, vox, float(a), 0.0, int(lcurve_iter), xp,
                 balance=bool(balance))
        r, g = _tv_terms(state, delta, w2, mg, D, vox, xp)
        res.append(r)
        reg.append(g)
    k, curv = _menger_corner(res, reg)
    return float(grid_a[k]), {"alphas": [float(a) for a in grid_a], "residual": res, "tv": reg,
                              "curvature": curv}


@INVERSION.register("tv", "TV with MEDI edge mask by ADMM, linear data term (FANSI, Milovic 2018)")
def tv(field, mask, voxel_size, b0_dir, magnitude=None, alpha="auto", mu1_factor=15.0, mu2=0.125,
       max_iter=60, tol=5e-3, balance=True, edge_fraction="voxel", edge_weight=0.0,
       magnitude_weights=True, noise_weights=None, lcurve_alphas=None, lcurve_iter=30, pad_mm=10.0,
       noise_laplacian="physical", alpha_h="geometric"):
    """TV-regularised dipole inversion with a magnitude edge mask, by ADMM (module docstring, eq. 1).

    Parameters
    ----------
    field, mask, voxel_size, b0_dir : as every inversion (field in ppm, voxel size in mm).
    magnitude : optional; gives the MEDI edge mask M_g and (``magnitude_weights``) the data
        weights W. Without it: plain TV, uniform weights.
    alpha : float, "auto" or "lcurve"
        TV weight in ppm·mm (the data term is in ppm^2, the gradient in ppm/mm). ``"auto"``
        (default): noise-scaled, alpha = ALPHA_KAPPA sigma h, sigma the field's noise SD
        (``inversion_base.noise_sd``, the robust Laplacian estimate, which also counts what the
        dipole model does not explain) and h the geometric mean voxel size (mm), ALPHA_KAPPA =
        0.5 chosen on the suite's tuning cases (benchmarks/eval: the noisy 1 mm head, the 2016
        challenge, our phantom; kappa 0.5 / 1 / 2 / 4 gave head 27.4 / 29.5 / 33.8 / 39.2 % and
        2016 88.1 / 83.6 / 81.5 / 82.0 % vs chi_33 with deep-gray ROI slopes 0.94 / 0.88 / 0.78 /
        0.65: the smallest kappa keeps the deep-gray contrast).
        ``noise_laplacian``: "physical" (default: sigma from the Laplacian per mm^2, ``noise_sd``
        with the voxel size, which vanishes on harmonic fields at any voxel size) or "voxel"
        (per voxel, which counts the field's curvature across thick slices as noise); the same
        for isotropic voxels.
        ``alpha_h``: h = the "geometric" or the "harmonic" mean voxel size (3 / sum_i 1/d_i: the
        noise's expected TV per voxel is proportional to sum_i sigma / d_i), or 1 mm ("unit"):
        the gradients are per mm, so a region of radius R loses about 3 alpha / R of its contrast
        to the penalty; with h = 1 mm that loss does not grow with the voxel size.
        ``"lcurve"``: chosen at the L-curve corner over ``lcurve_alphas`` (default 7 values,
        log-spaced 1e-4 ... 1e-2), ``lcurve_iter`` ADMM iterations per value (warm starts),
        then ``max_iter`` at the chosen value.
    mu1_factor : the first mu1 = mu1_factor * alpha (FANSI's default is 100); ``balance`` then
        adapts it (module docstring, "Penalties and stopping").
    mu2 : the first penalty of v = A chi (FANSI's default 1, for W of mean 1).
    balance : residual balancing of mu1 and mu2 (default True; False keeps them fixed).
    max_iter, tol : stop after ``max_iter`` iterations or when the four normalised primal and
        dual residuals are all below ``tol``.
    edge_fraction, edge_weight : MEDI edge mask (``edge_mask``); ``edge_fraction="voxel"``
        (default): MEDI's 30 % scaled with the voxels' anisotropy (mean / min edge; 0.3 for
        isotropic voxels of any size), a number: that share, ``"size"``: with the mean voxel edge against
        1 mm (``edge_share``; README, "Held-out geometries"); ``"noise"``: the share of mask
        voxels whose magnitude gradient stands out of its noise (``edge_share_from_noise``).
    noise_weights : optional explicit W (overrides the magnitude).
    pad_mm : zero padding around the mask's bounding box (mm).

    Returns
    -------
    chi (ppm, zero outside the mask), info: alpha and where it came from, mu1_start,
    mu2_start, the final mu1, mu2 and the number of penalty changes, iterations, stopped_by
    ("tol" or "max_iter"), the last residuals (r1, d1, r2, d2; primal_residual = max(r1, r2),
    dual_residual = max(d1, d2)), the L-curve (alphas, residuals, TV values, curvatures) when
    used, grid, seconds.
    """
    t0 = time.perf_counter()
    xp, f, m, vox, b0, mag, nw = check_inputs(field, mask, voxel_size, b0_dir, magnitude,
                                              noise_weights, method="tv",
                                              nonnegative_magnitude=True)
    b0 = tuple(b0)
    auto, rule = _tv_check(alpha, mu1_factor, mu2, tol, max_iter, lcurve_iter, noise_laplacian,
                           alpha_h, edge_weight)
    edge_fraction, edge_rule, magnitude_noise = _tv_edge_share(edge_fraction, vox, mag, m)

    grid = MaskGrid(m, _pad_voxels(pad_mm, vox, "tv"), xp)
    shape = grid.shape
    w_full, w_src = _data_weights(xp, m, mag, nw, bool(magnitude_weights))
    w2 = grid.put(w_full)
    w2 *= w2
    delta = grid.put(f * m)
    m_grid = grid.put(m, dtype=bool)
    if mag is not None and edge_fraction > 0:
        mg = edge_mask(grid.put(mag), m_grid, vox, edge_fraction, edge_weight)
    else:
        mg = [xp.ones(shape, backend.FLOAT) for _ in range(3)]
    D = dipole_kernel(shape, vox, b0, xp=xp, dtype=backend.FLOAT)
    e2 = gradient_symbol_sq(shape, vox, xp=xp, dtype=backend.FLOAT)
    curve = None
    sigma = None
    if rule:
        alpha, sigma = _tv_alpha_rule(delta, m_grid, vox, noise_laplacian, alpha_h)
    if auto:
        alpha, curve = _tv_lcurve(delta, w2, mg, D, e2, vox, xp, lcurve_alphas, lcurve_iter,
                                  mu1_factor, mu2, balance)
    alpha = float(alpha)
    state = _TVState(xp, shape, delta, float(mu1_factor) * alpha, float(mu2))
    it, stop, res, changes = _tv_admm(state, delta, w2, mg, D, e2, vox, alpha, float(tol), int(max_iter),
                                      xp, balance=bool(balance))
    chi = grid.take(state.chi) * m
    info = {"method": "tv", "alpha": alpha,
            "alpha_from": "l-curve" if auto else ("noise rule" if rule else "given"),
            "noise_sd_ppm": sigma, "alpha_kappa": ALPHA_KAPPA if rule else None,
            "noise_laplacian": noise_laplacian if rule else None,
            "alpha_h": alpha_h if rule else None,
            "alpha_h_mm": alpha_length(vox, alpha_h) if rule else None,
            "mu1_start": float(mu1_factor) * alpha, "mu2_start": float(mu2), "mu1": state.mu1,
            "mu2": state.mu2, "balance": bool(balance), "penalty_changes": changes,
            "iterations": it, "max_iter": int(max_iter), "stopped_by": stop, "tol": float(tol),
            "primal_residual": max(res["r1"], res["r2"]), "dual_residual": max(res["d1"], res["d2"]),
            "residuals": res,
            "edge_fraction": float(edge_fraction) if mag is not None else 0.0,
            "edge_fraction_rule": edge_rule, "magnitude_noise_sd": magnitude_noise,
            "weights": w_src, "grid": [int(n) for n in shape], "lcurve": curve,
            "seconds": round(time.perf_counter() - t0, 3)}
    return chi, info
