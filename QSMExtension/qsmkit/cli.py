"""The ``qsmkit`` command line: the whole pipeline, one command per stage, simulation and a demo.

Every command validates all inputs before writing anything, writes outputs
atomically (temporary name, then rename) with a JSON sidecar, shows a progress
bar on long work, and on bad input prints one line ``qsmkit: error: ...`` and
exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
import warnings
from dataclasses import replace

import numpy as np

from . import __version__, backend, geometry, io, qc, reference, report, units
from . import fsl as _fsl  # registers FSL's bet and prelude as masking and unwrapping methods
from .background import BACKGROUND
from .echoes import combine_magnitude
from .errors import QSMInputError, QSMWarning
from .inversion import INVERSION
from .masking import MASKING
from .pipeline import STAGES, PipelineConfig, accepts, peak_memory_mb, sidecar
from .progress import Progress, iterate
from .ras_order import run_pipeline_in_ras_order
from .reference import CHOICES as REFERENCE_CHOICES
from .registry import validate_params
from .simulation_files import write_simulation
from .unwrapping import UNWRAPPING


class OneLineParser(argparse.ArgumentParser):
    """argparse, but usage errors are one line (the command line contract)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def parse_params(items):
    """``["lam=0.1", "radii_mm=12,10,8"]`` -> {"lam": 0.1, "radii_mm": [12.0, 10.0, 8.0]}."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise QSMInputError(f"--param expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = _parse_value(value.strip())
    return out


def _parse_value(text):
    if "," in text:
        return [_parse_value(t) for t in text.split(",") if t]
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def check_outputs(outputs, inputs):
    """Refuse to write over an input file or its JSON sidecar, counting every image output's
    sidecar (``io.check_outputs``)."""
    io.check_outputs(outputs, inputs)


def b0_dir_for(volume, b0_world):
    return volume.b0_dir(b0_world) if b0_world else volume.b0_dir()


def load_field(path, units_name, b0, te, allow_nan=False):
    """A 3-D field in ppm. With ``allow_nan`` NaN/Inf are kept, for ``field_in_mask`` to judge
    once the mask is known (vendor field maps are often NaN outside the head)."""
    vol = io.load_volume(path, what="field", allow_complex=False)
    if not allow_nan:
        io.require_finite(vol.data, path, "field")
    if vol.data.ndim != 3:
        raise QSMInputError(f"{path}: field must be 3-D, got shape {vol.data.shape}")
    if b0 is not None:
        b0 = units.check_b0(b0)
    if te:
        te = units.check_te(te)
    try:
        data = units.to_ppm(vol.data.astype(np.float32), units_name, b0, te[0] if te else None)
    except QSMInputError as err:
        raise QSMInputError(str(err), path) from None
    return vol, np.asarray(data, dtype=np.float32)


def field_in_mask(field, mask, path):
    """NaN/Inf inside the mask are an error; outside it they are ignored (set to 0)."""
    return io.fill_outside_mask(field, mask, path, "field").astype(np.float32)


def load_weights(args, like: io.Volume, mask=None):
    """Noise weights for background removal: ``--weights`` (e.g. a magnitude image, larger =
    more reliable) or ``--noise`` (field noise SD, weight = 1/SD). None when neither is given.
    NaN/Inf inside ``mask`` are an error, outside it they are ignored."""
    if args.weights and args.noise:
        raise QSMInputError("give --weights or --noise, not both")
    path = args.weights or args.noise
    if not path:
        return None
    vol = io.load_volume(path, what="weights" if args.weights else "noise map",
                         allow_complex=False)
    io.check_same_grid(like, vol, "field", "weights" if args.weights else "noise map")
    vol.data = io.finite_in_mask(vol.data, mask, path, "weights" if args.weights else "noise map")
    data = combine_magnitude(vol.data) if vol.data.ndim == 4 else np.asarray(vol.data, np.float32)
    if data.ndim != 3:
        raise QSMInputError(f"must be 3-D, got shape {data.shape}", path)
    if args.noise:
        with np.errstate(divide="ignore", invalid="ignore"):
            data = np.where((data > 0) & np.isfinite(data), 1.0 / data, 0).astype(np.float32)
    if not np.any(data > 0):
        raise QSMInputError("weights are zero everywhere", path)
    return data


def load_magnitude_like(path, like: io.Volume, mask=None):
    """A magnitude image (3-D, or echoes combined) on the grid of ``like``, finite (inside
    ``mask`` when given; NaN/Inf outside it become 0)."""
    mvol = io.load_echoes([path], what="magnitude", allow_complex=False)
    io.check_same_grid(like, mvol, "field", "magnitude")
    mvol.data = io.finite_in_mask(mvol.data, mask, path, "magnitude")
    return combine_magnitude(mvol.data)


def load_mask(path, like: io.Volume, what="mask"):
    vol = io.load_volume(path, what=what, allow_complex=False)
    io.check_same_grid(like, vol, "image", what)
    io.require_finite(vol.data, path, what)
    if vol.data.ndim != 3:
        raise QSMInputError(f"{path}: {what} must be 3-D, got shape {vol.data.shape}")
    mask = np.asarray(vol.data) > 0
    if not mask.any():
        raise QSMInputError(f"{path}: {what} is empty")
    return mask


# ---------------------------------------------------------------- commands

def cmd_simulate(args):
    from .simulate import make_phantom, simulate_acquisition

    units.check_b0(args.b0)
    units.check_te(args.te)
    _check_shape(args.shape, args.coils + 1 if args.coils else 1)
    b0_dir = np.asarray(args.b0_dir if args.b0_dir else (0.0, 0.0, 1.0), dtype=float)
    t0 = time.perf_counter()
    ph = make_phantom(shape=tuple(args.shape), voxel_size=tuple(args.voxel_size),
                      b0_dir=tuple(b0_dir / np.linalg.norm(b0_dir)), seed=args.seed)
    acq = simulate_acquisition(ph, te=tuple(args.te), b0=args.b0, snr=args.snr,
                               n_coils=args.coils, body_coil=args.body_coil,
                               phase_offset=args.phase_offset, seed=args.seed)
    params = {k: v for k, v in vars(args).items() if k != "func"}
    files = write_simulation(args.out, ph, acq, params, seconds=time.perf_counter() - t0)
    report.summary("simulate", f"phantom {'x'.join(map(str, ph.chi.shape))}",
                   time.perf_counter() - t0, files, args.quiet)


def _check_shape(shape, copies=1):
    """Refuse a simulation whose float32 volume (times ``copies``) is above the memory ceiling."""
    io.check_claim(None, [*shape, max(int(copies), 1)], 4, "the requested phantom")


def _read_inputs(args):
    """Magnitude and phase (one 4-D file or one file per echo, or a DICOM folder), checked,
    with TE and B0 (given, else from the JSON sidecars or DICOM headers, each in its physical
    range); phase in rad, its scaling rule in ``pha.meta["qsmkit_phase_scaling"]``. With
    ``--mask``, NaN/Inf outside the mask become 0 (inside they are an error)."""
    mask_path = getattr(args, "mask", None)
    if getattr(args, "dicom", None):
        from . import scanner

        if args.magnitude or args.phase:
            raise QSMInputError("give either --dicom or --magnitude/--phase, not both")
        series = args.series[0] if args.series and len(args.series) == 1 else args.series
        mag, pha, te, b0 = scanner.load_gre_scanner(args.dicom, series=series)
        te = list(args.te) if args.te else te
        if len(te) != (1 if pha.data.ndim == 3 else pha.data.shape[3]):
            raise QSMInputError(f"{len(te)} echo time(s) for {pha.data.shape[3:] or (1,)} echo(es)",
                                args.dicom[0])
        te = units.check_te(te, "--te" if args.te else "echo time", args.dicom[0])
        b0 = units.check_b0(args.b0 if args.b0 else b0, "--b0" if args.b0 else "field strength",
                            args.dicom[0])
        return mag, pha, te, b0
    if not (args.magnitude and args.phase):
        raise QSMInputError("give --magnitude and --phase (files), or --dicom FOLDER")
    mag, pha, te, b0 = io.load_gre(args.magnitude, args.phase, args.te, args.b0,
                                   allow_nan=bool(mask_path))
    if mask_path:
        mask = load_mask(mask_path, pha)
        mag.data = io.fill_outside_mask(mag.data, mask, args.magnitude[0], "magnitude")
        pha.data = io.fill_outside_mask(pha.data, mask, args.phase[0], "phase")
    info = {}
    pha.data = io.phase_in_rad(pha, args.phase[0], getattr(args, "phase_scale", None), info)
    pha.meta["qsmkit_phase_scaling"] = info
    return mag, pha, te, b0


def _configure_fsl(args):
    """Apply --use-fsl / --fsl-dir before any method name is resolved; the FSL folder also goes
    to the environment, so worker processes (qsmkit batch) find it."""
    use, folder = getattr(args, "use_fsl", None), getattr(args, "fsl_dir", None)
    if folder:
        os.environ["FSLDIR"] = folder
    _fsl.configure(use_fsl=use, fsl_dir=folder)


def _fsl_record(config=None):
    """The sidecar's FSL entry, when a stage used FSL."""
    names = set() if config is None else {config.masking, config.unwrapping}
    return {"fsl": _fsl.provenance()} if names & {"bet", "prelude"} else {}


def _config(args):
    return PipelineConfig(
        masking=args.masking, unwrapping=args.unwrapping, background=args.background,
        inversion=args.inversion, device=args.device, precision=args.precision,
        masking_params=parse_params(args.masking_param),
        unwrapping_params=parse_params(args.unwrapping_param),
        field_params=parse_params(args.field_param),
        background_params=parse_params(args.background_param),
        inversion_params=parse_params(args.inversion_param),
        steep_field_fence=getattr(args, "steep_field", 0.0) or 0.0,
        zero_weight_unresolved=bool(getattr(args, "zero_weight_unresolved", False)))


