"""The whole QSM pipeline as a sequence of registered stages, with timing and a sidecar record.

mask -> total field (unwrapping, echo combination) -> background removal -> dipole inversion,
then chi is taken relative to a reference region (``qsmkit.reference``: by default ventricular
CSF found in the data, as published deep-gray values are).
Masking and unwrapping run on the CPU (scikit-image); background removal and inversion
run on the chosen device, and arrays stay there between those stages.
"""

from __future__ import annotations

import datetime
import inspect
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import numpy as np

from . import __version__, backend
from . import fsl as _fsl  # noqa: F401  (registers FSL's bet and prelude)
from .background import BACKGROUND
from .echoes import combine_magnitude, fit_field, unresolved_field
from .errors import QSMInputError
from .inversion import INVERSION
from .masking import MASKING, exclude_steep_field
from .reference import CHOICES as REFERENCE_CHOICES
from .reference import find_reference
from .registry import validate_params
from .unwrapping import UNWRAPPING

STAGES = ("mask", "field", "background", "inversion")


def accepts(func, name) -> bool:
    """Whether a stage function takes keyword ``name`` (e.g. a background method that uses the
    magnitude)."""
    return name in inspect.signature(func).parameters


@dataclass
class PipelineConfig:
    """Method choices and their parameters (each ``*_params`` goes to the method as keywords)."""

    masking: str = "auto"
    unwrapping: str = "auto"
    background: str = "auto"
    inversion: str = "auto"
    device: str = "auto"
    #: working precision of every stage: float32 (default) or float64 (a reference run;
    #: twice the memory); see ``backend.precision``
    precision: str = "float32"
    masking_params: dict = field(default_factory=dict)
    unwrapping_params: dict = field(default_factory=dict)
    #: keywords of ``echoes.fit_field``: method (linear|nonlinear|difference), offset
    #: (fit|none), magnitude_combination (rms|t2star|te), noise_sigma
    field_params: dict = field(default_factory=dict)
    background_params: dict = field(default_factory=dict)
    inversion_params: dict = field(default_factory=dict)
    #: > 0: drop the mask's steepest-field voxels before background removal (Tukey fence of
    #: the field gradient, ``masking.exclude_steep_field``); 0 off
    steep_field_fence: float = 0.0
    #: zero data weight in background removal and inversion on the voxels whose field steps by
    #: more than half a cycle to a neighbour (``known_field_weights``); off by default
    zero_weight_unresolved: bool = False
    #: the region whose mean chi is zero (``qsmkit.reference``): ``auto`` (CSF found in the
    #: data, else the whole mask), ``mask``, ``none``, or ``region`` (given to ``run_pipeline``)
    reference: str = "auto"

    def resolved(self) -> PipelineConfig:
        """A copy with ``auto`` replaced by the method each stage will use."""
        names = {stage: reg.resolve(getattr(self, stage)) for stage, reg in (
            ("masking", MASKING), ("unwrapping", UNWRAPPING), ("background", BACKGROUND),
            ("inversion", INVERSION))}
        # every parameter checked against its method's keywords and types before any work
        checked = {f"{stage}_params": reg.validate_params(names[stage],
                                                          getattr(self, f"{stage}_params"),
                                                          f"--{stage}-param")
                   for stage, reg in (("masking", MASKING), ("unwrapping", UNWRAPPING),
                                      ("background", BACKGROUND), ("inversion", INVERSION))}
        return PipelineConfig(
            **names,
            device=backend.resolve_device(self.device),
            precision=_check_precision(self.precision),
            field_params=validate_params(fit_field, self.field_params, "--field-param",
                                         "the field fit"),
            **checked,
            steep_field_fence=float(self.steep_field_fence),
            zero_weight_unresolved=bool(self.zero_weight_unresolved),
            reference=_check_reference(self.reference),
        )


def _check_reference(name):
    name = str(name).lower()
    if name not in (*REFERENCE_CHOICES, "region"):
        raise QSMInputError(f"reference must be one of {', '.join(REFERENCE_CHOICES)} or region, "
                            f"got {name!r}")
    return name


def _check_precision(name):
    if name not in ("float32", "float64"):
        raise QSMInputError(f"precision must be float32 or float64, got {name!r}")
    return name


