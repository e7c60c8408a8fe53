"""Unit conversions at the boundary: fields are ppm of B0 inside qsmkit.

phase (rad) = 2 pi * gamma * B0 * TE * field(ppm) * 1e-6, gamma = 42.5775 MHz/T.
"""

from __future__ import annotations

import numpy as np

from .errors import QSMInputError, warn

GAMMA_MHZ_PER_T = 42.5775  # proton gyromagnetic ratio / 2 pi
GAMMA_HZ_PER_T = GAMMA_MHZ_PER_T * 1e6

FIELD_UNITS = ("ppm", "hz", "rad")


def check_positive(name: str, value) -> None:
    try:
        v = np.atleast_1d(np.asarray(value, dtype=float))
    except (TypeError, ValueError):
        raise QSMInputError(f"{name} must be a number, got {value!r}") from None
    if v.size == 0 or not np.all(np.isfinite(v)) or np.any(v <= 0):
        shown = ", ".join(f"{x:g}" for x in v)  # plain numbers, no numpy reprs
        raise QSMInputError(f"{name} must be positive and finite, got {shown or 'nothing'}")


#: physical ranges (README "Input limits"): values outside ``*_REFUSE`` are refused, values
#: outside ``*_USUAL`` (but inside ``*_REFUSE``) give a warning
TE_REFUSE_S = (1e-4, 1.0)      # 0.1 ms .. 1 s
TE_USUAL_S = (1e-3, 0.2)       # 1 ms .. 200 ms
B0_REFUSE_T = (0.01, 30.0)     # 10 mT .. 30 T
B0_USUAL_T = (0.2, 12.0)       # 0.2 T .. 12 T (11.7 T human systems)


def check_te(te, name="--te", path=None) -> list:
    """Echo times (s) as a list of floats, refused outside ``TE_REFUSE_S`` with the likely slip
    named (milliseconds or microseconds typed as seconds), warned outside ``TE_USUAL_S``."""
    check_positive(name, te)
    values = [float(t) for t in np.atleast_1d(np.asarray(te, dtype=float))]
    lo, hi = TE_REFUSE_S
    for t in values:
        if t >= hi:
            guess = f"; did you mean {t:g} ms = {t / 1e3:.4g} s?" if t < 1e3 else (
                f"; did you mean {t:g} us = {t / 1e6:.4g} s?")
            raise QSMInputError(f"{name} {t:g} s is not a plausible echo time (echo times are in "
                                f"seconds, {lo * 1e3:g} ms to {hi:g} s){guess}", path)
        if t < lo:
            raise QSMInputError(f"{name} {t:g} s is not a plausible echo time (below "
                                f"{lo * 1e3:g} ms; echo times are in seconds, e.g. 0.020 for "
                                "20 ms)", path)
    unusual = [t for t in values if not TE_USUAL_S[0] <= t <= TE_USUAL_S[1]]
    if unusual:
        warn(f"{name} {', '.join(f'{t:g}' for t in unusual)} s is outside the usual "
             f"{TE_USUAL_S[0] * 1e3:g}-{TE_USUAL_S[1] * 1e3:g} ms of gradient-echo QSM; check the "
             "units (seconds)", path)
    return values


def check_b0(b0, name="--b0", path=None) -> float:
    """Field strength (T) as a float, refused outside ``B0_REFUSE_T`` with the likely slip named
    (millitesla, or the Larmor frequency in Hz or MHz), warned outside ``B0_USUAL_T``."""
    check_positive(name, b0)
    b = float(np.asarray(b0, dtype=float).ravel()[0])
    lo, hi = B0_REFUSE_T
    if b > hi:
        if b >= 1e6:  # a Larmor frequency in Hz
            guess = f"the Larmor frequency {b / 1e6:.4g} MHz = {b / GAMMA_HZ_PER_T:.3g} T"
        elif b >= 1000:
            guess = f"{b:g} mT = {b / 1e3:.3g} T"
        else:  # 30..1000: a Larmor frequency in MHz
            guess = f"the Larmor frequency {b:g} MHz = {b / GAMMA_MHZ_PER_T:.3g} T"
        raise QSMInputError(f"{name} {b:g} T is not a plausible field strength (B0 is in tesla, "
                            f"{lo:g} to {hi:g} T); did you mean {guess}?", path)
    if b < lo:
        raise QSMInputError(f"{name} {b:g} T is not a plausible field strength (below {lo:g} T; "
                            "B0 is in tesla, e.g. 3 for 3 T)", path)
    if not B0_USUAL_T[0] <= b <= B0_USUAL_T[1]:
        warn(f"{name} {b:g} T is outside the usual {B0_USUAL_T[0]:g}-{B0_USUAL_T[1]:g} T; check "
             "the units (tesla)", path)
    return b


def check_non_negative(name: str, value) -> float:
    """A finite number >= 0 (an erosion radius, a margin)."""
    v = float(value)
    if not np.isfinite(v) or v < 0:
        raise QSMInputError(f"{name} must be zero or positive, got {value}")
    return v


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


def known_half_range(max_abs: float):
    """The vendor's full-scale value for integer phase whose largest magnitude is ``max_abs``,
    when the data span a known scale: a power of two (Siemens 4096, 12-bit 2048, ...) reached
    to within 5 %, or 1000 pi (GE milliradians); None when the scale cannot be known."""
    if abs(max_abs - 1000 * np.pi) <= 2:
        return 1000 * np.pi
    power = 2.0 ** np.ceil(np.log2(max(max_abs, 1.0)))
    return power if max_abs >= 0.95 * power else None


