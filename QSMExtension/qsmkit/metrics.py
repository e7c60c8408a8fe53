"""Accuracy measures of a susceptibility map against a reference (DESIGN.md, "Measures").

Dipole inversion does not determine the mean of chi, so every measure first
removes each map's mean inside the mask (or, for ROI errors, inside the labelled
region). Inputs may be numpy or cupy arrays; everything is computed in float64
on the host.

- NRMSE (%): 100 ||x - ref|| / ||ref|| over the mask.
- HFEN (%): NRMSE of Laplacian-of-Gaussian filtered maps (Ravishankar & Bresler,
  IEEE TMI 2011; sigma 1.5 voxels, as in the 2016 QSM reconstruction challenge).
- SSIM: structural similarity (Wang et al., IEEE TIP 2004), 3-D, averaged over the mask.
- ROI mean error (ppb) per label.
- Vessel contrast recovery: (vessel - surround) contrast of x over that of ref.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .backend import to_numpy
from .errors import QSMInputError


def _prep(x, ref, mask=None):
    """Host float64 copies of ``x`` and ``ref`` and a boolean mask (all True by default)."""
    x = np.asarray(to_numpy(x), dtype=np.float64)
    ref = np.asarray(to_numpy(ref), dtype=np.float64)
    if x.shape != ref.shape:
        raise QSMInputError(f"map shape {x.shape} does not match reference shape {ref.shape}")
    if mask is None:
        m = np.ones(ref.shape, dtype=bool)
    else:
        m = np.asarray(to_numpy(mask)).astype(bool)
        if m.shape != ref.shape:
            raise QSMInputError(f"mask shape {m.shape} does not match map shape {ref.shape}")
    if not m.any():
        raise QSMInputError("mask is empty: nothing to compare")
    return x, ref, m


def _nrmse(x, ref, m):
    a = x[m] - x[m].mean()
    b = ref[m] - ref[m].mean()
    den = np.linalg.norm(b)
    num = np.linalg.norm(a - b)
    if den == 0:
        return 0.0 if num == 0 else float("inf")
    return float(100.0 * num / den)


def _demeaned_masked(v, m):
    out = np.zeros_like(v)
    out[m] = v[m] - v[m].mean()
    return out


def nrmse(x, ref, mask=None) -> float:
    """Normalised root-mean-square error (%) over ``mask`` after removing each map's mean
    inside the mask: ``100 ||x - ref|| / ||ref||``. ``inf`` if ``ref`` is constant and
    ``x`` is not."""
    x, ref, m = _prep(x, ref, mask)
    return _nrmse(x, ref, m)


def hfen(x, ref, mask=None, sigma=1.5) -> float:
    """High-frequency error norm (%): each map is demeaned in the mask and zeroed outside,
    filtered with a Laplacian of Gaussian (``sigma`` in voxels), and the NRMSE of the
    filtered maps is taken over the mask."""
    x, ref, m = _prep(x, ref, mask)
    lx = ndimage.gaussian_laplace(_demeaned_masked(x, m), sigma)
    lr = ndimage.gaussian_laplace(_demeaned_masked(ref, m), sigma)
    return _nrmse(lx, lr, m)


def ssim(x, ref, mask=None) -> float:
    """Structural similarity, 3-D (scikit-image, 7-voxel windows or the largest odd size
    that fits), of the two maps demeaned in the mask and zeroed outside it, with
    ``data_range`` from the reference; the SSIM map is averaged over the mask."""
    from skimage.metrics import structural_similarity

    x, ref, m = _prep(x, ref, mask)
    # work on the mask's bounding box plus a window's margin (speed; same values)
    idx = np.nonzero(m)
    sl = tuple(slice(max(int(i.min()) - 3, 0), int(i.max()) + 4) for i in idx)
    xs = _demeaned_masked(x, m)[sl]
    rs = _demeaned_masked(ref, m)[sl]
    ms = m[sl]
    win = min(7, min(xs.shape))
    win -= 1 - win % 2  # odd
    if win < 3:
        raise QSMInputError(f"volume {xs.shape} too small for SSIM (needs 3 voxels per axis)")
    data_range = float(rs.max() - rs.min())
    if data_range == 0:
        data_range = 1.0
    _, smap = structural_similarity(xs, rs, win_size=win, data_range=data_range, full=True)
    return float(smap[ms].mean())


def roi_mean_error_ppb(x, ref, labels, label_ids=None) -> dict:
    """Per label: (mean of x - mean of ref) in ppb (x1000, maps in ppm), after each map
    is demeaned over all labelled voxels (``labels > 0``). ``label_ids`` defaults to
    every non-zero label present."""
    lab = np.asarray(to_numpy(labels))
    region = lab > 0
    x, ref, region = _prep(x, ref, region)
    x = x - x[region].mean()
    ref = ref - ref[region].mean()
    if label_ids is None:
        label_ids = [int(v) for v in np.unique(lab[region])]
    out = {}
    for lid in label_ids:
        sel = lab == lid
        if not sel.any():
            raise QSMInputError(f"label {lid} has no voxels")
        out[int(lid)] = float(1000.0 * (x[sel].mean() - ref[sel].mean()))
    return out


def default_surround(vessel_mask, width=3):
    """A ring ``width`` voxels wide around the vessel (binary dilation minus the vessel)."""
    v = np.asarray(to_numpy(vessel_mask)).astype(bool)
    return ndimage.binary_dilation(v, iterations=int(width)) & ~v


def vessel_contrast_recovery(x, ref, vessel_mask, surround_mask=None) -> float:
    """(mean x in vessel - mean x in surround) / (the same for ref); 1 is perfect
    recovery. The surround defaults to a 3-voxel ring around the vessel."""
    v = np.asarray(to_numpy(vessel_mask)).astype(bool)
    x, ref, v = _prep(x, ref, v)
    s = default_surround(v) if surround_mask is None else np.asarray(to_numpy(surround_mask))
    s = s.astype(bool) & ~v
    if not s.any():
        raise QSMInputError("vessel surround is empty")
    cr = ref[v].mean() - ref[s].mean()
    cx = x[v].mean() - x[s].mean()
    if cr == 0:
        return float("nan")
    return float(cx / cr)


def summary(x, ref, mask, labels=None, vessel_mask=None) -> dict:
    """All measures in one dict: ``nrmse``, ``hfen``, ``ssim`` and, when given,
    ``roi_error_ppb`` (labels restricted to the mask) and ``vessel_contrast``."""
    x = np.asarray(to_numpy(x), dtype=np.float64)
    ref = np.asarray(to_numpy(ref), dtype=np.float64)
    m = np.asarray(to_numpy(mask)).astype(bool)
    out = {"nrmse": nrmse(x, ref, m), "hfen": hfen(x, ref, m), "ssim": ssim(x, ref, m)}
    if labels is not None:
        lab = np.where(m, np.asarray(to_numpy(labels)), 0)
        out["roi_error_ppb"] = roi_mean_error_ppb(x, ref, lab)
    if vessel_mask is not None:
        out["vessel_contrast"] = vessel_contrast_recovery(x, ref, vessel_mask)
    return out
