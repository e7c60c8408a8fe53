"""Brain masks from the magnitude image.

``threshold``: Otsu threshold of the smoothed magnitude, a morphological opening
to cut thin bridges (scalp, skull), the largest connected component and hole
filling, then an optional erosion in millimetres. Robust on simulated data and
on skull-stripped magnitude; FSL BET joins this registry when FSL is present.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu

from .errors import QSMInputError
from .registry import Registry

MASKING = Registry("masking", default="threshold")


def ellipsoid_structure(radius_mm, voxel_size):
    """Boolean ball of ``radius_mm`` on an anisotropic voxel grid (an ellipsoid in voxels)."""
    r = [max(int(np.floor(radius_mm / v)), 0) for v in voxel_size]
    grids = np.ogrid[tuple(slice(-n, n + 1) for n in r)]
    dist2 = sum((g * v) ** 2 for g, v in zip(grids, voxel_size))
    return dist2 <= radius_mm**2 + 1e-9


def erode_mm(mask, voxel_size, radius_mm):
    """Erode a mask by a ball of ``radius_mm`` (voxels near the volume border count as outside)."""
    if radius_mm <= 0:
        return mask.astype(bool)
    st = ellipsoid_structure(radius_mm, voxel_size)
    return ndimage.binary_erosion(mask, structure=st, border_value=0)


def largest_component(mask):
    lab, n = ndimage.label(mask)
    if n <= 1:
        return mask.astype(bool)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == np.argmax(sizes)


@MASKING.register("threshold", "Otsu threshold + opening + largest component + hole filling")
def mask_threshold(magnitude, voxel_size, *, threshold=None, opening_mm=3.0, erode=0.0,
                   smooth_mm=1.0):
    """Brain mask from magnitude.

    Parameters
    ----------
    magnitude : (X, Y, Z) or (X, Y, Z, E) array; echoes are combined by root-mean-square.
    voxel_size : 3 floats (mm)
    threshold : float, optional
        Absolute threshold; default Otsu's on the smoothed magnitude.
    opening_mm : radius of the opening ball that detaches scalp and skull.
    erode : extra erosion of the final mask (mm).
    smooth_mm : Gaussian sigma before thresholding (mm).
    """
    mag = np.asarray(magnitude, dtype=np.float32)
    if mag.ndim == 4:
        mag = np.sqrt(np.mean(mag**2, axis=3))
    sigma = [smooth_mm / v for v in voxel_size]
    smooth = ndimage.gaussian_filter(mag, sigma) if smooth_mm > 0 else mag
    if threshold is None:
        if not np.any(smooth > 0):
            raise QSMInputError("magnitude is empty (all zero): cannot compute a mask")
        threshold = threshold_otsu(smooth[smooth > 0])
    mask = smooth > threshold
    if opening_mm > 0:
        mask = ndimage.binary_opening(mask, structure=ellipsoid_structure(opening_mm, voxel_size))
    mask = largest_component(mask)
    mask = ndimage.binary_fill_holes(mask)
    mask = erode_mm(mask, voxel_size, erode)
    if not mask.any():
        raise QSMInputError("masking produced an empty mask; give --mask or a lower threshold")
    return mask
