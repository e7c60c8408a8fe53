"""One function per stage under a stable name, for scripts, notebooks and the Slicer console.

Each takes numpy arrays in the file's voxel order, the voxel size (mm) and, where the dipole
kernel is involved, the B0 direction in voxel axes (``Volume.b0_dir()`` gives it from a
file's geometry). ``method="auto"`` picks the stage's default; keyword parameters go to the
method (``qsmkit methods`` on the command line lists them with their defaults). Fields are in
ppm of B0, chi in ppm, phase in rad, echo times in s, field strength in T.

The method modules (``qsmkit.masking``, ``qsmkit.background``, ...) stay importable, but
their internals may change between versions; these names will not.
"""

from __future__ import annotations

import numpy as np

from . import backend
from . import fsl as _fsl  # noqa: F401  (registers FSL's bet and prelude)
from .background import BACKGROUND
from .echoes import FieldFit, fit_field
from .inversion import INVERSION
from .masking import MASKING
from .registry import Parameter
from .unwrapping import UNWRAPPING

__all__ = ["brain_mask", "unwrap_phase", "total_field", "remove_background", "invert_dipole",
           "combine_coils", "roi_statistics", "find_reference", "list_methods",
           "method_parameters"]

_REGISTRIES = {"masking": MASKING, "unwrapping": UNWRAPPING, "background": BACKGROUND,
               "inversion": INVERSION}


def brain_mask(magnitude, voxel_size, method="auto", **params) -> np.ndarray:
    """Brain mask from a magnitude image.

    Parameters
    ----------
    magnitude : ndarray
        (X, Y, Z), or (X, Y, Z, E) echoes (combined by root-mean-square).
    voxel_size : sequence of 3 float
        Voxel size (mm).
    method : str
        ``"auto"`` (``surface``, or FSL's ``bet`` when FSL is installed), ``"surface"``,
        ``"threshold"`` or ``"bet"``.
    **params
        Parameters of the method, e.g. ``erode=2.0`` (mm).

    Returns
    -------
    ndarray of bool
        The mask, shaped like one echo of ``magnitude``.
    """
    from .echoes import combine_magnitude

    mag = np.asarray(magnitude, dtype=np.float32)
    mag = combine_magnitude(mag) if mag.ndim == 4 else mag
    return np.asarray(MASKING.get(method).func(mag, voxel_size, **params)).astype(bool)


def unwrap_phase(phase, voxel_size, mask=None, magnitude=None, method="auto", **params):
    """Spatial unwrapping of one echo's wrapped phase.

    Parameters
    ----------
    phase : ndarray
        (X, Y, Z) wrapped phase (rad).
    voxel_size : sequence of 3 float
        Voxel size (mm).
    mask : ndarray of bool, optional
        Voxels to unwrap (default all); the result is 0 outside.
    magnitude : ndarray, optional
        Magnitude on the same grid, for quality-guided methods (``romeo``, ``prelude``).
    method : str
        ``"auto"`` (``romeo``, or FSL's ``prelude`` when FSL is installed), ``"romeo"``,
        ``"quality"``, ``"laplacian"`` or ``"prelude"``.
    **params
        Parameters of the method.

    Returns
    -------
    ndarray
        Unwrapped phase (rad), float32.
    """
    return UNWRAPPING.get(method).func(np.asarray(phase, dtype=np.float32), mask=mask,
                                       voxel_size=voxel_size, magnitude=magnitude, **params)


def total_field(magnitude, phase, te, b0, voxel_size, mask=None, unwrapping="auto",
                unwrapping_params=None, **fit_params) -> FieldFit:
    """Total field from the magnitude and wrapped phase of one or more echoes.

    Parameters
    ----------
    magnitude, phase : ndarray
        (X, Y, Z) or (X, Y, Z, E); phase wrapped, in rad.
    te : sequence of float
        Echo times (s), one per echo.
    b0 : float
        Field strength (T).
    voxel_size : sequence of 3 float
        Voxel size (mm).
    mask : ndarray of bool, optional
        Brain mask; the field is 0 outside it (default: ``brain_mask`` of the magnitude).
    unwrapping : str
        Unwrapping method, as in :func:`unwrap_phase`.
    unwrapping_params : dict, optional
        Its parameters.
    **fit_params
        ``method`` (``"linear"``, ``"nonlinear"`` or ``"difference"``), ``offset``
        (``"fit"`` or ``"none"``), ``magnitude_combination``, ``noise_sigma``.

    Returns
    -------
    FieldFit
        ``field_ppm``, ``field_hz``, ``noise_sd_ppm``, ``weights`` (for PDF),
        ``magnitude_combined`` and ``info``.
    """
    from .echoes import combine_magnitude

    magnitude = np.asarray(magnitude, dtype=np.float32)
    mag3 = combine_magnitude(magnitude) if magnitude.ndim == 4 else magnitude
    if mask is None:
        mask = brain_mask(mag3, voxel_size)
    unwrap = UNWRAPPING.get(unwrapping).func
    uparams = dict(unwrapping_params or {})

    def unwrap3(p, mask=None):
        return unwrap(p, mask=mask, voxel_size=voxel_size, magnitude=mag3, **uparams)

    return fit_field(magnitude, np.asarray(phase, dtype=np.float32), list(np.atleast_1d(te)),
                     b0, unwrap3, mask, **fit_params)


