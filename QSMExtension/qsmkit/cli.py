"""The ``qsmkit`` command line: the whole pipeline, one command per stage, simulation and a demo.

Every command validates all inputs before writing anything, writes outputs
atomically (temporary name, then rename) with a JSON sidecar, shows a progress
bar on long work, and on bad input prints one line ``qsmkit: error: ...`` and
exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from . import __version__, backend, geometry, io, kspace, qc, units
from . import fsl as _fsl  # registers FSL's bet and prelude as masking and unwrapping methods
from .background import BACKGROUND
from .echoes import combine_magnitude
from .errors import QSMInputError
from .inversion import INVERSION
from .masking import MASKING
from .pipeline import STAGES, PipelineConfig, accepts, run_pipeline, sidecar
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


class Progress:
    """A tqdm bar over pipeline stages (stderr); silent with --quiet."""

    def __init__(self, total, quiet=False, desc="qsmkit"):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="stage", disable=quiet, file=sys.stderr,
                        leave=False)

    def __call__(self, stage, done, total):
        self.bar.set_postfix_str(stage)
        self.bar.n = done
        self.bar.refresh()

    def close(self):
        self.bar.close()


def check_outputs(outputs, inputs):
    """Refuse to write over an input file."""
    ins = {os.path.realpath(p) for p in inputs if p}
    for out in outputs:
        if os.path.realpath(out) in ins:
            raise QSMInputError(f"{out}: output would overwrite an input file")


def b0_dir_for(volume, b0_world):
    return volume.b0_dir(b0_world) if b0_world else volume.b0_dir()


def load_field(path, units_name, b0, te, allow_nan=False):
    """A 3-D field in ppm. With ``allow_nan`` NaN/Inf are kept, for ``field_in_mask`` to judge
    once the mask is known (vendor field maps are often NaN outside the head)."""
    vol = io.load_volume(path, what="field")
    if not allow_nan:
        io.require_finite(vol.data, path, "field")
    if vol.data.ndim != 3:
        raise QSMInputError(f"{path}: field must be 3-D, got shape {vol.data.shape}")
    try:
        data = units.to_ppm(vol.data.astype(np.float32), units_name, b0, te[0] if te else None)
    except QSMInputError as err:
        raise QSMInputError(str(err), path) from None
    return vol, np.asarray(data, dtype=np.float32)


def field_in_mask(field, mask, path):
    """NaN/Inf inside the mask are an error; outside it they are ignored (set to 0)."""
    bad = ~np.isfinite(field)
    n_in = int(np.count_nonzero(bad & mask))
    if n_in:
        raise QSMInputError(f"field has {n_in} NaN/Inf voxels inside the mask", path)
    return np.where(bad, np.float32(0), field).astype(np.float32)


def load_weights(args, like: io.Volume):
    """Noise weights for background removal: ``--weights`` (e.g. a magnitude image, larger =
    more reliable) or ``--noise`` (field noise SD, weight = 1/SD). None when neither is given."""
    if args.weights and args.noise:
        raise QSMInputError("give --weights or --noise, not both")
    path = args.weights or args.noise
    if not path:
        return None
    vol = io.load_volume(path, what="weights" if args.weights else "noise map")
    io.check_same_grid(like, vol, "field", "weights" if args.weights else "noise map")
    data = combine_magnitude(vol.data) if vol.data.ndim == 4 else np.asarray(vol.data, np.float32)
    if data.ndim != 3:
        raise QSMInputError(f"must be 3-D, got shape {data.shape}", path)
    if args.noise:
        with np.errstate(divide="ignore", invalid="ignore"):
            data = np.where((data > 0) & np.isfinite(data), 1.0 / data, 0).astype(np.float32)
    if not np.any(data > 0):
        raise QSMInputError("weights are zero everywhere", path)
    return data


def load_magnitude_like(path, like: io.Volume):
    """A magnitude image (3-D, or echoes combined) on the grid of ``like``, finite."""
    mvol = io.load_echoes([path], what="magnitude")
    io.check_same_grid(like, mvol, "field", "magnitude")
    io.require_finite(mvol.data, path, "magnitude")
    return combine_magnitude(mvol.data)


def load_mask(path, like: io.Volume, what="mask"):
    vol = io.load_volume(path, what=what)
    io.check_same_grid(like, vol, "image", what)
    if vol.data.ndim != 3:
        raise QSMInputError(f"{path}: {what} must be 3-D, got shape {vol.data.shape}")
    mask = np.asarray(vol.data) > 0
    if not mask.any():
        raise QSMInputError(f"{path}: {what} is empty")
    return mask


# ---------------------------------------------------------------- commands

def cmd_simulate(args):
    from .simulate import make_phantom, simulate_acquisition

    units.check_positive("--b0", args.b0)
    units.check_positive("--te", args.te)
    b0_dir = np.asarray(args.b0_dir if args.b0_dir else (0.0, 0.0, 1.0), dtype=float)
    t0 = time.perf_counter()
    ph = make_phantom(shape=tuple(args.shape), voxel_size=tuple(args.voxel_size),
                      b0_dir=tuple(b0_dir / np.linalg.norm(b0_dir)), seed=args.seed)
    acq = simulate_acquisition(ph, te=tuple(args.te), b0=args.b0, snr=args.snr,
                               n_coils=args.coils, body_coil=args.body_coil,
                               phase_offset=args.phase_offset, seed=args.seed)
    params = {k: v for k, v in vars(args).items() if k != "func"}
    files = write_simulation(args.out, ph, acq, params)
    if not args.quiet:
        print(f"simulated {ph.chi.shape} phantom in {time.perf_counter() - t0:.1f} s; "
              f"wrote {len(files)} files to {args.out}")


def write_simulation(out, ph, acq, params):
    """Write a simulated data set (truth and acquisition) as NIfTI with one sidecar each."""
    affine = geometry.affine_for_b0(ph.voxel_size, ph.b0_dir, ph.chi.shape)
    meta = sidecar(extra={"simulation": params, "te": list(acq.te), "b0": acq.b0,
                          "b0_dir_voxel": list(map(float, ph.b0_dir)),
                          "labels": {int(k): v for k, v in ph.label_names.items()}})
    squeeze = (lambda a: a[..., 0]) if len(acq.te) == 1 else (lambda a: a)
    volumes = {
        "chi_true": (ph.chi_brain, np.float32), "chi_sources": (ph.chi, np.float32),
        "mask_true": (ph.mask, np.uint8), "labels": (ph.labels, np.uint8),
        "vessel_mask": (ph.vessel_mask, np.uint8),
        "field_total_true": (ph.field_total, np.float32),
        "field_local_true": (ph.field_local, np.float32),
        "field_background_true": (ph.field_background, np.float32),
        "magnitude": (squeeze(acq.magnitude), np.float32),
        "phase": (squeeze(acq.phase), np.float32),
    }
    if acq.coil_magnitude is not None:
        volumes["coils_magnitude"] = (acq.coil_magnitude, np.float32)
        volumes["coils_phase"] = (acq.coil_phase, np.float32)
    if acq.body_magnitude is not None:
        volumes["body_coil_magnitude"] = (squeeze(acq.body_magnitude), np.float32)
        volumes["body_coil_phase"] = (squeeze(acq.body_phase), np.float32)
    os.makedirs(out, exist_ok=True)
    written = []
    for name, (data, dtype) in volumes.items():
        written.append(io.save_volume(os.path.join(out, f"{name}.nii.gz"), data, affine,
                                      sidecar=meta, dtype=dtype))
    with open(os.path.join(out, "labels.tsv"), "w") as fh:
        fh.write("index\tname\n")
        for k, v in sorted(ph.label_names.items()):
            fh.write(f"{k}\t{v}\n")
    return written


def _read_inputs(args):
    """Magnitude and phase (one 4-D file or one file per echo, or a DICOM folder), checked,
    with TE and B0 (given, else from the JSON sidecars or DICOM headers); phase in rad."""
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
        return mag, pha, te, float(args.b0 if args.b0 else b0)
    if not (args.magnitude and args.phase):
        raise QSMInputError("give --magnitude and --phase (files), or --dicom FOLDER")
    mag, pha, te, b0 = io.load_gre(args.magnitude, args.phase, args.te, args.b0)
    pha.data = io.phase_in_rad(pha, args.phase[0])
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
        steep_field_fence=getattr(args, "steep_field", 0.0) or 0.0)


def cmd_run(args):
    mag, pha, te, b0 = _read_inputs(args)
    if getattr(args, "apodize", 0):  # the phase only: masking and priors keep the sharp magnitude
        pha.data = kspace.apodize(mag.data, pha.data, args.apodize)[1]
    mask = load_mask(args.mask, pha) if args.mask else None
    cfg = _config(args).resolved()
    names = ("mask", "field_total", "field_local", "local_mask", "chi")
    outs = {n: os.path.join(args.out, f"{n}.nii.gz") for n in names}
    check_outputs(outs.values(), [*(args.magnitude or []), *(args.phase or []), args.mask])
    b0_dir = b0_dir_for(pha, args.b0_dir)
    progress = Progress(len(STAGES), args.quiet, "qsmkit run")
    try:
        res = run_pipeline(mag.data, pha.data, te, b0, pha.voxel_size, b0_dir,
                           mask=mask, config=cfg, progress=progress)
    finally:
        progress.close()
    meta = sidecar(cfg, res.stages, inputs={"magnitude": args.magnitude, "phase": args.phase,
                                            "dicom": args.dicom, "mask": args.mask, "te": te,
                                            "b0": b0, "b0_dir_voxel": list(map(float, b0_dir)),
                                            "phase_convention": pha.meta.get("phase_convention"),
                                            "apodize": getattr(args, "apodize", 0.0)},
                   extra={"units": {"chi": "ppm", "field": "ppm"}, **_fsl_record(cfg),
                          "mask_volume_ml": round(qc.mask_volume_ml(res.mask, pha.voxel_size), 1)})
    for n, path in outs.items():
        data = getattr(res, n)
        io.save_volume(path, data, pha.affine, sidecar=meta,
                       dtype=np.uint8 if data.dtype == bool else np.float32)
    qc.write_mask_qc(os.path.join(args.out, "mask_qc.png"), mag.data, res.mask, pha.affine)
    if not args.quiet:
        print_stage_times(res.stages)
        print(f"wrote {args.out}/chi.nii.gz (ppm)")


def print_stage_times(stages):
    print(f"{'stage':<12}{'method':<12}{'seconds':>9}{'peak MB':>10}")
    for s in stages:
        print(f"{s['stage']:<12}{s['method']:<12}{s['seconds']:>9.2f}{s['peak_memory_mb']:>10.0f}")


def cmd_mask(args):
    vol = io.load_echoes(args.magnitude, what="magnitude")
    io.require_finite(vol.data, args.magnitude[0], "magnitude")
    check_outputs([args.out], args.magnitude)
    method = MASKING.resolve(args.method)
    params = parse_params(args.param)
    if args.erode:
        params["erode"] = args.erode
    mask = MASKING.get(method).func(combine_magnitude(vol.data), vol.voxel_size, **params)
    fsl = {"fsl": _fsl.provenance()} if method == "bet" else {}
    io.save_volume(args.out, mask, vol.affine, dtype=np.uint8,
                   sidecar=sidecar(extra={"stage": "mask", "method": method, "parameters": params,
                                          "inputs": {"magnitude": args.magnitude}, **fsl}))


def cmd_unwrap(args):
    pha = io.load_echoes(args.phase, what="phase")
    io.require_finite(pha.data, args.phase[0], "phase")
    inputs = [*args.phase, args.magnitude, args.mask]
    mask = load_mask(args.mask, pha) if args.mask else None
    if args.magnitude:
        mag = io.load_echoes([args.magnitude], what="magnitude")
        io.check_same_grid(pha, mag, "phase", "magnitude")
    check_outputs([args.out], inputs)
    method = UNWRAPPING.resolve(args.method)
    params = parse_params(args.param)
    phase = io.phase_in_rad(pha, args.phase[0])
    echoes = phase[..., None] if phase.ndim == 3 else phase
    magnitude = None
    if args.magnitude:
        magnitude = mag.data if mag.data.ndim == 4 else np.repeat(mag.data[..., None], echoes.shape[3], 3)
        if magnitude.shape != echoes.shape:
            raise QSMInputError(f"magnitude has {magnitude.shape[3]} echoes, phase {echoes.shape[3]}",
                                args.magnitude)
    from tqdm import tqdm

    out = np.stack([UNWRAPPING.get(method).func(
        echoes[..., e], mask=mask, voxel_size=pha.voxel_size,
        magnitude=None if magnitude is None else magnitude[..., e], **params)
        for e in tqdm(range(echoes.shape[3]), desc="unwrap", unit="echo",
                      disable=args.quiet, leave=False)], axis=3)
    out = out[..., 0] if phase.ndim == 3 else out
    fsl = {"fsl": _fsl.provenance()} if method == "prelude" else {}
    io.save_volume(args.out, out, pha.affine,
                   sidecar=sidecar(extra={"stage": "unwrap", "method": method, "units": "rad",
                                          "parameters": params, "inputs": {"phase": args.phase},
                                          **fsl}))


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
    io.require_finite(mag.data, args.magnitude, "channel magnitude")
    io.require_finite(pha.data, args.phase, "channel phase")
    body = body_phase = None
    if bool(args.body_magnitude) != bool(args.body_phase):
        raise QSMInputError("give both --body-magnitude and --body-phase, or neither")
    if args.body_magnitude:
        bmag = io.load_volume(args.body_magnitude, what="body-coil magnitude")
        bpha = io.load_volume(args.body_phase, what="body-coil phase")
        for vol, path, what in ((bmag, args.body_magnitude, "body-coil magnitude"),
                                (bpha, args.body_phase, "body-coil phase")):
            io.check_same_grid(mag, vol, "channel magnitude", what)
            io.require_finite(vol.data, path, what)
        body, body_phase = bmag.data.astype(np.float32), io.phase_in_rad(bpha, args.body_phase)
    mask = load_mask(args.mask, mag) if args.mask else None
    n_echoes = mag.data.shape[3] if mag.data.ndim == 5 else 1
    # dcm2niix's EchoTime, or the "te" of a sidecar qsmkit wrote (simulate)
    own = pha.meta.get("software") == "qsmkit"
    te = list(args.te) if args.te else pha.meta.get("EchoTime", pha.meta.get("te") if own else None)
    te = None if te is None else list(np.atleast_1d(te).astype(float))
    method = coils.resolve_method(args.method, body is not None, n_echoes)
    params = parse_params(args.param)
    outs = [args.out_magnitude, args.out_phase]
    if args.out_sensitivities:
        outs += [args.out_sensitivities, io.image_stem(args.out_sensitivities) + "_phase.nii.gz"]
    check_outputs(outs, [args.magnitude, args.phase, args.body_magnitude, args.body_phase, args.mask])
    progress = Progress(1, args.quiet, "qsmkit combine")
    t0 = time.perf_counter()
    try:
        # C order: the methods walk slabs of whole rows with all channels contiguous
        res = coils.combine(np.ascontiguousarray(mag.data, dtype=np.float32),
                            np.ascontiguousarray(io.phase_in_rad(pha, args.phase)), body=body,
                            body_phase=body_phase, te=te, method=method,
                            voxel_size=mag.voxel_size, mask=mask,
                            **({"return_sensitivities": bool(args.out_sensitivities)}
                               if method != "phase_of_sum" else {}), **params)
        progress(method, 1, 1)
    finally:
        progress.close()
    meta = sidecar(extra={"stage": "coil combination", "method": method, "parameters": params,
                          "info": res.info, "seconds": round(time.perf_counter() - t0, 3),
                          "channels": int(mag.data.shape[-1]), "echoes": n_echoes, "te": te,
                          "inputs": {"magnitude": args.magnitude, "phase": args.phase,
                                     "body_magnitude": args.body_magnitude,
                                     "body_phase": args.body_phase, "mask": args.mask}})
    if te is not None:
        meta["EchoTime"] = te if len(te) > 1 else te[0]
    for key in ("MagneticFieldStrength", "ImagingFrequency"):
        if key in pha.meta:  # keep what qsmkit run reads from the sidecar
            meta[key] = pha.meta[key]
    if "MagneticFieldStrength" not in meta and own and isinstance(pha.meta.get("b0"), (int, float)):
        meta["MagneticFieldStrength"] = pha.meta["b0"]
    io.save_volume(args.out_magnitude, res.magnitude, mag.affine, sidecar=meta)
    io.save_volume(args.out_phase, res.phase, mag.affine, sidecar={**meta, "units": "rad"})
    if args.out_sensitivities and res.sensitivities is not None:
        io.save_volume(outs[2], np.abs(res.sensitivities), mag.affine, sidecar=meta)
        io.save_volume(outs[3], np.angle(res.sensitivities), mag.affine,
                       sidecar={**meta, "units": "rad"})
    if not args.quiet:
        print(f"combined {mag.data.shape[-1]} channels ({method}) in "
              f"{time.perf_counter() - t0:.1f} s; wrote {args.out_magnitude} and {args.out_phase}")


def cmd_field(args):
    """Total field from (multi-)echo magnitude and phase: the field in ppm and Hz, its noise SD
    and the noise weights for background removal, and the echo-combined magnitude."""
    from .echoes import fit_field

    mag, pha, te, b0 = _read_inputs(args)
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
    uparams = parse_params(args.unwrapping_param)
    mag3 = combine_magnitude(mag.data)

    def unwrap3(p, mask=None):
        return unwrap(p, mask=mask, voxel_size=pha.voxel_size, magnitude=mag3, **uparams)

    params = parse_params(args.field_param)
    t0 = time.perf_counter()
    fit = fit_field(mag.data, pha.data, te, b0, unwrap3, mask, **params)
    meta = sidecar(extra={"stage": "field", "unwrapping": unwrap_method,
                          "unwrapping_parameters": uparams, "parameters": params, "info": fit.info,
                          "te": te, "b0": b0, "seconds": round(time.perf_counter() - t0, 3),
                          "inputs": {"magnitude": args.magnitude, "phase": args.phase,
                                     "dicom": args.dicom, "mask": args.mask}})
    units_of = {"field_ppm": "ppm", "field_hz": "Hz", "noise_sd_ppm": "ppm", "weights": "1",
                "magnitude_combined": "a.u.", "mask": "1"}
    for name, path in outs.items():
        data = mask if name == "mask" else getattr(fit, name)
        io.save_volume(path, data, pha.affine, sidecar={**meta, "units": units_of[name]},
                       dtype=np.uint8 if name == "mask" else np.float32)
    if not args.quiet:
        print(f"field from {len(te)} echo(es) ({fit.info.get('field_method', 'single echo')}); "
              f"wrote {stem}_ppm.nii.gz, _hz, _noise_sd_ppm, _weights, _magnitude, _mask")


def cmd_background(args):
    vol, field = load_field(args.field, args.field_units, args.b0, args.te, allow_nan=True)
    mask = load_mask(args.mask, vol)
    field = field_in_mask(field, mask, args.field)
    weights = load_weights(args, vol)
    out_mask = args.out_mask or io.image_stem(args.out) + "_mask.nii.gz"
    check_outputs([args.out, out_mask], [args.field, args.mask, args.weights, args.noise,
                                         args.magnitude])
    device = backend.resolve_device(args.device)
    method = BACKGROUND.resolve(args.method)
    params = parse_params(args.param)
    b0_dir = b0_dir_for(vol, args.b0_dir)
    t0 = time.perf_counter()
    func = BACKGROUND.get(method).func
    if args.magnitude:
        if not accepts(func, "magnitude"):
            raise QSMInputError(f"{args.magnitude}: --magnitude is used by tfi only; {method} "
                                "takes noise weights (--weights)")
        params["magnitude"] = backend.to_device(
            load_magnitude_like(args.magnitude, vol), device, backend.FLOAT)
    local, new_mask, info = func(
        backend.to_device(field, device, backend.FLOAT), backend.to_device(mask, device),
        vol.voxel_size, b0_dir,
        weights=None if weights is None else backend.to_device(weights, device, backend.FLOAT),
        **params)
    params.pop("magnitude", None)
    meta = sidecar(extra={"stage": "background", "method": method, "parameters": params,
                          "info": info, "device": backend.device_name(device),
                          "seconds": round(time.perf_counter() - t0, 3), "units": "ppm",
                          "b0_dir_voxel": list(map(float, b0_dir)),
                          "inputs": {"field": args.field, "mask": args.mask,
                                     "weights": args.weights, "noise": args.noise,
                                     "magnitude": args.magnitude,
                                     "field_units": args.field_units}})
    io.save_volume(args.out, backend.to_numpy(local), vol.affine, sidecar=meta)
    io.save_volume(out_mask, backend.to_numpy(new_mask), vol.affine, dtype=np.uint8, sidecar=meta)


def cmd_invert(args):
    vol, field = load_field(args.field, args.field_units, args.b0, args.te, allow_nan=True)
    mask = load_mask(args.mask, vol)
    field = field_in_mask(field, mask, args.field)
    mag = load_magnitude_like(args.magnitude, vol) if args.magnitude else None
    region = None
    if args.reference and args.reference != "mask":
        rvol = io.load_volume(args.reference, what="reference region")
        io.check_same_grid(vol, rvol, "field", "reference region")
        labels = np.rint(np.asarray(rvol.data)).astype(np.int64)
        region = labels == args.reference_label if args.reference_label is not None else labels > 0
        if not (region & mask).any():
            raise QSMInputError("reference region has no voxels inside the mask", args.reference)
    check_outputs([args.out], [args.field, args.mask, args.magnitude,
                               None if args.reference == "mask" else args.reference])
    device = backend.resolve_device(args.device)
    method = INVERSION.resolve(args.method)
    params = parse_params(args.param)
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
    meta = sidecar(extra={"stage": "inversion", "method": method, "parameters": params,
                          "info": info, "device": backend.device_name(device), "units": "ppm",
                          "seconds": round(time.perf_counter() - t0, 3),
                          "b0_dir_voxel": list(map(float, b0_dir)),
                          "inputs": {"field": args.field, "mask": args.mask,
                                     "magnitude": args.magnitude,
                                     "field_units": args.field_units}})
    io.save_volume(args.out, backend.to_numpy(chi), vol.affine, sidecar=meta)


def cmd_stats(args):
    from . import stats

    chi = io.load_volume(args.chi, what="chi map")
    if chi.data.ndim != 3:
        raise QSMInputError(f"chi map must be 3-D, got shape {chi.data.shape}", args.chi)
    io.require_finite(chi.data, args.chi, "chi map")
    base = io.image_stem(args.out)
    # beside the table: a JSON sidecar (parameters and rows) unless the table is JSON itself,
    # and the bar chart; a cohort table being appended to gets neither
    meta_path = None if args.append or args.out.endswith(".json") else base + ".json"
    png_path = None if args.append or args.no_plot else base + ".png"
    extra_outputs = [p for p in (meta_path, png_path) if p]
    check_outputs([args.out, *extra_outputs], [args.chi, args.labels, args.label_names])
    if args.labels.endswith(".seg.nrrd"):
        regions, affine = stats.read_segmentation(args.labels)
        shape = regions[0].mask.shape
    else:
        lab = io.load_volume(args.labels, what="label map")
        if lab.data.ndim != 3:
            raise QSMInputError(f"label map must be 3-D, got shape {lab.data.shape}", args.labels)
        labels = np.rint(lab.data).astype(np.int64)
        names = stats.read_label_names(args.label_names) if args.label_names else {}
        regions, affine, shape = None, lab.affine, labels.shape
    if not geometry.same_grid(chi.affine, chi.shape3, affine, shape):
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
        if regions:
            regions = resampled
        else:
            labels = resampled[0].mask
    if regions is None:
        regions = stats.regions_from_label_map(labels, names)
    subject = args.subject if (args.subject or args.append) else None
    if args.append and subject is None:
        subject = io.image_stem(os.path.basename(args.chi))
    rows = stats.roi_table(chi.data, regions, chi.voxel_size, reference=args.reference,
                           erode_mm=args.erode)
    stats.write_table(rows, args.out, subject=subject, append=args.append)
    ref = stats.resolve_reference(args.reference, regions)
    ref_name = next((r.name for r in regions if r.label == ref), None)
    if meta_path:
        meta = sidecar(extra={"stage": "stats", "units": "ppm", "rows": rows,
                              "parameters": {"reference": args.reference, "reference_name": ref_name,
                                             "erode_mm": args.erode, "resample": args.resample,
                                             "subject": subject},
                              "inputs": {"chi": args.chi, "labels": args.labels,
                                         "label_names": args.label_names}})
        io.write_json(meta_path, meta)
    if png_path:
        stats.plot_referenced_means(rows, png_path, ref_name, title=os.path.basename(args.chi))
    if not args.quiet:
        print(f"{'label':>5} {'name':<24} {'voxels':>8} {'mean':>9} {'mean_ref':>9}  (ppm)")
        for r in rows:
            print(f"{r['label']:>5} {r['name']:<24} {r['voxels']:>8} {r['mean']:>9.4f} "
                  f"{r['mean_ref']:>9.4f}")


def cmd_batch(args):
    from .batch import run_batch

    # masking and unwrapping are resolved here, where --use-fsl applies: the workers (other
    # processes, perhaps other machines) then run exactly the methods this command chose
    config = {"masking": MASKING.resolve(args.masking),
              "unwrapping": UNWRAPPING.resolve(args.unwrapping), "background": args.background,
              "inversion": args.inversion, "device": backend.resolve_device(args.device),
              "masking_params": parse_params(args.masking_param),
              "unwrapping_params": parse_params(args.unwrapping_param),
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
              f"{len(summary['failed'])} failed; derivatives in {summary['out']}"
              + (f"; cohort table {summary['group_table']}" if summary["group_table"] else ""))
    if summary["failed"]:
        raise PartialFailure()


class PartialFailure(Exception):
    """Some subjects of a batch failed (exit status 1); the others completed."""


def cmd_demo(args):
    from . import demo

    demo.run_demo(args.out, shape=tuple(args.shape), voxel_size=tuple(args.voxel_size),
                  seed=args.seed, snr=args.snr, te=tuple(args.te), b0=args.b0,
                  config=_config(args), quiet=args.quiet)


# ---------------------------------------------------------------- parser

def _add_common(p):
    p.add_argument("--device", default="auto", choices=["cpu", "gpu", "auto"],
                   help="compute device (default: auto = GPU when cupy sees one)")
    p.add_argument("--precision", default="float32", choices=["float32", "float64"],
                   help="working precision (default float32; float64 for a reference run, "
                        "twice the memory; outputs are written as float32)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")


def _add_b0_dir(p):
    p.add_argument("--b0-dir", nargs=3, type=float, metavar=("X", "Y", "Z"),
                   help="B0 direction in world (RAS) coordinates; default: scanner z from the "
                        "image geometry")


def _add_field_units(p):
    p.add_argument("--field-units", default="ppm", choices=units.FIELD_UNITS,
                   help="units of the field input (default ppm; hz needs --b0, rad --b0 and --te)")
    p.add_argument("--b0", type=float, help="field strength (T), for hz/rad field units")
    p.add_argument("--te", type=float, nargs="+", help="echo time (s), for rad field units")


def _add_fsl(p):
    p.add_argument("--use-fsl", choices=_fsl.USE_FSL_CHOICES,
                   help="auto (default): FSL bet/prelude for 'auto' masking/unwrapping when FSL "
                        "is installed; never: embedded methods; always: FSL or an error")
    p.add_argument("--fsl-dir", metavar="DIR", help="FSL folder (default: $FSLDIR)")


def _add_methods(p):
    _add_fsl(p)
    p.add_argument("--masking", default="auto", choices=MASKING.choices())
    p.add_argument("--unwrapping", default="auto", choices=UNWRAPPING.choices())
    p.add_argument("--background", default="auto", choices=BACKGROUND.choices())
    p.add_argument("--inversion", default="auto", choices=INVERSION.choices())
    for stage in ("masking", "unwrapping", "background", "inversion"):
        p.add_argument(f"--{stage}-param", action="append", metavar="KEY=VALUE",
                       help=f"parameter of the {stage} method (repeatable)")
    p.add_argument("--field-param", action="append", metavar="KEY=VALUE",
                   help="multi-echo field fit: method=linear|nonlinear|difference, offset=fit|none, "
                        "magnitude_combination=rms|t2star|te (repeatable)")


def _coil_methods():
    from .coils import COMBINATION

    return COMBINATION.names()


def build_parser():
    parser = OneLineParser(prog="qsmkit", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"qsmkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    p = sub.add_parser("demo", help="simulate the built-in phantom and run the whole pipeline on it")
    p.add_argument("--out", default="demo-output", help="output folder (default demo-output)")
    p.add_argument("--shape", nargs=3, type=int, default=[256, 256, 64])
    p.add_argument("--voxel-size", nargs=3, type=float, default=[0.9375, 0.9375, 2.5])
    p.add_argument("--te", nargs="+", type=float, default=[0.020], help="echo times (s)")
    p.add_argument("--b0", type=float, default=3.0, help="field strength (T)")
    p.add_argument("--snr", type=float, default=100.0)
    p.add_argument("--seed", type=int, default=0)
    _add_methods(p)
    _add_common(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("run", help="the whole pipeline: magnitude + phase -> chi")
    p.add_argument("--magnitude", nargs="+", help="4-D file or one file per echo")
    p.add_argument("--phase", nargs="+", help="4-D file or one file per echo (rad, or vendor "
                   "integer phase scaled per the sidecar's Manufacturer)")
    p.add_argument("--dicom", nargs="+", metavar="PATH", help="DICOM folder(s)/files or dcm2niix "
                   "NIfTI with sidecars holding both magnitude and phase (instead of "
                   "--magnitude/--phase)")
    p.add_argument("--series", nargs="+", type=int, metavar="N", help="with --dicom: the series "
                   "number, or the magnitude and the phase series numbers")
    p.add_argument("--te", nargs="+", type=float, help="echo times (s); default from a JSON sidecar")
    p.add_argument("--b0", type=float, help="field strength (T); default from a JSON sidecar")
    p.add_argument("--mask", help="brain mask (skips masking)")
    p.add_argument("--apodize", type=float, default=0.0, metavar="ALPHA",
                   help="Tukey k-space window on the complex data before the field fit, against "
                   "Gibbs rings at low matrix sizes (0 off, 1 Hann; see qsmkit.kspace)")
    p.add_argument("--steep-field", type=float, default=0.0, metavar="FENCE",
                   help="drop mask voxels whose field gradient lies beyond Q3 + FENCE x IQR before "
                   "background removal (e.g. 3: next to sinuses); 0 off")
    p.add_argument("--out", required=True, help="output folder")
    _add_methods(p)
    _add_b0_dir(p)
    _add_common(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("simulate", help="write a phantom data set with ground truth")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--shape", nargs=3, type=int, default=[256, 256, 64])
    p.add_argument("--voxel-size", nargs=3, type=float, default=[0.9375, 0.9375, 2.5])
    p.add_argument("--te", nargs="+", type=float, default=[0.020], help="echo times (s)")
    p.add_argument("--b0", type=float, default=3.0, help="field strength (T)")
    p.add_argument("--snr", type=float, default=100.0)
    p.add_argument("--coils", type=int, default=0, help="number of receive coils (0: combined)")
    p.add_argument("--body-coil", action="store_true", help="also write a body-coil image")
    p.add_argument("--no-phase-offset", dest="phase_offset", action="store_false",
                   help="no receiver phase offset at TE = 0")
    p.add_argument("--b0-dir", nargs=3, type=float, metavar=("X", "Y", "Z"),
                   help="B0 direction in voxel axes (the written affine is rotated to match)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("combine", help="coil combination: channel images -> one magnitude and "
                       "phase per echo")
    p.add_argument("--magnitude", required=True, help="channel magnitudes, 4-D (x, y, z, channel) "
                   "or 5-D (x, y, z, echo, channel); or complex channel images (then no --phase)")
    p.add_argument("--phase", help="channel phases, same shape (rad or vendor units)")
    p.add_argument("--body-magnitude", help="body-coil magnitude, 3-D or 4-D (echoes)")
    p.add_argument("--body-phase", help="body-coil phase, same shape")
    p.add_argument("--te", nargs="+", type=float, help="echo times (s); default from a JSON sidecar")
    p.add_argument("--mask", help="signal/object mask (default: from the magnitude)")
    p.add_argument("--method", default="auto", choices=["auto", *_coil_methods()],
                   help="auto: bodycoil with a body coil, else mcpc3ds for 2+ echoes, else adaptive")
    p.add_argument("--param", action="append", metavar="KEY=VALUE")
    p.add_argument("--out-magnitude", required=True)
    p.add_argument("--out-phase", required=True)
    p.add_argument("--out-sensitivities", metavar="FILE", help="also write the channel "
                   "sensitivities: magnitude to FILE, phase to FILE_phase.nii.gz")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_combine)

    p = sub.add_parser("field", help="total field from (multi-)echo magnitude and phase: ppm, Hz, "
                       "noise SD and PDF weights")
    p.add_argument("--magnitude", nargs="+", help="4-D file or one file per echo")
    p.add_argument("--phase", nargs="+", help="4-D file or one file per echo")
    p.add_argument("--dicom", nargs="+", metavar="PATH", help="DICOM / dcm2niix input instead")
    p.add_argument("--series", nargs="+", type=int, metavar="N")
    p.add_argument("--te", nargs="+", type=float, help="echo times (s); default from a JSON sidecar")
    p.add_argument("--b0", type=float, help="field strength (T); default from a JSON sidecar")
    p.add_argument("--mask", help="brain mask (default: computed with --masking)")
    p.add_argument("--out", required=True, help="output stem: STEM_ppm.nii.gz, STEM_hz.nii.gz, "
                   "STEM_noise_sd_ppm.nii.gz, STEM_weights.nii.gz, STEM_magnitude.nii.gz, "
                   "STEM_mask.nii.gz")
    _add_fsl(p)
    p.add_argument("--masking", default="auto", choices=MASKING.choices())
    p.add_argument("--unwrapping", default="auto", choices=UNWRAPPING.choices())
    p.add_argument("--unwrapping-param", action="append", metavar="KEY=VALUE")
    p.add_argument("--field-param", action="append", metavar="KEY=VALUE",
                   help="method=linear|nonlinear|difference, offset=fit|none, "
                        "magnitude_combination=rms|t2star|te, noise_sigma=SD")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_field)

    p = sub.add_parser("mask", help="brain mask from magnitude")
    p.add_argument("--magnitude", nargs="+", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--method", default="auto", choices=MASKING.choices())
    p.add_argument("--erode", type=float, default=0.0, help="erode the mask by this many mm")
    p.add_argument("--param", action="append", metavar="KEY=VALUE")
    _add_fsl(p)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_mask)

    p = sub.add_parser("unwrap", help="spatial phase unwrapping (rad in, rad out)")
    p.add_argument("--phase", nargs="+", required=True)
    p.add_argument("--magnitude")
    p.add_argument("--mask")
    p.add_argument("--out", required=True)
    p.add_argument("--method", default="auto", choices=UNWRAPPING.choices())
    p.add_argument("--param", action="append", metavar="KEY=VALUE")
    _add_fsl(p)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_unwrap)

    p = sub.add_parser("background", help="background field removal: total field -> local field")
    p.add_argument("--field", required=True)
    p.add_argument("--mask", required=True)
    p.add_argument("--out", required=True, help="local field (ppm)")
    p.add_argument("--out-mask", help="where the local field is valid (default OUT_mask.nii.gz)")
    p.add_argument("--method", default="auto", choices=BACKGROUND.choices())
    p.add_argument("--weights", help="noise weights, e.g. the magnitude (PDF; larger = more reliable)")
    p.add_argument("--noise", help="field noise SD map (PDF weights = 1/SD)")
    p.add_argument("--magnitude", help="magnitude image for tfi's edge prior (without it tfi "
                                       "uses plain TV)")
    p.add_argument("--param", action="append", metavar="KEY=VALUE")
    _add_field_units(p)
    _add_b0_dir(p)
    _add_common(p)
    p.set_defaults(func=cmd_background)

    p = sub.add_parser("invert", help="dipole inversion: local field -> chi (ppm)")
    p.add_argument("--field", required=True)
    p.add_argument("--mask", required=True)
    p.add_argument("--magnitude")
    p.add_argument("--out", required=True)
    p.add_argument("--method", default="auto", choices=INVERSION.choices())
    p.add_argument("--param", action="append", metavar="KEY=VALUE")
    p.add_argument("--reference", metavar="mask|REGION.nii.gz",
                   help="report chi relative to the mean over the whole mask, or over a region "
                        "(a mask or label image, e.g. CSF); default: as the inversion gives it")
    p.add_argument("--reference-label", type=int, metavar="N",
                   help="with a label image as --reference: the label of the region")
    _add_field_units(p)
    _add_b0_dir(p)
    _add_common(p)
    p.set_defaults(func=cmd_invert)

    p = sub.add_parser("batch", help="a BIDS dataset: every subject on Dask workers, derivatives "
                                     "and a cohort table; exit 1 if some subjects failed")
    p.add_argument("bids_dir")
    p.add_argument("--out", help="derivatives folder (default BIDS_DIR/derivatives/qsmkit)")
    p.add_argument("--participant-label", nargs="+", metavar="LABEL", help="subjects to process")
    p.add_argument("--session-label", nargs="+", metavar="LABEL", help="sessions to process")
    p.add_argument("--workers", type=int, help="local worker processes (default: cores / 2)")
    p.add_argument("--memory-limit", default="auto", help="per local worker, e.g. 4GB")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="an existing Dask scheduler, e.g. tcp://host:8786 (dask-jobqueue on SLURM)")
    p.add_argument("--force", action="store_true", help="redo subjects whose outputs are complete")
    p.add_argument("--reference", help="reference region for the ROI statistics (e.g. csf)")
    for stage, reg in (("masking", MASKING), ("unwrapping", UNWRAPPING), ("background", BACKGROUND),
                       ("inversion", INVERSION)):
        p.add_argument(f"--{stage}", default="auto", choices=reg.choices())
        p.add_argument(f"--{stage}-param", action="append", metavar="KEY=VALUE")
    _add_fsl(p)
    _add_common(p)
    p.set_defaults(func=cmd_batch)

    p = sub.add_parser("stats", help="chi statistics per label, referenced")
    p.add_argument("--chi", required=True)
    p.add_argument("--labels", required=True)
    p.add_argument("--label-names", help="label names: FreeSurfer LUT, ITK-SNAP label file, "
                                            "CSV or BIDS dseg.tsv")
    p.add_argument("--reference", help="reference region: label index or name (e.g. csf)")
    p.add_argument("--erode", type=float, default=0.0, metavar="MM",
                   help="erode every region (reference included) by this many mm first")
    p.add_argument("--resample", action="store_true",
                   help="resample labels on another grid onto the chi grid (nearest neighbour)")
    p.add_argument("--out", required=True,
                   help="table: .csv, .tsv or .json (also writes OUT.json with the parameters "
                        "and OUT.png, a bar chart, unless --append)")
    p.add_argument("--subject", help="add a leading subject column (cohort tables, long format)")
    p.add_argument("--append", action="store_true",
                   help="append rows to an existing cohort table (subject defaults to the chi "
                        "file name)")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG bar chart")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_stats)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _configure_fsl(args)
        with backend.precision(getattr(args, "precision", "float32")):
            args.func(args)
    except QSMInputError as err:
        print(f"qsmkit: error: {err}", file=sys.stderr)
        return 2
    except PartialFailure:
        return 1
    except MemoryError:
        print("qsmkit: error: out of memory (try a smaller volume or --device cpu)",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("qsmkit: interrupted; no partial output was left", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