def nominal_half_range(max_abs: float) -> float:
    """``known_half_range``, else the data's own maximum (a guess; ``rescale_phase`` refuses
    integer phase whose scale is unknown unless it is given)."""
    known = known_half_range(max_abs)
    return max_abs if known is None else known


PHASE_SCALE_HINT = ("give --phase-scale, the value that stands for pi (4096 for Siemens phase "
                    "as dcm2niix writes it, -4096..4094; 2048 for raw 12-bit 0..4095; 3141.59 "
                    "for milliradians), or keep the JSON sidecar naming the Manufacturer")


def phase_scaling(phase, scale=None) -> dict:
    """How ``rescale_phase`` maps ``phase`` to radians, for the sidecar: ``rule`` (radians,
    radians 0..2pi, given scale, vendor full scale, own range), ``pi_value`` (the value that
    becomes pi), ``offset_rad`` (added after scaling) and the data ``range``.

    Integer-valued phase whose scale cannot be known (the codes do not reach a vendor's full
    scale, e.g. Siemens phase spanning -1633..2774 of -4096..4095) is refused unless ``scale``
    is given: scaling it by its own range would make the field too large by that factor."""
    p = np.asarray(phase)
    if np.iscomplexobj(p):
        raise QSMInputError("phase is complex; give the phase angle (rad) or vendor phase")
    finite = p[np.isfinite(p)] if np.issubdtype(p.dtype, np.floating) else p.ravel()
    if finite.size == 0:
        raise QSMInputError("phase image has no finite values")
    lo, hi = float(finite.min()), float(finite.max())
    rng = [lo, hi]
    is_float = np.issubdtype(p.dtype, np.floating)
    if scale is not None:
        scale = float(scale)
        if not np.isfinite(scale) or scale <= 0:
            raise QSMInputError(f"--phase-scale must be positive and finite, got {scale:g}")
        signed = lo < 0
        top = scale if signed else 2 * scale
        if hi > top * 1.001 or (signed and lo < -scale * 1.001):
            raise QSMInputError(f"phase values {lo:g}..{hi:g} exceed the range "
                                f"{'-' if signed else '0..'}{scale:g}..{top:g} of --phase-scale "
                                f"{scale:g}")
        return {"rule": "given scale (--phase-scale)", "pi_value": scale,
                "offset_rad": 0.0 if signed else -np.pi, "range": rng}
    if is_float and lo >= -np.pi - 1e-3 and hi <= np.pi + 1e-3:
        return {"rule": "radians", "pi_value": np.pi, "offset_rad": 0.0, "range": rng}
    if is_float and lo >= 0 and hi <= 2 * np.pi + 1e-3:
        return {"rule": "radians 0..2pi (wrapped)", "pi_value": np.pi, "offset_rad": 0.0,
                "range": rng}
    integer_valued = not is_float or bool(np.all(np.mod(finite, 1) == 0))
    if integer_valued:
        signed = lo < 0
        half = known_half_range(max(-lo, hi + 1) if signed else (hi + 1) / 2)
        if half is None:
            raise QSMInputError(f"integer phase spans {lo:g}..{hi:g}, which reaches no known "
                                f"vendor scale (+-2^n or +-1000 pi): {PHASE_SCALE_HINT}")
        return {"rule": "vendor full scale reached by the data", "pi_value": half,
                "offset_rad": 0.0 if signed else -np.pi, "range": rng}
    warn(f"phase {lo:g}..{hi:g} is neither radians nor integer vendor phase: mapped by its own "
         f"range onto one 2 pi cycle, which is right only if it spans the full scale; "
         f"{PHASE_SCALE_HINT}")
    half = (hi - lo) / 2 or 1.0
    return {"rule": "own range (guessed)", "pi_value": half, "offset_rad": -np.pi - lo / half * np.pi,
            "range": rng}


def rescale_phase(phase, scale=None, info=None):
    """Bring vendor phase to radians in [-pi, pi) (float32).

    - floating data within [-pi, pi] (a small tolerance) are radians: wrapped only;
    - floating data within [0, 2 pi]: radians with a 0..2 pi convention: wrapped;
    - ``scale`` given (``--phase-scale``, the value that stands for pi): x / scale * pi for
      signed data, x / scale * pi - pi for unsigned data (0..2 scale);
    - integer-valued data (DICOM phase such as Siemens -4096..4094 or 0..4095, GE
      milliradians) that reach the vendor's full scale (``known_half_range``): the same with
      that scale, so the scaling does not depend on which codes happen to occur; integer data
      that do not reach a known scale are refused (``phase_scaling``);
    - other floats: the data's range is mapped linearly onto one 2 pi cycle, with a warning.

    ``info`` (a dict), when given, receives ``phase_scaling``'s record for the sidecar.
    """
    p = np.asarray(phase)
    rule = phase_scaling(p, scale)
    if info is not None:
        info.update(rule)
    if rule["rule"].startswith("radians"):
        return wrap_phase(p.astype(np.float32)).astype(np.float32)
    out = p.astype(np.float64) / rule["pi_value"] * np.pi + rule["offset_rad"]
    return wrap_phase(out).astype(np.float32)
