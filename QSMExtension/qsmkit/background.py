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
"effective dipole fitting", ISMRM 2010), the project's default, see ``pdf``.
``resharp``: regularisation-enabled SHARP (Sun & Wilman, MRM 2014), see ``resharp``.

Every method has the signature ``f(field, mask, voxel_size, b0_dir, weights=None, **params)``
and returns ``(local, valid_mask, info)``: the local field (ppm, zero outside ``valid_mask``),
the mask where it is valid (V-SHARP erodes) and a dict for the sidecar.
"""

from __future__ import annotations

import numpy as np

from . import backend
from .backend import get_array_module
from .dipole import apply_kernel, padded_shape
from .errors import QSMInputError
from .registry import Registry

BACKGROUND = Registry("background", default="pdf")


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


def check_inputs(field, mask, weights=None):
    """Validate and prepare (field, mask, weights) on the field's device.

    NaN/Inf outside the mask are allowed (vendor field maps are often NaN outside the head)
    and set to 0; inside the mask they are an error, as are an empty mask and shapes that differ.
    """
    xp = get_array_module(field)
    f = xp.asarray(field, dtype=backend.FLOAT)
    m = xp.asarray(mask)
    if m.shape != f.shape:
        raise QSMInputError(f"mask shape {tuple(m.shape)} does not match field shape {tuple(f.shape)}")
    m = m.astype(bool)
    if not bool(m.any()):
        raise QSMInputError("mask is empty")
    bad = ~xp.isfinite(f)
    n_bad = int((bad & m).sum())
    if n_bad:
        raise QSMInputError(f"field has {n_bad} NaN/Inf voxels inside the mask")
    f = xp.where(bad | ~m, 0, f).astype(backend.FLOAT)
    w = None
    if weights is not None:
        w = xp.asarray(weights, dtype=backend.FLOAT)
        if w.shape != f.shape:
            raise QSMInputError(f"weights shape {tuple(w.shape)} does not match field shape {tuple(f.shape)}")
        w = xp.where(xp.isfinite(w) & m, xp.abs(w), 0).astype(backend.FLOAT)
        mean = float(w[m].mean())
        if not mean > 0:
            raise QSMInputError("weights are zero everywhere inside the mask")
        w /= backend.FLOAT(mean)
    return xp, f, m, w


def default_pdf_pad(mask, voxel_size, margin_mm=12.0):
    """Padding (voxels per side, per axis) for PDF: enough that every mask voxel has
    ``margin_mm`` of grid beyond it before the field of view wraps around.

    The background sources PDF has to represent lie outside the brain. Those inside the field
    of view are unknowns already; those beyond it (air around the head, the neck) are stood in
    for by unknowns in the padding, and a thin shell of them reproduces a smooth exterior field
    as well as a thick one. Where the mask already stays ``margin_mm`` away from the border the
    field of view itself provides that shell. Doubling the grid (the usual choice) costs about
    8x the FFT work for no measurable gain (``make bench``: 0.11-0.13x the time, same NRMSE).
    """
    m = backend.to_numpy(mask).astype(bool)
    pad = []
    for ax, v in enumerate(voxel_size):
        other = tuple(a for a in range(m.ndim) if a != ax)
        hits = np.flatnonzero(m.any(axis=other))
        gap = min(hits[0], m.shape[ax] - 1 - hits[-1]) if hits.size else m.shape[ax]
        pad.append(max(0, int(np.ceil(margin_mm / v)) - int(gap)))
    return pad


@BACKGROUND.register("pdf", "PDF: projection onto dipole fields (Liu 2011), weighted, CG")
def pdf(field, mask, voxel_size, b0_dir, weights=None, pad=None, tol=0.05, max_iter=200):
    """Projection onto dipole fields: the background is the field of dipoles outside the mask
    that best fits the total field inside it, in the weighted least-squares sense.

    With D the dipole convolution on the padded grid, M the mask, O = 1 - M the region that may
    hold background sources and W the noise weights (Liu et al., NMR Biomed 2011, eq. 3):

        chi_b = argmin_x || W M (f - D O x) ||^2,   background = M D O chi_b,

    solved with conjugate gradients on the normal equations O D W^2 M D O x = O D W^2 M f
    (CGNR). Local field = f - background inside M. Holes in the mask are outside M, so sources
    there (e.g. air in sinuses enclosed by a loose mask) are fitted as background.

    Stopping rule: CG fits the large, smooth background within a few iterations, then slowly
    fits parts of the brain's own field with sources just outside the mask (the field of any
    source distribution inside M has a component that outside sources reproduce; see the
    README). We stop when an iteration changes the local field by less than ``tol`` of its
    norm inside the mask, or after ``max_iter`` iterations.

    Parameters
    ----------
    field : (X, Y, Z) total field (ppm), numpy or cupy; NaN allowed outside the mask.
    mask : brain mask.
    voxel_size : mm; b0_dir : unit B0 direction in voxel axes.
    weights : optional noise weights (e.g. the magnitude, or 1 / noise SD), any scale: they are
        normalised to mean 1 in the mask. Default uniform.
    pad : voxels per side (int or 3 ints) added around the field of view for sources beyond it;
        default ``default_pdf_pad`` (a 12 mm margin around the mask).
    tol : relative change of the local field per iteration at which CG stops.
    max_iter : cap on CG iterations.

    Returns
    -------
    local, mask, info (iterations, last relative change, normal-equation residual, padded shape).
    """
    from . import solvers
    from .dipole import crop_to, dipole_kernel, pad_to

    xp, f, m, w = check_inputs(field, mask, weights)
    if not 0 < tol < 1:
        raise QSMInputError(f"PDF tol must be in (0, 1), got {tol}")
    if int(max_iter) < 1:
        raise QSMInputError(f"PDF max_iter must be at least 1, got {max_iter}")
    if pad is None:
        pad = default_pdf_pad(m, voxel_size)
    big = padded_shape(f.shape, pad) if np.any(pad) else padded_shape(f.shape, "fast")
    d = dipole_kernel(big, voxel_size, b0_dir, xp=xp, dtype=backend.FLOAT)
    m_big = pad_to(m, big)
    outside = (~m_big).astype(backend.FLOAT)
    w2 = pad_to(m.astype(backend.FLOAT) if w is None else w * w, big)
    f_big = pad_to(f, big)

    def conv(x):
        xf = backend.rfftn(x)
        xf *= d
        return backend.irfftn(xf, s=big)

    def dot(a, b):
        return solvers.dot(xp, a, b)

    # CGNR (Hestenes & Stiefel 1952) keeping neither x nor the background: the local field
    # f - M D O x is updated directly from the search directions, which already live outside
    # the mask (O p = p), so each iteration costs two FFT convolutions and a few vector updates.
    mask_f = m_big.astype(backend.FLOAT)
    r = conv(w2 * f_big)
    r *= outside
    p = r.copy()
    rr = rr0 = dot(r, r)
    local_big = f_big * mask_f
    change, it = 1.0, 0
    while rr > 0 and change > tol and it < int(max_iter):
        q = conv(p)                       # D O p
        ap = conv(w2 * q)
        ap *= outside                     # O D W^2 M D O p
        pap = dot(p, ap)
        if pap <= 0:  # nothing left that outside sources can explain
            break
        alpha = rr / pap
        q *= mask_f
        local_big -= backend.FLOAT(alpha) * q
        r -= backend.FLOAT(alpha) * ap
        rr_new = dot(r, r)
        p *= backend.FLOAT(rr_new / rr)
        p += r
        rr = rr_new
        it += 1
        change = abs(alpha) * dot(q, q) ** 0.5 / max(dot(local_big, local_big) ** 0.5, 1e-30)
    local = xp.ascontiguousarray(crop_to(local_big, f.shape), dtype=backend.FLOAT)
    return local, m, {"iterations": it, "relative_change": round(change, 5),
                      "relative_residual": round((rr / rr0) ** 0.5 if rr0 else 0.0, 6),
                      "converged": change <= tol, "tol": tol, "max_iter": int(max_iter),
                      "padded_shape": [int(n) for n in big], "weighted": w is not None}


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


# registers "tfi" (PDF followed by total field inversion with a source prior)
from . import tfi  # noqa: E402,F401
