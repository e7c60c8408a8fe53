"""FSL BET (brain mask) and PRELUDE (phase unwrapping), called through fslpy's wrappers.

The method this package is built around masks with BET (Smith, Hum Brain Mapp 2002;17:143)
and unwraps with PRELUDE (Jenkinson, MRM 2003;49:193). Both are FSL programs: this module
finds an FSL installation, writes the arrays to a temporary NIfTI with the input's geometry,
runs the tool through :mod:`fsl.wrappers` (fslpy) and reads the result back, checking that
it is on the input's voxel grid.

Importing this module registers ``bet`` in :data:`qsmkit.masking.MASKING` and ``prelude``
in :data:`qsmkit.unwrapping.UNWRAPPING`, and makes those stages' ``auto`` choice depend on
:data:`USE_FSL`:

- ``"auto"`` (default, as DESIGN.md specifies): BET / PRELUDE when FSL is usable (a valid
  FSL directory and fslpy importable), the embedded methods otherwise. The resolved name is
  what the pipeline records in its JSON sidecar, so a run always says which one it used
  (see :func:`provenance` for the FSL directory and version to record as well);
- ``"never"``: always the embedded methods; naming ``bet`` / ``prelude`` is an error;
- ``"always"``: BET / PRELUDE, and an error that says how to install FSL when it is absent.

The stage functions receive a voxel size, not an affine; they hand FSL a diagonal affine
built from it. BET and PRELUDE work in voxel / millimetre space (BET's surface model is in
mm, PRELUDE's phase splitting is per voxel), so the result does not depend on the position
or orientation of the grid in the scanner; :func:`run_bet` / :func:`run_prelude` accept the
real affine when the caller has one.

fslpy locates FSL through ``$FSLDIR`` (``fsl.utils.platform.platform.fsldir``) and writes
with ``$FSLOUTPUTTYPE``; both are set for the duration of a call (``NIFTI_GZ`` unless the
user chose another type) under a lock, since they are process-wide environment variables.
"""

from __future__ import annotations

import contextlib
import glob
import os
import tempfile
import threading

import nibabel as nib
import numpy as np

from .errors import QSMInputError
from .masking import MASKING, erode_mm
from .unwrapping import UNWRAPPING

#: Where FSL's installer and instructions are.
FSL_INSTALL_URL = "https://fsl.fmrib.ox.ac.uk/fsl/docs/#/install/index"
#: The FSL programs qsmkit calls; an FSL directory is valid when ``bin/`` holds all of them.
TOOLS = ("bet", "prelude")
USE_FSL_CHOICES = ("auto", "never", "always")

#: ``"auto"`` | ``"never"`` | ``"always"``: whether the ``auto`` masking / unwrapping choice is
#: BET / PRELUDE (set it with :func:`configure`; the CLI's ``--use-fsl``).
USE_FSL = "auto"
#: An FSL directory that takes precedence over ``$FSLDIR`` (the CLI's ``--fsl-dir``).
FSL_DIR: str | None = None

#: Extensions FSL writes, by ``$FSLOUTPUTTYPE``; the reader accepts any of them.
_OUTPUT_EXTENSIONS = (".nii.gz", ".nii", ".hdr", ".hdr.gz")
_ENV_LOCK = threading.RLock()
_STDERR_LIMIT = 600


class FSLNotFoundError(QSMInputError):
    """FSL (or fslpy) is not installed or not found; the message says how to install it."""


class FSLToolError(QSMInputError):
    """An FSL program failed or wrote an unusable result; the message holds its stderr.

    Attributes ``tool``, ``command`` (argument list), ``returncode`` and ``stderr`` (full).
    """

    def __init__(self, message, *, tool=None, command=None, returncode=None, stderr=""):
        super().__init__(message)
        self.tool = tool
        self.command = list(command or [])
        self.returncode = returncode
        self.stderr = stderr


# ----------------------------------------------------------------------------- finding FSL


