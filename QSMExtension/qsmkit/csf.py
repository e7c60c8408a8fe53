"""A CSF reference region found in the data: the lateral ventricles, from R2* (multi-echo) or
the late-echo magnitude (single echo), away from the brain's edge, eroded.

Why CSF and why the ventricles. Deep-gray susceptibility is published relative to CSF (the
original method's table; Straub et al., MRM 2017 recommend ventricular CSF as the most
reproducible reference). CSF is the brain's only large compartment of nearly free water: its
R2* is about a third of white and gray matter's at any field strength (T2* ~150 ms against
40-60 ms at 3 T), and its signal is the brightest at long echo times. Sulcal CSF is thin, lies at
the brain's edge where background removal errs most, and shares voxels with cortex and veins, so
only CSF deep in the brain is used.

The rule (every threshold a ratio to a quantity measured on the same scan, so it holds at 3 T
and 7 T and for any signal scale):

1. Deep region: mask voxels at least ``depth_mm`` (15 mm) from the brain mask's edge.
2. Candidates: with R2* (``r2star``, s^-1): R2* < ``ratio`` (0.5) x the median R2* of the deep
   region, which is white and gray matter's. Without R2*: magnitude > ``mag_ratio`` (1.5) x the
   deep region's median magnitude (white matter's): CSF has 1.45x white matter's proton density
   and a longer T2*, so it is at least 1.55x brighter from TE 5 ms on at 3 T.
3. Connected components (26-connectivity) of at least ``min_ml`` (0.5 mL) are kept: the
   ventricles; isolated noise voxels are dropped.
4. Eroded by ``erode_vox`` (1) voxel against partial volumes with the caudate, thalamus and
   the choroid plexus; if that empties it, the un-eroded region is returned (``info``).

Checked against the head model's true CSF label in ``Testing/test_csf.py``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .errors import QSMInputError


def csf_mask(mask, voxel_size, r2star=None, magnitude=None, depth_mm=15.0, ratio=0.5,
             mag_ratio=1.5, min_ml=0.5, erode_vox=1):
    """Ventricular CSF mask from R2* or a late-echo magnitude (module docstring).

    Parameters
    ----------
    mask : (X, Y, Z) brain mask.
    voxel_size : mm.
    r2star : R2* map (s^-1), preferred; ``magnitude`` : used when no R2* is given (a 3-D
        magnitude, e.g. the last echo or the echoes' RMS).
    depth_mm, ratio, mag_ratio, min_ml, erode_vox : the rule's constants (module docstring).

    Returns
    -------
    csf : bool (X, Y, Z); info : dict with the criterion, threshold, voxel counts and volume.
    """
    m = np.asarray(mask).astype(bool)
    if not m.any():
        raise QSMInputError("CSF mask: the brain mask is empty")
    if r2star is None and magnitude is None:
        raise QSMInputError("CSF mask needs an R2* map or a magnitude")
    vox = np.asarray(voxel_size, float)
    # everything on the mask's bounding box grown by one voxel (the same distances, less work)
    full = m.shape
    box = tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n))
                for s, n in zip(ndimage.find_objects(m.astype(np.uint8))[0], full))
    m = m[box]
    r2star = None if r2star is None else np.asarray(r2star)[box]
    magnitude = None if magnitude is None else np.asarray(magnitude)[box]
    depth = ndimage.distance_transform_edt(m, sampling=vox)
    deep = depth >= depth_mm
    if deep.sum() < 100:
        raise QSMInputError(f"CSF mask: fewer than 100 brain voxels lie {depth_mm} mm from the "
                            "mask's edge (is the mask the whole brain?)")
    if r2star is not None:
        r2 = np.asarray(r2star, np.float32)
        good = deep & np.isfinite(r2)
        level = float(np.median(r2[good]))
        thr = ratio * level
        cand = good & (r2 < thr) & (r2 >= 0)
        criterion = "r2star"
    else:
        mag = np.asarray(magnitude, np.float32)
        level = float(np.median(mag[deep]))
        thr = level * mag_ratio
        cand = deep & (mag > thr)
        criterion = "magnitude"
    lab, n = ndimage.label(cand, structure=np.ones((3, 3, 3), bool))
    voxel_ml = float(np.prod(vox)) / 1000.0
    keep = np.zeros_like(cand)
    if n:
        sizes = np.bincount(lab.ravel())[1:]
        kept = np.zeros(n + 1, bool)
        kept[1:] = sizes * voxel_ml >= min_ml
        keep = kept[lab]
    csf = ndimage.binary_erosion(keep, iterations=erode_vox) if erode_vox > 0 else keep
    eroded = True
    if not csf.any():
        csf, eroded = keep, False
    out = np.zeros(full, bool)
    out[box] = csf
    csf = out
    info = {"criterion": criterion, "median_deep": round(level, 4), "threshold": round(thr, 4),
            "depth_mm": depth_mm, "ratio": ratio, "min_ml": min_ml, "erode_vox": erode_vox,
            "eroded": eroded, "candidates": int(cand.sum()), "voxels": int(csf.sum()),
            "volume_ml": round(float(csf.sum()) * voxel_ml, 2)}
    return csf, info
