"""Dipole inversion: susceptibility chi (ppm) from the tissue field (ppm).

The forward model delta = F^-1 D F chi (``dipole``) cannot be divided out on the
magic-angle cone where D(k) = 0. Methods here:

``tkd``: truncated k-space division (Shmueli et al., MRM 2009): 1/D where
|D| > t, else sign(D)/t.
``l2``: closed-form gradient-regularised least squares (Bilgic et al., MRM 2014):
chi = F^-1 [ D* F(delta) / (|D|^2 + lambda |E|^2) ], E_i the k-space symbol of the
forward difference along axis i (in 1/mm, so lambda does not depend on voxel size).
``focuss``: FOCUSS-QSM with magnitude prior, the method this project is built around and the
default (``qsmkit.focuss``).

Every method has the signature ``f(field, mask, voxel_size, b0_dir, magnitude=None, **params)``
and returns ``(chi, info)`` with chi zero outside the mask.
"""

from __future__ import annotations

import numpy as np

from . import backend
from .backend import get_array_module
from .dipole import apply_kernel, dipole_kernel, k_grids, pad_to, padded_shape
from .errors import QSMInputError
from .registry import Registry

INVERSION = Registry("inversion", default="focuss")


def default_pad(shape):
    """Zero padding against wrap-around: a quarter of each axis (at least 8 voxels)."""
    return [max(8, n // 4) for n in shape]


def check_inputs(field, mask, voxel_size, b0_dir, magnitude=None, noise_weights=None, *,
                 method="", nonnegative_magnitude=False):
    """The iterative inversions' inputs checked and cast: ``(xp, field, mask, voxel_size list,
    unit b0 (numpy), magnitude, noise_weights)`` as float32 arrays (numpy or cupy as given), or
    a one-line :class:`QSMInputError` (prefixed ``method: `` when a method is named). Noise
    weights, and the magnitude with ``nonnegative_magnitude``, must be >= 0 in the mask."""
    import math

    say = f"{method}: " if method else ""
    xp = get_array_module(field)
    f = xp.asarray(field)
    if f.ndim != 3:
        raise QSMInputError(f"{say}field must be a 3-D volume, got shape {tuple(f.shape)}")
    f = f.astype(backend.FLOAT, copy=False)
    m = xp.asarray(mask).astype(bool) if mask is not None else xp.ones(f.shape, dtype=bool)
    if m.shape != f.shape:
        raise QSMInputError(f"{say}mask shape {tuple(m.shape)} does not match field shape "
                            f"{tuple(f.shape)}")
    if not bool(m.any()):
        raise QSMInputError(f"{say}mask is empty")
    try:
        vox = [float(v) for v in np.asarray(voxel_size, dtype=float).reshape(3)]
        b0 = np.asarray(backend.to_numpy(b0_dir), dtype=float).reshape(3)
    except (TypeError, ValueError) as exc:
        raise QSMInputError(f"{say}voxel size and B0 direction must be 3 numbers each: {exc}") from exc
    if not all(math.isfinite(v) and v > 0 for v in vox):
        raise QSMInputError(f"{say}voxel size must be positive and finite, got {vox}")
    if not np.all(np.isfinite(b0)) or np.linalg.norm(b0) == 0:
        raise QSMInputError(f"{say}B0 direction must be finite and non-zero, got {list(b0)}")
    inside = f[m]
    if not bool(xp.all(xp.isfinite(inside))):
        raise QSMInputError(f"{say}field has NaN or infinite values inside the mask")
    if not bool(xp.any(inside != 0)):
        raise QSMInputError(f"{say}field is all zeros inside the mask: nothing to invert")
    arrays = []
    for name, a, nonnegative in (("magnitude", magnitude, nonnegative_magnitude),
                                 ("noise weights", noise_weights, True)):
        if a is None:
            arrays.append(None)
            continue
        a = xp.asarray(a)
        if a.shape != f.shape:
            raise QSMInputError(f"{say}{name} shape {tuple(a.shape)} does not match field shape "
                                f"{tuple(f.shape)}")
        a = a.astype(backend.FLOAT, copy=False)
        if not bool(xp.all(xp.isfinite(a[m]))):
            raise QSMInputError(f"{say}{name} has NaN or infinite values inside the mask"
                                if not nonnegative else
                                f"{say}{name} must be finite and non-negative inside the mask")
        if nonnegative and bool(xp.any(a[m] < 0)):
            raise QSMInputError(f"{say}{name} must be finite and non-negative inside the mask")
        arrays.append(a)
    return xp, f, m, vox, b0 / np.linalg.norm(b0), arrays[0], arrays[1]


def _prepare(field, mask):
    xp = get_array_module(field)
    f = xp.asarray(field, dtype=backend.FLOAT)
    m = xp.asarray(mask).astype(bool) if mask is not None else xp.ones(f.shape, dtype=bool)
    if not bool(m.any()):
        raise QSMInputError("mask is empty")
    return xp, f * m, m


@INVERSION.register("tkd", "truncated k-space division (Shmueli 2009)")
def tkd(field, mask, voxel_size, b0_dir, magnitude=None, threshold=0.19):
    """Truncated k-space division. ``threshold`` t in (0, 2/3): |D| < t is replaced by sign(D) t."""
    if not 0 < threshold < 2 / 3:
        raise QSMInputError(f"TKD threshold must be in (0, 2/3), got {threshold}")
    xp, f, m = _prepare(field, mask)

    def inverse(shape):
        d = dipole_kernel(shape, voxel_size, b0_dir, xp=xp, dtype=f.dtype)
        d_t = xp.where(xp.abs(d) < threshold, xp.where(d < 0, -threshold, threshold), d)
        return (1 / d_t).astype(f.dtype)

    chi = apply_kernel(f, inverse, padded_shape(f.shape, default_pad(f.shape))) * m
    return chi, {"threshold": threshold}


def gradient_symbol_sq(shape, voxel_size, xp=np, dtype=np.float32):
    """sum_i |E_i(k)|^2 with E_i = (1 - exp(-2 pi i k_i d_i)) / d_i, the forward difference (1/mm^2)."""
    total = None
    unit = [1.0] * len(shape)
    for g, d in zip(k_grids(shape, unit, xp=xp, real=True, dtype=dtype), voxel_size):
        term = (2 - 2 * xp.cos(2 * np.pi * g)) / dtype(d * d)
        total = term if total is None else total + term
    return total


def l_curve_lambda(field, voxel_size, b0_dir, pad_shape, lams=None):
    """Regularisation weight at the corner of the L-curve of the closed-form L2 inversion
    (Bilgic et al., MRM 2014): the point of largest curvature of (log ||D chi - f||,
    log ||G chi||) over a log-spaced grid, both norms evaluated in k-space (Parseval) for
    every lambda at the cost of one FFT. Returns (lambda, grid, curvature)."""
    xp = get_array_module(field)
    lams = np.logspace(-4, 0, 25) if lams is None else np.asarray(lams, dtype=float)
    spec = backend.rfftn(pad_to(field, pad_shape))
    power = (spec * spec.conj()).real
    # real-FFT half spectrum: every plane but k = 0 (and Nyquist) stands for two
    twice = xp.full(power.shape[-1], 2.0, dtype=power.dtype)
    twice[0] = 1
    if pad_shape[-1] % 2 == 0:
        twice[-1] = 1
    power = power * twice
    d = dipole_kernel(pad_shape, voxel_size, b0_dir, xp=xp, dtype=field.dtype)
    e2 = gradient_symbol_sq(pad_shape, voxel_size, xp=xp, dtype=np.dtype(field.dtype).type)
    res, reg = [], []
    for lam in lams:
        den = d * d + field.dtype.type(lam) * e2
        den[(0,) * den.ndim] = 1
        x = d / den
        res.append(float((power * (d * x - 1) ** 2).sum()) ** 0.5)
        reg.append(float((power * x * x * e2).sum()) ** 0.5)
    u, v = np.log(res), np.log(reg)
    du, dv = np.gradient(u), np.gradient(v)
    ddu, ddv = np.gradient(du), np.gradient(dv)
    curvature = np.abs(du * ddv - dv * ddu) / (du**2 + dv**2) ** 1.5
    inner = curvature[2:-2]  # one-sided differences at the ends are not curvature
    return float(lams[2 + int(np.argmax(inner))]), lams, curvature


@INVERSION.register("l2", "closed-form gradient-regularised L2 (Bilgic 2014)")
def l2(field, mask, voxel_size, b0_dir, magnitude=None, lam=0.05):
    """Closed-form L2 inversion with gradient regularisation weight ``lam`` (mm^2), or
    ``lam="lcurve"`` to choose it at the L-curve's corner (``l_curve_lambda``)."""
    xp, f, m = _prepare(field, mask)
    chosen = None
    if lam == "lcurve":
        lam = chosen = l_curve_lambda(f, voxel_size, b0_dir, padded_shape(f.shape, default_pad(f.shape)))[0]
    if not (isinstance(lam, (int, float)) and lam > 0):
        raise QSMInputError(f"L2 regularisation lambda must be positive or 'lcurve', got {lam!r}")

    def inverse(shape):
        d = dipole_kernel(shape, voxel_size, b0_dir, xp=xp, dtype=f.dtype)
        e2 = gradient_symbol_sq(shape, voxel_size, xp=xp, dtype=np.dtype(f.dtype).type)
        den = d * d + f.dtype.type(lam) * e2
        den[(0,) * den.ndim] = 1  # k = 0: D = 0 and E = 0; the mean of chi is not determined
        return (d / den).astype(f.dtype)

    chi = apply_kernel(f, inverse, padded_shape(f.shape, default_pad(f.shape))) * m
    return chi, {"lambda": lam, "lambda_from": "l-curve" if chosen is not None else "given"}


def reference_chi(chi, mask, region=None):
    """chi relative to a reference: minus its mean over ``region`` & ``mask`` (e.g. CSF), or over
    the whole mask when ``region`` is None; zero outside the mask. The dipole inversion fixes
    chi only up to a constant, so published values are always relative to something.

    Returns (referenced chi, the offset subtracted in ppm)."""
    xp = get_array_module(chi)
    m = xp.asarray(mask).astype(bool)
    ref = m if region is None else m & xp.asarray(region).astype(bool)
    if not bool(ref.any()):
        raise QSMInputError("reference region has no voxels inside the mask")
    offset = float(chi[ref].mean())
    return xp.where(m, chi - chi.dtype.type(offset), 0).astype(chi.dtype), offset


# FOCUSS registers itself into INVERSION; imported last because it builds on this module.
# So do the LSQR and TV-ADMM baselines (inversion_baselines).
from . import focuss, inversion_baselines  # noqa: E402,F401
