"""Voxel integration of the 0.64 mm head model onto an acquisition grid, as a scanner measures
it: each acquisition voxel is split into sub-voxels, which take the nearest native voxel's labels
and the trilinear interpolation of the native fields; the values (and the complex signal, by
``qsmkit.simulate.integrate_echo``) are then averaged over each acquisition voxel. Shared by the
end-to-end cases (``benchmarks/e2e_cases.build``) and the suite's thick-slice head
(``benchmarks/eval/cases._head_integrated``), which walk the acquisition grid in slabs of rows
along its first axis to bound memory."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def slabs(n, step):
    """(i0, i1) row ranges of ``step`` rows covering ``range(n)``."""
    for i0 in range(0, n, step):
        yield i0, min(i0 + step, n)


def slab_points(axes, fac, i0, i1, native_shape):
    """The sub-voxel centres of acquisition rows ``i0:i1`` as a meshgrid in native voxel units
    (``axes``: the sub-voxel centres along each axis; native voxel i is centred at i), and the
    index of the nearest native voxel of each (clipped to the native grid)."""
    grid = np.meshgrid(axes[0][i0 * fac[0]:i1 * fac[0]], axes[1], axes[2], indexing="ij")
    near = tuple(np.clip(np.rint(g).astype(np.int32), 0, n - 1) for g, n in zip(grid, native_shape))
    return grid, near


def interpolate(native, grid):
    """Trilinear interpolation of a native map at the sub-voxel centres ``grid``."""
    return ndimage.map_coordinates(native, grid, order=1, mode="nearest")


def block_mode(lab, fac, n_lab):
    """The majority label of each block of ``fac`` sub-voxels (labels ``0..n_lab-1``)."""
    from qsmkit.simulate import block_mean

    counts = np.stack([block_mean((lab == k).astype(np.float32), fac) for k in range(n_lab)])
    return counts.argmax(axis=0).astype(np.int16)
