"""The voxel-integration helpers that the end-to-end cases and the suite's thick-slice head are
built with (``benchmarks/subvoxel.py``), against scipy's own mode and a direct walk."""

import numpy as np
from benchmarks import subvoxel
from scipy import stats


def test_block_mode_is_the_majority_label_of_each_block():
    rng = np.random.default_rng(3)
    fac = (2, 2, 3)
    lab = rng.integers(0, 5, size=(6, 4, 9)).astype(np.int16)
    got = subvoxel.block_mode(lab, fac, 5)
    blocks = lab.reshape(3, 2, 2, 2, 3, 3).transpose(0, 2, 4, 1, 3, 5).reshape(3, 2, 3, -1)
    want = stats.mode(blocks, axis=-1, keepdims=False).mode  # ties: the smallest label, as argmax
    assert got.shape == (3, 2, 3) and got.dtype == np.int16
    np.testing.assert_array_equal(got, want)


def test_slabs_cover_the_rows_once_and_points_are_the_nearest_native_voxels():
    assert list(subvoxel.slabs(10, 4)) == [(0, 4), (4, 8), (8, 10)]
    fac = (2, 1, 3)
    axes = [np.linspace(-0.6, 7.4, 10), np.arange(5.0), np.linspace(0.2, 2.9, 6)]
    grid, near = subvoxel.slab_points(axes, fac, 1, 3, (8, 5, 4))
    assert grid[0].shape == (4, 5, 6)  # rows 1:3 of the acquisition grid, 2 sub-voxels each
    np.testing.assert_array_equal(grid[0][:, 0, 0], axes[0][2:6])
    np.testing.assert_array_equal(near[2][0, 0], [0, 1, 1, 2, 2, 3])  # rint
    assert subvoxel.slab_points(axes, fac, 0, 1, (8, 5, 4))[1][0].min() == 0  # rint(-0.6) = -1, clipped
    native = np.arange(8 * 5 * 4, dtype=float).reshape(8, 5, 4)  # linear: interpolation is exact
    np.testing.assert_allclose(subvoxel.interpolate(native, grid),
                               20 * grid[0] + 4 * grid[1] + grid[2], atol=1e-9)