def cmd_run(args):
    t_start = time.perf_counter()
    mag, pha, te, b0 = _read_inputs(args)
    warn_if_not_magnitude(mag.data, (args.magnitude or args.dicom)[0])
    mask = load_mask(args.mask, pha) if args.mask else None
    how, region = reference_option(args, pha)  # checked on the file's grid
    cfg = replace(_config(args), reference=how).resolved()
    names = ("mask", "field_total", "field_local", "local_mask", "chi", "reference")
    outs = {n: os.path.join(args.out, f"{n}.nii.gz") for n in names}
    check_outputs([*outs.values(), os.path.join(args.out, "mask_qc.png")],
                  [*(args.magnitude or []), *(args.phase or []), args.mask, args.reference])
    progress = Progress(len(STAGES), args.quiet, "qsmkit run")
    try:  # the stages run in the voxel order closest to RAS whatever the file's
        res, order = run_pipeline_in_ras_order(
            mag.data, pha.data, te, b0, pha.affine, b0_world=args.b0_dir, mask=mask, config=cfg,
            progress=progress, reference_region=region, apodize=getattr(args, "apodize", 0))
    finally:
        progress.close()
    b0_dir = geometry.b0_direction(order.canonical_affine, args.b0_dir)
    ref_info = {**res.reference, **({"file": args.reference} if region is not None else {})}
    if res.reference_region is None:
        del outs["reference"]
    meta = sidecar(cfg, res.stages, inputs={"magnitude": args.magnitude, "phase": args.phase,
                                            "dicom": args.dicom, "mask": args.mask, "te": te,
                                            "b0": b0, "b0_dir_voxel": list(map(float, b0_dir)),
                                            "voxel_order": {"file": "".join(geometry.axcodes(pha.affine)),
                                                            "processed": "RAS"},
                                            "apodize": getattr(args, "apodize", 0.0),
                                            **_phase_record(pha)},
                   extra={"units": {"chi": "ppm", "field": "ppm"}, **_fsl_record(cfg),
                          **report.pipeline_record(res.stages), "reference": ref_info,
                          "mask_volume_ml": round(qc.mask_volume_ml(res.mask, pha.voxel_size), 1)})
    qc_png = os.path.join(args.out, "mask_qc.png") if _can_plot() else None
    if qc_png is None:
        print("qsmkit: note: matplotlib is not installed: no mask_qc.png", file=sys.stderr)
    with io.OutputSet() as outset:  # all five (and sidecars, and the QC figure) move in together
        for n, path in outs.items():
            data = res.reference_region if n == "reference" else getattr(res, n)
            io.save_volume(outset.path(path), data, pha.affine, sidecar=meta,
                           dtype=np.uint8 if data.dtype == bool else np.float32)
        if qc_png:
            qc.write_mask_qc(outset.path(qc_png), order.forward(mag.data),
                             order.forward(res.mask), order.canonical_affine)
    if not args.quiet:
        print_stage_times(res.stages)
    note = reference.fallback_note(ref_info)
    if note:
        print(note, file=sys.stderr)
    report.summary("run", f"{meta['method']}; {reference.describe(ref_info)}",
                   time.perf_counter() - t_start, [*outs.values(), qc_png], args.quiet)


def reference_option(args, like: io.Volume):
    """``--reference`` (and ``--reference-label``) of ``run``: (how, region or None). A file is a
    mask or label image on ``like``'s grid: the region is ``--reference-label`` in it, else
    every label > 0."""
    ref = args.reference or "auto"
    if ref.lower() in REFERENCE_CHOICES:
        if args.reference_label is not None:
            raise QSMInputError("--reference-label needs a label image as --reference")
        return ref.lower(), None
    if not os.path.exists(ref):
        raise QSMInputError(f"--reference {ref}: neither auto, mask, none nor an existing mask or "
                            "label image file")
    region = region_from_file(ref, args.reference_label, like, "phase")
    if not region.any():
        raise QSMInputError("reference region has no voxels"
                            + (f" with label {args.reference_label}" if args.reference_label
                               is not None else ""), ref)
    return "region", region


def region_from_file(path, label, like: io.Volume, like_name):
    """The region of a mask or label image (``--reference``) on ``like``'s grid: voxels with
    ``label`` (``--reference-label``), else every label > 0."""
    from .stats import label_map

    rvol = io.load_volume(path, what="reference region", allow_complex=False)
    io.check_same_grid(like, rvol, like_name, "reference region")
    labels = label_map(rvol.data, path)
    return labels == label if label is not None else labels > 0


def _phase_record(pha):
    """The sidecar's record of how the phase was scaled to radians."""
    info = pha.meta.get("qsmkit_phase_scaling") or pha.meta.get("phase_convention")
    return {"phase_scaling": info} if info else {}