@dataclass
class PipelineResult:
    mask: np.ndarray
    field_total: np.ndarray
    field_local: np.ndarray
    local_mask: np.ndarray
    chi: np.ndarray
    config: PipelineConfig
    stages: list = field(default_factory=list)
    #: the region chi is relative to (None for reference ``none``) and its record
    #: (``qsmkit.reference``, with ``offset_ppm``, the mean chi subtracted, and ``seconds``)
    reference_region: np.ndarray | None = None
    reference: dict = field(default_factory=dict)


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far (MB); NaN where the platform cannot say
    (Windows has no ``resource`` module)."""
    try:
        import resource
    except ImportError:
        return float("nan")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 / 1024 if sys.platform == "darwin" else rss / 1024


class StageTimer:
    """Records each stage's method, seconds, peak memory and method info for the sidecar."""

    def __init__(self, device, progress=None, total=None):
        self.device = device
        self.progress = progress
        self.total = len(STAGES) if total is None else total
        self.records = []

    def run(self, stage, method, func, *args, **kwargs):
        if self.progress:
            self.progress(stage, len(self.records), self.total)
        t0 = time.perf_counter()
        out = func(*args, **kwargs)
        if self.device == "gpu":
            backend.get_xp("gpu").cuda.Device().synchronize()
        self.records.append({"stage": stage, "method": method,
                             "seconds": round(time.perf_counter() - t0, 4),
                             "peak_memory_mb": round(peak_memory_mb(), 1)})
        if self.progress:
            self.progress(stage, len(self.records), self.total)
        return out


def run_pipeline(magnitude, phase, te, b0, voxel_size, b0_dir, mask=None,
                 config: PipelineConfig | None = None,
                 progress: Callable[[str, int, int], None] | None = None,
                 reference_region=None) -> PipelineResult:
    """Run mask -> field -> background -> inversion, then reference chi.

    Parameters
    ----------
    magnitude, phase : (X, Y, Z) or (X, Y, Z, E) arrays; phase wrapped, in rad.
    te : echo times (s); b0 : field strength (T).
    voxel_size : mm; b0_dir : unit B0 direction in voxel axes.
    mask : optional brain mask; computed with ``config.masking`` when absent.
    progress : optional callback(stage, done, total).
    config : methods, parameters, device and working precision (``PipelineConfig``).
    reference_region : the reference region (bool on the image grid), e.g. a CSF
        segmentation; when given, ``config.reference`` is ``region`` (else it must not be).
    """
    cfg = (config or PipelineConfig()).resolved()
    if reference_region is not None and cfg.reference not in ("auto", "region"):
        raise QSMInputError(f"a reference region was given with reference {cfg.reference!r}")
    if reference_region is None and cfg.reference == "region":
        raise QSMInputError("reference 'region' needs the region (reference_region)")
    if reference_region is not None:
        cfg = replace(cfg, reference="region")
    with backend.precision(cfg.precision):
        return _run_pipeline(magnitude, phase, te, b0, voxel_size, b0_dir, mask, cfg, progress,
                             reference_region)


def _run_pipeline(magnitude, phase, te, b0, voxel_size, b0_dir, mask, cfg: PipelineConfig,
                  progress, reference_region=None) -> PipelineResult:
    """``run_pipeline`` inside its precision context; ``cfg`` is already resolved."""
    magnitude = np.asarray(magnitude, dtype=np.float32)
    phase = np.asarray(phase, dtype=np.float32)
    if magnitude.shape != phase.shape:
        raise QSMInputError(f"magnitude shape {magnitude.shape} and phase shape {phase.shape} differ")
    for name, arr in (("magnitude", magnitude), ("phase", phase)):
        if not np.all(np.isfinite(arr)):
            raise QSMInputError(f"{name} contains {int(np.sum(~np.isfinite(arr)))} NaN/Inf voxels")
    timer = StageTimer(cfg.device, progress)
    mag3 = combine_magnitude(magnitude)

    if mask is None:
        mask = timer.run("mask", cfg.masking, MASKING.get(cfg.masking).func, mag3, voxel_size,
                         **cfg.masking_params)
    else:
        mask = np.asarray(mask).astype(bool)
        if mask.shape != mag3.shape:
            raise QSMInputError(f"mask shape {mask.shape} does not match image shape {mag3.shape}")
        timer.run("mask", "given", lambda: mask)

    unwrap = UNWRAPPING.get(cfg.unwrapping).func

    def unwrap3(p, mask=None):
        # the magnitude feeds quality-guided unwrappers (ROMEO's weights, PRELUDE's input)
        return unwrap(p, mask=mask, voxel_size=voxel_size, magnitude=mag3, **cfg.unwrapping_params)

    fit = timer.run("field", cfg.unwrapping, lambda: fit_field(magnitude, phase, te, b0, unwrap3,
                                                               mask, **cfg.field_params))
    field_total = fit.field_ppm
    weights, unknown = known_field_weights(fit, mask)
    timer.records[-1]["info"] = {**fit.info, "unresolved_field": {
        "voxels": int(unknown.sum()), "rule": "field step to a neighbour > 1 / (2 spatial_unwrap_te)",
        "zero_weight": cfg.zero_weight_unresolved}}
    zero_unknown = cfg.zero_weight_unresolved and bool(unknown.any())
    if not cfg.zero_weight_unresolved:
        weights = fit.weights
    bg_mask = mask
    if cfg.steep_field_fence > 0:
        bg_mask, steep = exclude_steep_field(mask, field_total, voxel_size, fence=cfg.steep_field_fence)
        timer.records[-1]["info"]["steep_field"] = steep

    f_dev = backend.to_device(field_total, cfg.device, backend.FLOAT)
    m_dev = backend.to_device(bg_mask, cfg.device)
    mag_dev = backend.to_device(mag3, cfg.device, backend.FLOAT)
    # PDF weights each voxel by 1 / (noise SD of the field) (Liu et al. 2011), which the
    # field fit derives from the magnitude of every echo, unless the caller gives weights.
    bg_params = {"weights": backend.to_device(weights, cfg.device, backend.FLOAT),
                 **cfg.background_params}
    if accepts(BACKGROUND.get(cfg.background).func, "magnitude"):  # tfi: its edge prior
        bg_params.setdefault("magnitude", mag_dev)
    local, local_mask, bg_info = timer.run(
        "background", cfg.background, BACKGROUND.get(cfg.background).func, f_dev, m_dev,
        voxel_size, b0_dir, **bg_params)
    timer.records[-1]["info"] = bg_info

    inv_func = INVERSION.get(cfg.inversion).func
    inv_params = dict(cfg.inversion_params)
    if zero_unknown:
        inv_params.update(inversion_noise_weights(inv_func, inv_params, mag3, unknown, cfg.device))
    chi, inv_info = timer.run(
        "inversion", cfg.inversion, inv_func, local, local_mask, voxel_size, b0_dir,
        magnitude=mag_dev, **inv_params)
    timer.records[-1]["info"] = inv_info
    local_mask = backend.to_numpy(local_mask).astype(bool)
    chi = backend.to_numpy(chi)
    chi, region, ref_info = apply_reference(chi, local_mask, voxel_size, cfg.reference, magnitude,
                                            te, reference_region)
    return PipelineResult(
        mask=mask, field_total=field_total, field_local=backend.to_numpy(local),
        local_mask=local_mask, chi=chi, config=cfg, stages=timer.records,
        reference_region=region, reference=ref_info)


