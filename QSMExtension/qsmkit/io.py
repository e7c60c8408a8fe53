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

import contextlib
import gzip
import json
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass, field

import nibabel as nib
import numpy as np

from . import geometry
from .backend import to_numpy
from .errors import QSMInputError
from .geometry import VoxelGrid  # re-exported: io.VoxelGrid

NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: NIfTI xform code for "scanner anatomical" coordinates
_XFORM_SCANNER = 1
#: RAS <-> LPS: flip the first two world axes
_FLIP_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


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



# ----------------------------------------------------------------------------- size guards

#: environment variable overriding the ceiling on the bytes an image header may claim (GB)
MAX_IMAGE_GB_ENV = "QSMKIT_MAX_IMAGE_GB"
#: deflate cannot compress better than about 1032:1, so a gzip stream of n bytes holds at
#: most this many times n bytes (plus a small slack for headers)
_DEFLATE_MAX_RATIO = 1032
_GZIP_CHUNK = 1 << 24


def max_image_bytes() -> int:
    """The ceiling on the voxel data one image may claim: ``$QSMKIT_MAX_IMAGE_GB`` (GB, 1e9
    bytes) when set, else half the machine's physical memory (16 GB where it cannot be read)."""
    env = os.environ.get(MAX_IMAGE_GB_ENV, "").strip()
    if env:
        try:
            gb = float(env)
        except ValueError:
            gb = float("nan")
        if not np.isfinite(gb) or gb <= 0:
            raise QSMInputError(f"{MAX_IMAGE_GB_ENV} must be a positive number of GB, got {env!r}")
        return int(gb * 1e9)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) // 2
    except (AttributeError, ValueError, OSError):  # pragma: no cover - not POSIX
        return 16 * 10**9


def _gb(n) -> str:
    return f"{n / 1e9:.3g} GB" if n >= 1e8 else f"{n:,} bytes"


def check_claim(path, shape, itemsize, what) -> int:
    """Refuse a header claim (or a requested array) above the ceiling; returns its bytes."""
    shape = tuple(int(n) for n in shape)
    if any(n < 0 for n in shape):
        raise QSMInputError(f"cannot read {what} (header gives a negative size {shape})", path)
    claimed = int(np.prod([float(n) for n in shape]) * itemsize)
    ceiling = max_image_bytes()
    if claimed > ceiling:
        raise QSMInputError(
            f"{'header claims' if path is not None else what + ' needs'} "
            f"{'x'.join(map(str, shape))} voxels of {itemsize} bytes "
            f"({_gb(claimed)}), above the ceiling of {_gb(ceiling)} (half the memory; set "
            f"{MAX_IMAGE_GB_ENV} to change it)", path)
    return claimed


def _short_data(path, holds, claimed, how):
    return QSMInputError(f"file {how} {_gb(holds)} of voxel data but its header claims "
                         f"{_gb(claimed)}: truncated file or corrupt header", path)


