"""The background stage's shared base: its method registry, input checks, and PDF (the
original method, on which ``tfi`` builds). ``background`` (V-SHARP, RESHARP) and ``tfi`` both
import from here and not from each other, so there is no import circle; ``background`` imports
``tfi`` once to register it.

Every method has the signature ``f(field, mask, voxel_size, b0_dir, weights=None, **params)``
and returns ``(local, valid_mask, info)``: the local field (ppm, zero outside ``valid_mask``),
the mask where it is valid (V-SHARP erodes) and a dict for the sidecar.
"""

from __future__ import annotations

import numpy as np

from . import backend, solvers
from .backend import get_array_module
from .dipole import crop_to, dipole_kernel, pad_to, padded_shape
from .errors import QSMInputError
from .registry import Registry

#: ``auto`` is ``tfi-fast`` (module ``tfi``): on the end-to-end benchmark's full simulations it
#: gives 37 % chi NRMSE against PDF's 45 % (3 T, 1 mm), at 0.8-2.7x PDF's CPU time
#: (``benchmarks/background_time.py``). PDF, the original method, stays a choice
#: (``--background pdf``).
BACKGROUND = Registry("background", default="tfi-fast")


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


def cap_weights(w, m, cap=1.0):
    """Noise weights (mean 1 in the mask ``m``) lowered to ``cap`` times their median in the
    mask wherever they exceed it, then normalised to mean 1 again; ``cap`` <= 0 or ``w`` None:
    unchanged. Returns (weights, share of mask voxels lowered).

    Why: weights of 1 / (noise SD) make the background fit optimal when what it cannot fit is
    noise. In background removal at clinical SNR it is mostly not: it is the part of the brain's
    own field that sources outside the mask reproduce (the harmonic floor) and background the
    solver has not fitted yet, neither of which is smaller where the signal is brighter. Raw
    weights then pull the fit towards the brightest voxels, the CSF at the brain's edge, and
    leave the error in a rim there (the built-in phantom: local field 44.5 % with raw weights,
    35 % capped). Weights below the median still mark voxels whose field is unreliable (veins,
    low signal, the last echoes' dropouts) and keep their full effect."""
    if w is None or not cap > 0:
        return w, 0.0
    xp = backend.get_array_module(w)
    limit = backend.FLOAT(cap * float(xp.median(w[m])))
    share = float((w[m] > limit).mean())
    w = xp.minimum(w, limit)
    w /= backend.FLOAT(float(w[m].mean()))
    return w.astype(backend.FLOAT, copy=False), share


#: PDF's margin of background sources around the mask, mm (``default_pdf_pad``)
PDF_MARGIN_MM = 12.0


def default_pdf_pad(mask, voxel_size, margin_mm=PDF_MARGIN_MM):
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
def pdf(field, mask, voxel_size, b0_dir, weights=None, pad=None, tol=0.05, max_iter=200,
        min_iter=0):
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
    tol : relative change of the local field per iteration at which CG stops (0: run
        ``max_iter`` iterations).
    max_iter : cap on CG iterations.
    min_iter : CG iterations run whatever the change (``tfi-fast``'s start).

    Returns
    -------
    local, mask, info (iterations, last relative change, normal-equation residual, padded shape).
    """
    xp, f, m, w = check_inputs(field, mask, weights)
    if not 0 <= tol < 1:
        raise QSMInputError(f"PDF tol must be in [0, 1), got {tol}")
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
    while rr > 0 and (change > tol or it < int(min_iter)) and it < int(max_iter):
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
        if it >= int(min_iter):  # the change only decides once min_iter is reached
            change = abs(alpha) * dot(q, q) ** 0.5 / max(dot(local_big, local_big) ** 0.5, 1e-30)
    local = xp.ascontiguousarray(crop_to(local_big, f.shape), dtype=backend.FLOAT)
    return local, m, {"iterations": it, "relative_change": round(change, 5),
                      "relative_residual": round((rr / rr0) ** 0.5 if rr0 else 0.0, 6),
                      "converged": change <= tol, "tol": tol, "max_iter": int(max_iter),
                      "padded_shape": [int(n) for n in big], "weighted": w is not None}