def configure(use_fsl: str | None = None, fsl_dir: str | None = None) -> None:
    """Set :data:`USE_FSL` and/or :data:`FSL_DIR` (the CLI's ``--use-fsl`` / ``--fsl-dir``)."""
    global USE_FSL, FSL_DIR
    if use_fsl is not None:
        mode = str(use_fsl).lower()
        if mode not in USE_FSL_CHOICES:
            raise QSMInputError(f"--use-fsl must be one of {', '.join(USE_FSL_CHOICES)}, got {use_fsl!r}")
        USE_FSL = mode
    if fsl_dir is not None:
        FSL_DIR = os.fspath(fsl_dir) or None


def _use_fsl_mode() -> str:
    mode = str(USE_FSL).lower()
    if mode not in USE_FSL_CHOICES:
        raise QSMInputError(f"qsmkit.fsl.USE_FSL must be one of {', '.join(USE_FSL_CHOICES)}, "
                            f"got {USE_FSL!r}")
    return mode


def _embedded_names() -> str:
    return (f"masking 'auto' uses {_resolve_name(_EMBEDDED['masking'])!r} and unwrapping 'auto' "
            f"uses {_resolve_name(_EMBEDDED['unwrapping'])!r}")


def _install_hint() -> str:
    return (f"install FSL ({FSL_INSTALL_URL}) and set FSLDIR (or give --fsl-dir), or use the "
            f"embedded methods: without FSL, {_embedded_names()}")


def _candidate(setting=None) -> tuple[str | None, str]:
    """(directory, where it came from): ``setting``, else :data:`FSL_DIR`, else ``$FSLDIR``."""
    if setting is not None and str(setting).strip():
        return os.path.expanduser(os.fspath(setting).strip()), "the given FSL directory"
    if FSL_DIR:
        return os.path.expanduser(FSL_DIR), "--fsl-dir"
    env = os.environ.get("FSLDIR", "").strip()
    if env:
        return env, "$FSLDIR"
    return None, ""


def _missing_tools(fsldir: str) -> list[str]:
    missing = []
    for tool in TOOLS:
        path = os.path.join(fsldir, "bin", tool)
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            missing.append(f"bin/{tool}")
    return missing


def fsl_unavailable_reason(setting=None) -> str | None:
    """Why FSL cannot be used here (one line), or ``None`` when it can.

    FSL is usable when the FSL directory (``setting``, else :data:`FSL_DIR`, else ``$FSLDIR``)
    holds executable ``bin/bet`` and ``bin/prelude`` and fslpy is importable.
    """
    fsldir, source = _candidate(setting)
    if fsldir is None:
        return "FSLDIR is not set"
    if not os.path.isdir(fsldir):
        return f"{source} {fsldir} is not a directory"
    missing = _missing_tools(fsldir)
    if missing:
        return f"{source} {fsldir} lacks {' and '.join(missing)} (missing or not executable)"
    try:
        import fsl.wrappers  # noqa: F401
    except ImportError:
        return "fslpy is not installed (pip install fslpy)"
    return None


def find_fsldir(setting=None) -> str:
    """The FSL directory to use: ``setting`` first, else :data:`FSL_DIR`, else ``$FSLDIR``.

    Valid when ``<dir>/bin/bet`` and ``<dir>/bin/prelude`` exist and are executable.
    Raises :class:`FSLNotFoundError` naming what is missing and how to install FSL.
    """
    fsldir, source = _candidate(setting)
    if fsldir is None:
        raise FSLNotFoundError(f"FSL not found: FSLDIR is not set; {_install_hint()}")
    if not os.path.isdir(fsldir):
        raise FSLNotFoundError(f"FSL not found: {source} {fsldir} is not a directory; {_install_hint()}")
    missing = _missing_tools(fsldir)
    if missing:
        raise FSLNotFoundError(f"FSL not usable: {source} {fsldir} lacks {' and '.join(missing)} "
                               f"(missing or not executable); {_install_hint()}")
    return os.path.abspath(fsldir)


def fsl_available(setting=None) -> bool:
    """True when BET and PRELUDE can run here (see :func:`fsl_unavailable_reason`)."""
    return fsl_unavailable_reason(setting) is None