def _can_plot() -> bool:
    """Whether matplotlib imports (Slicer's Python may lack it: the panels install only what
    their commands need, and the figure is then left out)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def print_stage_times(stages):
    print(f"{'stage':<12}{'method':<12}{'seconds':>9}{'peak MB':>10}")
    for s in stages:
        print(f"{s['stage']:<12}{s['method']:<12}{s['seconds']:>9.2f}{s['peak_memory_mb']:>10.0f}")


def cmd_mask(args):
    t_start = time.perf_counter()
    vol = io.load_echoes(args.magnitude, what="magnitude", allow_complex=False)
    io.require_finite(vol.data, args.magnitude[0], "magnitude")
    warn_if_not_magnitude(vol.data, args.magnitude[0])
    check_outputs([args.out], args.magnitude)
    units.check_non_negative("--erode", args.erode)
    method = MASKING.resolve(args.method)
    params = MASKING.validate_params(method, parse_params(args.param))
    if args.erode:
        params["erode"] = args.erode
    t0 = time.perf_counter()
    mask = MASKING.get(method).func(combine_magnitude(vol.data), vol.voxel_size, **params)
    fsl = {"fsl": _fsl.provenance()} if method == "bet" else {}
    meta = report.record("mask", method, params, time.perf_counter() - t0,
                         inputs={"magnitude": args.magnitude}, extra=fsl)
    with io.OutputSet() as outset:
        io.save_volume(outset.path(args.out), mask, vol.affine, dtype=np.uint8, sidecar=meta)
    report.summary("mask", method, time.perf_counter() - t_start, [args.out], args.quiet)


def warn_if_not_magnitude(data, path):
    """Warn (stderr) when a "magnitude" image has negative values or looks like a phase image:
    a magnitude is >= 0; a phase is spread over [-pi, pi] (or a vendor's symmetric integer
    range), half of it negative."""
    data = np.asarray(data)
    negative = float(np.mean(data < 0))
    if negative == 0:
        return
    lo, hi = float(data.min()), float(data.max())
    looks_like_phase = negative > 0.2 and (max(abs(lo), hi) <= np.pi * 1.01
                                           or abs(lo + hi) < 0.1 * (hi - lo))
    what = ("looks like a phase image (values from {:.4g} to {:.4g}, {:.0f} % negative)"
            if looks_like_phase else "has negative values (from {:.4g}; {:.0f} % of voxels)")
    values = (lo, hi, 100 * negative) if looks_like_phase else (lo, 100 * negative)
    print(f"qsmkit: warning: {path}: the magnitude {what.format(*values)}; a magnitude image is "
          "never negative. Check that --magnitude is the magnitude, not the phase.",
          file=sys.stderr)


def cmd_unwrap(args):
    t_start = time.perf_counter()
    pha = io.load_echoes(args.phase, what="phase", allow_complex=False)
    inputs = [*args.phase, args.magnitude, args.mask]
    mask = load_mask(args.mask, pha) if args.mask else None
    pha.data = io.finite_in_mask(pha.data, mask, args.phase[0], "phase")
    if args.magnitude:
        mag = io.load_echoes([args.magnitude], what="magnitude", allow_complex=False)
        io.check_same_grid(pha, mag, "phase", "magnitude")
        mag.data = io.finite_in_mask(mag.data, mask, args.magnitude, "magnitude")
    check_outputs([args.out], inputs)
    method = UNWRAPPING.resolve(args.method)
    params = UNWRAPPING.validate_params(method, parse_params(args.param))
    scaling = {}
    phase = io.phase_in_rad(pha, args.phase[0], getattr(args, "phase_scale", None), scaling)
    echoes = phase[..., None] if phase.ndim == 3 else phase
    magnitude = None
    if args.magnitude:
        magnitude = mag.data if mag.data.ndim == 4 else np.repeat(mag.data[..., None], echoes.shape[3], 3)
        if magnitude.shape != echoes.shape:
            raise QSMInputError(f"magnitude has {magnitude.shape[3]} echoes, phase {echoes.shape[3]}",
                                args.magnitude)
    t0 = time.perf_counter()
    out = np.stack([UNWRAPPING.get(method).func(
        echoes[..., e], mask=mask, voxel_size=pha.voxel_size,
        magnitude=None if magnitude is None else magnitude[..., e], **params)
        for e in iterate(range(echoes.shape[3]), "qsmkit unwrap", args.quiet or echoes.shape[3] == 1,
                         "echo", name=lambda e: f"echo {e + 1}")], axis=3)
    out = out[..., 0] if phase.ndim == 3 else out
    fsl = {"fsl": _fsl.provenance()} if method == "prelude" else {}
    meta = report.record("unwrap", method, params, time.perf_counter() - t0,
                         inputs={"phase": args.phase, "magnitude": args.magnitude,
                                 "mask": args.mask},
                         extra={"units": "rad", "phase_scaling": scaling, **fsl})
    with io.OutputSet() as outset:
        io.save_volume(outset.path(args.out), out, pha.affine, sidecar=meta)
    report.summary("unwrap", method, time.perf_counter() - t_start, [args.out], args.quiet)


def cmd_combine(args):
    """Coil combination: channel images (channels in the last axis) -> one magnitude and phase
    per echo, written as MAGNITUDE/PHASE files (4-D when there are echoes)."""
    from . import coils

    mag = io.load_volume(args.magnitude, what="channel magnitude")
    if np.iscomplexobj(mag.data):  # complex channel images: magnitude and phase in one file
        if args.phase:
            raise QSMInputError("the channel images are complex: give them without --phase",
                                args.magnitude)
        pha = io.Volume(np.angle(mag.data).astype(np.float32), mag.affine, mag.path, dict(mag.meta))
        mag = io.Volume(np.abs(mag.data).astype(np.float32), mag.affine, mag.path, mag.meta)
    elif not args.phase:
        raise QSMInputError("give --phase, or complex channel images", args.magnitude)
    else:
        pha = io.load_volume(args.phase, what="channel phase")
    io.check_same_grid(mag, pha, "channel magnitude", "channel phase")
    if mag.data.shape != pha.data.shape:
        raise QSMInputError(f"channel magnitude shape {mag.data.shape} does not match channel "
                            f"phase shape {pha.data.shape}", args.phase)
    if mag.data.ndim not in (4, 5):
        raise QSMInputError(f"channel images must be 4-D (x, y, z, channel) or 5-D (x, y, z, echo, "
                            f"channel), got shape {mag.data.shape}", args.magnitude)
    mask = load_mask(args.mask, mag) if args.mask else None
    mag.data = io.finite_in_mask(mag.data, mask, args.magnitude, "channel magnitude")
    pha.data = io.finite_in_mask(pha.data, mask, args.phase or args.magnitude, "channel phase")
    body = body_phase = None
    if bool(args.body_magnitude) != bool(args.body_phase):
        raise QSMInputError("give both --body-magnitude and --body-phase, or neither")
    if args.body_magnitude:
        bmag = io.load_volume(args.body_magnitude, what="body-coil magnitude")
        bpha = io.load_volume(args.body_phase, what="body-coil phase")
        for vol, path, what in ((bmag, args.body_magnitude, "body-coil magnitude"),
                                (bpha, args.body_phase, "body-coil phase")):
            io.check_same_grid(mag, vol, "channel magnitude", what)
            vol.data = io.finite_in_mask(vol.data, mask, path, what)
        body = bmag.data.astype(np.float32)
        body_phase = io.phase_in_rad(bpha, args.body_phase, getattr(args, "phase_scale", None))
    n_echoes = mag.data.shape[3] if mag.data.ndim == 5 else 1
    # dcm2niix's EchoTime, or the "te" of a sidecar qsmkit wrote (simulate)
    own = pha.meta.get("software") == "qsmkit"
    te = list(args.te) if args.te else pha.meta.get("EchoTime", pha.meta.get("te") if own else None)
    te = None if te is None else units.check_te(te, "--te" if args.te else "EchoTime", args.phase)
    method = coils.resolve_method(args.method, body is not None, n_echoes)
    params = coils.COMBINATION.validate_params(method, parse_params(args.param))
    scaling = {}
    phase_rad = io.phase_in_rad(pha, args.phase, getattr(args, "phase_scale", None), scaling)
    outs = [args.out_magnitude, args.out_phase]
    if args.out_sensitivities:
        outs += [args.out_sensitivities, io.image_stem(args.out_sensitivities) + "_phase.nii.gz"]
    check_outputs(outs, [args.magnitude, args.phase, args.body_magnitude, args.body_phase, args.mask])
    progress = Progress(1, args.quiet, "qsmkit combine")
    t0 = t_start = time.perf_counter()
    try:
        # C order: the methods walk slabs of whole rows with all channels contiguous
        res = coils.combine(np.ascontiguousarray(mag.data, dtype=np.float32),
                            np.ascontiguousarray(phase_rad), body=body,
                            body_phase=body_phase, te=te, method=method,
                            voxel_size=mag.voxel_size, mask=mask,
                            **({"return_sensitivities": bool(args.out_sensitivities)}
                               if method != "phase_of_sum" else {}), **params)
        progress(method, 1, 1)
    finally:
        progress.close()
    meta = report.record("coil combination", method, params, time.perf_counter() - t0,
                         inputs={"magnitude": args.magnitude, "phase": args.phase,
                                 "body_magnitude": args.body_magnitude,
                                 "body_phase": args.body_phase, "mask": args.mask},
                         info=res.info, extra={"channels": int(mag.data.shape[-1]),
                                               "echoes": n_echoes, "te": te,
                                               "phase_scaling": scaling})
    if te is not None:
        meta["EchoTime"] = te if len(te) > 1 else te[0]
    for key in ("MagneticFieldStrength", "ImagingFrequency"):
        if key in pha.meta:  # keep what qsmkit run reads from the sidecar
            meta[key] = pha.meta[key]
    if "MagneticFieldStrength" not in meta and own and isinstance(pha.meta.get("b0"), (int, float)):
        meta["MagneticFieldStrength"] = pha.meta["b0"]
    with io.OutputSet() as outset:
        io.save_volume(outset.path(args.out_magnitude), res.magnitude, mag.affine, sidecar=meta)
        io.save_volume(outset.path(args.out_phase), res.phase, mag.affine,
                       sidecar={**meta, "units": "rad"})
        if args.out_sensitivities and res.sensitivities is not None:
            io.save_volume(outset.path(outs[2]), np.abs(res.sensitivities), mag.affine,
                           sidecar=meta)
            io.save_volume(outset.path(outs[3]), np.angle(res.sensitivities), mag.affine,
                           sidecar={**meta, "units": "rad"})
    report.summary("combine", f"{method}, {mag.data.shape[-1]} channels",
                   time.perf_counter() - t_start, outs, args.quiet)


def cmd_field(args):
    """Total field from (multi-)echo magnitude and phase: the field in ppm and Hz, its noise SD
    and the noise weights for background removal, and the echo-combined magnitude."""
    from .echoes import fit_field

    t_start = time.perf_counter()
    mag, pha, te, b0 = _read_inputs(args)
    warn_if_not_magnitude(mag.data, (args.magnitude or args.dicom)[0])
    mask = load_mask(args.mask, pha) if args.mask else None
    if mask is None:
        method = MASKING.resolve(args.masking)
        mask = MASKING.get(method).func(combine_magnitude(mag.data), pha.voxel_size)
    stem = args.out
    outs = {"field_ppm": f"{stem}_ppm.nii.gz", "field_hz": f"{stem}_hz.nii.gz",
            "noise_sd_ppm": f"{stem}_noise_sd_ppm.nii.gz", "weights": f"{stem}_weights.nii.gz",
            "magnitude_combined": f"{stem}_magnitude.nii.gz", "mask": f"{stem}_mask.nii.gz"}
    check_outputs(outs.values(), [*(args.magnitude or []), *(args.phase or []), args.mask])
    unwrap_method = UNWRAPPING.resolve(args.unwrapping)
    unwrap = UNWRAPPING.get(unwrap_method).func
    uparams = UNWRAPPING.validate_params(unwrap_method, parse_params(args.unwrapping_param),
                                         "--unwrapping-param")
    mag3 = combine_magnitude(mag.data)

    def unwrap3(p, mask=None):
        return unwrap(p, mask=mask, voxel_size=pha.voxel_size, magnitude=mag3, **uparams)

    params = validate_params(fit_field, parse_params(args.field_param), "--field-param",
                             "the field fit")
    t0 = time.perf_counter()
    fit = fit_field(mag.data, pha.data, te, b0, unwrap3, mask, **params)
    field_method = fit.info.get("field_method", "single echo")
    meta = report.record("field", field_method, params, time.perf_counter() - t0,
                         inputs={"magnitude": args.magnitude, "phase": args.phase,
                                 "dicom": args.dicom, "mask": args.mask}, info=fit.info,
                         extra={"unwrapping": unwrap_method, "unwrapping_parameters": uparams,
                                "te": te, "b0": b0, **_phase_record(pha)})
    units_of = {"field_ppm": "ppm", "field_hz": "Hz", "noise_sd_ppm": "ppm", "weights": "1",
                "magnitude_combined": "a.u.", "mask": "1"}
    with io.OutputSet() as outset:
        for name, path in outs.items():
            data = mask if name == "mask" else getattr(fit, name)
            io.save_volume(outset.path(path), data, pha.affine,
                           sidecar={**meta, "units": units_of[name]},
                           dtype=np.uint8 if name == "mask" else np.float32)
    fit_text = field_method if len(te) == 1 else f"{field_method} fit of {len(te)} echoes"
    report.summary("field", f"{unwrap_method} unwrapping, {fit_text}",
                   time.perf_counter() - t_start, outs.values(), args.quiet)


def cmd_background(args):
    t_start = time.perf_counter()
    vol, field = load_field(args.field, args.field_units, args.b0, args.te, allow_nan=True)
    mask = load_mask(args.mask, vol)
    field = field_in_mask(field, mask, args.field)
    weights = load_weights(args, vol, mask)
    out_mask = args.out_mask or io.image_stem(args.out) + "_mask.nii.gz"
    check_outputs([args.out, out_mask], [args.field, args.mask, args.weights, args.noise,
                                         args.magnitude])
    device = backend.resolve_device(args.device)
    method = BACKGROUND.resolve(args.method)
    params = BACKGROUND.validate_params(method, parse_params(args.param))
    b0_dir = b0_dir_for(vol, args.b0_dir)
    t0 = time.perf_counter()
    func = BACKGROUND.get(method).func
    if args.magnitude:
        if not accepts(func, "magnitude"):
            raise QSMInputError(f"{args.magnitude}: --magnitude is used by tfi only; {method} "
                                "takes noise weights (--weights)")
        params["magnitude"] = backend.to_device(
            load_magnitude_like(args.magnitude, vol, mask), device, backend.FLOAT)
    local, new_mask, info = func(
        backend.to_device(field, device, backend.FLOAT), backend.to_device(mask, device),
        vol.voxel_size, b0_dir,
        weights=None if weights is None else backend.to_device(weights, device, backend.FLOAT),
        **params)
    params.pop("magnitude", None)
    meta = report.record("background", method, params, time.perf_counter() - t0, device,
                         inputs={"field": args.field, "mask": args.mask, "weights": args.weights,
                                 "noise": args.noise, "magnitude": args.magnitude,
                                 "field_units": args.field_units}, info=info,
                         extra={"units": "ppm", "b0_dir_voxel": list(map(float, b0_dir))})
    with io.OutputSet() as outset:
        io.save_volume(outset.path(args.out), backend.to_numpy(local), vol.affine, sidecar=meta)
        io.save_volume(outset.path(out_mask), backend.to_numpy(new_mask), vol.affine,
                       dtype=np.uint8, sidecar=meta)
    report.summary("background", method, time.perf_counter() - t_start, [args.out, out_mask],
                   args.quiet)


def cmd_invert(args):
    t_start = time.perf_counter()
    vol, field = load_field(args.field, args.field_units, args.b0, args.te, allow_nan=True)
    mask = load_mask(args.mask, vol)
    field = field_in_mask(field, mask, args.field)
    mag = load_magnitude_like(args.magnitude, vol, mask) if args.magnitude else None
    region = None
    if args.reference and args.reference != "mask":
        region = region_from_file(args.reference, args.reference_label, vol, "field")
        if not (region & mask).any():
            raise QSMInputError("reference region has no voxels inside the mask", args.reference)
    check_outputs([args.out], [args.field, args.mask, args.magnitude,
                               None if args.reference == "mask" else args.reference])
    device = backend.resolve_device(args.device)
    method = INVERSION.resolve(args.method)
    params = INVERSION.validate_params(method, parse_params(args.param))
    b0_dir = b0_dir_for(vol, args.b0_dir)
    t0 = time.perf_counter()
    chi, info = INVERSION.get(method).func(
        backend.to_device(field, device, backend.FLOAT), backend.to_device(mask, device),
        vol.voxel_size, b0_dir,
        magnitude=None if mag is None else backend.to_device(mag, device, backend.FLOAT), **params)
    if args.reference:
        from .inversion import reference_chi

        chi, offset = reference_chi(chi, backend.to_device(mask, device),
                                    None if region is None else backend.to_device(region, device))
        info = {**info, "reference": {"region": args.reference, "label": args.reference_label,
                                      "offset_ppm": offset}}
    meta = report.record("inversion", method, params, time.perf_counter() - t0, device,
                         inputs={"field": args.field, "mask": args.mask,
                                 "magnitude": args.magnitude, "field_units": args.field_units},
                         info=info, extra={"units": "ppm", "b0_dir_voxel": list(map(float, b0_dir))})
    with io.OutputSet() as outset:
        io.save_volume(outset.path(args.out), backend.to_numpy(chi), vol.affine, sidecar=meta)
    report.summary("invert", method, time.perf_counter() - t_start, [args.out], args.quiet)


def cmd_stats(args):
    from . import stats

    t_start = time.perf_counter()
    units.check_non_negative("--erode", args.erode)
    chi = io.load_volume(args.chi, what="chi map", allow_complex=False, allow_shear=True)
    if chi.data.ndim != 3:
        raise QSMInputError(f"chi map must be 3-D, got shape {chi.data.shape}", args.chi)
    io.require_finite(chi.data, args.chi, "chi map")
    base = io.image_stem(args.out)
    # beside the table: a JSON sidecar (parameters and rows) unless the table is JSON itself,
    # and the bar chart; a cohort table being appended to gets neither
    meta_path = None if args.append or args.out.endswith(".json") else base + ".json"
    png_path = None if args.append or args.no_plot else base + ".png"
    extra_outputs = [p for p in (meta_path, png_path) if p]
    ref_label, ref_file = _stats_reference_kind(args.reference)
    check_outputs([args.out, *extra_outputs], [args.chi, args.labels, args.label_names,
                                               args.magnitude, ref_file])
    labels, names, regions = _stats_labels(args, chi)
    outside, empty = {}, []
    if regions is None:
        labels, outside, empty = labels_inside_chi_mask(chi, labels, names, args, ref_label)
    else:
        regions, outside = regions_inside_chi_mask(chi, regions, args, ref_label)
    region, ref_info = (None, None) if ref_label is not None else \
        _stats_reference_region(args, chi, ref_file)
    subject = args.subject if (args.subject or args.append) else None
    if args.append and subject is None:
        subject = io.image_stem(os.path.basename(args.chi))
    # a label map: statistics of all labels in one pass (no mask per label)
    rows = stats.roi_table(chi.data, labels if regions is None else regions, chi.voxel_size,
                           names if regions is None else None, reference=ref_label,
                           erode_mm=args.erode, empty_labels=empty, reference_region=region)
    if ref_label is not None:
        ref_info, ref_name = _label_reference_info(rows, ref_label, chi.voxel_size)
    else:
        ref_info["offset_ppm"] = round(float(chi.data[region].mean()), 6) if region is not None \
            else None
        ref_name = {"csf": "CSF (auto)", "mask": "whole mask"}.get(ref_info["how"],
                                                                     ref_info.get("name"))
    note = reference.fallback_note(ref_info, args.chi)  # said once the outputs are written
    if args.append:  # read-modify-write of the cohort table, itself atomic
        stats.write_table(rows, args.out, subject=subject, append=True)
        if note:
            print(note, file=sys.stderr)
        return _print_rows(rows, args.quiet)
    with io.OutputSet() as outset:
        _write_stats(outset, rows, args, subject, ref_name, ref_info, meta_path, png_path, t_start,
                     outside)
    if note:
        print(note, file=sys.stderr)
    _print_rows(rows, args.quiet)
    report.summary("stats", f"{len(rows)} regions, {reference.describe(ref_info)}",
                   time.perf_counter() - t_start, [args.out, meta_path, png_path], args.quiet)


_IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


def _stats_reference_kind(ref):
    """``--reference`` of ``stats``: (label name or number, or None; reference image file, or
    None). ``auto``, ``mask`` and ``none`` are choices; a name ending like an image is a file."""
    if ref is None or ref.lower() in REFERENCE_CHOICES:
        return None, None
    if ref.lower().endswith(_IMAGE_SUFFIXES):
        return None, ref
    return ref, None


def _stats_labels(args, chi: io.Volume):
    """(label map or None, label names, regions or None) on the chi map's grid."""
    from . import stats

    names = {}
    if args.labels.endswith(".seg.nrrd"):
        regions, affine = stats.read_segmentation(args.labels)
        labels, shape = None, regions[0].mask.shape
    else:
        lab = io.load_volume(args.labels, what="label map", allow_shear=True)
        if lab.data.ndim != 3:
            raise QSMInputError(f"label map must be 3-D, got shape {lab.data.shape}", args.labels)
        labels = stats.label_map(lab.data, args.labels)
        names = stats.read_label_names(args.label_names) if args.label_names else {}
        regions, affine, shape = None, lab.affine, labels.shape
    if geometry.same_grid(chi.affine, chi.shape3, affine, shape):
        return labels, names, regions
    if not args.resample:
        raise QSMInputError(f"labels {shape} are not on the chi map's grid {chi.shape3}; give "
                            "--resample to resample them (nearest neighbour)", args.labels)
    resampled = []
    for r in (regions or [stats.Region(0, "", labels)]):
        data, inside = stats.resample_nearest(r.mask if regions else labels, affine,
                                              chi.shape3, chi.affine)
        resampled.append(stats.Region(r.label, r.name, data))
    if inside == 0 or not any(r.mask.any() for r in resampled):
        raise QSMInputError("labels and chi map do not overlap in space", args.labels)
    print(f"qsmkit: warning: {args.labels}: labels resampled (nearest neighbour) onto the chi "
          f"grid; {100 * inside:.0f} % of chi voxels lie inside the label grid", file=sys.stderr)
    return (None, names, resampled) if regions else (resampled[0].mask, names, None)