def _gzip_holds_at_least(path, need, start=0, raw_zlib=False) -> None:
    """Refuse a compressed stream (from byte ``start``) that cannot hold ``need`` bytes: first
    the deflate ratio bound (no reading), then the gzip size trailer, then a bounded read that
    counts decompressed bytes in chunks (memory stays at one chunk)."""
    size = os.path.getsize(path) - start
    if need > _DEFLATE_MAX_RATIO * size + 4096:
        raise _short_data(path, _DEFLATE_MAX_RATIO * size, need, "can hold at most")
    if not raw_zlib and start == 0 and size >= 18:
        with open(path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            if int.from_bytes(f.read(4), "little") == need % 2**32:
                return  # the trailer agrees (single-member gzip)
    total = 0
    try:
        with open(path, "rb") as raw:
            raw.seek(start)
            if raw_zlib:
                dec = zlib.decompressobj()
                while total < need:
                    chunk = raw.read(_GZIP_CHUNK // 64)
                    if not chunk:
                        break
                    total += len(dec.decompress(chunk, _GZIP_CHUNK))
                    while dec.unconsumed_tail and total < need:  # at most a chunk at a time
                        total += len(dec.decompress(dec.unconsumed_tail, _GZIP_CHUNK))
            else:
                with gzip.GzipFile(fileobj=raw) as f:
                    while total < need:
                        chunk = f.read(min(_GZIP_CHUNK, need - total))
                        if not chunk:
                            break
                        total += len(chunk)
    except (OSError, EOFError, zlib.error) as exc:
        raise QSMInputError(f"cannot read (compressed data damaged or truncated: "
                            f"{_short_reason(exc)})", path) from exc
    if total < need:
        raise _short_data(path, total, need, "holds")


def _guard_nifti(path, what) -> None:
    img = nib.load(path, mmap=False)  # header only; the data are read later
    hdr = img.header
    claimed = check_claim(path, hdr.get_data_shape(), hdr.get_data_dtype().itemsize, what)
    need = int(hdr.get_data_offset()) + claimed
    if path.lower().endswith(".gz"):
        _gzip_holds_at_least(path, need)
    elif os.path.getsize(path) < need:
        raise _short_data(path, max(0, os.path.getsize(path) - int(hdr.get_data_offset())),
                          claimed, "holds")


_NRRD_TYPES = {"int8": 1, "uint8": 1, "int16": 2, "uint16": 2, "int32": 4, "uint32": 4,
               "int64": 8, "uint64": 8, "float": 4, "double": 8, "signed char": 1, "uchar": 1,
               "unsigned char": 1, "short": 2, "ushort": 2, "unsigned short": 2, "int": 4,
               "uint": 4, "unsigned int": 4, "longlong": 8, "ulonglong": 8, "block": 1}
_MET_TYPES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4,
              "MET_UINT": 4, "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8,
              "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8}


def _header_lines(path, limit=1 << 16):
    """The text lines of a NRRD / MetaImage header and the byte offset just after it."""
    with open(path, "rb") as f:
        head = f.read(limit)
    lines, pos = [], 0
    for raw in head.split(b"\n"):
        end = pos + len(raw) + 1
        text = raw.decode("latin-1").strip()
        if path.lower().endswith((".nrrd", ".nhdr")) and not text and lines:
            return lines, end  # NRRD: a blank line ends the header
        lines.append(text)
        pos = end
        if text.lower().replace(" ", "").startswith("elementdatafile="):
            return lines, end  # MetaImage: the ElementDataFile line ends the header
    return lines, min(pos, len(head))


def _guard_nrrd(path, what) -> None:
    lines, offset = _header_lines(path)
    if not lines or not lines[0].startswith("NRRD"):
        return  # not a NRRD: SimpleITK reports it
    fields = {}
    for ln in lines[1:]:
        if ":" in ln and not ln.startswith("#"):
            key, _, value = ln.partition(":")
            fields[key.strip().lower()] = value.lstrip("=").strip()
    try:
        sizes = [int(v) for v in fields["sizes"].split()]
        itemsize = _NRRD_TYPES[fields["type"].lower()]
    except (KeyError, ValueError):
        return  # SimpleITK gives the reason
    if fields.get("type", "").lower() == "block":
        itemsize = int(fields.get("blocksize", 1) or 1)
    claimed = check_claim(path, sizes, itemsize, what)
    data_file = fields.get("data file", fields.get("datafile"))
    if data_file:
        if data_file.startswith("LIST") or "%" in data_file:
            return  # several data files: the ceiling is the check
        source, offset = os.path.join(os.path.dirname(path), data_file), 0
        if not os.path.isfile(source):
            raise QSMInputError(f"cannot read {what} (its data file {data_file} is missing)", path)
    else:
        source = path
    encoding = fields.get("encoding", "raw").lower()
    skip = int(fields.get("byte skip", fields.get("byteskip", 0)) or 0)
    if encoding == "raw":
        holds = os.path.getsize(source) - offset - max(skip, 0)
        if holds < claimed:
            raise _short_data(path, max(holds, 0), claimed, "holds")
    elif encoding in ("gzip", "gz"):
        _gzip_holds_at_least(source, claimed, start=offset)
    elif encoding in ("ascii", "text", "txt", "hex"):  # at least one character per value
        holds = os.path.getsize(source) - offset
        if holds < claimed // itemsize:
            raise _short_data(path, holds, claimed, "holds")


def _guard_metaimage(path, what) -> None:
    lines, offset = _header_lines(path)
    fields = {}
    for ln in lines:
        key, sep, value = ln.partition("=")
        if sep:
            fields[key.strip().lower()] = value.strip()
    try:
        sizes = [int(v) for v in fields["dimsize"].split()]
        itemsize = _MET_TYPES[fields["elementtype"].upper()]
        itemsize *= int(fields.get("elementnumberofchannels", 1))
    except (KeyError, ValueError):
        return
    claimed = check_claim(path, sizes, itemsize, what)
    data_file = fields.get("elementdatafile", "LOCAL")
    if data_file.upper() != "LOCAL":
        if data_file.upper().startswith("LIST") or "%" in data_file:
            return
        source, offset = os.path.join(os.path.dirname(path), data_file), 0
        if not os.path.isfile(source):
            raise QSMInputError(f"cannot read {what} (its data file {data_file} is missing)", path)
    else:
        source = path
    if fields.get("compresseddata", "false").lower() == "true":
        _gzip_holds_at_least(source, claimed, start=offset, raw_zlib=True)
    elif os.path.getsize(source) - offset < claimed:
        raise _short_data(path, max(os.path.getsize(source) - offset, 0), claimed, "holds")


def _guard_sitk(path, what) -> None:
    """Any other SimpleITK format: the claimed size against the ceiling (header only)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    itemsize = np.dtype(sitk.GetArrayViewFromImage(sitk.Image([1] * reader.GetDimension(),
                                                              reader.GetPixelID())).dtype).itemsize
    check_claim(path, [*reader.GetSize(), reader.GetNumberOfComponents()], itemsize, what)


def check_image_size(path, what="image") -> None:
    """Before reading: the size the header claims against the file (uncompressed), a bounded
    read (compressed) and the ceiling ``max_image_bytes``, so memory follows the data and not
    the header. Raises :class:`QSMInputError` naming the file."""
    low = path.lower()
    if _is_nifti(path):
        _guard_nifti(path, what)
    elif low.endswith((".nrrd", ".nhdr")):
        _guard_nrrd(path, what)
    elif low.endswith((".mha", ".mhd")):
        _guard_metaimage(path, what)
    else:
        _guard_sitk(path, what)

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


def load_volume(path, *, dtype=None, what="image", allow_complex=True,
                allow_shear=False) -> Volume:
    """Load a NIfTI (nibabel) or any SimpleITK-readable image as a :class:`Volume`.

    ``dtype=None`` keeps integer voxel types (raw vendor phase stays integer so
    :func:`qsmkit.units.rescale_phase` can recognise it; NIfTI scl_slope / scl_inter
    with integer values, such as dcm2niix's Siemens phase, keep an integer type),
    returns float32 for real floating data and for integers with non-integer scaling,
    and complex64 for complex data; ``dtype`` given casts (floats to integers are
    rounded; bool gives nonzero voxels).
    A dcm2niix-style JSON sidecar beside the file is loaded into ``meta``.

    Before any voxel is read, the size the header claims is checked against the file and
    the ceiling (``check_image_size``). Complex data are refused when ``allow_complex`` is
    False (inputs that must be real: masks, fields, magnitudes), and voxel axes sheared
    beyond ``geometry.SHEAR_TOLERANCE_DEG`` unless ``allow_shear`` (ROI statistics, where no
    dipole kernel is used).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise QSMInputError("file not found", path=path)
    if os.path.isdir(path):
        raise QSMInputError(f"cannot read {what} (is a directory)", path=path)
    try:
        check_image_size(path, what)
        if _is_nifti(path):
            data, affine, meta = _load_nifti(path, what)
        else:
            data, affine, meta = _load_sitk(path, what)
        data = _default_dtype(data)
    except QSMInputError:
        raise
    except MemoryError as exc:
        raise MemoryError(f"{path}: not enough memory to read {what}") from exc
    except Exception as exc:
        raise QSMInputError(f"cannot read {what} ({_short_reason(exc)})", path=path) from exc
    _check_ndim(data, path, what)
    if not np.all(np.isfinite(affine)):
        raise QSMInputError(f"cannot read {what} (affine has non-finite values)", path=path)
    if np.iscomplexobj(data) and not allow_complex:
        raise QSMInputError(f"{what} is complex-valued ({data.dtype}); give real values "
                            "(magnitude, or phase in rad)", path=path)
    if not allow_shear:
        geometry.check_orthogonal(affine, path, what)
    if dtype is not None:
        data = _cast(data, dtype)
    side = read_sidecar(path)
    side.update(meta)
    return Volume(data=data, affine=affine, path=path, meta=side)


# ----------------------------------------------------------------------------- writing


#: every temporary name starts with this, then the host and process id, so a later run can
#: tell a dead run's leftovers (removed) from a live run's (kept)
TEMP_PREFIX = ".tmp-qsmkit-"
_STALE_SECONDS = 24 * 3600
_TEMP_NAME = re.compile(r"^\.tmp-qsmkit-(?P<host>[A-Za-z0-9._]+)-(?P<pid>\d+)-")
_OLD_TEMP_NAME = re.compile(r"^\.tmp-[a-z0-9_]{8}-.+")  # temporary files of qsmkit <= 0.x
_cleaned: set = set()


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname() or "host")[:40]


def _temp_prefix() -> str:
    return f"{TEMP_PREFIX}{_host()}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def clean_stale_temp(folder) -> list:
    """Remove temporary files and folders that interrupted or killed runs left in ``folder``:
    those of a process of this host that no longer runs, and any older than a day. Returns
    the removed paths."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    now, host = time.time(), _host()
    for entry in entries:
        m = _TEMP_NAME.match(entry.name)
        if not m and not _OLD_TEMP_NAME.match(entry.name):
            continue
        try:
            age = now - entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        dead = m is not None and m["host"] == host and not _pid_alive(int(m["pid"]))
        if dead or age > _STALE_SECONDS or (m is None and age > 3600):
            try:
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.remove(entry.path)
                removed.append(entry.path)
            except OSError:
                pass
    return removed


def _clean_once(folder) -> None:
    key = os.path.abspath(folder)
    if key not in _cleaned:
        _cleaned.add(key)
        clean_stale_temp(key)


def _temp_path(path: str) -> str:
    """Create an empty temporary file beside ``path`` whose name keeps the real extension."""
    d, name = os.path.split(os.path.abspath(path))
    _clean_once(d)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(), suffix="-" + name, dir=d)
    os.close(fd)
    return tmp


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _make_parent(path: str) -> str:
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as exc:
        reason = _short_reason(exc)
        raise QSMInputError(f"cannot create output folder ({reason})", path=path) from exc
    return parent


def atomic_write(path: str, writer) -> str:
    """Run ``writer(tmp_path)`` then rename over ``path``; on failure leave nothing behind."""
    path = os.fspath(path)
    _make_parent(path)
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


def _atomic_write_detached(path: str, writer) -> str:
    """``atomic_write`` for formats with a separate data file (``.nhdr``, ``.mhd``): the
    writer writes ``path``'s name inside a temporary folder beside it, whose files (header
    and data file, under their final names) are then moved beside ``path``."""
    path = os.fspath(path)
    parent = _make_parent(path)
    _clean_once(parent)
    try:
        stage = tempfile.mkdtemp(prefix=_temp_prefix(), dir=parent)
    except OSError as exc:
        raise QSMInputError(f"cannot write ({_short_reason(exc)})", path=path) from exc
    try:
        writer(os.path.join(stage, os.path.basename(path)))
        names = sorted(os.listdir(stage), key=lambda n: n == os.path.basename(path))
        for name in names:  # the data file first, the header last
            os.chmod(os.path.join(stage, name), 0o666 & ~_umask())
            os.replace(os.path.join(stage, name), os.path.join(parent, name))
    except Exception as exc:
        if isinstance(exc, QSMInputError):
            raise
        raise QSMInputError(f"cannot write ({_short_reason(exc)})", path=path) from exc
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return path


@contextlib.contextmanager
def _signals_held():
    """Hold off SIGINT and SIGTERM (main thread only) while a few renames run; a signal that
    arrives meanwhile is delivered afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []
    sigs = [signal.SIGINT] + ([signal.SIGTERM] if hasattr(signal, "SIGTERM") else [])
    old = {}
    try:
        for sig in sigs:
            old[sig] = signal.signal(sig, lambda num, frame: pending.append((num, frame)))
    except ValueError:  # pragma: no cover - not the main interpreter thread
        pass
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        for num, frame in pending[:1]:  # deliver it now, to the handler it was meant for
            handler = old.get(num)
            if callable(handler):
                handler(num, frame)
            elif handler != signal.SIG_IGN:
                os.kill(os.getpid(), num)


class OutputSet:
    """A command's outputs, written as one set.

    ``path(target)`` gives where to write each file: a staging folder beside the target
    (``.tmp-qsmkit-HOST-PID-*``; sidecars written beside a staged file go with it). Leaving
    the ``with`` block normally moves every staged file into place with SIGINT/SIGTERM held
    off, and a failed move restores the files it replaced, so the target holds the whole new
    set or the whole old set, never a mix. Leaving it by an exception (a bad input, Ctrl-C,
    SIGTERM) removes the staging folders and leaves the targets as they were. Folders left by
    a killed run (SIGKILL, power loss) are removed by a later run (``clean_stale_temp``).
    """

    def __init__(self):
        self._stage = {}  # target folder -> staging folder

    def path(self, target) -> str:
        target = os.path.abspath(os.fspath(target))
        folder, name = os.path.split(target)
        if folder not in self._stage:
            _make_parent(target)
            _clean_once(folder)
            try:
                self._stage[folder] = tempfile.mkdtemp(prefix=_temp_prefix(), dir=folder)
            except OSError as exc:
                raise QSMInputError(f"cannot write ({_short_reason(exc)})", path=target) from exc
        if os.path.isdir(target):
            raise QSMInputError("cannot write: a folder of that name exists", path=target)
        return os.path.join(self._stage[folder], name)

    def staged(self) -> list:
        """(staged file, target) pairs written so far."""
        pairs = []
        for folder, stage in self._stage.items():
            for name in sorted(os.listdir(stage)):
                if os.path.isfile(os.path.join(stage, name)) and not name.startswith(".tmp-"):
                    pairs.append((os.path.join(stage, name), os.path.join(folder, name)))
        return pairs

    def commit(self) -> list:
        """Move every staged file into place (all or nothing); returns the targets."""
        pairs = self.staged()
        done = []  # (target, backup or None)
        with _signals_held():
            try:
                for src, dst in pairs:
                    backup = None
                    if os.path.lexists(dst):
                        backup = os.path.join(os.path.dirname(src), ".old-" + os.path.basename(dst))
                        os.replace(dst, backup)
                    done.append((dst, backup))
                    os.replace(src, dst)
            except OSError as exc:
                for dst, backup in reversed(done):
                    with contextlib.suppress(OSError):
                        if backup:
                            os.replace(backup, dst)
                        else:
                            os.remove(dst)
                self.discard()
                raise QSMInputError(f"cannot move the outputs into place "
                                    f"({_short_reason(exc)}); the old files are kept",
                                    dst) from exc
            self.discard()
        return [dst for _, dst in pairs]

    def discard(self) -> None:
        for stage in self._stage.values():
            shutil.rmtree(stage, ignore_errors=True)
        self._stage = {}

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.commit()
        else:
            self.discard()
        return False


_TABLE_SUFFIXES = (".json", ".csv", ".tsv", ".png", ".txt")


def _realpath(p) -> str:
    return os.path.realpath(os.fspath(p))


def check_outputs(outputs, inputs, sidecars=True) -> None:
    """Refuse, before any work, a command whose outputs would overwrite one of its inputs or an
    input's JSON sidecar (TE and B0 may live there), or would write one file twice.

    ``outputs``: every file the command writes; with ``sidecars`` each image output's sidecar
    (``sidecar_path``) counts too. ``inputs``: the input files (None entries ignored)."""
    protected = {}
    for p in inputs:
        if not p:
            continue
        protected.setdefault(_realpath(p), f"input {p}")
        if not str(p).lower().endswith(_TABLE_SUFFIXES):
            protected.setdefault(_realpath(sidecar_path(p)), f"the JSON sidecar of input {p}")
    seen = {}
    for out in outputs:
        if not out:
            continue
        written = [out]
        if sidecars and not str(out).lower().endswith(_TABLE_SUFFIXES):
            written.append(sidecar_path(out))
        for w in written:
            real = _realpath(w)
            if real in protected:
                what = protected[real]
                raise QSMInputError(f"output would overwrite {what}" if w == out else
                                    f"output's JSON sidecar {w} would overwrite {what}", out)
            if real in seen and seen[real] != out:
                raise QSMInputError(f"outputs {seen[real]} and {out} would both write {w}", out)
            seen[real] = out


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
    if path.lower().endswith((".nhdr", ".mhd")):  # header + separate data file
        _atomic_write_detached(path, writer)
    else:
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


def load_echoes(paths, what="phase", allow_complex=True) -> Volume:
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
    vols = [load_volume(p, what=what, allow_complex=allow_complex) for p in paths]
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


def load_gre(magnitude_paths, phase_paths, te=None, b0=None, allow_nan=False):
    """A gradient-echo acquisition: magnitude and phase (one 4-D file or one file per echo),
    checked against each other, with the echo times (s) and field strength (T) given or read
    from the dcm2niix/BIDS JSON sidecars (``EchoTime``, ``MagneticFieldStrength``), each
    checked against its physical range (``units.check_te``, ``units.check_b0``).
    With ``allow_nan`` NaN/Inf voxels are kept for ``fill_outside_mask`` to judge.

    Returns (magnitude Volume, phase Volume, te list, b0)."""
    from . import units

    mag = load_echoes(magnitude_paths, what="magnitude", allow_complex=False)
    pha = load_echoes(phase_paths, what="phase", allow_complex=False)
    check_same_grid(mag, pha, "magnitude", "phase")
    if mag.data.shape != pha.data.shape:
        raise QSMInputError(f"{magnitude_paths[0]}: magnitude shape {mag.data.shape} does not "
                            f"match phase shape {pha.data.shape} ({phase_paths[0]})")
    if not allow_nan:
        require_finite(mag.data, magnitude_paths[0], "magnitude")
        require_finite(pha.data, phase_paths[0], "phase")
    n_echoes = 1 if pha.data.ndim == 3 else pha.data.shape[3]
    # dcm2niix/BIDS keys, or the "te"/"b0" of a sidecar that qsmkit itself wrote (simulate, combine)
    own = pha.meta.get("software") == "qsmkit"
    te_name = "--te" if te is not None else "EchoTime in the JSON sidecar"
    te = te if te is not None else pha.meta.get("EchoTime", pha.meta.get("te") if own else None)
    if te is None:
        raise QSMInputError(f"{phase_paths[0]}: missing echo time: its JSON sidecar has no EchoTime (s); "
                            "add it there, or give --te SECONDS (one per echo)")
    try:
        te = list(np.atleast_1d(np.asarray(te, dtype=float)))
    except (TypeError, ValueError):
        raise QSMInputError(f"{te_name} is not a number or list of numbers: {te!r}",
                            phase_paths[0]) from None
    if len(te) != n_echoes:
        raise QSMInputError(f"{phase_paths[0]}: {n_echoes} echo(es) but {len(te)} echo time(s) given")
    te = units.check_te(te, te_name, None if te_name == "--te" else phase_paths[0])
    b0_name = "--b0" if b0 is not None else "the field strength in the JSON sidecar"
    if b0 is None and own and "MagneticFieldStrength" not in pha.meta and "b0" in pha.meta:
        b0 = pha.meta["b0"]
    if b0 is None:
        from .vendor import b0_from_sidecar

        # the field the phase evolved in (ImagingFrequency / gamma) when the sidecar has it
        b0, _source = b0_from_sidecar(pha.meta, phase_paths[0])
    b0 = units.check_b0(b0, b0_name, None if b0_name == "--b0" else phase_paths[0])
    return mag, pha, te, float(b0)


def fill_outside_mask(data, mask, path, what="image"):
    """NaN/Inf voxels inside ``mask`` are an error naming ``path``; outside it they become 0
    (vendor maps are often NaN outside the head). ``mask`` is 3-D; ``data`` 3-D or more
    (echoes, channels in the trailing axes). Returns float data (a copy when filled)."""
    a = np.asarray(data)
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.complexfloating)):
        return a
    bad = ~np.isfinite(a)
    if not bad.any():
        return a
    m = np.asarray(mask, dtype=bool).reshape(mask.shape + (1,) * (a.ndim - 3))
    n_in = int(np.count_nonzero(bad & m))
    if n_in:
        raise QSMInputError(f"{what} has {n_in} NaN/Inf voxels inside the mask", path)
    return np.where(bad, a.dtype.type(0), a)