def known_field_weights(fit, mask):
    """The field fit's noise weights with zero where its field is not known, and that region:
    voxels whose field steps by more than half a cycle to a neighbour (``unresolved_field``:
    aliased, or a 2 pi step of the unwrapper). They stay in the mask; with zero data weight in
    background removal and inversion, chi there comes from the prior. On ``make demo`` this
    lowers chi NRMSE from 50.0 to 43.9 % (README, "Accuracy and speed today")."""
    unknown = unresolved_field(fit.field_hz, mask, fit.info["spatial_unwrap_te"])
    return np.where(unknown, 0, fit.weights).astype(np.float32), unknown


def inversion_noise_weights(func, params, magnitude, unknown, device="cpu") -> dict:
    """``noise_weights`` for an inversion that takes them: the weights it would use by itself
    (the magnitude where it weights by the magnitude, else uniform), zero where the field is
    ``unknown``. Nothing where the method takes no noise weights or the caller gave its own."""
    if not accepts(func, "noise_weights") or "noise_weights" in params:
        return {}
    by_magnitude = accepts(func, "magnitude_weights") and params.get("magnitude_weights", True)
    w = np.where(unknown, 0, magnitude if by_magnitude else 1).astype(np.float32)
    return {"noise_weights": backend.to_device(w, device, backend.FLOAT)}


def apply_reference(chi, mask, voxel_size, how="auto", magnitude=None, te=None, region=None):
    """chi relative to its reference region (``qsmkit.reference.find_reference``, inside
    ``mask``, where chi is defined): returns (the referenced chi, 0 outside ``mask``; the region
    or None; its record with ``offset_ppm`` and ``seconds``)."""
    from .inversion import reference_chi as subtract_mean

    t0 = time.perf_counter()
    te = None if te is None else list(np.atleast_1d(te))
    region, info = find_reference(how, mask, voxel_size, magnitude=magnitude, te=te,
                                  region=region)
    if region is not None:
        chi, offset = subtract_mean(chi, mask, region)
        info["offset_ppm"] = round(offset, 6)
    info["seconds"] = round(time.perf_counter() - t0, 3)
    return chi, region, info


def sidecar(config: PipelineConfig | None = None, stages=None, inputs=None, extra=None) -> dict:
    """The JSON sidecar: software, version, device, every parameter, per-stage time."""
    cfg = config.resolved() if config is not None else None
    out = {
        "software": "qsmkit",
        "version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "precision": np.dtype(backend.FLOAT).name,
    }
    if cfg is not None:
        out["device"] = backend.device_name(cfg.device)
        out["parameters"] = asdict(cfg)
    if inputs:
        out["inputs"] = inputs
    if stages is not None:
        out["stages"] = stages
    if extra:
        out.update(extra)
    return out
