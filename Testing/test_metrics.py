"""Accuracy measures (qsmkit.metrics) against hand computations."""

import numpy as np
import pytest
from scipy import ndimage

from qsmkit import metrics
from qsmkit.errors import QSMInputError


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    ref = ndimage.gaussian_filter(rng.standard_normal((24, 28, 20)), 2.0) * 0.1
    z, y, x = np.ogrid[:24, :28, :20]
    mask = (z - 11.5) ** 2 / 100 + (y - 13.5) ** 2 / 144 + (x - 9.5) ** 2 / 64 <= 1
    return ref, mask, rng


def test_nrmse_basic(data):
    ref, mask, _ = data
    assert metrics.nrmse(ref, ref) == 0.0
    assert metrics.nrmse(ref, ref, mask) == 0.0
    assert metrics.nrmse(ref + 3.7, ref, mask) == pytest.approx(0.0, abs=1e-9)
    assert metrics.nrmse(ref, ref + 3.7, mask) == pytest.approx(0.0, abs=1e-9)
    # zero-mean reference: 2 ref is 100 % off
    r = np.array([1.0, -1.0, 2.0, -2.0])
    assert metrics.nrmse(2 * r, r) == pytest.approx(100.0)
    assert metrics.nrmse(np.zeros(4), r) == pytest.approx(100.0)
    # by hand, a 2-element mask: x = (3, 1) -> (1, -1); ref = (0, 4) -> (-2, 2)
    x = np.array([3.0, 1.0, 50.0])
    rf = np.array([0.0, 4.0, -50.0])
    m = np.array([True, True, False])
    assert metrics.nrmse(x, rf, m) == pytest.approx(100 * np.sqrt(18) / np.sqrt(8))


def test_nrmse_matches_numpy_formula(data):
    ref, mask, rng = data
    x = ref + 0.02 * rng.standard_normal(ref.shape) + 0.5
    a = x[mask] - x[mask].mean()
    b = ref[mask] - ref[mask].mean()
    expected = 100 * np.sqrt(np.sum((a - b) ** 2) / np.sum(b**2))
    assert metrics.nrmse(x, ref, mask) == pytest.approx(expected, rel=1e-12)
    # float32 inputs give the float64 answer
    assert metrics.nrmse(x.astype(np.float32), ref.astype(np.float32), mask) == pytest.approx(
        expected, rel=1e-5)


def test_hfen_matches_independent_computation(data):
    ref, mask, rng = data
    x = ref + 0.02 * rng.standard_normal(ref.shape) - 1.0
    xd = np.where(mask, x - x[mask].mean(), 0)
    rd = np.where(mask, ref - ref[mask].mean(), 0)
    lx = ndimage.gaussian_laplace(xd, 1.5)[mask]
    lr = ndimage.gaussian_laplace(rd, 1.5)[mask]
    lx, lr = lx - lx.mean(), lr - lr.mean()
    expected = 100 * np.linalg.norm(lx - lr) / np.linalg.norm(lr)
    assert metrics.hfen(x, ref, mask) == pytest.approx(expected, rel=1e-10)
    assert metrics.hfen(ref + 2, ref, mask) == pytest.approx(0.0, abs=1e-9)
    # more noise, larger error; other sigma changes the answer
    noisier = ref + 0.04 * rng.standard_normal(ref.shape)
    assert metrics.hfen(noisier, ref, mask) > metrics.hfen(x, ref, mask)
    assert metrics.hfen(x, ref, mask, sigma=3.0) != pytest.approx(expected, rel=1e-3)


def test_ssim(data):
    ref, mask, rng = data
    assert metrics.ssim(ref, ref, mask) == pytest.approx(1.0)
    assert metrics.ssim(ref + 1.0, ref, mask) == pytest.approx(1.0)  # mean removed
    values = [metrics.ssim(ref + s * rng.standard_normal(ref.shape), ref, mask)
              for s in (0.002, 0.01, 0.05)]
    assert 1.0 > values[0] > values[1] > values[2]
    assert metrics.ssim(ref, ref) == pytest.approx(1.0)


def test_roi_mean_error_ppb():
    labels = np.zeros((4, 4, 4), dtype=np.uint8)
    labels[0] = 1
    labels[1] = 2
    labels[2:] = 3  # 16, 16, 32 voxels; 0 nowhere
    labels[3, 3, 3] = 0
    ref = np.zeros(labels.shape)
    ref[labels == 2] = 0.1
    x = ref.copy()
    x[labels == 2] = 0.05  # 50 ppb low in label 2
    x[labels == 0] = 99.0  # outside the labels: ignored
    x = x + 7.0            # offsets are removed
    err = metrics.roi_mean_error_ppb(x, ref, labels)
    assert set(err) == {1, 2, 3}
    # after demeaning over the 63 labelled voxels: shift of x relative to ref = -0.05*16/63
    shift = 1000 * 0.05 * 16 / 63
    assert err[1] == pytest.approx(shift)
    assert err[2] == pytest.approx(-50 + shift)
    assert err[3] == pytest.approx(shift)
    only = metrics.roi_mean_error_ppb(x, ref, labels, label_ids=[2])
    assert list(only) == [2] and only[2] == pytest.approx(err[2])
    with pytest.raises(QSMInputError):
        metrics.roi_mean_error_ppb(x, ref, labels, label_ids=[9])


def test_vessel_contrast_recovery():
    shape = (20, 20, 20)
    vessel = np.zeros(shape, dtype=bool)
    vessel[9:11, 9:11, 2:18] = True
    ref = np.full(shape, -0.03)
    ref[vessel] = 0.4
    assert metrics.vessel_contrast_recovery(ref, ref, vessel) == pytest.approx(1.0)
    assert metrics.vessel_contrast_recovery(ref + 1, ref, vessel) == pytest.approx(1.0)
    half = np.full(shape, -0.03)
    half[vessel] = -0.03 + 0.5 * 0.43
    assert metrics.vessel_contrast_recovery(half, ref, vessel) == pytest.approx(0.5)
    surround = metrics.default_surround(vessel)
    assert not np.any(surround & vessel)
    assert surround.sum() > vessel.sum()
    ring = np.zeros(shape, dtype=bool)
    ring[5, 5, 5] = True
    assert metrics.vessel_contrast_recovery(half, ref, vessel, ring) == pytest.approx(0.5)


def test_summary(data):
    ref, mask, rng = data
    labels = np.where(mask, 1 + (np.indices(ref.shape)[0] > 11), 0).astype(np.uint8)
    vessel = np.zeros(ref.shape, dtype=bool)
    vessel[11:13, 13:15, 5:15] = True
    truth = ref.copy()
    truth[vessel] += 0.4
    x = truth + 0.01 * rng.standard_normal(ref.shape)
    s = metrics.summary(x, truth, mask, labels=labels, vessel_mask=vessel)
    assert set(s) == {"nrmse", "hfen", "ssim", "roi_error_ppb", "vessel_contrast"}
    assert s["nrmse"] == pytest.approx(metrics.nrmse(x, truth, mask))
    assert set(s["roi_error_ppb"]) == {1, 2}
    assert s["vessel_contrast"] == pytest.approx(1.0, abs=0.1)
    assert set(metrics.summary(x, truth, mask)) == {"nrmse", "hfen", "ssim"}


def test_input_checks(data):
    ref, mask, _ = data
    with pytest.raises(QSMInputError):
        metrics.nrmse(ref[:-1], ref)
    with pytest.raises(QSMInputError):
        metrics.nrmse(ref, ref, np.zeros(ref.shape, bool))