def fsl_version(fsldir) -> str | None:
    """FSL's version from ``<fsldir>/etc/fslversion`` (``None`` when absent)."""
    try:
        with open(os.path.join(fsldir, "etc", "fslversion"), encoding="utf-8") as f:
            text = f.read().strip()
    except OSError:
        return None
    return text.split(":")[0].strip() or None


def provenance(setting=None) -> dict:
    """What to record in a sidecar about FSL: the mode, directory, FSL and fslpy versions."""
    info = {"use_fsl": _use_fsl_mode(), "fsldir": None, "fsl_version": None, "fslpy_version": None}
    if fsl_unavailable_reason(setting) is None:
        fsldir = find_fsldir(setting)
        info["fsldir"] = fsldir
        info["fsl_version"] = fsl_version(fsldir)
        from fsl.version import __version__ as fslpy_version

        info["fslpy_version"] = fslpy_version
    return info


def _import_wrappers():
    try:
        import fsl.wrappers as wrappers
    except ImportError as exc:
        raise FSLNotFoundError(
            "fslpy is not installed: pip install fslpy; "
            f"FSL itself: {FSL_INSTALL_URL}"
        ) from exc
    return wrappers


@contextlib.contextmanager
def _fsl_environment(fsldir: str):
    """Point fslpy (and the FSL scripts it starts) at ``fsldir`` for the duration of a call.

    fslpy's ``runfsl`` looks for the program under ``fsl.utils.run.FSL_PREFIX``, then
    ``$FSLDEVDIR/bin``, then ``$FSLDIR/bin``; FSL's own scripts (``bet`` runs ``bet2``) read
    ``$FSLDIR``. Setting ``FSL_PREFIX`` to ``<fsldir>/bin`` and ``FSLDIR`` makes the validated
    installation the one that runs. ``FSLOUTPUTTYPE`` defaults to ``NIFTI_GZ`` when unset.
    """
    import fsl.utils.run as fslrun
    from fsl.utils.platform import platform as fslplatform

    with _ENV_LOCK:
        saved_env = {k: os.environ.get(k) for k in ("FSLDIR", "FSLOUTPUTTYPE")}
        saved_prefix = fslrun.FSL_PREFIX
        try:
            fslplatform.fsldir = fsldir  # sets $FSLDIR and notifies fslpy's listeners
            if not os.environ.get("FSLOUTPUTTYPE"):
                os.environ["FSLOUTPUTTYPE"] = "NIFTI_GZ"
            fslrun.FSL_PREFIX = os.path.join(fsldir, "bin")
            yield
        finally:
            fslrun.FSL_PREFIX = saved_prefix
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _run_tool(tool: str, wrapper, fsldir: str, *args, **kwargs) -> list[str]:
    """Run an fslpy wrapper; return the command line; raise :class:`FSLToolError` on failure."""
    with _fsl_environment(fsldir):
        command = list(wrapper(*args, cmdonly=True, **kwargs))
        try:
            result = wrapper(*args, stdout=True, stderr=True, exitcode=True, log={"tee": False},
                             **kwargs)
        except (OSError, RuntimeError) as exc:  # e.g. the program cannot be executed at all
            raise FSLToolError(f"FSL {tool} could not run ({exc})", tool=tool, command=command) from exc
    # FileOrThing wrappers return a Results dict whose .stdout is (stdout, stderr, exitcode)
    out = getattr(result, "stdout", result)
    _stdout, stderr, code = out
    if code != 0:
        tail = " ".join(stderr.split())
        if len(tail) > _STDERR_LIMIT:
            tail = "..." + tail[-_STDERR_LIMIT:]
        raise FSLToolError(f"FSL {tool} failed with exit code {code}: {tail or '(no error output)'}",
                           tool=tool, command=command, returncode=code, stderr=stderr)
    return command


# ----------------------------------------------------------------------------- arrays <-> files


