"""Unit conversions at the boundary: fields are ppm of B0 inside qsmkit.

phase (rad) = 2 pi * gamma * B0 * TE * field(ppm) * 1e-6, gamma = 42.5775 MHz/T.
"""

from __future__ import annotations

import numpy as np

from .errors import QSMInputError

GAMMA_MHZ_PER_T = 42.5775  # proton gyromagnetic ratio / 2 pi
GAMMA_HZ_PER_T = GAMMA_MHZ_PER_T * 1e6

FIELD_UNITS = ("ppm", "hz", "rad")


def check_positive(name: str, value) -> None:
    v = np.atleast_1d(np.asarray(value, dtype=float))
    if v.size == 0 or not np.all(np.isfinite(v)) or np.any(v <= 0):
        raise QSMInputError(f"{name} must be positive and finite, got {value}")


def larmor_hz(b0_tesla: float) -> float:
    """Proton Larmor frequency (Hz) at B0."""
    check_positive("B0 (tesla)", b0_tesla)
    return GAMMA_HZ_PER_T * float(b0_tesla)


def ppm_to_hz(field_ppm, b0_tesla):
    return field_ppm * (larmor_hz(b0_tesla) * 1e-6)


def hz_to_ppm(field_hz, b0_tesla):
    return field_hz / (larmor_hz(b0_tesla) * 1e-6)


def rad_to_ppm(phase_rad, b0_tesla, te_s):
    """Phase (rad) accumulated at echo time ``te_s`` -> field in ppm."""
    check_positive("echo time (s)", te_s)
    return phase_rad / (2 * np.pi * larmor_hz(b0_tesla) * 1e-6 * float(te_s))


def ppm_to_rad(field_ppm, b0_tesla, te_s):
    check_positive("echo time (s)", te_s)
    return field_ppm * (2 * np.pi * larmor_hz(b0_tesla) * 1e-6 * float(te_s))


def to_ppm(field, units: str, b0_tesla=None, te_s=None):
    """Convert a field map in ``ppm``, ``hz`` or ``rad`` (at ``te_s``) to ppm."""
    u = str(units).lower()
    if u == "ppm":
        return field
    if u == "hz":
        if b0_tesla is None:
            raise QSMInputError("field in Hz needs --b0 (tesla) to convert to ppm")
        return hz_to_ppm(field, b0_tesla)
    if u == "rad":
        if b0_tesla is None or te_s is None:
            raise QSMInputError("field in rad needs --b0 (tesla) and --te (seconds)")
        return rad_to_ppm(field, b0_tesla, te_s)
    raise QSMInputError(f"unknown field units {units!r}; choose ppm, hz or rad")


def wrap_phase(phase):
    """Wrap to [-pi, pi)."""
    return (phase + np.pi) % (2 * np.pi) - np.pi


def rescale_phase(phase):
    """Bring vendor phase to radians in [-pi, pi).

    Floating data already within [-pi, pi] (a small tolerance) are kept (wrapped).
    Anything else (integer DICOM phase such as Siemens -4096..4095, or 0..4095,
    GE/Philips scaled integers) is mapped linearly from its range onto one
    2 pi cycle: (x - min) / (max - min + step) * 2 pi - pi, where step is the
    quantisation step (1 for integers) so that the top code does not alias onto
    -pi. This follows the usual dcm2niix/ROMEO convention.
    """
    p = np.asarray(phase)
    finite = p[np.isfinite(p)] if np.issubdtype(p.dtype, np.floating) else p.ravel()
    if finite.size == 0:
        raise QSMInputError("phase image has no finite values")
    lo, hi = float(finite.min()), float(finite.max())
    if np.issubdtype(p.dtype, np.floating) and lo >= -np.pi - 1e-3 and hi <= np.pi + 1e-3:
        return wrap_phase(p.astype(np.float32)).astype(np.float32)
    is_integer_valued = np.issubdtype(p.dtype, np.integer) or np.all(np.mod(finite, 1) == 0)
    step = 1.0 if is_integer_valued else 0.0
    # Symmetric signed ranges like -4096..4095 map exactly to [-pi, pi).
    if lo < 0 and is_integer_valued:
        half = max(-lo, hi + step)
        out = p.astype(np.float64) / half * np.pi
    else:
        out = (p.astype(np.float64) - lo) / (hi - lo + step) * 2 * np.pi - np.pi
    return wrap_phase(out).astype(np.float32)