def remove_background(field, mask, voxel_size, b0_dir, method="auto", weights=None,
                      magnitude=None, device="cpu", **params):
    """Local (tissue) field from the total field.

    Parameters
    ----------
    field : ndarray
        (X, Y, Z) total field (ppm).
    mask : ndarray of bool
        Brain mask.
    voxel_size : sequence of 3 float
        Voxel size (mm).
    b0_dir : sequence of 3 float
        Unit B0 direction in voxel axes (``Volume.b0_dir()``).
    method : str
        ``"auto"`` (``pdf``), ``"pdf"``, ``"tfi"``, ``"vsharp"`` or ``"resharp"``.
    weights : ndarray, optional
        Noise weights (1 / noise SD, e.g. ``total_field(...).weights``); default uniform.
    magnitude : ndarray, optional
        Magnitude for ``tfi``'s edge prior (ignored by the other methods).
    device : str
        ``"cpu"``, ``"gpu"`` or ``"auto"``.
    **params
        Parameters of the method.

    Returns
    -------
    local : ndarray
        Local field (ppm), 0 outside ``valid``.
    valid : ndarray of bool
        Where the local field is valid (the mask, or an eroded mask for SMV methods).
    info : dict
        What the method reports (iterations, ...).
    """
    device = backend.resolve_device(device)
    func = BACKGROUND.get(method).func
    if magnitude is not None and "magnitude" in _keywords(func):
        params["magnitude"] = backend.to_device(magnitude, device, backend.FLOAT)
    local, valid, info = func(
        backend.to_device(field, device, backend.FLOAT), backend.to_device(mask, device),
        voxel_size, b0_dir,
        weights=None if weights is None else backend.to_device(weights, device, backend.FLOAT),
        **params)
    return backend.to_numpy(local), backend.to_numpy(valid).astype(bool), info


def invert_dipole(field, mask, voxel_size, b0_dir, magnitude=None, method="auto", device="cpu",
                  **params):
    """Susceptibility (chi) from the local field: the dipole inversion.

    Parameters
    ----------
    field : ndarray
        (X, Y, Z) local field (ppm).
    mask : ndarray of bool
        Where the local field is valid.
    voxel_size : sequence of 3 float
        Voxel size (mm).
    b0_dir : sequence of 3 float
        Unit B0 direction in voxel axes.
    magnitude : ndarray, optional
        Magnitude image: the edge prior of ``tv`` and ``focuss`` (and data weights of ``tv``/``lsqr``).
    method : str
        ``"auto"`` (``tv``), ``"focuss"``, ``"tkd"``, ``"l2"``, ``"lsqr"`` or ``"tv"``.
    device : str
        ``"cpu"``, ``"gpu"`` or ``"auto"``.
    **params
        Parameters of the method, e.g. ``max_iter=200`` for ``tv``, ``refine=30`` for ``focuss``.

    Returns
    -------
    chi : ndarray
        Susceptibility (ppm), 0 outside the mask.
    info : dict
        What the method reports.
    """
    device = backend.resolve_device(device)
    chi, info = INVERSION.get(method).func(
        backend.to_device(field, device, backend.FLOAT), backend.to_device(mask, device),
        voxel_size, b0_dir,
        magnitude=None if magnitude is None else backend.to_device(magnitude, device, backend.FLOAT),
        **params)
    return backend.to_numpy(chi), info


