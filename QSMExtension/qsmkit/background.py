"""Background field removal: tissue (local) field = total field - background field.

``vsharp``: variable-kernel SHARP (Schweser et al., NeuroImage 2011; Li et al.,
NeuroImage 2011). The background field is harmonic inside the brain, so the
spherical mean value (SMV) filter leaves it unchanged: (delta - s_r) * f removes
it. Near the brain edge only small spheres fit inside the mask, so each voxel
uses the largest radius r whose sphere stays inside the mask (mask eroded by r).
The high-passed field is deconvolved by truncated division with (1 - S_rmax(k))
(threshold ``tsvd``), and the result is kept inside the mask eroded by the
smallest radius.
``pdf``: projection onto dipole fields (Liu et al., NMR Biomed 2011; first shown as
"effective dipole fitting", ISMRM 2010), the original method, in ``background_base``.
``tfi``, ``tfi-fast``: PDF, then total field inversion with a source prior, in ``tfi``.
``resharp``: regularisation-enabled SHARP (Sun & Wilman, MRM 2014), see ``resharp``.

The common signature and the registry ``BACKGROUND``: ``background_base``.
"""

from __future__ import annotations

import numpy as np

from . import backend
from .background_base import BACKGROUND, check_inputs, default_pdf_pad, pdf  # noqa: F401
from .dipole import apply_kernel, padded_shape
from .errors import QSMInputError


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
def vsharp(field, mask, voxel_size, b0_dir=None, weights=None, radii_mm=None, tsvd=0.05):
    """V-SHARP background removal.

    Parameters
    ----------
    field : (X, Y, Z) total field (ppm), numpy or cupy.
    mask : (X, Y, Z) bool brain mask.
    voxel_size : 3 floats (mm).
    b0_dir, weights : not used (SMV filtering needs neither); accepted for the common signature.
    radii_mm : radii, largest first (default ``default_radii``: 12 mm down to the largest voxel size).
    tsvd : truncation threshold of the deconvolution.

    Returns
    -------
    local : tissue field (ppm), zero outside ``new_mask``.
    new_mask : the mask eroded by the smallest radius (where ``local`` is valid).
    info : dict with the radii used.
    """
    xp, f, m, _ = check_inputs(field, mask)
    m = m.astype(backend.FLOAT)
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


@BACKGROUND.register("resharp", "RESHARP: Tikhonov-regularised SHARP (Sun & Wilman 2014)")
def resharp(field, mask, voxel_size, b0_dir=None, weights=None, radius_mm=4.0, lam=1e-3,
            tol=1e-3, max_iter=100):
    """Regularisation-enabled SHARP (Sun & Wilman, MRM 2014, eq. 5).

    The background is harmonic in the brain, so the SMV high-pass C = delta - s_r removes it
    wherever the ball of radius r fits inside the mask (M_r, the mask eroded by r). RESHARP
    finds the local field f_L on the whole mask M whose high-pass matches the data there,

        f_L = argmin_x || M_r C (f - M x) ||^2 + lam || M x ||^2,

    by conjugate gradients on (M C M_r C M + lam) x = M C M_r C f. Unlike SHARP's truncated
    deconvolution this keeps the brain edge (M instead of M_r), and Tikhonov damping
    replaces the truncation threshold.

    Parameters
    ----------
    radius_mm : SMV radius (mm), at least the largest voxel dimension.
    lam : Tikhonov weight, relative to the unit-norm high-pass.
    tol, max_iter : CG stopping rule (relative normal-equation residual) and cap.
    b0_dir, weights : not used; accepted for the common signature.
    """
    from .solvers import cg

    xp, f, m, _ = check_inputs(field, mask)
    if not radius_mm >= max(voxel_size):
        raise QSMInputError(f"RESHARP radius {radius_mm} mm is smaller than a voxel ({max(voxel_size)} mm)")
    if not lam > 0:
        raise QSMInputError(f"RESHARP lambda must be positive, got {lam}")
    big = padded_shape(f.shape, [int(np.ceil(radius_mm / v)) + 1 for v in voxel_size])
    s = sphere_kernel_ft(big, voxel_size, radius_mm, xp, backend.FLOAT)
    c = (1 - s.real).astype(backend.FLOAT)
    mf = m.astype(backend.FLOAT)
    eroded = apply_kernel(mf, lambda _: s, big) > 0.999
    if not bool(eroded.any()):
        raise QSMInputError(f"mask too small for RESHARP radius {radius_mm} mm")
    er = eroded.astype(backend.FLOAT)

    def high_pass(x):
        return apply_kernel(x, lambda _: c, big)

    def normal(x):
        return mf * high_pass(er * high_pass(mf * x)) + backend.FLOAT(lam) * (mf * x)

    rhs = mf * high_pass(er * high_pass(f))
    local, info = cg(normal, rhs, tol=tol, max_iter=max_iter)
    local = xp.ascontiguousarray(local * mf, dtype=backend.FLOAT)
    return local, m, {**info.as_dict(), "radius_mm": radius_mm, "lambda": lam, "tol": tol,
                      "max_iter": int(max_iter)}


# registers "tfi" and "tfi-fast" (PDF, then total field inversion with a source prior); tfi
# imports only background_base, so this is not a circle
from . import tfi  # noqa: E402,F401
