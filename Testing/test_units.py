"""Tests for qsmkit.units: ppm / Hz / rad conversions and vendor phase rescaling."""

from __future__ import annotations

import numpy as np
import pytest

from qsmkit import units
from qsmkit.errors import QSMInputError

TE = 0.020


def test_one_ppm_at_3t_is_127_7325_hz():
    assert units.larmor_hz(3.0) == pytest.approx(127.7325e6)
    assert units.ppm_to_hz(1.0, 3.0) == pytest.approx(127.7325, abs=1e-9)
    assert units.hz_to_ppm(127.7325, 3.0) == pytest.approx(1.0, abs=1e-12)
    assert units.rad_to_ppm(2 * np.pi * 127.7325 * 0.02, 3.0, 0.02) == pytest.approx(1.0, abs=1e-12)
    # 1 ppm at 7 T, TE 20 ms: 298.0425 Hz -> 2 pi * 298.0425 * 0.02 rad
    assert units.ppm_to_hz(1.0, 7.0) == pytest.approx(298.0425, abs=1e-9)
    assert units.ppm_to_rad(1.0, 7.0, TE) == pytest.approx(2 * np.pi * 298.0425 * TE)


@pytest.mark.parametrize("b0", [3.0, 7.0])
def test_round_trips(b0):
    ppm = np.linspace(-0.5, 0.5, 11)
    hz = units.ppm_to_hz(ppm, b0)
    rad = units.ppm_to_rad(ppm, b0, TE)
    np.testing.assert_allclose(units.hz_to_ppm(hz, b0), ppm, atol=1e-12)
    np.testing.assert_allclose(units.rad_to_ppm(rad, b0, TE), ppm, atol=1e-12)
    # rad = 2 pi * Hz * TE
    np.testing.assert_allclose(rad, 2 * np.pi * hz * TE, atol=1e-12)
    np.testing.assert_allclose(units.to_ppm(hz, "hz", b0_tesla=b0), ppm, atol=1e-12)
    np.testing.assert_allclose(units.to_ppm(rad, "RAD", b0_tesla=b0, te_s=TE), ppm, atol=1e-12)
    assert units.to_ppm(ppm, "ppm") is ppm


def test_to_ppm_errors():
    with pytest.raises(QSMInputError, match="--b0"):
        units.to_ppm(1.0, "hz")
    with pytest.raises(QSMInputError, match="--te"):
        units.to_ppm(1.0, "rad", b0_tesla=3.0)
    with pytest.raises(QSMInputError, match="--b0"):
        units.to_ppm(1.0, "rad", te_s=TE)
    with pytest.raises(QSMInputError) as err:
        units.to_ppm(1.0, "tesla")
    assert "ppm, hz or rad" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("bad", [0.0, -0.02, float("nan"), float("inf"), [0.01, 0.0], []])
def test_check_positive_rejects(bad):
    with pytest.raises(QSMInputError) as err:
        units.check_positive("echo time (s)", bad)
    assert "echo time" in str(err.value)


def test_check_positive_accepts_and_guards_conversions():
    units.check_positive("TE", 0.02)
    units.check_positive("TE", [0.004, 0.008, 0.012])
    with pytest.raises(QSMInputError):
        units.rad_to_ppm(1.0, 3.0, 0.0)
    with pytest.raises(QSMInputError):
        units.ppm_to_hz(1.0, -3.0)
    with pytest.raises(QSMInputError):
        units.to_ppm(1.0, "rad", b0_tesla=3.0, te_s=float("nan"))


def test_rescale_int16_siemens_range():
    raw = np.arange(-4096, 4096, dtype=np.int16)
    out = units.rescale_phase(raw)
    assert out.dtype == np.float32
    assert out[0] == np.float32(-np.pi)  # -4096 -> -pi exactly
    assert out.min() >= -np.pi and out.max() < np.pi
    np.testing.assert_allclose(out, raw * (np.pi / 4096), atol=1e-6)  # linear
    steps = np.diff(out.astype(np.float64))
    np.testing.assert_allclose(steps, np.pi / 4096, rtol=1e-3)
    few = units.rescale_phase(np.array([-4096, 0, 2048], dtype=np.int16))
    np.testing.assert_allclose(few, [-np.pi, 0.0, np.pi / 2], atol=1e-7)


def test_rescale_uint16_zero_based():
    raw = np.arange(0, 4096, dtype=np.uint16).reshape(16, 16, 16)
    out = units.rescale_phase(raw)
    assert out.dtype == np.float32 and out.shape == raw.shape
    assert out.flat[0] == np.float32(-np.pi)
    assert out.min() >= -np.pi and out.max() < np.pi
    np.testing.assert_allclose(out.ravel(), raw.ravel() * (2 * np.pi / 4096) - np.pi, atol=1e-6)


def test_rescale_keeps_float_radians():
    rng = np.random.default_rng(1)
    ph = rng.uniform(-np.pi, np.pi, size=(5, 6, 7))
    out = units.rescale_phase(ph)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, ph, atol=1e-6)
    # integer-valued floats (scaled integers as floats) are treated like integers
    out = units.rescale_phase(np.array([-4096.0, 0.0, 4094.0]))
    np.testing.assert_allclose(out, [-np.pi, 0.0, 4094 * np.pi / 4096], atol=1e-6)


def test_wrap_phase():
    x = np.array([-np.pi, np.pi, 3 * np.pi / 2, -3 * np.pi / 2, 0.25])
    np.testing.assert_allclose(units.wrap_phase(x), [-np.pi, -np.pi, -np.pi / 2, np.pi / 2, 0.25])


def test_rescale_rejects_all_nan():
    with pytest.raises(QSMInputError):
        units.rescale_phase(np.full((2, 2, 2), np.nan))


def test_rescale_phase_uses_nominal_range_not_data_range():
    """A Siemens image whose codes span only -4000..4000 still scales by 4096 (the nominal
    range), GE milliradians (full range) by 1000, and float 0..2 pi radians are only wrapped."""
    from qsmkit.units import rescale_phase

    np.testing.assert_allclose(rescale_phase(np.array([-4000, 0, 4000], np.int16)),
                               np.array([-4000, 0, 4000]) / 4096 * np.pi, rtol=1e-6)
    ge = np.array([-3141, -3000, 0, 1500, 3141], np.int16)  # wrapped phase spans the full range
    np.testing.assert_allclose(rescale_phase(ge), ge / 1000.0, rtol=1e-6)
    np.testing.assert_allclose(rescale_phase(np.array([0.0, 1.0, 6.0])),
                               [0.0, 1.0, 6.0 - 2 * np.pi], atol=1e-6)
