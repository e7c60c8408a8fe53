"""k-space apodization (``qsmkit.kspace``) against Gibbs ringing, and the steep-field mask
refinement (``qsmkit.masking.exclude_steep_field``)."""

import numpy as np
import pytest

from qsmkit import kspace, masking
from qsmkit.errors import QSMInputError


def test_tukey_window():
    np.testing.assert_array_equal(kspace.tukey(16, 0.0), np.ones(16))
    hann = kspace.tukey(64, 1.0)
    k = np.abs(np.fft.fftfreq(64)) * 2
    np.testing.assert_allclose(hann, 0.5 * (1 + np.cos(np.pi * k)), atol=1e-12)  # Hann
    half = kspace.tukey(64, 0.5)
    assert np.all(half[k <= 0.5] == 1) and half[k > 0.5].max() < 1
    with pytest.raises(QSMInputError, match="alpha"):
        kspace.tukey(8, 1.5)


def test_apodize_removes_gibbs_ringing():
    # a box with a phase step, band-limited to the central 32 of 128 k-space points: the
    # truncation rings (Gibbs: about 9 % overshoot) in magnitude and phase
    n, keep = 128, 32
    x = np.arange(n)
    box = ((x > 40) & (x < 88)).astype(float)
    obj = box[:, None, None] * np.ones((1, 4, 4)) * np.exp(1j * 0.8 * (x[:, None, None] > 64))
    k = np.fft.fftn(obj)
    low = np.abs(np.fft.fftfreq(n)) * n < keep / 2
    z = np.fft.ifftn(k * low[:, None, None])
    z = z[::4]  # the scanner's grid: 32 points
    mag, pha = np.abs(z).astype(np.float32), np.angle(z).astype(np.float32)
    ring = mag[:, 0, 0].max() - 1
    m2, p2 = kspace.apodize(mag, pha, 1.0)
    ring2 = m2[:, 0, 0].max() / np.median(m2[12:20, 0, 0]) - 1
    print(f"overshoot raw {ring:.3f}, Hann {ring2:.4f}")
    assert ring > 0.05 and ring2 < 0.01
    # a smooth object (all its k-space inside the flat part of the window) is unchanged
    smooth = np.exp(1j * 0.5 * np.cos(2 * np.pi * np.arange(32) / 32))[:, None, None] * np.ones((1, 8, 8))
    m3, p3 = kspace.apodize(np.abs(smooth), np.angle(smooth), 0.5)
    np.testing.assert_allclose(p3, np.angle(smooth), atol=1e-5)
    m4, p4 = kspace.apodize(np.stack([mag, mag], 3), np.stack([pha, pha], 3), 1.0)  # echoes
    np.testing.assert_allclose(p4[..., 1], p2, atol=1e-6)
    assert kspace.apodize(mag, pha, 0.0)[1] is not None


def test_exclude_steep_field():
    n = 40
    g = np.indices((n, n, n)) - n / 2
    mask = (g**2).sum(0) < 15**2
    rng = np.random.default_rng(0)
    field = 0.001 * g[0] + 0.002 * rng.standard_normal(mask.shape)  # a gradient and noise
    spot = np.array([n / 2 + 14, n / 2, n / 2])  # a steep source just outside the edge
    r2 = ((np.indices((n, n, n)) - spot[:, None, None, None]) ** 2).sum(0) + 1.0
    field = field + 2.0 / r2**1.5
    kept, info = masking.exclude_steep_field(mask, field, (1.0, 1.0, 1.0), fence=3.0, dilate_mm=1.0)
    removed = mask & ~kept
    d = np.sqrt(((np.argwhere(removed) - spot) ** 2).sum(1))
    assert removed.sum() > 0 and d.max() < 8  # only next to the source
    assert info["removed_ml"] == pytest.approx(removed.sum() / 1000, abs=0.05)
    plain, info0 = masking.exclude_steep_field(mask, 0.001 * g[0], (1.0, 1.0, 1.0))
    assert info0["removed_ml"] < 0.5  # a smooth field loses (almost) nothing