def combine_coils(channels, phase=None, body=None, body_phase=None, te=None, voxel_size=None,
                  mask=None, method="auto", **params):
    """Coil combination: channel images -> one magnitude and phase per echo.

    Parameters
    ----------
    channels : ndarray
        Complex (X, Y, Z, C) or (X, Y, Z, E, C), or magnitudes with ``phase``.
    phase : ndarray, optional
        Channel phases (rad) when ``channels`` holds magnitudes.
    body, body_phase : ndarray, optional
        Body-coil image (complex, or magnitude + phase), (X, Y, Z) or (X, Y, Z, E).
    te : sequence of float, optional
        Echo times (s); needed by ``mcpc3ds`` and ``aspire``.
    voxel_size : sequence of 3 float, optional
        Voxel size (mm).
    mask : ndarray of bool, optional
        Voxels with signal (default: from the magnitude).
    method : str
        ``"auto"`` (``bodycoil`` with a body coil, else ``mcpc3ds`` for 2+ echoes, else
        ``adaptive``), ``"bodycoil"``, ``"mcpc3ds"``, ``"aspire"``, ``"adaptive"`` or
        ``"phase_of_sum"``.
    **params
        Parameters of the method.

    Returns
    -------
    Combined
        ``magnitude``, ``phase`` (rad), ``sensitivities`` (or None) and ``info``.
    """
    from .coils import combine

    return combine(channels, phase, body=body, body_phase=body_phase, te=te, method=method,
                   voxel_size=voxel_size, mask=mask, **params)


def find_reference(mask, voxel_size, how="auto", magnitude=None, te=None, region=None):
    """The reference region of chi: the region whose mean chi is taken as zero.

    Parameters
    ----------
    mask : ndarray of bool
        Brain mask (where chi is defined); the region lies inside it.
    voxel_size : sequence of 3 float
        Voxel size (mm).
    how : str
        ``"auto"`` (ventricular CSF found in the data, eroded: from R2* with two or more echoes
        and ``te``, else from the last echo's magnitude; the whole mask when none is found,
        with the reason in ``info["fallback"]``), ``"mask"``, ``"region"`` or ``"none"``.
    magnitude : ndarray, optional
        (X, Y, Z) or (X, Y, Z, E) magnitude, for ``"auto"``.
    te : sequence of float, optional
        Echo times (s) of a multi-echo ``magnitude``.
    region : ndarray of bool, optional
        The region for ``how="region"``.

    Returns
    -------
    region : ndarray of bool, or None for ``"none"``
    info : dict
        ``how`` (what was used: ``csf``, ``mask``, ``region`` or ``none``), ``requested``,
        ``voxels``, ``volume_ml``, ``csf`` (the CSF rule's record), ``fallback`` (why not CSF).
    """
    from .reference import find_reference as find

    return find(how, mask, voxel_size, magnitude=magnitude, te=te, region=region)


def roi_statistics(chi, labels, voxel_size, label_names=None, reference=None, erode_mm=0.0,
                   reference_region=None):
    """Chi statistics per region, relative to a reference region.

    Parameters
    ----------
    chi : ndarray
        (X, Y, Z) susceptibility (ppm).
    labels : ndarray of int
        Label map on chi's grid (0 = no region).
    voxel_size : sequence of 3 float
        Voxel size (mm).
    label_names : dict, optional
        Label number -> name.
    reference : int or str, optional
        The reference region (number or name, e.g. ``"csf"``); ``mean_ref`` = mean minus its
        mean.
    erode_mm : float
        Erode every region by this many mm first.
    reference_region : ndarray of bool, optional
        The reference as a region instead of a label (e.g. from :func:`find_reference`).

    Returns
    -------
    list of dict
        One row per region: ``label``, ``name``, ``voxels``, ``volume_mm3``, ``mean``, ``sd``,
        ``median``, ``iqr``, ``min``, ``max``, ``mean_ref``.
    """
    from .stats import roi_table

    return roi_table(chi, labels, voxel_size, label_names, reference=reference, erode_mm=erode_mm,
                     reference_region=reference_region)


def list_methods(stage) -> list[str]:
    """The method names of ``stage`` (``"masking"``, ``"unwrapping"``, ``"background"``,
    ``"inversion"`` or ``"combination"``)."""
    return _registry(stage).names()


def method_parameters(stage, method="auto") -> list[Parameter]:
    """The parameters of one method: ``name``, ``default`` and ``meaning`` each."""
    return _registry(stage).get(method).parameters()


def _registry(stage):
    if stage == "combination":
        from .coils import COMBINATION

        return COMBINATION
    try:
        return _REGISTRIES[stage]
    except KeyError:
        raise ValueError(f"unknown stage {stage!r}; choose one of "
                         f"{', '.join([*_REGISTRIES, 'combination'])}") from None


def _keywords(func):
    import inspect

    return inspect.signature(func).parameters
