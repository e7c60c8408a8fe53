"""V-SHARP against a case with known answer: a local source inside a spherical brain and a strong
air-like source outside it; the background is harmonic inside the mask."""

import numpy as np
import pytest

from qsmkit import background, dipole, metrics


def ball(shape, voxel, centre, radius):
    g = np.meshgrid(*[(np.arange(n) - n / 2) * v for n, v in zip(shape, voxel)], indexing="ij")
    return sum((q - c) ** 2 for q, c in zip(g, centre)) <= radius**2


# Measured: 3.9 % (1 mm) and 13.6 % (2.5 mm slices: the small spheres near the edge are coarse in z,
# and the air is 7 mm from the brain); PDF in the background issue is expected to do better.
@pytest.mark.parametrize("voxel, bar", [((1.0, 1.0, 1.0), 6.0), ((0.9375, 0.9375, 2.5), 18.0)])
def test_vsharp_removes_harmonic_background(voxel, bar):
    shape = tuple(int(120 / v) for v in voxel)
    mask = ball(shape, voxel, (0, 0, 0), 40)
    local_chi = 0.1 * ball(shape, voxel, (5, 0, 0), 8)
    air = 9.4 * ball(shape, voxel, (0, 0, 52), 5)  # just above the "brain"
    pad = [n // 2 for n in shape]
    local = dipole.forward_field(local_chi.astype(np.float32), voxel, (0, 0, 1), pad=pad)
    bg = dipole.forward_field(air.astype(np.float32), voxel, (0, 0, 1), pad=pad)
    assert np.abs(bg[mask]).max() > 5 * np.abs(local[mask]).max()  # background dominates
    est, valid, info = background.vsharp(local + bg, mask, voxel)
    assert valid.sum() > 0.7 * mask.sum() and not (valid & ~mask).any()
    assert metrics.nrmse(est, local, valid) < bar
    assert info["radii_mm"][0] == 12.0


def test_ball_weights_are_isotropic_on_anisotropic_voxels():
    """The SMV ball's second moments at the voxel centres are equal along every axis, even on
    0.9375 x 0.9375 x 2.5 mm voxels (r^2/5 + d_min^2/12); this keeps V-SHARP from leaving
    shells of residual background."""
    voxel, r = (0.9375, 0.9375, 2.5), 6.0
    w = background.ball_weights(voxel, r)
    assert w.sum() == pytest.approx(1.0)
    grids = np.meshgrid(*[(np.arange(n) - n // 2) * v for n, v in zip(w.shape, voxel)],
                        indexing="ij")
    moments = [float((w * g**2).sum()) for g in grids]
    np.testing.assert_allclose(moments, r**2 / 5 + 0.9375**2 / 12, rtol=0.02)