def _stats_reference_region(args, chi: io.Volume, ref_file):
    """The reference region of ``stats`` when it is not a label of --labels: (region or None,
    record). ``auto``: CSF found in --magnitude inside the chi map's mask, else the region
    ``qsmkit run`` wrote beside the chi map (``reference.nii.gz``, named in its sidecar), else
    the whole mask (chi's mask, or chi != 0) with the reason."""
    inside, source = chi_mask(chi, args.mask)
    if inside is None:
        inside, source = np.asarray(chi.data) != 0, "chi != 0"
    how = (args.reference or "auto").lower()
    if ref_file:
        given = region_from_file(ref_file, args.reference_label, chi, "chi map")
        try:
            region, info = reference.find_reference("region", inside, chi.voxel_size, region=given)
        except QSMInputError as err:
            raise QSMInputError(str(err), ref_file) from None
        return region, {**info, "file": ref_file, "label": args.reference_label}
    if args.reference_label is not None:
        raise QSMInputError("--reference-label needs a label image as --reference")
    if how != "auto" or args.magnitude:
        mag, te = _stats_magnitude(args, chi) if how == "auto" else (None, None)
        region, info = reference.find_reference(how, inside, chi.voxel_size, magnitude=mag, te=te)
        return region, {**info, "mask": source}
    beside = _run_reference_beside(chi, args.chi)
    if beside is not None:
        region, info = reference.find_reference("region", inside, chi.voxel_size, region=beside[0])
        return region, {**info, "how": "csf" if beside[1].get("how") == "csf" else "region",
                        "requested": "auto", "file": beside[2], "csf": beside[1].get("csf"),
                        "mask": source}
    region, info = reference.find_reference("auto", inside, chi.voxel_size)
    info["fallback"] = ("no --magnitude to find CSF in (or give --reference with a CSF label), "
                        "and no reference.nii.gz from qsmkit run "
                        "beside the chi map")
    return region, {**info, "mask": source}


def _stats_magnitude(args, chi: io.Volume):
    """--magnitude on the chi grid and the echo times for R2* (--te, else its sidecar's)."""
    mag = io.load_volume(args.magnitude, what="magnitude", allow_complex=False)
    io.check_same_grid(chi, mag, "chi map", "magnitude")
    data = np.asarray(mag.data, np.float32)
    te = list(args.te) if args.te else mag.meta.get("te")
    if data.ndim == 4 and te is not None and len(te) != data.shape[3]:
        raise QSMInputError(f"{len(te)} echo time(s) for {data.shape[3]} echoes", args.magnitude)
    return np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0), te


