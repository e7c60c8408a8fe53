"""Dipole inversion: susceptibility chi (ppm) from the tissue field (ppm).

The forward model delta = F^-1 D F chi (``dipole``) cannot be divided out on the
magic-angle cone where D(k) = 0. Methods here:

``tkd``: truncated k-space division (Shmueli et al., MRM 2009): 1/D where
|D| > t, else sign(D)/t.
``l2``: closed-form gradient-regularised least squares (Bilgic et al., MRM 2014):
chi = F^-1 [ D* F(delta) / (|D|^2 + lambda |E|^2) ], E_i the k-space symbol of the
forward difference along axis i (in 1/mm, so lambda does not depend on voxel size).
``focuss``: FOCUSS-QSM with magnitude prior, the method this project is built around
(``qsmkit.focuss``).
``tv``: TV with MEDI's magnitude edge mask by ADMM (``qsmkit.inversion_baselines``), the default:
across the evaluation suite (``benchmarks/eval``) it is the most accurate method on every head,
the FANSI phantom and held-out textures, and it keeps deep-gray contrast on the 2016 challenge
(ROI slope 0.95 against FOCUSS's 0.66), where FOCUSS's smoother maps score a lower RMSE.

Every method has the signature ``f(field, mask, voxel_size, b0_dir, magnitude=None, **params)``
and returns ``(chi, info)`` with chi zero outside the mask.
"""

from __future__ import annotations

import numpy as np

from . import backend
from .backend import get_array_module
from .dipole import apply_kernel, dipole_kernel, pad_to, padded_shape
from .errors import QSMInputError
from .inversion_base import INVERSION, check_inputs, default_pad, gradient_symbol_sq, noise_sd  # noqa: F401


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


# the other methods register themselves into INVERSION (they import only inversion_base)
from . import focuss, inversion_baselines  # noqa: E402,F401
