"""From (multi-)echo magnitude and wrapped phase to one total field map in ppm.

Single echo: unwrap the phase spatially and scale: field = phi / (2 pi gamma B0 TE).
The phase offset at TE = 0 cannot be separated from the field with one echo; a
smooth offset is largely removed with the background field.

Two or more echoes: the phase offset cancels in the Hermitian product of
consecutive echoes, s_{e+1} conj(s_e), whose phase is 2 pi gamma B0 dTE field.
The products are summed (magnitude-weighted, which is also the maximum-likelihood
weighting for equal noise) when echoes are equally spaced, otherwise the first
pair is used; its phase is unwrapped spatially and scaled by dTE. This is the
usual echo-difference estimate; a full weighted fit across echoes comes with
the multi-echo issue.
"""

from __future__ import annotations

import numpy as np

from .errors import QSMInputError
from .units import check_positive, rad_to_ppm


def combine_magnitude(magnitude):
    """Root-mean-square across echoes (last axis) of a 4-D magnitude; 3-D passes through."""
    m = np.asarray(magnitude, dtype=np.float32)
    return np.sqrt(np.mean(m**2, axis=3)) if m.ndim == 4 else m


def as_echoes(array):
    """(X, Y, Z) -> (X, Y, Z, 1); (X, Y, Z, E) unchanged."""
    a = np.asarray(array)
    if a.ndim == 3:
        return a[..., None]
    if a.ndim != 4:
        raise QSMInputError(f"expected a 3-D or 4-D (echoes last) image, got shape {a.shape}")
    return a


def field_from_phase(magnitude, phase, te, b0, unwrap, mask=None):
    """Total field (ppm) from magnitude and wrapped phase.

    Parameters
    ----------
    magnitude, phase : (X, Y, Z) or (X, Y, Z, E); phase in rad.
    te : sequence of E echo times (s), increasing.
    b0 : field strength (T).
    unwrap : callable(phase3d, mask=...) -> unwrapped phase (a method of ``unwrapping``).
    mask : optional brain mask.
    Returns (field_ppm, info) where ``info`` records how the field was formed.
    """
    mag = as_echoes(magnitude).astype(np.float32)
    ph = as_echoes(phase).astype(np.float32)
    te = np.atleast_1d(np.asarray(te, dtype=float))
    check_positive("echo time (s)", te)
    check_positive("B0 (tesla)", b0)
    if te.size != ph.shape[3]:
        raise QSMInputError(f"{te.size} echo time(s) given for {ph.shape[3]} phase echo(es)")
    if np.any(np.diff(te) <= 0):
        raise QSMInputError(f"echo times must increase, got {list(te)}")
    if te.size == 1:
        unwrapped = unwrap(ph[..., 0], mask=mask)
        return rad_to_ppm(unwrapped, b0, te[0]).astype(np.float32), {
            "field_estimate": "single echo, spatially unwrapped", "te_used": [te[0]]}
    dte = np.diff(te)
    uniform = np.allclose(dte, dte[0], rtol=1e-3)
    signal = mag * np.exp(1j * ph)
    pairs = range(te.size - 1) if uniform else range(1)
    product = sum(signal[..., e + 1] * np.conj(signal[..., e]) for e in pairs)
    unwrapped = unwrap(np.angle(product).astype(np.float32), mask=mask)
    info = {"field_estimate": "echo-difference phase, spatially unwrapped",
            "echo_pairs": [[int(e), int(e) + 1] for e in pairs], "delta_te": float(dte[0])}
    return rad_to_ppm(unwrapped, b0, dte[0]).astype(np.float32), info
