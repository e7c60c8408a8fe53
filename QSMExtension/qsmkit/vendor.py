"""Vendor conventions read off a dcm2niix-style sidecar: what an image holds, its phase in
radians, the field strength. Pure rules on ``(array, sidecar dict)``; no file reading, so the
NIfTI reader (``io``) and the DICOM reader (``scanner``) share them without importing each other.

Phase in radians (:func:`phase_convention`) is decided by the **metadata first**:

1. the sidecar states the unit: ``PhaseUnits`` ``rad`` / ``mrad`` (the DICOM Rescale Type
   (0028,1054) or the Real World Value Mapping's unit code, as Philips writes them), or a
   Philips image with ``UsePhilipsFloatNotDisplayScaling`` (dcm2niix's and our DICOM reader's
   Philips "floating point" values ``(stored - (2005,100D)) / (2005,100E)``, radians for phase;
   with the flag 0 the display values, milliradians);
2. the manufacturer's known encoding: Siemens 12-bit integers (signed -4096..4094 after the
   DICOM rescale slope 2 / intercept -4096, or raw 0..4095), GE milliradians (radians x 1000);
3. only then the **range**, with a tolerance: wrapped phase over a head covers the whole
   circle, so the largest value lies near the encoding's full scale (within 10 %):
   radians (-pi..pi or 0..2 pi), milliradians (+-3142), 12-bit (+-4096, 0..4095).

Values that contradict the stated convention are an error naming the range (never a silent
rescale); the rule that was used is returned as a record for the sidecar.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import numpy as np

from . import units
from .errors import QSMInputError

KINDS = ("magnitude", "phase", "phasediff", "fieldmap", "real", "imaginary", "unknown")
#: Siemens stores phase in 12 bits: raw 0..4095 for -pi..pi, written as -4096..4094 after
#: the DICOM rescale (slope 2, intercept -4096).
SIEMENS_HALF_RANGE = 4096
#: GE (and Philips display values) store phase in milliradians, -3142..3142.
MILLIRAD_HALF_RANGE = 1000 * np.pi
#: how far above a convention's full scale values may lie (rounding of the vendor's scaling:
#: Philips maps 0..4095 to -3142..3142.0 mrad, slightly beyond 1000 pi)
OVER_TOLERANCE = 0.01
#: a range fallback needs the largest value within this fraction below full scale
RANGE_TOLERANCE = 0.10


# ----------------------------------------------------------------------------- image type


def _tokens(meta: dict) -> list[str]:
    it = meta.get("ImageType", [])
    if isinstance(it, str):
        it = re.split(r"[\\_/]", it)
    return [str(t).strip().upper() for t in it]


def manufacturer(meta: dict) -> str:
    """``"siemens"``, ``"ge"``, ``"philips"`` or ``""`` (unknown) from ``Manufacturer``."""
    m = str(meta.get("Manufacturer", "")).lower()
    for name in ("siemens", "philips"):
        if name in m:
            return name
    if m.startswith("ge") or "general electric" in m:
        return "ge"
    return ""


def image_kind(meta: dict) -> str:
    """What an image holds, from its sidecar: one of :data:`KINDS`.

    ``fieldmap`` for vendor field maps (``FIELDMAPHZ`` in ``ImageType`` or ``Units`` Hz);
    ``phasediff`` for a phase image with ``EchoTime1`` and ``EchoTime2`` (dcm2niix writes
    them only for Siemens dual-echo phase differences); then the enhanced-DICOM
    ``ComplexImageComponent`` (MAGNITUDE / PHASE / REAL / IMAGINARY), ``ImageType`` tokens
    (``P``/``PHASE``, ``M``/``MAGNITUDE``, ``R``/``REAL``, ``I``/``IMAGINARY``) and the vendor
    private image types (``GEImageType`` 0..3, ``PhilipsImageType`` M/P/R/I).
    """
    tokens = _tokens(meta)
    if "FIELDMAPHZ" in tokens or str(meta.get("Units", "")).lower() == "hz":
        return "fieldmap"
    kind = "unknown"
    ge = meta.get("GEImageType")
    philips = str(meta.get("PhilipsImageType", "")).upper()
    component = str(meta.get("ComplexImageComponent", "")).upper()
    if component in ("MAGNITUDE", "PHASE", "REAL", "IMAGINARY"):
        kind = component.lower()
    elif "P" in tokens or "PHASE" in tokens or "PHASE MAP" in tokens or ge == 1 or philips.startswith("P"):
        kind = "phase"
    elif "R" in tokens or "REAL" in tokens or ge == 2 or philips.startswith("R"):
        kind = "real"
    elif "I" in tokens or "IMAGINARY" in tokens or ge == 3 or philips.startswith("I"):
        kind = "imaginary"
    elif "M" in tokens or "MAGNITUDE" in tokens or ge == 0 or philips.startswith("M"):
        kind = "magnitude"
    if kind == "phase" and "EchoTime1" in meta and "EchoTime2" in meta:
        return "phasediff"
    return kind


# ----------------------------------------------------------------------------- field strength


def b0_from_sidecar(meta: dict, path=None, b0_from: str = "frequency") -> tuple[float, str]:
    """Field strength (T) and the tag it came from.

    ``b0_from="frequency"`` (default): ``ImagingFrequency`` (MHz) / gamma, the field the
    phase actually evolved in, when it lies within 10% of ``MagneticFieldStrength`` (or that
    is absent); else the nominal ``MagneticFieldStrength``. ``b0_from="nominal"`` uses the
    nominal value only.
    """
    if b0_from not in ("frequency", "nominal"):
        raise QSMInputError(f"b0_from must be 'frequency' or 'nominal', got {b0_from!r}")
    nominal = meta.get("MagneticFieldStrength")
    freq = meta.get("ImagingFrequency")
    nominal = float(nominal) if isinstance(nominal, (int, float)) and nominal > 0 else None
    freq = float(freq) if isinstance(freq, (int, float)) and freq > 0 else None
    if b0_from == "frequency" and freq is not None:
        b0 = freq / units.GAMMA_MHZ_PER_T
        if nominal is None or abs(b0 - nominal) <= 0.1 * nominal:
            return b0, "ImagingFrequency"
    if nominal is not None:
        return nominal, "MagneticFieldStrength"
    raise QSMInputError("missing field strength (no MagneticFieldStrength / ImagingFrequency); "
                        "give --b0 TESLA", path)


# ----------------------------------------------------------------------------- phase


@dataclass(frozen=True)
class PhaseConvention:
    """``rad = wrap(stored x scale + offset)``; ``name`` the convention, ``source`` the
    metadata (or ``range``) that chose it."""

    name: str
    scale: float
    offset: float
    source: str

    def record(self) -> dict:
        return asdict(self)


def _is_integer_valued(a: np.ndarray) -> bool:
    return np.issubdtype(a.dtype, np.integer) or bool(np.all(np.mod(a, 1) == 0))


_RAD = ("rad", "radian", "radians")
_MRAD = ("mrad", "milliradian", "milliradians")


def _stated_units(meta: dict, vendor: str) -> tuple[str, str] | None:
    """("rad" | "mrad", source) when the sidecar states the phase unit."""
    u = str(meta.get("PhaseUnits", "")).strip().lower()
    if u in _RAD or u in _MRAD:
        return ("rad" if u in _RAD else "mrad"), f"PhaseUnits {meta['PhaseUnits']}"
    flag = meta.get("UsePhilipsFloatNotDisplayScaling")
    if vendor == "philips" and flag in (0, 1, True, False):
        if flag:
            return "rad", "UsePhilipsFloatNotDisplayScaling 1 (Philips floating-point values)"
        if "PhilipsRescaleSlope" in meta:
            return "mrad", "UsePhilipsFloatNotDisplayScaling 0 (Philips display values)"
    return None


def _fits(lo, hi, low, high):
    """Values within [low, high] widened by OVER_TOLERANCE of the half span."""
    tol = OVER_TOLERANCE * (high - low) / 2
    return lo >= low - tol and hi <= high + tol


def _near_full_scale(lo, hi, low, high):
    """The data reach within RANGE_TOLERANCE of full scale on at least one side: wrapped phase
    covers the circle."""
    span = (high - low) / 2
    return (hi >= high - RANGE_TOLERANCE * span) or (lo <= low + RANGE_TOLERANCE * span)


def _range_fallback(lo, hi, is_float, integer):
    """Convention from the values alone (module docstring, step 3), or None."""
    pi = np.pi
    if is_float and _fits(lo, hi, -pi, pi):
        return PhaseConvention("radians", 1.0, 0.0, "range")
    if is_float and lo >= 0 and _fits(lo, hi, 0, 2 * pi):
        return PhaseConvention("radians-0-2pi", 1.0, 0.0, "range")
    m, h = MILLIRAD_HALF_RANGE, SIEMENS_HALF_RANGE
    if lo < 0 and _fits(lo, hi, -m, m) and _near_full_scale(lo, hi, -m, m):
        return PhaseConvention("milliradians", 1e-3, 0.0, "range")
    if integer and lo < 0 and _fits(lo, hi, -h, h - 1) and _near_full_scale(lo, hi, -h, h):
        return PhaseConvention("12-bit-signed", pi / h, 0.0, "range")
    if integer and lo >= 0 and _fits(lo, hi, 0, h - 1) and hi >= (1 - RANGE_TOLERANCE) * (h - 1):
        return PhaseConvention("12-bit-unsigned", 2 * pi / h, -pi, "range")
    return None


def phase_convention(data, meta: dict | None = None, path=None) -> PhaseConvention:
    """How stored phase becomes radians (module docstring: metadata, then vendor, then range).

    Raises :class:`QSMInputError` naming the range and manufacturer when no convention fits
    or when the values contradict the one the metadata states.
    """
    meta = meta or {}
    a = np.asarray(data)
    if a.size == 0:
        raise QSMInputError("phase image is empty", path)
    if not np.all(np.isfinite(a)):
        raise QSMInputError(f"phase has {int(np.sum(~np.isfinite(a)))} NaN/Inf voxels", path)
    lo, hi = float(a.min()), float(a.max())
    vendor = manufacturer(meta)
    is_float = np.issubdtype(a.dtype, np.floating)
    integer = _is_integer_valued(a)
    who = meta.get("Manufacturer") or "unknown"

    def contradiction(what):
        return QSMInputError(f"phase range {lo:g}..{hi:g} contradicts {what} (manufacturer {who}); "
                             "check the export or convert the phase to radians first", path)

    stated = _stated_units(meta, vendor)
    if stated is not None:
        unit, source = stated
        if unit == "rad":
            if _fits(lo, hi, -np.pi, np.pi) or (lo >= 0 and _fits(lo, hi, 0, 2 * np.pi)):
                return PhaseConvention("radians", 1.0, 0.0, source)
            raise contradiction(f"{source}: radians")
        if _fits(lo, hi, -MILLIRAD_HALF_RANGE, MILLIRAD_HALF_RANGE):
            return PhaseConvention("milliradians", 1e-3, 0.0, source)
        raise contradiction(f"{source}: milliradians (-3142..3142)")
    if integer and vendor == "siemens":
        h = SIEMENS_HALF_RANGE
        wide = hi - lo >= h / 2  # at least a quarter of the circle: raw phase, not a crop
        if lo < 0 and _fits(lo, hi, -h, h - 2) and wide:
            return PhaseConvention("siemens-12bit-signed", np.pi / h, 0.0,
                                   "Manufacturer Siemens (12-bit, DICOM rescale slope 2, intercept -4096)")
        if lo >= 0 and hi <= h - 1 and wide:
            return PhaseConvention("siemens-12bit-unsigned", 2 * np.pi / h, -np.pi,
                                   "Manufacturer Siemens (12-bit, raw 0..4095)")
    if integer and vendor == "ge":
        m = MILLIRAD_HALF_RANGE
        if lo < 0 and _fits(lo, hi, -m, m) and hi - lo >= m:
            return PhaseConvention("ge-milliradians", 1e-3, 0.0, "Manufacturer GE (radians x 1000)")
    if vendor in ("siemens", "ge") and integer:
        raise QSMInputError(
            f"unknown phase range {lo:g}..{hi:g} for manufacturer {who}: expected "
            + ("Siemens 12-bit (-4096..4094 or 0..4095)" if vendor == "siemens" else
               "GE milliradians (-3142..3142)") + "; convert the phase to radians first", path)
    found = _range_fallback(lo, hi, is_float, integer)
    if found is not None:
        return found
    raise QSMInputError(
        f"unknown phase range {lo:g}..{hi:g} for manufacturer {who}: "
        "expected radians (-pi..pi or 0..2pi), Siemens 12-bit (-4096..4095 or 0..4095) or "
        "milliradians (-3142..3142); convert the phase to radians first", path)


def convert_phase(data, meta: dict | None = None, path=None):
    """``(phase in rad in [-pi, pi) as float32, convention record)``."""
    conv = phase_convention(data, meta, path)
    if conv.scale == 1 and conv.offset == 0:  # radians: wrapped in float32, in-range values kept
        return units.wrap_phase(np.asarray(data, dtype=np.float32)).astype(np.float32), conv.record()
    x = np.asarray(data, dtype=np.float64) * conv.scale + conv.offset
    return units.wrap_phase(x).astype(np.float32), conv.record()


def phase_to_rad(data, meta: dict | None = None, path=None):
    """Vendor phase -> radians in [-pi, pi) (float32); see :func:`phase_convention`."""
    return convert_phase(data, meta, path)[0]


def complex_to_phase(real, imaginary):
    """Magnitude and phase (rad, float32) of a real / imaginary export (GE and others)."""
    z = np.asarray(real, dtype=np.float64) + 1j * np.asarray(imaginary, dtype=np.float64)
    return np.abs(z).astype(np.float32), np.angle(z).astype(np.float32)


# ----------------------------------------------------------------------------- field maps


def phasediff_to_hz(phasediff_rad, te1: float, te2: float):
    """Dual-echo phase difference (rad) -> off-resonance frequency (Hz), float32.

    ``f = dphi / (2 pi (TE2 - TE1))``; unambiguous within +-1 / (2 (TE2 - TE1)).
    """
    units.check_positive("echo time (s)", [te1, te2])
    dte = float(te2) - float(te1)
    if dte <= 0:
        raise QSMInputError(f"phase difference needs TE2 > TE1, got TE1={te1} s, TE2={te2} s")
    return (np.asarray(phasediff_rad, dtype=np.float64) / (2 * np.pi * dte)).astype(np.float32)


def fieldmap_to_hz(data, meta: dict, path=None):
    """A vendor field map to Hz (float32) from its sidecar's ``Units`` (Hz, rad/s)."""
    u = str(meta.get("Units", "Hz" if "FIELDMAPHZ" in _tokens(meta) else "")).strip().lower()
    a = np.asarray(data, dtype=np.float64)
    if u == "hz":
        return a.astype(np.float32)
    if u in ("rad/s", "rad s-1", "rad/sec"):
        return (a / (2 * np.pi)).astype(np.float32)
    raise QSMInputError(f"field map units {meta.get('Units')!r} not understood (expected Hz or rad/s)", path)
