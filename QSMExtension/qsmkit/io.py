"""Reading and writing images: NIfTI through nibabel, everything else through SimpleITK.

Arrays keep the file's voxel order, ``(X, Y, Z)`` or ``(X, Y, Z, E...)`` with
echoes and channels in the last axes. Geometry is a 4x4 voxel-to-world affine in
RAS+ millimetres (the nibabel convention); ITK's LPS physical space is converted
on the way in and out. Writes are atomic: data go to a temporary file in the
target directory (same extension, so the writer picks the same format) which is
then renamed over the target, so an interrupted run never leaves a half-written
file. Every bad input raises :class:`~qsmkit.errors.QSMInputError` with a
one-line message naming the file.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, field

import nibabel as nib
import numpy as np

from . import geometry
from .backend import to_numpy
from .errors import QSMInputError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: NIfTI xform code for "scanner anatomical" coordinates
_XFORM_SCANNER = 1
#: RAS <-> LPS: flip the first two world axes
_FLIP_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


class VoxelGrid:
    """Geometry read off ``data`` (voxel axes first) and ``affine`` (voxel to RAS+ mm), shared
    by every array-with-affine container (files here, Slicer nodes in ``slicer_adapter``)."""

    data: np.ndarray
    affine: np.ndarray

    @property
    def shape3(self) -> tuple:
        """Shape of the three spatial axes."""
        return tuple(int(n) for n in self.data.shape[:3])

    @property
    def voxel_size(self) -> np.ndarray:
        """Voxel size (mm) along each of the three voxel axes."""
        return geometry.voxel_size(self.affine)

    def b0_dir(self, b0_world=None) -> np.ndarray:
        """B0 as a unit vector in voxel axes; ``b0_world`` (world coordinates) overrides z."""
        return geometry.b0_direction(self.affine, b0_world)


@dataclass
class Volume(VoxelGrid):
    """An image array with its geometry.

    ``data`` is in the file's voxel order, ``(X, Y, Z)`` or ``(X, Y, Z, E...)``;
    ``affine`` maps voxel indices to RAS+ world millimetres; ``meta`` holds the
    content of a dcm2niix-style JSON sidecar when one sits beside the file (and,
    for files read through SimpleITK, the header key/values under
    ``"itk_metadata"``).
    """

    data: np.ndarray
    affine: np.ndarray
    path: str | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.affine.shape != (4, 4):
            raise QSMInputError(
                f"affine must be 4x4, got shape {self.affine.shape}", path=self.path
            )


# ----------------------------------------------------------------------------- helpers


def _is_nifti(path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def _short_reason(exc: BaseException, limit: int = 160) -> str:
    """A short one-line reason from an exception (ITK messages are long and multi-line)."""
    text = str(exc).strip() or type(exc).__name__
    if "ERROR:" in text:  # ITK / SimpleITK: keep what follows the last "ERROR:" tag
        text = text.rsplit("ERROR:", 1)[1]
        text = re.sub(r"^\s*\w+\(0x[0-9a-fA-F]+\):\s*", "", text)
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[: limit - 3].rstrip() + "..."
    return text or type(exc).__name__


def _native(a: np.ndarray) -> np.ndarray:
    """Native byte order (cupy and many numerics dislike big-endian arrays)."""
    return a if a.dtype.isnative else a.astype(a.dtype.newbyteorder("="))


def _default_dtype(a: np.ndarray) -> np.ndarray:
    """``dtype=None`` policy: ints kept, bool -> uint8, float -> float32, complex -> complex64."""
    if a.dtype == np.bool_:
        return a.astype(np.uint8)
    if np.issubdtype(a.dtype, np.integer):
        return a
    if np.issubdtype(a.dtype, np.complexfloating):
        return a.astype(np.complex64, copy=False)
    if np.issubdtype(a.dtype, np.floating):
        return a.astype(np.float32, copy=False)
    raise TypeError(f"unsupported voxel type {a.dtype}")


def _cast(a: np.ndarray, dtype) -> np.ndarray:
    """Cast to ``dtype``; real floats going to integers are rounded (not truncated)."""
    dtype = np.dtype(dtype)
    if a.dtype == dtype:
        return a
    if (np.issubdtype(dtype, np.integer) or dtype == np.bool_) and np.iscomplexobj(a):
        raise QSMInputError(f"cannot store complex data as {dtype}")
    if np.issubdtype(dtype, np.integer) and np.issubdtype(a.dtype, np.floating):
        a = np.rint(a)
    return a.astype(dtype)


def _check_ndim(data: np.ndarray, path, what: str) -> None:
    if data.ndim < 3:
        raise QSMInputError(f"{what} must be 3-D or 4-D, got shape {tuple(data.shape)}", path=path)


def image_stem(path) -> str:
    """The path without its image extension: ``x.nii.gz`` / ``x.nii`` / ``x.nrrd`` -> ``x``."""
    p = str(path)
    d, name = os.path.split(p)
    if name.lower().endswith(".gz"):
        name = name[:-3]
    stem, _ = os.path.splitext(name)
    if not stem:  # a name such as ".nii": keep it whole
        stem = name
    return os.path.join(d, stem)


def sidecar_path(path) -> str:
    """The JSON sidecar beside an image: ``x.nii.gz`` / ``x.nii`` / ``x.nrrd`` -> ``x.json``."""
    return image_stem(path) + ".json"


def read_sidecar(path) -> dict:
    """Content of a sibling JSON sidecar, or ``{}`` when absent, unreadable or not an object."""
    jp = sidecar_path(path)
    if os.path.abspath(jp) == os.path.abspath(str(path)) or not os.path.isfile(jp):
        return {}
    try:
        with open(jp, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


# ----------------------------------------------------------------------------- loading


def _integer_scaled(raw: np.ndarray, slope: float, inter: float):
    """Apply an integer-valued scl_slope / scl_inter to integer voxels, keeping an integer type.

    Siemens phase written by dcm2niix is stored as 0..4095 with slope 2, intercept -4096;
    keeping the result integer lets :func:`qsmkit.units.rescale_phase` recognise it.
    Returns ``None`` when the scaling is not integer-valued.
    """
    if slope == 1.0 and inter == 0.0:
        return raw
    if slope != int(slope) or inter != int(inter) or raw.size == 0:
        return None
    ends = np.array([raw.min(), raw.max()], dtype=np.float64) * slope + inter
    for dt in (raw.dtype, np.dtype(np.int16), np.dtype(np.int32)):
        info = np.iinfo(dt)
        if ends.min() >= info.min and ends.max() <= info.max:
            return (raw.astype(np.int64) * int(slope) + int(inter)).astype(dt)
    return None


def _load_nifti(path: str, what: str):
    img = nib.load(path, mmap=False)
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise TypeError(f"not a NIfTI image ({type(img).__name__})")
    disk = img.get_data_dtype()
    if disk.fields is not None:
        raise TypeError(f"unsupported voxel type {disk} (RGB/structured)")
    proxy = img.dataobj
    slope = getattr(proxy, "slope", 1.0)
    inter = getattr(proxy, "inter", 0.0)
    slope = 1.0 if slope is None or not np.isfinite(slope) or slope == 0 else float(slope)
    inter = 0.0 if inter is None or not np.isfinite(inter) else float(inter)
    if np.issubdtype(disk, np.integer) and hasattr(proxy, "get_unscaled"):
        raw = np.asarray(proxy.get_unscaled())
        data = _integer_scaled(raw, slope, inter)
        if data is None:  # non-integer scaling: real-valued data
            data = np.asarray(img.get_fdata(dtype=np.float32))
    elif np.issubdtype(disk, np.complexfloating):
        data = np.asarray(proxy)
    else:  # scaled integers or floats: let nibabel apply scl_slope / scl_inter
        data = np.asarray(img.get_fdata(dtype=np.float64 if disk.itemsize > 4 else np.float32))
    return _native(np.array(data, copy=True)), np.array(img.affine, dtype=np.float64), {}


def _sitk_affine(img) -> np.ndarray:
    """RAS voxel->world affine of a SimpleITK image (first three axes)."""
    dim = img.GetDimension()
    direction = np.array(img.GetDirection(), dtype=np.float64).reshape(dim, dim)[:3, :3]
    spacing = np.array(img.GetSpacing(), dtype=np.float64)[:3]
    origin = np.array(img.GetOrigin(), dtype=np.float64)[:3]
    lps = np.eye(4)
    lps[:3, :3] = direction * spacing  # scale the columns
    lps[:3, 3] = origin
    return _FLIP_LPS @ lps


def _load_sitk(path: str, what: str):
    import SimpleITK as sitk

    img = sitk.ReadImage(path)
    dim = img.GetDimension()
    arr = sitk.GetArrayFromImage(img)  # (z, y, x[, c]) or (t, z, y, x[, c])
    ncomp = img.GetNumberOfComponentsPerPixel()
    vector = ncomp > 1 and arr.ndim == dim + 1
    if dim < 3:
        shape = tuple(reversed(arr.shape[: arr.ndim - (1 if vector else 0)]))
        raise QSMInputError(f"{what} must be 3-D or 4-D, got shape {shape}", path=path)
    spatial = list(range(dim))[::-1]  # reverse the image axes: (x, y, z[, t]), components last
    arr = np.transpose(arr, spatial + ([dim] if vector else []))
    meta = {}
    try:
        keys = img.GetMetaDataKeys()
        if keys:
            meta["itk_metadata"] = {k: img.GetMetaData(k) for k in keys}
    except Exception:  # pragma: no cover - metadata is a bonus, never a failure
        pass
    return _native(np.ascontiguousarray(arr)), _sitk_affine(img), meta


def load_volume(path, *, dtype=None, what="image") -> Volume:
    """Load a NIfTI (nibabel) or any SimpleITK-readable image as a :class:`Volume`.

    ``dtype=None`` keeps integer voxel types (raw vendor phase stays integer so
    :func:`qsmkit.units.rescale_phase` can recognise it; NIfTI scl_slope / scl_inter
    with integer values, such as dcm2niix's Siemens phase, keep an integer type),
    returns float32 for real floating data and for integers with non-integer scaling,
    and complex64 for complex data; ``dtype`` given casts (floats to integers are
    rounded; bool gives nonzero voxels).
    A dcm2niix-style JSON sidecar beside the file is loaded into ``meta``.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise QSMInputError("file not found", path=path)
    if os.path.isdir(path):
        raise QSMInputError(f"cannot read {what} (is a directory)", path=path)
    try:
        if _is_nifti(path):
            data, affine, meta = _load_nifti(path, what)
        else:
            data, affine, meta = _load_sitk(path, what)
        data = _default_dtype(data)
    except QSMInputError:
        raise
    except MemoryError:
        raise
    except Exception as exc:
        raise QSMInputError(f"cannot read {what} ({_short_reason(exc)})", path=path) from exc
    _check_ndim(data, path, what)
    if not np.all(np.isfinite(affine)):
        raise QSMInputError(f"cannot read {what} (affine has non-finite values)", path=path)
    if dtype is not None:
        data = _cast(data, dtype)
    side = read_sidecar(path)
    side.update(meta)
    return Volume(data=data, affine=affine, path=path, meta=side)


# ----------------------------------------------------------------------------- writing


def _temp_path(path: str) -> str:
    """Create an empty temporary file beside ``path`` whose name keeps the real extension."""
    d, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + name, dir=d)
    os.close(fd)
    return tmp


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str, writer) -> str:
    """Run ``writer(tmp_path)`` then rename over ``path``; on failure leave nothing behind."""
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as exc:
        reason = _short_reason(exc)
        raise QSMInputError(f"cannot create output folder ({reason})", path=path) from exc
    if os.path.isdir(path):
        raise QSMInputError("cannot write: a folder of that name exists", path=path)
    try:
        tmp = _temp_path(path)
    except OSError as exc:
        raise QSMInputError(f"cannot write ({_short_reason(exc)})", path=path) from exc
    try:
        writer(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.remove(tmp)
        except OSError:
            pass
        if isinstance(exc, QSMInputError) or not isinstance(exc, Exception):
            raise
        raise QSMInputError(f"cannot write ({_short_reason(exc)})", path=path) from exc
    return path


def _to_jsonable(obj):
    """Recursively turn numpy scalars/arrays, paths, sets and complex numbers into JSON types."""
    if isinstance(obj, dict):
        return {
            str(_to_jsonable(k)) if not isinstance(k, str) else k: _to_jsonable(v)
            for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return _to_jsonable(obj.item())
    if isinstance(obj, complex):
        return [obj.real, obj.imag]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if hasattr(obj, "tolist"):  # e.g. a cupy array
        return _to_jsonable(obj.tolist())
    return str(obj)


def write_json(path, obj) -> None:
    """Write ``obj`` as indented JSON, atomically; numpy values become plain numbers and lists."""
    text = json.dumps(_to_jsonable(obj), indent=2) + "\n"

    def writer(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(os.fspath(path), writer)


def _nifti_writer(data: np.ndarray, affine: np.ndarray):
    def writer(tmp):
        img = nib.Nifti1Image(data, affine)
        img.set_sform(affine, code=_XFORM_SCANNER)
        img.set_qform(affine, code=_XFORM_SCANNER)
        img.header.set_xyzt_units("mm", "sec")
        img.header.set_data_dtype(data.dtype)
        if np.issubdtype(data.dtype, np.integer):
            img.header.set_slope_inter(1.0, 0.0)
        nib.save(img, tmp)

    return writer


def _sitk_writer(path: str, data: np.ndarray, affine: np.ndarray):
    import SimpleITK as sitk

    if data.ndim > 4:
        raise QSMInputError(
            f"only 3-D or 4-D data can be saved in this format, got shape {data.shape}; use NIfTI",
            path=path,
        )
    low = path.lower()
    if np.iscomplexobj(data) and not low.endswith((".nrrd", ".nhdr")):
        raise QSMInputError("complex data can be saved as NIfTI or NRRD only", path=path)
    lps = _FLIP_LPS @ affine
    m = lps[:3, :3]
    spacing = np.sqrt((m**2).sum(axis=0))
    if np.any(spacing == 0) or abs(np.linalg.det(m)) < 1e-12:
        raise QSMInputError("affine is singular: cannot save", path=path)
    direction = m / spacing
    arr = np.ascontiguousarray(np.transpose(data, (2, 1, 0) + tuple(range(3, data.ndim))))

    def writer(tmp):
        img = sitk.GetImageFromArray(arr, isVector=data.ndim == 4)
        img.SetSpacing([float(s) for s in spacing])
        img.SetDirection([float(v) for v in direction.ravel()])
        img.SetOrigin([float(v) for v in lps[:3, 3]])
        sitk.WriteImage(img, tmp, True)

    return writer


def save_volume(path, data, affine, *, sidecar: dict | None = None, dtype=np.float32) -> str:
    """Write ``data`` with ``affine`` (RAS+) to ``path``, atomically; returns the path written.

    The format follows the extension: ``.nii``/``.nii.gz`` through nibabel (sform and
    qform both set from the affine, code 1 = scanner; units mm / s), anything else
    (``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``, ...) through SimpleITK (4-D data as a
    vector image). ``dtype`` casts the data (``None`` keeps it; bool -> uint8; real
    floats going to integers are rounded); complex data stay complex64 when ``dtype``
    is a real float type. ``sidecar`` is written as ``sidecar_path(path)``.
    """
    path = os.fspath(path)
    data = to_numpy(data)
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise QSMInputError(
            f"cannot write: affine must be a finite 4x4 matrix, got {affine.shape}", path=path
        )
    _check_ndim(data, path, "data")
    if data.dtype == object:
        raise QSMInputError("cannot write: data is not numeric (object array)", path=path)
    if dtype is None:
        out = data
        if out.dtype == np.bool_:
            out = out.astype(np.uint8)
        elif out.dtype in (np.int64, np.uint64):
            info = np.iinfo(np.int32)
            ok = out.size == 0 or (out.min() >= info.min and out.max() <= info.max)
            out = out.astype(np.int32 if ok else np.float64)
    else:
        dt = np.dtype(dtype)
        if np.iscomplexobj(data) and np.issubdtype(dt, np.floating):
            dt = np.dtype(np.complex128 if dt.itemsize > 4 else np.complex64)
        out = _cast(data, dt)
    out = _native(np.ascontiguousarray(out))
    if sidecar_path(path) == path and sidecar is not None:
        raise QSMInputError("cannot write: image path and JSON sidecar path coincide", path=path)
    writer = _nifti_writer(out, affine) if _is_nifti(path) else _sitk_writer(path, out, affine)
    atomic_write(path, writer)
    if sidecar is not None:
        write_json(sidecar_path(path), sidecar)
    return path


# ----------------------------------------------------------------------------- checks


def require_finite(data, path, what="image") -> None:
    """Raise :class:`QSMInputError` naming ``path`` and the number of NaN/Inf voxels, if any."""
    a = np.asarray(data)
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.complexfloating)):
        return
    bad = int(a.size - np.count_nonzero(np.isfinite(a)))
    if bad:
        raise QSMInputError(
            f"{what} has {bad} non-finite (NaN/Inf) voxels of {a.size}; "
            "mask or fill them before processing",
            path=path,
        )


def check_same_grid(a: Volume, b: Volume, what_a="magnitude", what_b="phase") -> None:
    """Raise :class:`QSMInputError` unless two volumes share the voxel grid (shape3 and affine)."""
    if geometry.same_grid(a.affine, a.shape3, b.affine, b.shape3):
        return
    if a.shape3 != b.shape3:
        why = "shapes differ"
    else:
        diff = float(np.max(np.abs(a.affine - b.affine)))
        why = f"affines differ (max difference {diff:.3g})"
    raise QSMInputError(
        f"{what_a} {a.path} {a.shape3} and {what_b} {b.path} {b.shape3} are not on the same "
        f"voxel grid: {why}"
    )


def load_echoes(paths, what="phase") -> Volume:
    """Load one or more files as a multi-echo volume with echoes in the 4th axis.

    A single file is returned as is (3-D stays 3-D, a 4-D file holds the echoes in its
    4th axis); several files are stacked along a new 4th axis (each may itself carry
    trailing axes such as channels, giving ``(X, Y, Z, E, C)``). All files must share
    the voxel grid and shape. ``meta`` is the first file's sidecar; with several files
    ``meta["files"]`` lists the paths, ``meta["files_meta"]`` each sidecar, and when
    every file's sidecar has an ``EchoTime`` (dcm2niix writes one file per echo),
    ``meta["EchoTime"]`` becomes the list of echo times in file order.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise QSMInputError(f"no {what} files given")
    vols = [load_volume(p, what=what) for p in paths]
    first = vols[0]
    if len(vols) == 1:
        return first
    for i, v in enumerate(vols[1:], start=2):
        check_same_grid(first, v, f"{what} echo 1", f"{what} echo {i}")
    arrays = []
    for v in vols:
        d = v.data
        while d.ndim > 3 and d.shape[-1] == 1:  # drop trailing singleton axes
            d = d[..., 0]
        arrays.append(d)
    for p, d in zip(paths[1:], arrays[1:], strict=True):
        if d.shape != arrays[0].shape:
            raise QSMInputError(
                f"{what} files must have the same shape: {paths[0]} has {arrays[0].shape}, "
                f"{p} has {d.shape}"
            )
    data = np.stack(arrays, axis=3)
    meta = dict(first.meta)
    meta["files"] = list(paths)
    meta["files_meta"] = [v.meta for v in vols]
    tes = [v.meta.get("EchoTime") for v in vols]
    if all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in tes):
        meta["EchoTime"] = [float(t) for t in tes]
    return Volume(data=data, affine=first.affine, path=first.path, meta=meta)


__all__ = [
    "Volume",
    "load_volume",
    "save_volume",
    "sidecar_path",
    "write_json",
    "require_finite",
    "check_same_grid",
    "load_echoes",
]


def load_gre(magnitude_paths, phase_paths, te=None, b0=None):
    """A gradient-echo acquisition: magnitude and phase (one 4-D file or one file per echo),
    checked against each other, with the echo times (s) and field strength (T) given or read
    from the dcm2niix/BIDS JSON sidecars (``EchoTime``, ``MagneticFieldStrength``).

    Returns (magnitude Volume, phase Volume, te list, b0)."""
    from . import units

    mag = load_echoes(magnitude_paths, what="magnitude")
    pha = load_echoes(phase_paths, what="phase")
    check_same_grid(mag, pha, "magnitude", "phase")
    if mag.data.shape != pha.data.shape:
        raise QSMInputError(f"{magnitude_paths[0]}: magnitude shape {mag.data.shape} does not "
                            f"match phase shape {pha.data.shape} ({phase_paths[0]})")
    require_finite(mag.data, magnitude_paths[0], "magnitude")
    require_finite(pha.data, phase_paths[0], "phase")
    n_echoes = 1 if pha.data.ndim == 3 else pha.data.shape[3]
    # dcm2niix/BIDS keys, or the "te"/"b0" of a sidecar that qsmkit itself wrote (simulate, combine)
    own = pha.meta.get("software") == "qsmkit"
    te = te if te is not None else pha.meta.get("EchoTime", pha.meta.get("te") if own else None)
    if te is None:
        raise QSMInputError(f"{phase_paths[0]}: missing echo time: its JSON sidecar has no EchoTime (s); "
                            "add it there, or give --te SECONDS (one per echo)")
    te = list(np.atleast_1d(te).astype(float))
    if len(te) != n_echoes:
        raise QSMInputError(f"{phase_paths[0]}: {n_echoes} echo(es) but {len(te)} echo time(s) given")
    units.check_positive("--te", te)
    if b0 is None and own and "MagneticFieldStrength" not in pha.meta and "b0" in pha.meta:
        b0 = pha.meta["b0"]
    if b0 is None:
        from .scanner import b0_from_sidecar

        # the field the phase evolved in (ImagingFrequency / gamma) when the sidecar has it
        b0, _source = b0_from_sidecar(pha.meta, phase_paths[0])
    units.check_positive("--b0", b0)
    return mag, pha, te, float(b0)


def phase_in_rad(volume: Volume, path) -> np.ndarray:
    """The phase of ``volume`` in radians: the vendor's scaling when its sidecar names the
    manufacturer (``qsmkit.scanner.phase_to_rad``: strict ranges), else the range-based
    ``qsmkit.units.rescale_phase``."""
    from . import units

    if volume.meta.get("Manufacturer"):
        from .scanner import phase_to_rad

        return phase_to_rad(volume.data, volume.meta, path)
    return units.rescale_phase(volume.data)
