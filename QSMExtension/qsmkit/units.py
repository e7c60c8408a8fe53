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
        shown = ", ".join(f"{x:g}" for x in v)  # plain numbers, no numpy reprs
        raise QSMInputError(f"{name} must be positive and finite, got {shown or 'nothing'}")


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


def nominal_half_range(max_abs: float) -> float:
    """The vendor's full-scale value for integer phase whose largest magnitude is ``max_abs``:
    a power of two (Siemens 4096, 12-bit 2048, ...) when within 5% below it, 1000 pi for GE's
    milliradians, else the data's own maximum (the best guess for unknown scalings)."""
    if abs(max_abs - 1000 * np.pi) <= 2:
        return 1000 * np.pi
    power = 2.0 ** np.ceil(np.log2(max(max_abs, 1.0)))
    return power if max_abs >= 0.95 * power else max_abs


def rescale_phase(phase):
    """Bring vendor phase to radians in [-pi, pi) (float32).

    - floating data within [-pi, pi] (a small tolerance) are radians: wrapped only;
    - floating data within [0, 2 pi]: radians with a 0..2 pi convention: wrapped;
    - integer-valued data (DICOM phase such as Siemens -4096..4094 or 0..4095, GE
      milliradians): x / H * pi for signed data and x / H * pi - pi for unsigned data
      (0..2H), where H is the nominal half range (``nominal_half_range``), so the scaling
      does not depend on which codes happen to occur in this image;
    - anything else: the data's range is mapped linearly onto one 2 pi cycle.
    """
    p = np.asarray(phase)
    finite = p[np.isfinite(p)] if np.issubdtype(p.dtype, np.floating) else p.ravel()
    if finite.size == 0:
        raise QSMInputError("phase image has no finite values")
    lo, hi = float(finite.min()), float(finite.max())
    is_float = np.issubdtype(p.dtype, np.floating)
    if is_float and lo >= -np.pi - 1e-3 and hi <= np.pi + 1e-3:
        return wrap_phase(p.astype(np.float32)).astype(np.float32)
    if is_float and lo >= 0 and hi <= 2 * np.pi + 1e-3:
        return wrap_phase(p.astype(np.float32)).astype(np.float32)
    integer_valued = not is_float or bool(np.all(np.mod(finite, 1) == 0))
    if integer_valued and lo < 0:
        out = p.astype(np.float64) / nominal_half_range(max(-lo, hi + 1)) * np.pi
    elif integer_valued:
        out = p.astype(np.float64) / nominal_half_range((hi + 1) / 2) * np.pi - np.pi
    else:
        out = (p.astype(np.float64) - lo) / (hi - lo) * 2 * np.pi - np.pi
    return wrap_phase(out).astype(np.float32)
