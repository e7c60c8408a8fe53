"""Background field removal: tissue (local) field = total field - background field.

``vsharp``: variable-kernel SHARP (Schweser et al., NeuroImage 2011; Li et al.,
NeuroImage 2011). The background field is harmonic inside the brain, so the
spherical mean value (SMV) filter leaves it unchanged: (delta - s_r) * f removes
it. Near the brain edge only small spheres fit inside the mask, so each voxel
uses the largest radius r whose sphere stays inside the mask (mask eroded by r).
The high-passed field is deconvolved by truncated division with (1 - S_rmax(k))
(threshold ``tsvd``), and the result is kept inside the mask eroded by the
smallest radius.
PDF (projection onto dipole fields) joins this registry in the background issue.
"""

from __future__ import annotations

import numpy as np

from . import backend
from .backend import get_array_module
from .dipole import apply_kernel, padded_shape
from .errors import QSMInputError
from .registry import Registry

BACKGROUND = Registry("background", default="vsharp")


def ball_weights(voxel_size, radius_mm, sub=5):
    """Weights of the spherical-mean-value ball on an (anisotropic) voxel grid, centred on a voxel,
    summing to 1.

    SMV filtering leaves a harmonic field unchanged only if the discrete ball's second moments,
    taken at the voxel centres, are equal along all axes. A 0/1 ball on 0.9 x 0.9 x 2.5 mm voxels
    breaks this (each voxel adds its own d_i^2 / 12 of spread), so its mean of a harmonic quadratic
    field is off by a constant that differs per radius, and V-SHARP leaves shells of residual
    background. We therefore use the partial-volume fraction (``sub``^3 samples per voxel) of an
    ellipsoid with semi-axes R_i^2 = R^2 - 5/12 (d_i^2 - d_min^2), whose centre-sampled second
    moments are all R^2/5 + d_min^2/12.
    """
    d = np.asarray(voxel_size, dtype=float)
    semi2 = radius_mm**2 - 5.0 / 12.0 * (d**2 - d.min() ** 2)
    semi2 = np.maximum(semi2, (0.5 * d) ** 2)
    half = [int(np.ceil(np.sqrt(s2) / v + 0.5)) for s2, v in zip(semi2, d)]
    offsets = (np.arange(sub) + 0.5) / sub - 0.5
    q = []
    for h, v, s2 in zip(half, d, semi2):
        pos = np.arange(-h, h + 1)[:, None] * v + offsets[None, :] * v  # (n, sub) sample positions
        q.append(pos**2 / s2)
    inside = (q[0][:, None, None, :, None, None] + q[1][None, :, None, None, :, None]
              + q[2][None, None, :, None, None, :]) <= 1.0
    w = inside.mean(axis=(3, 4, 5))
    return w / w.sum()


def sphere_kernel_ft(shape, voxel_size, radius_mm, xp=np, dtype=np.float32):
    """Real-FFT of the normalised ball of ``radius_mm`` (the SMV operator s_r), centred at the
    origin with wrap-around, on a (possibly anisotropic) grid of ``shape``."""
    w = ball_weights(voxel_size, radius_mm)
    kernel = np.zeros(shape, dtype=dtype)
    idx = np.ix_(*[np.arange(-(n // 2), n // 2 + 1) % m for n, m in zip(w.shape, shape)])
    kernel[idx] = w
    return backend.rfftn(xp.asarray(kernel))


def default_radii(voxel_size, max_mm=12.0):
    """Radii (mm) from ``max_mm`` down to the largest voxel dimension, about one in-plane voxel apart."""
    vmax = float(np.max(voxel_size))
    step = max(float(np.min(voxel_size)), 1.0)
    radii = np.arange(max_mm, vmax - 1e-6, -step)
    return [float(r) for r in radii] if radii.size else [max(vmax, max_mm)]


@BACKGROUND.register("vsharp", "V-SHARP: variable-radius spherical mean value filtering")
def vsharp(field, mask, voxel_size, radii_mm=None, tsvd=0.05, weights=None):
    """V-SHARP background removal.

    Parameters
    ----------
    field : (X, Y, Z) total field (ppm), numpy or cupy.
    mask : (X, Y, Z) bool brain mask.
    voxel_size : 3 floats (mm).
    radii_mm : radii, largest first (default ``default_radii``: 12 mm down to the largest voxel size).
    tsvd : truncation threshold of the deconvolution.
    weights : ignored (accepted so every background method has the same signature).

    Returns
    -------
    local : tissue field (ppm), zero outside ``new_mask``.
    new_mask : the mask eroded by the smallest radius (where ``local`` is valid).
    info : dict with the radii used.
    """
    xp = get_array_module(field)
    f = xp.asarray(field, dtype=backend.FLOAT)
    m = xp.asarray(mask).astype(backend.FLOAT)
    radii = sorted(radii_mm or default_radii(voxel_size), reverse=True)
    big = padded_shape(f.shape, [int(np.ceil(radii[0] / v)) + 1 for v in voxel_size])
    fm = f * m
    high_pass = xp.zeros_like(f)
    assigned = xp.zeros(f.shape, dtype=bool)
    for r in radii:
        s = sphere_kernel_ft(big, voxel_size, r, xp, backend.FLOAT)
        # A voxel lies in the mask eroded by r when the ball around it is all inside the mask.
        eroded = apply_kernel(m, lambda _, s=s: s, big) > 0.999
        filtered = fm - apply_kernel(fm, lambda _, s=s: s, big)
        new = eroded & ~assigned
        high_pass[new] = filtered[new]
        assigned |= eroded
        if r == radii[0]:
            s_max = s
    if not bool(assigned.any()):
        raise QSMInputError(f"mask too small for V-SHARP radii {radii} mm")

    def deconv(_, s=s_max):
        k = 1 - s.real
        return xp.where(xp.abs(k) > tsvd, 1 / xp.where(k == 0, 1, k), 0).astype(backend.FLOAT)

    local = apply_kernel(high_pass, deconv, big) * assigned
    return local, assigned, {"radii_mm": [float(r) for r in radii], "tsvd": tsvd}
