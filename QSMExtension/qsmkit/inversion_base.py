"""What every dipole inversion shares: the method registry, input checks, the zero padding rule,
the k-space symbol of the gradient and the field's noise estimate.

The methods live in ``inversion`` (TKD, L2), ``focuss`` and ``inversion_baselines`` (LSQR, TV) and
import only this module, so none imports another sideways; ``inversion`` imports them all so
that every method is registered once ``qsmkit.inversion`` is imported.
"""

from __future__ import annotations

import math

import numpy as np

from . import backend
from .backend import get_array_module
from .dipole import k_grids
from .errors import QSMInputError
from .registry import Registry

INVERSION = Registry("inversion", default="tv")


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


def gradient_symbol_sq(shape, voxel_size, xp=np, dtype=np.float32):
    """sum_i |E_i(k)|^2 with E_i = (1 - exp(-2 pi i k_i d_i)) / d_i, the forward difference (1/mm^2)."""
    total = None
    unit = [1.0] * len(shape)
    for g, d in zip(k_grids(shape, unit, xp=xp, real=True, dtype=dtype), voxel_size):
        term = (2 - 2 * xp.cos(2 * np.pi * g)) / dtype(d * d)
        total = term if total is None else total + term
    return total


def _interior(m, xp):
    """Voxels of ``m`` whose 6 neighbours are in ``m`` too."""
    out = m.copy()
    for ax in range(m.ndim):
        out &= xp.roll(m, 1, ax) & xp.roll(m, -1, ax)
    return out


def noise_sd(x, mask, voxel_size=None):
    """Robust SD of white noise in ``x`` inside ``mask``: 1.4826 x the median absolute deviation
    of the 7-point Laplacian over the mask eroded twice, divided by the Laplacian's gain on white
    noise (sqrt(42) for the voxel Laplacian). Smooth signal adds little; edges are outliers that
    the median ignores.

    ``voxel_size`` given: the physical Laplacian, sum_i (x[+1] - 2 x + x[-1]) / d_i^2 (gain
    sqrt(sum_i 2 / d_i^4 + (sum_i 2 / d_i^2)^2)), which vanishes on harmonic fields at any voxel
    size. The same estimate as the voxel Laplacian for isotropic voxels; at 0.94 x 0.94 x 2.5 mm
    the voxel Laplacian counts the smooth field's curvature across the thick slices as noise
    (2.3x the in-plane estimate on a noise-free local field, 1.35x on a head with known noise,
    where the physical one returns the added noise's SD; README, "Dipole inversion")."""
    xp = get_array_module(x)
    m = xp.asarray(mask).astype(bool)
    w = [1.0] * x.ndim if voxel_size is None else [1.0 / float(d) ** 2 for d in voxel_size]
    lap = x * backend.FLOAT(-2 * sum(w))
    for ax in range(x.ndim):
        if voxel_size is None:
            lap += xp.roll(x, 1, ax)
            lap += xp.roll(x, -1, ax)
        else:
            lap += backend.FLOAT(w[ax]) * (xp.roll(x, 1, ax) + xp.roll(x, -1, ax))
    gain = math.sqrt(sum(2 * wi * wi for wi in w) + (2 * sum(w)) ** 2)
    inner = _interior(_interior(m, xp), xp)
    if int(inner.sum()) < 64:
        inner = m
    v = lap[inner]
    if v.size == 0:
        return 0.0
    return float(1.4826 * float(xp.median(xp.abs(v - xp.median(v)))) / gain)