def _run_reference_beside(chi: io.Volume, chi_path):
    """(region, record, path) of the reference that ``qsmkit run`` wrote beside this chi map
    (its sidecar's ``reference``), or None."""
    info = chi.meta.get("reference") if chi.meta.get("software") == "qsmkit" else None
    path = os.path.join(os.path.dirname(os.path.abspath(chi_path)), "reference.nii.gz")
    if not isinstance(info, dict) or info.get("how") in (None, "none") or not os.path.exists(path):
        return None
    rvol = io.load_volume(path, what="reference region", allow_complex=False)
    if not geometry.same_grid(chi.affine, chi.shape3, rvol.affine, rvol.data.shape[:3]):
        return None
    return np.asarray(rvol.data) > 0, info, path


def _label_reference_info(rows, ref_label, voxel_size):
    """The record of a reference given as a label of --labels, and its name."""
    from .stats import resolve_reference

    ref = resolve_reference(ref_label, {r["label"]: r["name"] for r in rows})
    row = next(r for r in rows if r["label"] == ref)
    n = int(row["voxels"])
    return {"how": "label", "requested": str(ref_label), "name": row["name"], "label": ref,
            "voxels": n, "volume_ml": round(n * float(np.prod(voxel_size)) / 1000, 2),
            "offset_ppm": round(row["mean"], 6)}, row["name"]


def _print_rows(rows, quiet):
    if not quiet:
        print(f"{'label':>5} {'name':<24} {'voxels':>8} {'mean':>9} {'mean_ref':>9}  (ppm)")
        for r in rows:
            print(f"{r['label']:>5} {r['name']:<24} {r['voxels']:>8} {r['mean']:>9.4f} "
                  f"{r['mean_ref']:>9.4f}")


def _write_stats(outset, rows, args, subject, ref_name, ref_info, meta_path, png_path, t_start,
                 outside):
    """The table, its JSON record and the bar chart, staged in ``outset``."""
    from . import stats

    stats.write_table(rows, outset.path(args.out), subject=subject)
    if meta_path:
        meta = sidecar(extra={"stage": "stats", "method": "roi statistics",
                              "device": backend.device_name("cpu"),
                              "seconds": round(time.perf_counter() - t_start, 3),
                              "peak_memory_mb": round(peak_memory_mb(), 1),
                              "units": "ppm", "rows": rows, "reference": ref_info,
                              "parameters": {"reference": args.reference, "reference_name": ref_name,
                                             "reference_label": args.reference_label,
                                             "erode_mm": args.erode, "resample": args.resample,
                                             "subject": subject, "mask": args.mask,
                                             "te": args.te},
                              "outside_chi_mask_voxels": outside,
                              "inputs": {"chi": args.chi, "labels": args.labels,
                                         "label_names": args.label_names,
                                         "magnitude": args.magnitude}})
        io.write_json(outset.path(meta_path), meta)
    if png_path:
        stats.plot_referenced_means(rows, outset.path(png_path), ref_name,
                                    title=os.path.basename(args.chi))


def chi_mask(chi: io.Volume, mask_path=None):
    """The chi map's mask (bool) and where it came from, or (None, None) when unknown:
    ``--mask``, else ``chi != 0`` for a chi map written by ``qsmkit run``, ``invert``, ``batch``
    or ``demo`` (0 outside their mask by construction; a true chi map whose reference region
    is 0 ppm must not be read that way, hence only these)."""
    if mask_path:
        return load_mask(mask_path, chi, what="chi mask"), mask_path
    stage = chi.meta.get("stage") if chi.meta.get("software") == "qsmkit" else None
    if stage in ("inversion", "pipeline"):
        return np.asarray(chi.data) != 0, "chi != 0"
    return None, None


def regions_inside_chi_mask(chi: io.Volume, regions, args, ref_label=None):
    """Regions cut to the chi map's mask, and {name: voxels outside it} for those that reach
    out of it (skull, air): a region wholly outside gets 0 voxels and NaN statistics. Says so
    on stderr; a reference region wholly outside is an error."""
    from .stats import Region, resolve_reference

    inside, source = chi_mask(chi, args.mask)
    if inside is None:
        return regions, {}
    outside = {r.name: int(np.count_nonzero(r.mask & ~inside)) for r in regions}
    outside = {k: v for k, v in outside.items() if v}
    if not outside:
        return regions, {}
    cut = [Region(r.label, r.name, r.mask & inside) for r in regions]
    ref = resolve_reference(ref_label, regions)
    for r in cut:
        if r.label == ref and not r.mask.any():
            raise QSMInputError(f"reference region {r.name} lies wholly outside the chi map's "
                                f"mask ({source})", args.labels)
    whole = [r.name for r in cut if not r.mask.any()]
    part = [k for k in outside if k not in whole]
    notes = []
    if whole:
        notes.append(f"{len(whole)} region(s) lie outside the chi map's mask ({', '.join(whole)}): "
                     "0 voxels, NaN statistics")
    if part:
        notes.append(f"{len(part)} reach out of it ({', '.join(part)}): only their voxels inside "
                     "it are counted")
    print(f"qsmkit: note: {args.chi}: " + "; ".join(notes) + f" (mask: {source})", file=sys.stderr)
    return cut, outside


def labels_inside_chi_mask(chi: io.Volume, labels, names, args, ref_label=None):
    """A label map cut to the chi map's mask (voxels outside set to 0, in one pass), {name:
    voxels outside} for labels that reach out of it, and the labels wholly outside it (listed
    with 0 voxels and NaN statistics). Says so on stderr; a reference wholly outside is an error."""
    from .stats import resolve_reference

    inside, source = chi_mask(chi, args.mask)
    if inside is None:
        return labels, {}, []
    total = np.bincount(labels.ravel())
    kept = np.bincount(labels[inside].ravel(), minlength=total.size)
    name = {lab: str(names.get(lab, lab)) for lab in range(1, total.size) if total[lab]}
    outside = {name[lab]: int(total[lab] - kept[lab]) for lab in name if total[lab] > kept[lab]}
    if not outside:
        return labels, {}, []
    whole = [lab for lab in name if kept[lab] == 0]
    ref = resolve_reference(ref_label, name)
    if ref in whole:
        raise QSMInputError(f"reference region {name[ref]} lies wholly outside the chi map's "
                            f"mask ({source})", args.labels)
    part = [k for k in outside if k not in {name[lab] for lab in whole}]
    notes = []
    if whole:
        notes.append(f"{len(whole)} region(s) lie outside the chi map's mask "
                     f"({', '.join(name[lab] for lab in whole)}): 0 voxels, NaN statistics")
    if part:
        notes.append(f"{len(part)} reach out of it ({', '.join(part)}): only their voxels inside "
                     "it are counted")
    print(f"qsmkit: note: {args.chi}: " + "; ".join(notes) + f" (mask: {source})", file=sys.stderr)
    return np.where(inside, labels, 0), outside, whole


def cmd_batch(args):
    from .batch import run_batch

    # masking and unwrapping are resolved here, where --use-fsl applies: the workers (other
    # processes, perhaps other machines) then run exactly the methods this command chose
    # (every stage is resolved, so that batch_summary.json names the methods that ran)
    t_start = time.perf_counter()
    config = {"masking": MASKING.resolve(args.masking),
              "unwrapping": UNWRAPPING.resolve(args.unwrapping),
              "background": BACKGROUND.resolve(args.background),
              "inversion": INVERSION.resolve(args.inversion),
              "device": backend.resolve_device(args.device), "precision": args.precision,
              "masking_params": parse_params(args.masking_param),
              "unwrapping_params": parse_params(args.unwrapping_param),
              "field_params": parse_params(args.field_param),
              "background_params": parse_params(args.background_param),
              "inversion_params": parse_params(args.inversion_param)}
    if args.workers is not None and args.workers < 1:
        raise QSMInputError(f"--workers must be at least 1, got {args.workers}")
    summary = run_batch(args.bids_dir, args.out, args.participant_label, args.session_label,
                        config, workers=args.workers, memory_limit=args.memory_limit,
                        scheduler=args.scheduler, force=args.force, reference=args.reference,
                        progress=not args.quiet)
    for key in summary["failed"]:
        print(f"qsmkit: failed: {key}: {summary['errors'][key]}", file=sys.stderr)
    if not args.quiet:
        print(f"{len(summary['done'])} done, {len(summary['skipped'])} already complete, "
              f"{len(summary['failed'])} failed")
    methods = ", ".join(f"{k}={config[k]}" for k in ("masking", "unwrapping", "background",
                                                     "inversion"))
    written = [summary["out"], summary["group_table"]]
    report.summary("batch", methods, time.perf_counter() - t_start, written, args.quiet)
    if summary["failed"]:
        raise PartialFailure()


class PartialFailure(Exception):
    """Some subjects of a batch failed (exit status 1); the others completed."""


def cmd_demo(args):
    from . import demo

    units.check_b0(args.b0)
    units.check_te(args.te)
    _check_shape(args.shape)
    demo.run_demo(args.out, shape=tuple(args.shape), voxel_size=tuple(args.voxel_size),
                  seed=args.seed, snr=args.snr, te=tuple(args.te), b0=args.b0,
                  config=_config(args), quiet=args.quiet)


def _method_stages():
    """stage -> (registry or None, how the command line chooses it); ``field`` is the echo fit,
    one function with keywords rather than a registry."""
    from .coils import COMBINATION

    return {"combination": (COMBINATION, "qsmkit combine --method"),
            "masking": (MASKING, "qsmkit mask --method, run/demo/batch --masking"),
            "unwrapping": (UNWRAPPING, "qsmkit unwrap --method, run/demo/batch --unwrapping"),
            "field": (None, "qsmkit field/run/demo --field-param"),
            "background": (BACKGROUND, "qsmkit background --method, run/demo/batch --background"),
            "inversion": (INVERSION, "qsmkit invert --method, run/demo/batch --inversion")}


METHOD_STAGES = ("combination", "masking", "unwrapping", "field", "background", "inversion")


def _format_default(value):
    if isinstance(value, str):
        return repr(value)
    return "None" if value is None else str(value)


