"""The reference region of chi: the region whose mean chi is taken as zero when values are
reported (the dipole inversion fixes chi only up to a constant).

How it is chosen (``how``):

- ``auto`` (the default of ``qsmkit run`` and ``qsmkit stats``): ventricular CSF found in the
  data, eroded (``qsmkit.csf.csf_mask``: from R2* when two or more echoes and their times are
  given, else from the last echo's magnitude), as the original method's table is relative to
  CSF. When no CSF is found (too few echoes and a dark CSF, a mask with no deep region, a
  small field of view) it falls back to the whole mask, says why in ``info["fallback"]``, and
  the caller says so on stderr.
- ``mask``: the whole brain mask (the mean over the brain is zero).
- ``region``: a region the user gives (a mask or a label of a label image, e.g. a CSF
  segmentation), cut to the brain mask.
- ``none``: no reference (chi as the inversion gives it).

``info`` is what sidecars record: ``how`` (what was used), ``requested``, ``voxels``,
``volume_ml`` and, for ``auto``, the CSF rule's record (criterion, threshold, erosion); the
caller adds ``offset_ppm`` (the reference's mean chi that was subtracted).
"""

from __future__ import annotations

import numpy as np

from .errors import QSMInputError

CHOICES = ("auto", "mask", "none")


def find_reference(how, mask, voxel_size, *, magnitude=None, te=None, r2star=None, region=None):
    """The reference region (bool, on the mask's grid; None for ``how="none"``) and its record.

    Parameters
    ----------
    how : ``"auto"``, ``"mask"``, ``"region"`` or ``"none"`` (module docstring).
    mask : brain mask (the region is always inside it).
    voxel_size : mm.
    magnitude : (X, Y, Z) or (X, Y, Z, E) magnitude, for ``auto``.
    te : echo times (s) of a multi-echo ``magnitude``: R2* is fitted from them.
    r2star : an R2* map (s^-1), used by ``auto`` instead of fitting one.
    region : the region for ``how="region"`` (bool or 0/1 on the mask's grid).
    """
    m = np.asarray(mask).astype(bool)
    vox_ml = float(np.prod(voxel_size)) / 1000.0
    how = str(how).lower()
    if how == "none":
        return None, {"how": "none", "requested": "none"}
    if how == "region":
        if region is None:
            raise QSMInputError("reference 'region' needs the region")
        r = np.asarray(region).astype(bool) & m
        if not r.any():
            raise QSMInputError("the reference region has no voxels inside the brain mask")
        return r, _counted({"how": "region", "requested": "region"}, r, vox_ml)
    if how == "mask":
        if not m.any():
            raise QSMInputError("reference 'mask': the mask is empty")
        return m, _counted({"how": "mask", "requested": "mask"}, m, vox_ml)
    if how != "auto":
        raise QSMInputError(f"unknown reference {how!r}; choose one of auto, mask, none or a region")
    try:
        r, csf_info = _auto_csf(m, voxel_size, magnitude, te, r2star)
    except QSMInputError as err:
        reason = str(err)
    else:
        if r.any():
            return r, _counted({"how": "csf", "requested": "auto", "csf": csf_info}, r, vox_ml)
        reason = (f"no CSF found: no {csf_info['min_ml']} mL region below the threshold "
                  f"({csf_info['criterion']} {csf_info['threshold']})")
    if not m.any():
        raise QSMInputError("reference: the brain mask is empty")
    return m, _counted({"how": "mask", "requested": "auto", "fallback": reason}, m, vox_ml)


def _auto_csf(mask, voxel_size, magnitude, te, r2star):
    from .csf import csf_mask

    if r2star is None:
        if magnitude is None:
            raise QSMInputError("no magnitude or R2* map to find CSF in")
        mag = np.asarray(magnitude, np.float32)
        n_echoes = 1 if mag.ndim == 3 else mag.shape[3]
        if n_echoes >= 2 and te is not None and len(te) == n_echoes:
            r2star = r2star_map(mag, te, mask)
        else:
            return csf_mask(mask, voxel_size, magnitude=mag if mag.ndim == 3 else mag[..., -1])
    return csf_mask(mask, voxel_size, r2star=r2star)


def r2star_map(magnitude, te, mask=None):
    """R2* (s^-1) from multi-echo magnitudes (``echoes.fit_t2star``), fitted inside ``mask``
    only; 0 where undefined and outside the mask."""
    from .echoes import fit_t2star

    mag = np.asarray(magnitude, np.float32)
    m = np.ones(mag.shape[:3], bool) if mask is None else np.asarray(mask).astype(bool)
    t2s, _ = fit_t2star(mag[m][:, None, None, :], te)  # the mask's voxels as an (N, 1, 1, E) image
    t2s = t2s[:, 0, 0]
    out = np.zeros(m.shape, np.float32)
    out[m] = np.where(t2s > 0, 1 / np.where(t2s > 0, t2s, 1), 0)
    return out


def _counted(info, region, vox_ml):
    n = int(np.count_nonzero(region))
    return {**info, "voxels": n, "volume_ml": round(n * vox_ml, 2)}


def describe(info) -> str:
    """A few words for a summary line, e.g. ``reference CSF (auto, r2star, 6.4 mL, offset
    0.012 ppm)`` or ``reference whole mask (no CSF found: ...)``."""
    off = info.get("offset_ppm")
    off = "" if off is None else f", offset {off:+.4f} ppm"
    if info.get("how", "none") == "none":
        return "no reference"
    if info["how"] == "csf":
        return f"reference CSF (auto, {info['csf']['criterion']}, {info['volume_ml']} mL{off})"
    if info["how"] == "mask":
        why = " (fallback: no CSF found)" if info.get("fallback") else ""
        return f"reference whole mask{why} ({info['volume_ml']} mL{off})"
    name = info.get("name") or "region"
    return f"reference {name} ({info['volume_ml']} mL{off})"


def fallback_note(info, where="") -> str | None:
    """The stderr note for a reference that fell back to the whole mask, else None."""
    if not info.get("fallback"):
        return None
    return (f"qsmkit: note: {where + ': ' if where else ''}no CSF reference found "
            f"({info['fallback']}); chi is relative to the whole-mask mean instead")