def _affine(affine_or_voxel_size) -> np.ndarray:
    a = np.asarray(affine_or_voxel_size, dtype=np.float64)
    if a.shape == (4, 4):
        return a
    if a.shape == (3,):
        if not np.all(np.isfinite(a)) or np.any(a <= 0):
            raise QSMInputError(f"voxel size must be three positive numbers, got {a.tolist()}")
        # BET and PRELUDE work in voxel/mm space: a diagonal affine (origin at the grid
        # centre) carries all they use, the voxel size.
        return np.diag([*a, 1.0])
    raise QSMInputError(f"expected a 4x4 affine or 3 voxel sizes, got shape {a.shape}")


def _write(path: str, data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Write NIfTI (scanner xform codes); return the affine as stored (float32 in the header)."""
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, path)
    return nib.load(path).affine


def _find_output(prefix: str, tool: str, command) -> str:
    for ext in _OUTPUT_EXTENSIONS:
        if os.path.isfile(prefix + ext):
            return prefix + ext
    found = sorted(os.path.basename(p) for p in glob.glob(os.path.join(os.path.dirname(prefix), "*")))
    raise FSLToolError(f"FSL {tool} reported success but wrote no {os.path.basename(prefix)}.* "
                       f"(files present: {', '.join(found) or 'none'})", tool=tool, command=command)


def _read_on_grid(path: str, shape, affine: np.ndarray, tool: str, command) -> np.ndarray:
    img = nib.load(path)
    data = np.asarray(img.dataobj)
    while data.ndim > len(shape) and data.shape[-1] == 1:
        data = data[..., 0]
    if tuple(data.shape) != tuple(shape):
        raise FSLToolError(f"FSL {tool} output {os.path.basename(path)} has shape {data.shape}, "
                           f"expected {tuple(shape)}", tool=tool, command=command)
    tol = 1e-3 * max(1.0, float(np.max(np.abs(affine[:3, :3]))))
    if not np.allclose(img.affine, affine, atol=tol):
        diff = float(np.max(np.abs(img.affine - affine)))
        raise FSLToolError(f"FSL {tool} output {os.path.basename(path)} is not on the input grid "
                           f"(affine differs by {diff:.3g})", tool=tool, command=command)
    return data


def _finite(name, a):
    if not np.all(np.isfinite(a)):
        raise QSMInputError(f"{name} contains {int(np.sum(~np.isfinite(a)))} NaN/Inf voxels")


# ----------------------------------------------------------------------------- BET and PRELUDE


def run_bet(magnitude, affine_or_voxel_size, *, f=0.5, g=0.0, robust=True, fsldir=None, extra=None):
    """Brain mask of ``magnitude`` by FSL BET, on the input grid.

    Parameters
    ----------
    magnitude : (X, Y, Z) or (X, Y, Z, E) array; echoes are combined by root-mean-square.
    affine_or_voxel_size : 4x4 voxel-to-world affine, or 3 voxel sizes (mm).
    f : BET's fractional intensity threshold (``-f``, 0..1; smaller gives a larger brain).
    g : vertical gradient in ``f`` (``-g``, -1..1).
    robust : robust brain-centre estimation (``-R``).
    fsldir : FSL directory (default :data:`FSL_DIR`, then ``$FSLDIR``).
    extra : dict of further keyword arguments for :func:`fsl.wrappers.bet`
        (e.g. ``{"c": (x, y, z)}`` for the centre, ``{"t": True}``).

    Returns
    -------
    (X, Y, Z) bool array: ``<out>_mask`` from ``bet <in> <out> -m -n [-R] -f F -g G``.
    """
    mag = np.asarray(magnitude, dtype=np.float32)
    if mag.ndim == 4:
        mag = np.sqrt(np.mean(mag**2, axis=3))
    if mag.ndim != 3:
        raise QSMInputError(f"BET needs a 3-D magnitude (or 4-D echoes), got shape {mag.shape}")
    _finite("magnitude", mag)
    if not np.any(mag > 0):
        raise QSMInputError("magnitude is empty (all zero): cannot compute a mask")
    if not 0.0 <= float(f) <= 1.0:
        raise QSMInputError(f"BET -f must be in 0..1, got {f}")
    if not -1.0 <= float(g) <= 1.0:
        raise QSMInputError(f"BET -g must be in -1..1, got {g}")
    affine = _affine(affine_or_voxel_size)
    fsldir = find_fsldir(fsldir)
    wrappers = _import_wrappers()
    options = {"mask": True, "seg": False, "robust": bool(robust), "fracintensity": float(f),
               "g": float(g), **(extra or {})}
    with tempfile.TemporaryDirectory(prefix="qsmkit-bet-") as tmp:
        stored = _write(os.path.join(tmp, "magnitude.nii.gz"), mag, affine)
        prefix = os.path.join(tmp, "brain")
        command = _run_tool("bet", wrappers.bet, fsldir, os.path.join(tmp, "magnitude.nii.gz"),
                            prefix, **options)
        out = _find_output(prefix + "_mask", "bet", command)
        mask = _read_on_grid(out, mag.shape, stored, "bet", command) > 0
    if not mask.any():
        raise FSLToolError("FSL bet returned an empty mask; try a smaller -f (--param f=0.3) or "
                           "--masking threshold", tool="bet", command=command)
    return mask


def run_prelude(phase, magnitude=None, mask=None, affine=(1.0, 1.0, 1.0), fsldir=None, extra=None):
    """Unwrap ``phase`` (rad) with FSL PRELUDE, on the input grid.

    Runs ``prelude --abs=<magnitude> --phase=<phase> [--mask=<mask>] --out=<out>`` (fslpy's
    spelling of ``-a -p -m -o``).

    Parameters
    ----------
    phase : (X, Y, Z) array, wrapped phase in radians (PRELUDE accepts -pi..pi or 0..2pi);
        a 4-D array is unwrapped volume by volume by PRELUDE.
    magnitude : same shape; PRELUDE uses it to weight its region growing. ``None``
        gives a uniform magnitude.
    mask : optional boolean mask (3-D); outside it PRELUDE returns zero.
    affine : 4x4 affine or 3 voxel sizes (mm).
    fsldir : FSL directory (default :data:`FSL_DIR`, then ``$FSLDIR``).
    extra : dict of further keyword arguments for :func:`fsl.wrappers.prelude`
        (e.g. ``{"force3D": True}``, ``{"removeramps": True}``).

    Returns
    -------
    float32 array of ``phase``'s shape: the unwrapped phase (rad). As with any spatial
    unwrapping it may differ from the true phase by a constant multiple of 2 pi.
    """
    ph = np.asarray(phase, dtype=np.float32)
    if ph.ndim not in (3, 4):
        raise QSMInputError(f"PRELUDE needs a 3-D (or 4-D) phase, got shape {ph.shape}")
    _finite("phase", ph)
    lo, hi = float(ph.min()), float(ph.max())
    if lo < -np.pi - 1e-3 or hi > 2 * np.pi + 1e-3:
        raise QSMInputError(f"phase must be wrapped radians (range {lo:.4g}..{hi:.4g}); rescale vendor "
                            "phase first (qsmkit.units.rescale_phase)")
    mag = np.ones_like(ph) if magnitude is None else np.asarray(magnitude, dtype=np.float32)
    if mag.shape != ph.shape:
        raise QSMInputError(f"magnitude shape {mag.shape} does not match phase shape {ph.shape}")
    _finite("magnitude", mag)
    if mask is not None:
        mask = np.asarray(mask).astype(bool)
        if mask.shape != ph.shape[:3]:
            raise QSMInputError(f"mask shape {mask.shape} does not match phase shape {ph.shape[:3]}")
        if not mask.any():
            raise QSMInputError("mask is empty: nothing to unwrap")
    aff = _affine(affine)
    fsldir = find_fsldir(fsldir)
    wrappers = _import_wrappers()
    with tempfile.TemporaryDirectory(prefix="qsmkit-prelude-") as tmp:
        files = {"abs": os.path.join(tmp, "magnitude.nii.gz"),
                 "phase": os.path.join(tmp, "phase.nii.gz")}
        stored = _write(files["abs"], mag, aff)
        _write(files["phase"], ph, aff)
        if mask is not None:
            files["mask"] = os.path.join(tmp, "mask.nii.gz")
            _write(files["mask"], mask.astype(np.uint8), aff)
        prefix = os.path.join(tmp, "unwrapped")
        command = _run_tool("prelude", wrappers.prelude, fsldir, **files, out=prefix, **(extra or {}))
        out = _find_output(prefix, "prelude", command)
        result = _read_on_grid(out, ph.shape, stored, "prelude", command)
    return np.asarray(result, dtype=np.float32)


# ----------------------------------------------------------------------------- registry


def _check_tool(tool: str) -> None:
    """Registry check for an explicitly chosen ``bet`` / ``prelude``."""
    if _use_fsl_mode() == "never":
        raise QSMInputError(f"{tool} needs FSL, but FSL use is switched off (--use-fsl never)")
    find_fsldir()
    _import_wrappers()


def _check_bet():
    _check_tool("bet")


def _check_prelude():
    _check_tool("prelude")


@MASKING.register("bet", "FSL BET brain extraction (needs FSL)", check=_check_bet)
def mask_bet(magnitude, voxel_size, *, f=0.5, g=0.0, robust=True, erode=0.0, **extra):
    """FSL BET brain mask (Smith 2002), optionally eroded by ``erode`` mm.

    ``voxel_size`` becomes a diagonal affine: BET's surface model works in mm, so the
    grid's position and orientation do not change the mask. ``extra`` keywords go to
    :func:`fsl.wrappers.bet`.
    """
    mask = run_bet(magnitude, voxel_size, f=f, g=g, robust=robust, extra=extra or None)
    return erode_mm(mask, voxel_size, erode)


@UNWRAPPING.register("prelude", "FSL PRELUDE phase unwrapping (needs FSL)", check=_check_prelude)
def unwrap_prelude(phase, mask=None, voxel_size=None, magnitude=None, **extra):
    """FSL PRELUDE phase-region-expanding unwrapping (Jenkinson 2003) of one echo.

    ``voxel_size`` (default 1 mm) becomes a diagonal affine; PRELUDE works per voxel.
    Without ``magnitude`` a uniform one is used. Returns float32 radians.
    """
    vs = (1.0, 1.0, 1.0) if voxel_size is None else voxel_size
    return run_prelude(phase, magnitude, mask, vs, extra=extra or None)


def _resolve_name(default) -> str:
    return default() if callable(default) else default


def use_fsl_for_auto() -> bool:
    """Whether ``auto`` masking / unwrapping picks BET / PRELUDE under :data:`USE_FSL`."""
    mode = _use_fsl_mode()
    if mode == "never":
        return False
    if mode == "always":
        return True  # the tool's check then says how to install FSL when it is absent
    return fsl_available()


def _auto(stage: str, tool: str):
    def rule():
        return tool if use_fsl_for_auto() else _resolve_name(_EMBEDDED[stage])

    rule.qsmkit_fsl_rule = True
    return rule


def _install_auto_rules():
    """Make ``auto`` of masking / unwrapping go through :func:`use_fsl_for_auto`; the embedded
    default each registry had is kept as the fallback (idempotent under module reload)."""
    for stage, registry, tool in (("masking", MASKING, "bet"), ("unwrapping", UNWRAPPING, "prelude")):
        if not getattr(registry.default, "qsmkit_fsl_rule", False):
            _EMBEDDED[stage] = registry.default
        registry.set_default(_auto(stage, tool))


_EMBEDDED: dict = globals().get("_EMBEDDED", {})
_install_auto_rules()

__all__ = [
    "FSL_INSTALL_URL",
    "USE_FSL",
    "FSL_DIR",
    "FSLNotFoundError",
    "FSLToolError",
    "configure",
    "find_fsldir",
    "fsl_available",
    "fsl_unavailable_reason",
    "fsl_version",
    "provenance",
    "run_bet",
    "run_prelude",
    "mask_bet",
    "unwrap_prelude",
    "use_fsl_for_auto",
]