def describe_method(stage, name=None) -> str:
    """The parameters of one method (or of the echo fit, stage ``field``) as text."""
    import textwrap

    from .echoes import fit_field
    from .registry import method_parameters

    registry, _how = _method_stages()[stage]
    if registry is None:
        title, params = "field: the echo fit (echoes.fit_field)", method_parameters(fit_field)
    else:
        method = registry.get(name)
        title, params = f"{stage} {method.name}: {method.summary}", method.parameters()
    lines = [title]
    if not params:
        lines.append("    (no parameters)")
    for prm in params:
        head = prm.name if prm.name.startswith("**") else f"{prm.name} = {_format_default(prm.default)}"
        lines.append(f"    {head}")
        meaning = " ".join((prm.meaning or "(not described)").split())
        lines += textwrap.wrap(meaning, 92, initial_indent=" " * 8, subsequent_indent=" " * 8)
    return "\n".join(lines)


def _resolved_or_none(registry, name):
    try:
        return registry.resolve(name)
    except QSMInputError:  # e.g. FSL's bet with no FSL here: still list it
        return None


def cmd_methods(args):
    """``qsmkit methods [STAGE] [--method NAME]``: every method and its parameters."""
    stages = [args.stage] if args.stage else list(METHOD_STAGES)
    blocks = []
    for stage in stages:
        registry, how = _method_stages()[stage]
        if registry is None:
            if not args.method:
                blocks.append(f"== field ({how})\n" + describe_method("field"))
            continue
        auto = _auto_rule(registry)
        if stage == "combination":
            auto = "bodycoil with a body coil, else mcpc3ds for 2+ echoes, else adaptive"
        names = [args.method] if args.method else registry.names()
        if args.method and args.method not in registry.names():
            if args.stage:
                raise QSMInputError(f"no {stage} method {args.method}; choose one of "
                                    f"{', '.join(registry.names())}")
            continue
        out = [f"== {stage} ({how}; auto = {auto})"]
        for n in names:
            method = registry._methods[n]
            if method.check is not None and _resolved_or_none(registry, n) is None:
                out.append(f"{stage} {n}: {method.summary} [not available here]")
                continue
            out.append(describe_method(stage, n))
        blocks.append("\n".join(out))
    if not blocks:
        raise QSMInputError(f"no stage has a method {args.method}")
    print("\n\n".join(blocks))


#: the commands with a --list-params option
LIST_PARAMS_COMMANDS = ("demo", "run", "field", "mask", "unwrap", "background", "invert", "batch",
                        "combine")