def finite_in_mask(data, mask, path, what="image"):
    """``require_finite`` without a mask; with one, ``fill_outside_mask`` (NaN/Inf outside it
    become 0, inside they are an error): what every command does with its --mask."""
    if mask is None:
        require_finite(data, path, what)
        return data
    return fill_outside_mask(data, mask, path, what)


def phase_in_rad(volume: Volume, path, scale=None, info=None) -> np.ndarray:
    """The phase of ``volume`` in radians: ``scale`` (``--phase-scale``, the value standing
    for pi) when given, else the vendor's scaling when its sidecar names the manufacturer
    (``qsmkit.vendor.convert_phase``: metadata first, then a tolerant range), else
    ``qsmkit.units.rescale_phase``, which refuses integer phase whose scale the data do not
    reveal. The rule used goes into ``info`` (a dict, for the sidecar) and into
    ``volume.meta["phase_convention"]``."""
    from . import units

    info = {} if info is None else info
    try:
        if scale is None and volume.meta.get("Manufacturer"):
            from .vendor import convert_phase

            rad, convention = convert_phase(volume.data, volume.meta, path)
            info.update(rule=f"vendor convention ({volume.meta['Manufacturer']}, from the "
                             "JSON sidecar)", convention=convention)
            volume.meta["phase_convention"] = convention
            return rad
        rad = units.rescale_phase(volume.data, scale=scale, info=info)
        volume.meta["phase_convention"] = {"name": "given scale" if scale is not None else "range",
                                           "source": "units.rescale_phase", **info}
        return rad
    except QSMInputError as err:
        if err.path is None and not str(err).startswith(str(path)):
            raise QSMInputError(str(err), path) from None
        raise