def list_params(argv) -> int:
    """``--list-params``: the parameters of the method(s) a command line chooses, then exit 0."""
    args, _rest = _list_params_parser().parse_known_args(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    _configure_fsl(args)
    stage_of = {"mask": "masking", "unwrap": "unwrapping", "background": "background",
                "invert": "inversion", "combine": "combination"}
    if command in stage_of:
        stage = stage_of[command]
        registry = _method_stages()[stage][0]
        name = args.method or "auto"
        if stage == "combination" and name == "auto":
            print("combination auto: bodycoil with a body coil, else mcpc3ds for 2+ echoes, else "
                  "adaptive; give --method to list one")
            return 0
        print(describe_method(stage, registry.resolve(name)))
        return 0
    blocks = []
    for stage, registry in _pipeline_registries():
        if command == "field" and stage in ("background", "inversion"):
            continue
        name = getattr(args, stage) or "auto"
        blocks.append(describe_method(stage, registry.resolve(name)))
    blocks.insert(2, describe_method("field"))
    print("\n\n".join(blocks))
    return 0


def _list_params_parser():
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--method")
    for stage, _ in _pipeline_registries():
        p.add_argument(f"--{stage}")
    p.add_argument("--use-fsl")
    p.add_argument("--fsl-dir")
    return p


# ---------------------------------------------------------------- parser

def _add_quiet(p):
    p.add_argument("--quiet", action="store_true",
                   help="print neither progress nor the closing summary (errors still go to stderr)")


def _add_common(p):
    p.add_argument("--device", default="auto", choices=["cpu", "gpu", "auto"],
                   help="compute device (default auto: the GPU when cupy sees one, else the CPU)")
    p.add_argument("--precision", default="float32", choices=["float32", "float64"],
                   help="working precision (default float32; float64 for a reference run, "
                        "twice the memory; outputs are written as float32)")
    _add_quiet(p)


def _add_list_params(p):
    p.add_argument("--list-params", action="store_true",
                   help="print the parameters of the chosen method(s) (name, default, meaning) "
                        "and exit; see also 'qsmkit methods'")


def _add_b0_dir(p):
    p.add_argument("--b0-dir", nargs=3, type=float, metavar=("X", "Y", "Z"),
                   help="B0 direction in world (RAS) coordinates, any length (default: scanner z, "
                        "read from the image geometry)")


def _add_field_units(p):
    p.add_argument("--field-units", default="ppm", choices=units.FIELD_UNITS,
                   help="units of the field input (default ppm; hz needs --b0, rad --b0 and --te)")
    p.add_argument("--b0", type=float, metavar="TESLA",
                   help="field strength (T), for hz/rad field units (no default)")
    p.add_argument("--te", type=float, nargs="+", metavar="SECONDS",
                   help="echo time (s), for rad field units (no default)")


def _add_phase_scale(p):
    p.add_argument("--phase-scale", type=float, metavar="PI_VALUE",
                   help="integer phase without a sidecar naming the Manufacturer: the value that "
                        "stands for pi (4096 Siemens as dcm2niix writes it, 2048 raw 12-bit "
                        "0..4095, 3141.59 milliradians); needed when the data do not reach the "
                        "vendor's full scale")


def _add_fsl(p):
    p.add_argument("--use-fsl", choices=_fsl.USE_FSL_CHOICES,
                   help="auto (default): FSL bet/prelude for 'auto' masking/unwrapping when FSL "
                        "is installed; never: embedded methods; always: FSL or an error")
    p.add_argument("--fsl-dir", metavar="DIR", help="FSL folder (default: $FSLDIR)")


def _add_method(p, registry, what):
    """``--method`` and ``--param`` of a single-stage command."""
    p.add_argument("--method", default="auto", choices=registry.choices(),
                   help=f"{what} method (default auto = {_auto_rule(registry)}); "
                        "'qsmkit methods' lists them")
    p.add_argument("--param", action="append", metavar="KEY=VALUE",
                   help=f"a parameter of the method, repeatable{_param_example(registry)}; "
                        "--list-params shows them with their defaults")
    _add_list_params(p)


def _auto_rule(registry):
    """What ``auto`` means, for the help text: the default, or what it resolves to here."""
    if isinstance(registry.default, str):
        return registry.default
    try:
        return f"{registry.resolve('auto')} on this machine"
    except QSMInputError:
        return "chosen on this machine"


def _param_example(registry):
    """`` (e.g. --param NAME=DEFAULT)`` from the default method's first parameter, so the
    example in the help is always one the default method takes."""
    try:
        params = [q for q in registry.get("auto").parameters()
                  if not q.name.startswith("**") and q.default is not None]
    except QSMInputError:
        return ""
    return f" (e.g. --param {params[0].name}={params[0].default})" if params else ""


def _add_methods(p):
    _add_fsl(p)
    for stage, reg in _pipeline_registries():
        p.add_argument(f"--{stage}", default="auto", choices=reg.choices(),
                       help=f"{stage} method (default auto = {_auto_rule(reg)})")
    for stage, _ in _pipeline_registries():
        p.add_argument(f"--{stage}-param", action="append", metavar="KEY=VALUE",
                       help=f"a parameter of the {stage} method, repeatable (--list-params "
                            f"shows them)")
    p.add_argument("--field-param", action="append", metavar="KEY=VALUE",
                   help="multi-echo field fit, repeatable: method=linear|nonlinear|difference "
                        "(default linear), offset=fit|none (default fit), "
                        "magnitude_combination=rms|t2star|te (default rms)")
    p.add_argument("--zero-weight-unresolved", action="store_true",
                   help="zero data weight in background removal and inversion where the field "
                        "steps by more than half a cycle to a neighbour (aliased phase or a 2 pi "
                        "unwrapping step; the count is in the sidecar either way)")
    _add_list_params(p)


def _pipeline_registries():
    return (("masking", MASKING), ("unwrapping", UNWRAPPING), ("background", BACKGROUND),
            ("inversion", INVERSION))


def _add_phantom_options(p):
    """The phantom and acquisition of ``simulate`` and ``demo``."""
    p.add_argument("--shape", nargs=3, type=int, default=[256, 256, 64], metavar=("X", "Y", "Z"),
                   help="phantom size in voxels (default 256 256 64; at least 32 32 16)")
    p.add_argument("--voxel-size", nargs=3, type=float, default=[0.9375, 0.9375, 2.5],
                   metavar=("X", "Y", "Z"), help="voxel size (mm) (default 0.9375 0.9375 2.5)")
    p.add_argument("--te", nargs="+", type=float, default=[0.020], metavar="SECONDS",
                   help="echo times (s), one per echo (default 0.020)")
    p.add_argument("--b0", type=float, default=3.0, metavar="TESLA",
                   help="field strength (T) (default 3)")
    p.add_argument("--snr", type=float, default=100.0,
                   help="magnitude signal-to-noise ratio of brain tissue at the first echo; the "
                        "phase noise follows from it (default 100)")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed of the noise and the phantom's texture (default 0)")


def _add_gre_inputs(p, what="magnitude and phase"):
    """Magnitude and phase as files or DICOM, with TE and B0, for ``run`` and ``field``."""
    p.add_argument("--magnitude", nargs="+", metavar="FILE",
                   help="magnitude: one 4-D file (echoes last) or one 3-D file per echo")
    p.add_argument("--phase", nargs="+", metavar="FILE",
                   help="phase, as --magnitude: rad, or vendor integer phase scaled per the "
                        "sidecar's Manufacturer (else see --phase-scale)")
    p.add_argument("--dicom", nargs="+", metavar="PATH",
                   help=f"DICOM folder(s)/files or dcm2niix NIfTI with sidecars holding both "
                        f"{what} (instead of --magnitude/--phase)")
    p.add_argument("--series", nargs="+", type=int, metavar="N",
                   help="with --dicom: the series number, or the magnitude and the phase series "
                        "numbers (default: the only GRE series)")
    p.add_argument("--te", nargs="+", type=float, metavar="SECONDS",
                   help="echo times (s), one per echo (default: EchoTime of the JSON sidecar)")
    p.add_argument("--b0", type=float, metavar="TESLA",
                   help="field strength (T) (default: ImagingFrequency / gamma, else "
                        "MagneticFieldStrength, of the JSON sidecar)")
    _add_phase_scale(p)


def _coil_methods():
    from .coils import COMBINATION

    return COMBINATION.names()


def _subparser(sub, name, summary, description=None):
    """A subcommand with its one-line summary (``qsmkit --help``) and description (its own
    ``--help``)."""
    return sub.add_parser(name, help=summary, description=description or summary[0].upper()
                          + summary[1:] + ".")


def _add_demo_command(sub):
    """``qsmkit demo``."""
    p = _subparser(sub, "demo", "simulate the built-in phantom and run the whole pipeline on it",
                   "Simulate the built-in phantom, run the whole pipeline on it and measure each "
                   "stage against the truth: NIfTI outputs, metrics.csv, roi_stats.csv and "
                   "overview.png in --out.")
    p.add_argument("--out", default="demo-output", metavar="DIR",
                   help="output folder (default demo-output)")
    _add_phantom_options(p)
    _add_methods(p)
    _add_common(p)
    p.set_defaults(func=cmd_demo)


def _add_run_command(sub):
    """``qsmkit run``."""
    p = _subparser(sub, "run", "the whole pipeline: magnitude + phase -> chi",
                   "The whole pipeline: brain mask, total field (unwrapping, echo fit), "
                   "background removal and dipole inversion; writes mask, field_total, "
                   "field_local, local_mask and chi (ppm) as NIfTI with JSON sidecars, and "
                   "mask_qc.png (magnitude with the mask outline), in --out.")
    _add_gre_inputs(p)
    p.add_argument("--mask", metavar="FILE", help="brain mask (skips masking; default: computed)")
    p.add_argument("--apodize", type=float, default=0.0, metavar="ALPHA",
                   help="Tukey k-space window on the complex data before the field fit, against "
                   "Gibbs rings at low matrix sizes (0 off, 1 Hann; see qsmkit.kspace) (default 0)")
    p.add_argument("--steep-field", type=float, default=0.0, metavar="FENCE",
                   help="drop mask voxels whose field gradient lies beyond Q3 + FENCE x IQR before "
                   "background removal (e.g. 3: next to sinuses); 0 off (default 0)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    _add_run_reference(p)
    _add_methods(p)
    _add_b0_dir(p)
    _add_common(p)
    p.set_defaults(func=cmd_run)


def _add_run_reference(p):
    p.add_argument("--reference", default="auto", metavar="auto|mask|none|REGION.nii.gz",
                   help="the region whose mean chi is zero: auto = ventricular CSF found in the "
                        "data (R2* or late-echo magnitude, eroded; the whole mask if none is "
                        "found, with a note), mask = the whole mask, none = as the inversion "
                        "gives it, or a mask or label image (e.g. a CSF segmentation); written "
                        "as reference.nii.gz (default auto)")
    p.add_argument("--reference-label", type=int, metavar="N",
                   help="with a label image as --reference: the label of the region (default: "
                        "every label > 0)")


def _add_simulate_command(sub):
    """``qsmkit simulate``."""
    p = _subparser(sub, "simulate", "write a phantom data set with ground truth",
                   "Write the built-in head phantom: true chi, fields and labels, and the "
                   "simulated magnitude and phase (optionally coil by coil), as NIfTI with JSON "
                   "sidecars, plus labels.tsv.")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    _add_phantom_options(p)
    p.add_argument("--coils", type=int, default=0,
                   help="number of receive coils; 0 writes only the combined images (default 0)")
    p.add_argument("--body-coil", action="store_true", help="also write a body-coil image")
    p.add_argument("--no-phase-offset", dest="phase_offset", action="store_false",
                   help="no receiver phase offset at TE = 0 (default: a smooth offset)")
    p.add_argument("--b0-dir", nargs=3, type=float, metavar=("X", "Y", "Z"),
                   help="B0 direction in voxel axes; the written affine is rotated to match "
                        "(default 0 0 1)")
    _add_quiet(p)
    p.set_defaults(func=cmd_simulate)


def _add_combine_command(sub):
    """``qsmkit combine``."""
    p = _subparser(sub, "combine", "coil combination: channel images -> one magnitude and phase "
                   "per echo")
    p.add_argument("--magnitude", required=True, metavar="FILE",
                   help="channel magnitudes, 4-D (x, y, z, channel) or 5-D (x, y, z, echo, "
                        "channel); or complex channel images (then no --phase)")
    p.add_argument("--phase", metavar="FILE",
                   help="channel phases, same shape (rad or vendor units)")
    p.add_argument("--body-magnitude", metavar="FILE", help="body-coil magnitude, 3-D or 4-D (echoes)")
    p.add_argument("--body-phase", metavar="FILE", help="body-coil phase, same shape (rad)")
    p.add_argument("--te", nargs="+", type=float, metavar="SECONDS",
                   help="echo times (s) (default: EchoTime of the JSON sidecar; needed by "
                        "mcpc3ds and aspire)")
    p.add_argument("--mask", metavar="FILE",
                   help="signal/object mask (default: from the magnitude)")
    p.add_argument("--method", default="auto", choices=["auto", *_coil_methods()],
                   help="auto (default): bodycoil with a body coil, else mcpc3ds for 2+ echoes, "
                        "else adaptive; 'qsmkit methods' lists them")
    p.add_argument("--param", action="append", metavar="KEY=VALUE",
                   help="a parameter of the method, repeatable; --list-params shows them")
    _add_list_params(p)
    p.add_argument("--out-magnitude", required=True, metavar="FILE",
                   help="combined magnitude (4-D when there are echoes)")
    p.add_argument("--out-phase", required=True, metavar="FILE",
                   help="combined phase (rad), same shape")
    _add_phase_scale(p)
    p.add_argument("--out-sensitivities", metavar="FILE", help="also write the channel "
                   "sensitivities: magnitude to FILE, phase to FILE_phase.nii.gz (default: not "
                   "written)")
    _add_quiet(p)
    p.set_defaults(func=cmd_combine)


def _add_field_command(sub):
    """``qsmkit field``."""
    p = _subparser(sub, "field", "total field from (multi-)echo magnitude and phase: ppm, Hz, "
                   "noise SD and PDF weights")
    _add_gre_inputs(p)
    p.add_argument("--mask", metavar="FILE", help="brain mask (default: computed with --masking)")
    p.add_argument("--out", required=True, metavar="STEM",
                   help="output stem: STEM_ppm.nii.gz, STEM_hz.nii.gz, STEM_noise_sd_ppm.nii.gz, "
                        "STEM_weights.nii.gz, STEM_magnitude.nii.gz, STEM_mask.nii.gz")
    _add_fsl(p)
    p.add_argument("--masking", default="auto", choices=MASKING.choices(),
                   help=f"masking method when no --mask is given (default auto = "
                        f"{_auto_rule(MASKING)})")
    p.add_argument("--unwrapping", default="auto", choices=UNWRAPPING.choices(),
                   help=f"unwrapping method (default auto = {_auto_rule(UNWRAPPING)})")
    p.add_argument("--unwrapping-param", action="append", metavar="KEY=VALUE",
                   help="a parameter of the unwrapping method, repeatable")
    p.add_argument("--field-param", action="append", metavar="KEY=VALUE",
                   help="the echo fit, repeatable: method=linear|nonlinear|difference (default "
                        "linear), offset=fit|none (default fit), magnitude_combination="
                        "rms|t2star|te (default rms), noise_sigma=SD (default: from the fit)")
    _add_quiet(p)
    p.set_defaults(func=cmd_field)


def _add_mask_command(sub):
    """``qsmkit mask``."""
    p = _subparser(sub, "mask", "brain mask from the magnitude image")
    p.add_argument("--magnitude", nargs="+", required=True, metavar="FILE",
                   help="magnitude: one 3-D or 4-D file (echoes combined by root-mean-square), "
                        "or one file per echo")
    p.add_argument("--out", required=True, metavar="FILE", help="brain mask (NIfTI, 0/1)")
    _add_method(p, MASKING, "masking")
    p.add_argument("--erode", type=float, default=0.0, metavar="MM",
                   help="erode the mask by this many mm (default 0)")
    _add_fsl(p)
    _add_quiet(p)
    p.set_defaults(func=cmd_mask)


def _add_unwrap_command(sub):
    """``qsmkit unwrap``."""
    p = _subparser(sub, "unwrap", "spatial phase unwrapping (rad in, rad out)",
                   "Spatial phase unwrapping, echo by echo: wrapped phase (rad, or vendor units) "
                   "in, unwrapped phase (rad) out, 0 outside the mask.")
    p.add_argument("--phase", nargs="+", required=True, metavar="FILE",
                   help="wrapped phase: one 3-D or 4-D file (echoes last) or one file per echo")
    p.add_argument("--magnitude", metavar="FILE",
                   help="magnitude on the same grid, for quality-guided methods (romeo, prelude) "
                        "(default: none)")
    p.add_argument("--mask", metavar="FILE",
                   help="voxels to unwrap (default: all; the output is 0 outside)")
    p.add_argument("--out", required=True, metavar="FILE", help="unwrapped phase (rad)")
    _add_method(p, UNWRAPPING, "unwrapping")
    _add_phase_scale(p)
    _add_fsl(p)
    _add_quiet(p)
    p.set_defaults(func=cmd_unwrap)


def _add_background_command(sub):
    """``qsmkit background``."""
    p = _subparser(sub, "background", "background field removal: total field -> local field")
    p.add_argument("--field", required=True, metavar="FILE",
                   help="total field, 3-D (ppm by default; see --field-units)")
    p.add_argument("--mask", required=True, metavar="FILE", help="brain mask (0/1)")
    p.add_argument("--out", required=True, metavar="FILE", help="local field (ppm)")
    p.add_argument("--out-mask", metavar="FILE",
                   help="where the local field is valid (default OUT_mask.nii.gz)")
    _add_method(p, BACKGROUND, "background removal")
    p.add_argument("--weights", metavar="FILE",
                   help="noise weights, e.g. the magnitude; larger = more reliable (default: "
                        "uniform)")
    p.add_argument("--noise", metavar="FILE",
                   help="field noise SD map (ppm); weights = 1/SD (default: uniform)")
    p.add_argument("--magnitude", metavar="FILE",
                   help="magnitude for tfi's edge prior (default: none, then tfi uses plain TV)")
    _add_field_units(p)
    _add_b0_dir(p)
    _add_common(p)
    p.set_defaults(func=cmd_background)


def _add_invert_command(sub):
    """``qsmkit invert``."""
    p = _subparser(sub, "invert", "dipole inversion: local field -> chi (ppm)")
    p.add_argument("--field", required=True, metavar="FILE",
                   help="local (tissue) field, 3-D (ppm by default; see --field-units)")
    p.add_argument("--mask", required=True, metavar="FILE",
                   help="where the local field is valid (0/1), e.g. background's OUT_mask")
    p.add_argument("--magnitude", metavar="FILE",
                   help="magnitude: edge prior of tv and focuss, data weights (default: none, no prior)")
    p.add_argument("--out", required=True, metavar="FILE", help="chi map (ppm)")
    _add_method(p, INVERSION, "dipole inversion")
    p.add_argument("--reference", metavar="mask|REGION.nii.gz",
                   help="report chi relative to the mean over the whole mask, or over a region "
                        "(a mask or label image, e.g. CSF); default: as the inversion gives it")
    p.add_argument("--reference-label", type=int, metavar="N",
                   help="with a label image as --reference: the label of the region (default: "
                        "every label > 0)")
    _add_field_units(p)
    _add_b0_dir(p)
    _add_common(p)
    p.set_defaults(func=cmd_invert)


def _add_batch_command(sub):
    """``qsmkit batch``."""
    p = _subparser(sub, "batch", "a BIDS dataset: every subject on Dask workers, derivatives "
                                 "and a cohort table; exit 1 if some subjects failed",
                   "Process every subject of a BIDS dataset (sub-*/[ses-*/]anat/*_part-mag_* and "
                   "*_part-phase_*, EchoTime and MagneticFieldStrength in the JSON sidecars) on "
                   "Dask workers; write BIDS derivatives, a cohort table and batch_summary.json. "
                   "Exit status 1 when some subjects failed.")
    p.add_argument("bids_dir", help="the BIDS dataset's root folder")
    p.add_argument("--out", metavar="DIR",
                   help="derivatives folder (default BIDS_DIR/derivatives/qsmkit)")
    p.add_argument("--participant-label", nargs="+", metavar="LABEL",
                   help="subjects to process, without 'sub-' (default: all)")
    p.add_argument("--session-label", nargs="+", metavar="LABEL",
                   help="sessions to process, without 'ses-' (default: all)")
    p.add_argument("--workers", type=int,
                   help="local worker processes (default: CPU cores / 2)")
    p.add_argument("--memory-limit", default="auto",
                   help="memory per local worker, e.g. 4GB (default auto: the machine's memory "
                        "shared among the workers)")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="an existing Dask scheduler, e.g. tcp://host:8786 (dask-jobqueue on "
                        "SLURM) (default: start local workers)")
    p.add_argument("--force", action="store_true", help="redo subjects whose outputs are complete")
    p.add_argument("--reference", metavar="REGION",
                   help="reference region of the ROI statistics, a name in the dseg.tsv (e.g. "
                        "csf) or a label number (default: the CSF that run's pipeline finds in "
                        "the data, see qsmkit run --reference)")
    _add_methods(p)
    _add_common(p)
    p.set_defaults(func=cmd_batch)


def _add_stats_command(sub):
    """``qsmkit stats``."""
    p = _subparser(sub, "stats", "chi statistics per region, relative to a reference region",
                   "Chi statistics per region of a label map or Slicer segmentation (voxels, "
                   "volume, mean, SD, median, IQR, min, max, mean minus the reference's mean), as "
                   "CSV/TSV/JSON, a JSON sidecar and a bar chart. Regions outside the chi map's "
                   "mask (chi = 0 exactly) are left out of the statistics and reported.")
    p.add_argument("--chi", required=True, metavar="FILE", help="chi map (ppm)")
    p.add_argument("--labels", required=True, metavar="FILE",
                   help="integer label map (NIfTI/NRRD) or 3D Slicer segmentation (.seg.nrrd)")
    p.add_argument("--label-names", metavar="FILE",
                   help="label names: FreeSurfer LUT, ITK-SNAP label file, CSV or BIDS dseg.tsv "
                        "(default: the label numbers)")
    p.add_argument("--reference", default="auto", metavar="auto|mask|none|REGION|FILE",
                   help="the region mean_ref is relative to: auto = ventricular CSF found in "
                        "--magnitude, else the reference.nii.gz that qsmkit run wrote beside the "
                        "chi map, else the whole mask (with a note); mask = the chi map's whole "
                        "mask; none = no reference (mean_ref empty); a label number or name of "
                        "--labels (e.g. csf); or a mask or label image FILE (default auto)")
    p.add_argument("--reference-label", type=int, metavar="N",
                   help="with a label image as --reference: the label of the region (default: "
                        "every label > 0)")
    p.add_argument("--magnitude", metavar="FILE",
                   help="magnitude (3-D, or 4-D echoes) on the chi grid, to find the CSF "
                        "reference in (--reference auto; R2* with --te or the sidecar's echo "
                        "times, else the last echo)")
    p.add_argument("--te", nargs="+", type=float, metavar="SECONDS",
                   help="echo times of a 4-D --magnitude (default: its JSON sidecar's)")
    p.add_argument("--erode", type=float, default=0.0, metavar="MM",
                   help="erode every region (reference included) by this many mm first (default 0)")
    p.add_argument("--resample", action="store_true",
                   help="resample labels on another grid onto the chi grid (nearest neighbour)")
    p.add_argument("--mask", metavar="FILE",
                   help="the chi map's mask: region voxels outside it are left out (default: "
                        "chi != 0 for chi maps qsmkit reconstructed, else every voxel)")
    p.add_argument("--out", required=True, metavar="FILE",
                   help="table: .csv, .tsv or .json (also writes OUT.json with the parameters "
                        "and OUT.png, a bar chart, unless --append)")
    p.add_argument("--subject", help="add a leading subject column (cohort tables, long format) "
                                     "(default: none; with --append the chi file name)")
    p.add_argument("--append", action="store_true",
                   help="append rows to an existing cohort table (subject defaults to the chi "
                        "file name)")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG bar chart")
    _add_quiet(p)
    p.set_defaults(func=cmd_stats)


def _add_methods_command(sub):
    """``qsmkit methods``."""
    p = _subparser(sub, "methods", "list every stage's methods and their parameters",
                   "List the methods of each stage with their parameters (name, default, "
                   "meaning), as the registry defines them; 'auto' shows what it resolves to "
                   "here.")
    p.add_argument("stage", nargs="?", choices=[*METHOD_STAGES],
                   help="only this stage (default: all)")
    p.add_argument("--method", metavar="NAME", help="only this method (default: all)")
    p.set_defaults(func=cmd_methods)


#: the subcommands in the order ``qsmkit --help`` lists them; each adds its own parser
COMMANDS = (_add_demo_command, _add_run_command, _add_simulate_command, _add_combine_command,
            _add_field_command, _add_mask_command, _add_unwrap_command, _add_background_command,
            _add_invert_command, _add_batch_command, _add_stats_command, _add_methods_command)


def build_parser():
    parser = OneLineParser(
        prog="qsmkit", description="Quantitative susceptibility mapping (QSM): the whole pipeline, "
        "one command per stage, simulation, a demo and ROI statistics. 'qsmkit COMMAND --help' "
        "describes each command; 'qsmkit methods' lists every method's parameters.")
    parser.add_argument("--version", action="version", version=f"qsmkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for add in COMMANDS:
        add(sub)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: outputs staged so far are removed (exit status 143)."""


def _on_sigterm(signum, frame):
    raise Terminated()


def _show_warning(message, category, filename, lineno, file=None, line=None, _orig=None):
    """qsmkit's own warnings as one line ``qsmkit: warning: ...``; others as Python prints them."""
    if issubclass(category, QSMWarning):
        print(f"qsmkit: warning: {message}", file=sys.stderr)
    else:
        _orig(message, category, filename, lineno, file, line)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    command = next((a for a in argv if not a.startswith("-")), None)
    if ("--list-params" in argv and "--help" not in argv and "-h" not in argv
            and command in LIST_PARAMS_COMMANDS):
        try:
            return list_params(argv)
        except QSMInputError as err:
            print(f"qsmkit: error: {err}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    in_main = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, _on_sigterm) if in_main else None
    orig_show = warnings.showwarning
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", QSMWarning)
            warnings.showwarning = lambda *a, **k: _show_warning(*a, **k, _orig=orig_show)
            _configure_fsl(args)
            with backend.precision(getattr(args, "precision", "float32")):
                args.func(args)
    except QSMInputError as err:
        print(f"qsmkit: error: {err}", file=sys.stderr)
        return 2
    except PartialFailure:
        return 1
    except MemoryError as err:
        where = f"{err}; " if str(err) else ""
        print(f"qsmkit: error: out of memory ({where}try a smaller volume or --device cpu)",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:
        # every command stages its outputs and moves them in together (io.OutputSet): an
        # interruption leaves the previous files as they were
        what = "terminated" if isinstance(err, Terminated) else "interrupted"
        print(f"qsmkit: {what}; outputs left as they were before this run "
              f"({_interrupted_note(args)})", file=sys.stderr)
        return 143 if isinstance(err, Terminated) else 130
    except BrokenPipeError:  # output piped into e.g. `head`, which stopped reading
        sys.stdout = open(os.devnull, "w")
        return 0
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, old_term)
    return 0


def _interrupted_note(args) -> str:
    if getattr(args, "command", None) == "batch":
        return "subjects already finished are complete, the others have no outputs"
    return "no file of this run was written"


if __name__ == "__main__":
    sys.exit(main())
