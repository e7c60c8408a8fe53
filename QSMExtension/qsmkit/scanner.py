"""Scanner input: dcm2niix NIfTI + JSON sidecars, and DICOM series read directly.

Both paths give the same thing: per image a :class:`~qsmkit.io.Volume` in qsmkit's
convention (``(X, Y, Z)`` voxel order, RAS+ millimetre affine) whose ``meta`` is a
dcm2niix-style sidecar (``EchoTime`` in s, ``MagneticFieldStrength`` in T,
``ImagingFrequency`` in MHz, ``ImageType``, ``EchoNumber``, ``Manufacturer``, ...), and from
there one set of rules (``qsmkit.vendor``, re-exported here):

- **what an image is** (:func:`image_kind`): magnitude, phase, Siemens phase difference,
  vendor field map in Hz, real or imaginary, from ``ImageType`` (``P``/``PHASE``,
  ``M``/``MAGNITUDE``, ``FIELDMAPHZ``), GE's (0043,102F) and Philips' (2005,1011) private
  image-type tags;
- **phase in radians** (:func:`phase_convention`): by the metadata first (stated units,
  Philips floating-point scaling, the vendor's encoding), by the range only as a tolerant
  fallback; the rule used goes into ``meta["phase_convention"]`` and the run's sidecar;
- **real / imaginary exports** (GE and others) become magnitude and phase
  (:func:`load_gre_scanner`);
- **B0** (:func:`b0_from_sidecar`): the Larmor frequency actually used,
  ``ImagingFrequency / gamma`` (a "3 T" Siemens Prisma runs at 2.895 T), falling back to
  the nominal ``MagneticFieldStrength``;
- **Siemens dual-echo phase difference to Hz** (:func:`phasediff_to_hz`):
  ``f = dphi / (2 pi (TE2 - TE1))``; the echo times come from the sidecar's
  ``EchoTime1`` / ``EchoTime2`` or, for DICOM, from the protocol (``alTE[0]``, ``alTE[1]``
  in the Siemens CSA series header's ASCCONV block, the same source dcm2niix uses).

DICOM geometry follows dcm2niix, so the DICOM reader and dcm2niix's NIfTI of the same
series give the same array and affine: voxel ``i`` runs along the DICOM row direction
(columns of the stored image), ``j`` along the column direction but **flipped** (dcm2niix
stores rows bottom-up), ``k`` along ``row x column`` (slices sorted by their position on
that normal); LPS patient coordinates are converted to RAS+.
Classic (one slice per file) and enhanced (multi-frame) MR images are read; an enhanced file's
frames are split by image type, echo and position through its functional groups
(:func:`_enhanced_frames`), then stacked like classic slices. Siemens mosaic files raise an
error suggesting dcm2niix.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

import numpy as np

from .errors import QSMInputError
from .io import Volume, check_same_grid, load_volume, sidecar_path
from .vendor import (  # noqa: F401  (re-exported: the sidecar rules live in ``vendor``)
    KINDS,
    MILLIRAD_HALF_RANGE,
    SIEMENS_HALF_RANGE,
    b0_from_sidecar,
    complex_to_phase,
    convert_phase,
    fieldmap_to_hz,
    image_kind,
    manufacturer,
    phase_convention,
    phase_to_rad,
    phasediff_to_hz,
)

_FLIP_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
_ENHANCED_MR = {"1.2.840.10008.5.1.4.1.1.4.1", "1.2.840.10008.5.1.4.1.1.4.3"}


# ----------------------------------------------------------------------------- data classes


@dataclass
class ScannerImage:
    """One 3-D image of one echo of one series, with its dcm2niix-style sidecar in ``volume.meta``.

    ``volume.data`` holds the stored values after the DICOM / NIfTI rescale (vendor units:
    Siemens phase -4096..4094, GE field maps in Hz, ...).
    """

    volume: Volume
    kind: str
    source: str
    files: list = field(default_factory=list)

    @property
    def meta(self) -> dict:
        return self.volume.meta

    @property
    def te(self):
        te = self.meta.get("EchoTime")
        return float(te) if isinstance(te, (int, float)) and not isinstance(te, bool) else None

    @property
    def series(self):
        """Series identity: (SeriesNumber, SeriesInstanceUID) as far as known."""
        return (self.meta.get("SeriesNumber"), self.meta.get("SeriesInstanceUID"))


@dataclass
class ScannerSeries:
    """Images of one kind from one series, echoes in the 4th axis (3-D with one echo).

    ``data.data`` is in physical units: phase and phase difference in rad (float32),
    field maps in Hz (float32), magnitude / real / imaginary as stored.
    ``te`` lists echo times (s): one per echo; ``[TE1, TE2]`` for a phase difference or a
    vendor field map. ``b0`` is in T (``meta["b0_source"]`` says from which tag).
    """

    data: Volume
    te: list
    b0: float
    kind: str
    meta: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- NIfTI + sidecar


def _is_nifti(path: str) -> bool:
    return path.lower().endswith((".nii", ".nii.gz"))


def read_nifti_image(path) -> list[ScannerImage]:
    """A dcm2niix NIfTI and its JSON sidecar as :class:`ScannerImage` (one per echo of a 4-D
    file whose sidecar lists one ``EchoTime`` per volume)."""
    path = os.fspath(path)
    jp = sidecar_path(path)
    if not os.path.isfile(jp):
        raise QSMInputError(f"no JSON sidecar {os.path.basename(jp)} beside the image (dcm2niix "
                            "-b y writes one); give --te and --b0 and use the plain image inputs", path)
    try:
        with open(jp, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as exc:
        raise QSMInputError(f"cannot read the JSON sidecar ({exc})", jp) from exc
    if not isinstance(meta, dict):
        raise QSMInputError("JSON sidecar is not an object", jp)
    vol = load_volume(path, what="scanner image")
    vol.meta = meta
    kind = image_kind(meta)
    data = vol.data
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 3:
        return [ScannerImage(Volume(data, vol.affine, path, meta), kind, path, [path])]
    te = meta.get("EchoTime")
    if data.ndim == 4 and isinstance(te, list) and len(te) == data.shape[3]:
        out = []
        for e in range(data.shape[3]):
            m = dict(meta, EchoTime=te[e], EchoNumber=e + 1)
            out.append(ScannerImage(Volume(data[..., e], vol.affine, path, m), kind, path, [path]))
        return out
    raise QSMInputError(f"scanner image must be 3-D (or 4-D with one EchoTime per volume), got "
                        f"shape {data.shape}", path)


# ----------------------------------------------------------------------------- DICOM


def _import_pydicom():
    try:
        import pydicom
    except ImportError as exc:  # pragma: no cover - pydicom is a dependency
        raise QSMInputError("reading DICOM needs pydicom (pip install pydicom)") from exc
    return pydicom


def _dicom_files(paths) -> list[str]:
    files = []
    for p in paths:
        p = os.fspath(p)
        if os.path.isdir(p):
            for root, _dirs, names in os.walk(p):
                files.extend(os.path.join(root, n) for n in sorted(names) if not n.startswith("."))
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise QSMInputError("file not found", p)
    return sorted(files)


def _siemens_protocol(ds) -> dict:
    """Echo times (µs) and sequence file from the Siemens CSA series header's ASCCONV block."""
    elem = ds.get((0x0029, 0x1020))
    raw = getattr(elem, "value", None)
    if not isinstance(raw, (bytes, bytearray)):
        return {}
    start, end = raw.find(b"### ASCCONV BEGIN"), raw.find(b"### ASCCONV END")
    if start < 0 or end < start:
        return {}
    text = raw[start:end].decode("latin-1")
    tes = {int(i): int(v) for i, v in re.findall(r"^\s*alTE\[(\d+)\]\s*=\s*(\d+)", text, re.M)}
    seq = re.search(r'^\s*tSequenceFileName\s*=\s*"+([^"]*)"+', text, re.M)
    return {"alTE_us": [tes[i] for i in sorted(tes)], "SequenceFile": seq.group(1) if seq else ""}


def _float_or_none(value):
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if np.isfinite(out) else None


def _phase_units(ds) -> str | None:
    """``"mrad"`` / ``"rad"`` when the header states the unit of the rescaled values: Rescale
    Type (0028,1054) or the Real World Value Mapping's measurement unit code (UCUM)."""
    rescale_type = str(ds.get("RescaleType", "")).strip().lower()
    if rescale_type in ("mrad", "rad"):
        return rescale_type
    items = list(ds.get("RealWorldValueMappingSequence", None) or [])
    codes = list(ds.get("MeasurementUnitsCodeSequence", None) or [])  # a flattened frame
    for item in items:
        codes.extend(item.get("MeasurementUnitsCodeSequence", None) or [])
    for code in codes:
        value = str(code.get("CodeValue", "")).strip().lower()
        if value in ("mrad", "rad"):
            return value
    return None


def _philips_scale_slope(ds):
    """Philips' private scale slope (2005,100E) when usable: floating-point value
    ``FP = DV / (RS x SS)`` with DV the rescaled (display) value and RS the rescale slope."""
    if manufacturer({"Manufacturer": ds.get("Manufacturer", "")}) != "philips":
        return None
    elem = ds.get((0x2005, 0x100E))
    ss = _float_or_none(getattr(elem, "value", None))
    rs = _float_or_none(ds.get("RescaleSlope", 1) or 1)
    return ss if ss and ss > 0 and rs else None


def _dicom_meta(ds, path) -> dict:
    """dcm2niix-style sidecar entries from a DICOM header (times in s); for Philips the scaling
    fields as dcm2niix names them, and ``UsePhilipsFloatNotDisplayScaling`` 1 when the pixels
    are converted to Philips floating-point values (:func:`_pixels`)."""
    meta = {}

    def put(key, value, conv=lambda v: v):
        if value is not None and value != "":
            meta[key] = conv(value)

    put("Modality", ds.get("Modality"), str)
    put("Manufacturer", ds.get("Manufacturer"), str)
    put("MagneticFieldStrength", ds.get("MagneticFieldStrength"), float)
    put("ImagingFrequency", ds.get("ImagingFrequency") or ds.get("TransmitterFrequency"), float)
    put("SeriesNumber", ds.get("SeriesNumber"), int)
    put("SeriesInstanceUID", ds.get("SeriesInstanceUID"), str)
    put("SeriesDescription", ds.get("SeriesDescription"), str)
    put("ProtocolName", ds.get("ProtocolName"), str)
    put("SequenceName", ds.get("SequenceName"), str)
    put("ImageType", ds.get("ImageType"), lambda v: [v] if isinstance(v, str) else [str(t) for t in v])
    put("ComplexImageComponent", ds.get("ComplexImageComponent"), str)
    put("EchoTime", ds.get("EchoTime", ds.get("EffectiveEchoTime")), lambda v: float(v) / 1000.0)
    put("EchoNumber", ds.get("EchoNumbers"), int)
    put("RepetitionTime", ds.get("RepetitionTime"), lambda v: float(v) / 1000.0)
    put("FlipAngle", ds.get("FlipAngle"), float)
    put("BitsStored", ds.get("BitsStored"), int)
    put("PhaseUnits", _phase_units(ds))
    vendor = manufacturer(meta)
    if vendor == "ge" and (0x0043, 0x102F) in ds:
        try:
            meta["GEImageType"] = int(ds[0x0043, 0x102F].value)
        except (TypeError, ValueError):
            pass
    if vendor == "philips":
        if (0x2005, 0x1011) in ds:
            meta["PhilipsImageType"] = str(ds[0x2005, 0x1011].value).strip()
        put("PhilipsRescaleSlope", _float_or_none(ds.get("RescaleSlope")))
        put("PhilipsRescaleIntercept", _float_or_none(ds.get("RescaleIntercept")))
        ss = _philips_scale_slope(ds)
        if ss is not None:  # pixels become floating-point values: the display unit no longer holds
            meta["PhilipsScaleSlope"] = ss
            meta["UsePhilipsFloatNotDisplayScaling"] = 1
            if "PhaseUnits" in meta:
                meta["PhilipsDisplayUnits"] = meta.pop("PhaseUnits")
    if vendor == "siemens":
        proto = _siemens_protocol(ds)
        if proto.get("alTE_us"):
            meta["ProtocolEchoTimes"] = [t / 1e6 for t in proto["alTE_us"]]
        if proto.get("SequenceFile"):
            meta["PulseSequenceDetails"] = proto["SequenceFile"]
    return meta


def _is_enhanced(ds) -> bool:
    return str(ds.get("SOPClassUID", "")) in _ENHANCED_MR or int(ds.get("NumberOfFrames", 1) or 1) > 1


def _check_slice(ds, path):
    if "MOSAIC" in [str(t).upper() for t in (ds.get("ImageType") or [])]:
        raise QSMInputError("Siemens mosaic DICOM is not supported; convert it with dcm2niix", path)
    for tag in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing"):
        if tag not in ds:
            raise QSMInputError(f"DICOM image has no {tag}: not an image slice", path)


def _decode(ds, path) -> np.ndarray:
    try:
        return ds.pixel_array
    except Exception as exc:
        raise QSMInputError(f"cannot decode DICOM pixel data ({exc}); compressed files need "
                            "pylibjpeg / gdcm, or convert with dcm2niix", path) from exc


def _pixels(ds, path, px=None) -> np.ndarray:
    """Stored values after the DICOM rescale (integer when the rescale is integer-valued);
    Philips images with a private scale slope as floating-point values (dcm2niix's default,
    so DICOM and dcm2niix's NIfTI give the same numbers). ``px``: pixels already decoded (a
    frame of a multi-frame file)."""
    px = _decode(ds, path) if px is None else px
    if px.ndim != 2:
        raise QSMInputError(f"DICOM slice must be 2-D grey values, got shape {px.shape}", path)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    inter = float(ds.get("RescaleIntercept", 0) or 0)
    ss = _philips_scale_slope(ds)
    if ss is not None:
        return ((px.astype(np.float64) * slope + inter) / (slope * ss)).astype(np.float32)
    if slope == 1 and inter == 0:
        return px
    if slope == int(slope) and inter == int(inter):
        return px.astype(np.int32) * int(slope) + int(inter)
    return (px.astype(np.float64) * slope + inter).astype(np.float32)


_FRAME_GROUPS = (0x52009229, 0x52009230)  # Shared / Per-Frame Functional Groups Sequence
_PHILIPS_FRAME_PRIVATE = (0x2005, 0x140F)  # Philips' per-frame copy of the classic header


def _merge(frame, item):
    for elem in item:
        if elem.tag != 0x7FE00010:
            frame[elem.tag] = elem


def _enhanced_frames(ds, path):
    """Frames of an enhanced (multi-frame) DICOM as ``(frame dataset, pixels)``: each frame
    dataset holds the file's attributes, then Philips' private per-frame header (2005,140F)
    when present, then the shared and the frame's own functional groups (PS3.3 C.7.6.16:
    Plane Position / Orientation, Pixel Measures, MR Echo, MR Image Frame Type, Pixel Value
    Transformation, Real World Value Mapping), later ones taking precedence, so the standard
    per-frame geometry is what counts. ``EffectiveEchoTime`` stands in for ``EchoTime`` and the
    frame type for ``ImageType``."""
    pydicom = _import_pydicom()
    base = pydicom.Dataset()
    for elem in ds:
        if elem.tag not in _FRAME_GROUPS and elem.tag != 0x7FE00010:
            base[elem.tag] = elem
    shared = list(ds.get("SharedFunctionalGroupsSequence", None) or [])[:1]
    per_frame = list(ds.get("PerFrameFunctionalGroupsSequence", None) or [])
    n = int(ds.get("NumberOfFrames", 1) or 1)
    if len(per_frame) != n:
        raise QSMInputError(f"enhanced DICOM has {n} frames but {len(per_frame)} per-frame "
                            "functional groups", path)
    px = _decode(ds, path)
    px = px[None] if px.ndim == 2 else px
    if px.shape[0] != n:
        raise QSMInputError(f"enhanced DICOM pixel data hold {px.shape[0]} frames, header says {n}",
                            path)
    for i, groups in enumerate(per_frame):
        frame = pydicom.Dataset()
        _merge(frame, base)
        private = groups.get(_PHILIPS_FRAME_PRIVATE)
        if private is not None and private.VR == "SQ" and len(private.value):
            _merge(frame, private.value[0])
        for group in (*shared, groups):
            for elem in group:
                if elem.VR == "SQ" and elem.tag != _PHILIPS_FRAME_PRIVATE and len(elem.value):
                    _merge(frame, elem.value[0])
                    if elem.keyword == "RealWorldValueMappingSequence":
                        frame[elem.tag] = elem
        if "FrameType" in frame:
            frame.ImageType = list(frame.FrameType)
        if "EffectiveEchoTime" in frame:
            frame.EchoTime = frame.EffectiveEchoTime
        _check_slice(frame, path)
        yield frame, px[i]


def _stack_slices(slices, source) -> tuple[np.ndarray, np.ndarray]:
    """(data (X, Y, Z), RAS affine) from (dataset, path, pixels) slices of one image volume."""
    first_ds, first_path = slices[0][0], slices[0][1]
    iop = np.array(first_ds.ImageOrientationPatient, dtype=np.float64)
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    spacing = np.array(first_ds.PixelSpacing, dtype=np.float64)  # (between rows, between columns)
    shape2 = slices[0][2].shape
    for ds, path, px in slices[1:]:
        if not np.allclose(np.array(ds.ImageOrientationPatient, dtype=np.float64), iop, atol=1e-4):
            raise QSMInputError(f"slices of one image have different orientations ({first_path})", path)
        if px.shape != shape2 or not np.allclose(np.array(ds.PixelSpacing, dtype=np.float64), spacing):
            raise QSMInputError(f"slices of one image differ in matrix or pixel spacing ({first_path})",
                                path)
    pos = np.array([np.array(s[0].ImagePositionPatient, dtype=np.float64) for s in slices])
    order = np.argsort(pos @ normal, kind="stable")
    slices = [slices[i] for i in order]
    pos = pos[order]
    dist = pos @ normal
    if len(slices) > 1:
        gaps = np.diff(dist)
        if np.any(gaps < 1e-3):
            raise QSMInputError("two slices share a position: several images are mixed in one series "
                                "(e.g. echoes without EchoNumbers); separate them", source)
        if np.max(np.abs(gaps - gaps.mean())) > 0.01 * gaps.mean() + 1e-3:
            raise QSMInputError(f"irregular slice spacing ({gaps.min():.4g}..{gaps.max():.4g} mm): "
                                "missing slices?", source)
        step = (pos[-1] - pos[0]) / (len(slices) - 1)
    else:
        thick = float(first_ds.get("SpacingBetweenSlices") or first_ds.get("SliceThickness") or 1.0)
        step = normal * thick
    # voxel (i, j, k): i along the row direction (column index), j along the column direction
    # (row index), k over sorted slices; pixel_array is [row, column] so transpose each slice.
    data = np.stack([s[2].T for s in slices], axis=2)
    n_rows = shape2[0]
    lps = np.eye(4)
    lps[:3, 0] = row_dir * spacing[1]
    lps[:3, 1] = col_dir * spacing[0]
    lps[:3, 2] = step
    lps[:3, 3] = pos[0]
    # dcm2niix stores rows bottom-up: flip j and move the origin to the last row
    data = data[:, ::-1, :]
    lps[:3, 3] = lps[:3, 3] + (n_rows - 1) * lps[:3, 1]
    lps[:3, 1] = -lps[:3, 1]
    affine = _FLIP_LPS @ lps
    if np.issubdtype(data.dtype, np.integer):
        for dt in (np.int16, np.uint16, np.int32):
            info = np.iinfo(dt)
            if data.min() >= info.min and data.max() <= info.max:
                data = data.astype(dt)
                break
    return np.ascontiguousarray(data), affine


def read_dicom(paths) -> list[ScannerImage]:
    """DICOM files and/or directories (searched recursively) as :class:`ScannerImage` s.

    Slices are grouped by series (SeriesInstanceUID), image kind (magnitude / phase /
    real / imaginary), EchoNumbers and EchoTime; each group becomes one 3-D volume.
    A Siemens field-mapping series (``*fm`` sequence or ``gre_field_mapping``) with a single
    phase echo and two protocol echo times is a phase difference (``phasediff``), with
    ``EchoTime1`` / ``EchoTime2`` from the protocol. Files that are not DICOM are skipped.
    """
    pydicom = _import_pydicom()
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    groups: dict = {}
    for path in _dicom_files(paths):
        try:
            ds = pydicom.dcmread(path)
        except (pydicom.errors.InvalidDicomError, OSError):
            continue
        if "PixelData" not in ds:
            continue  # DICOMDIR, presentation states, reports
        if _is_enhanced(ds):
            frames = [(f, _pixels(f, path, px)) for f, px in _enhanced_frames(ds, path)]
        else:
            _check_slice(ds, path)
            frames = [(ds, _pixels(ds, path))]
        for frame, px in frames:
            meta = _dicom_meta(frame, path)
            if len(frames) > 1:
                meta["MultiFrame"] = True
            kind = image_kind(meta)
            key = (meta.get("SeriesInstanceUID"), meta.get("SeriesNumber"), kind,
                   meta.get("EchoNumber"),
                   None if meta.get("EchoTime") is None else round(meta["EchoTime"], 7))
            groups.setdefault(key, {"meta": meta, "kind": kind, "slices": []})
            groups[key]["slices"].append((frame, path, px))
    if not groups:
        raise QSMInputError(f"no DICOM images found in {', '.join(os.fspath(p) for p in paths)}")
    images = []
    for g in groups.values():
        files = sorted({s[1] for s in g["slices"]})
        source = os.path.dirname(files[0]) or files[0]
        data, affine = _stack_slices(g["slices"], source)
        meta = dict(g["meta"], SourceFiles=len(files))
        images.append(ScannerImage(Volume(data, affine, source, meta), g["kind"], source, files))
    _mark_phase_differences(images)
    return sorted(images, key=lambda im: (im.meta.get("SeriesNumber") or 0, im.kind,
                                          im.meta.get("EchoNumber") or 0))


def _mark_phase_differences(images):
    """Siemens field-mapping series with one phase image: it is the phase difference."""
    by_series: dict = {}
    for im in images:
        if im.kind == "phase":
            by_series.setdefault(im.series, []).append(im)
    for group in by_series.values():
        if len(group) != 1:
            continue
        im = group[0]
        meta = im.meta
        fm_sequence = (re.search(r"fm\d", str(meta.get("SequenceName", ""))) is not None
                       or "field_mapping" in str(meta.get("PulseSequenceDetails", "")))
        tes = meta.get("ProtocolEchoTimes", [])
        if manufacturer(meta) == "siemens" and fm_sequence and len(tes) >= 2 and tes[1] > tes[0]:
            meta["EchoTime1"], meta["EchoTime2"] = float(tes[0]), float(tes[1])
            im.kind = "phasediff"


# ----------------------------------------------------------------------------- series


def read_scanner_images(paths) -> list[ScannerImage]:
    """NIfTI files (with sidecars), DICOM files, or directories of either, as images."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise QSMInputError("no scanner files given")
    nifti, other = [], []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(os.path.join(p, n) for n in os.listdir(p) if _is_nifti(n))
            (nifti.extend(found) if found else other.append(p))
        elif _is_nifti(p):
            nifti.append(p)
        else:
            other.append(p)
    images = []
    for p in nifti:
        images.extend(read_nifti_image(p))
    if other:
        images.extend(read_dicom(other))
    return images


def _describe(images) -> str:
    seen = []
    for im in images:
        text = f"series {im.meta.get('SeriesNumber', '?')} {im.kind} ({im.source})"
        if text not in seen:
            seen.append(text)
    return "; ".join(seen[:6]) + ("; ..." if len(seen) > 6 else "")


def _select(images, kind=None, series=None):
    if kind is not None:
        if kind not in KINDS:
            raise QSMInputError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        images = [im for im in images if im.kind == kind]
    if series is not None:
        images = [im for im in images if im.meta.get("SeriesNumber") == series]
    return images


def _one_series(images, what, paths) -> list:
    if not images:
        raise QSMInputError(f"no {what} images in {', '.join(map(str, paths))}")
    kinds = sorted({im.kind for im in images})
    if len(kinds) > 1:
        raise QSMInputError(f"mixed series: {', '.join(kinds)} images given together ({_describe(images)}); "
                            "choose one kind")
    if len({im.series for im in images}) > 1:
        raise QSMInputError(f"mixed series: {what} images from several series ({_describe(images)}); "
                            "choose one series")
    return images


def _stack_echoes(images, what) -> tuple[list, list]:
    """Images sorted by echo time (echo number when absent); duplicates are an error."""
    def key(im):
        return (im.te if im.te is not None else np.inf, im.meta.get("EchoNumber") or 0)

    images = sorted(images, key=key)
    tes = [im.te for im in images]
    for a, b in zip(images, images[1:]):
        if key(a) == key(b):
            raise QSMInputError(f"two {what} images with the same echo ({a.source}, {b.source})")
    for im in images[1:]:
        check_same_grid(images[0].volume, im.volume, f"{what} echo 1", f"{what} echo")
    return images, tes


def _require_te(im, what):
    if im.te is None:
        raise QSMInputError(f"{what} sidecar has no EchoTime; give --te SECONDS", im.source)
    return im.te


def read_scanner_series(paths, kind=None, series=None, b0_from="frequency") -> ScannerSeries:
    """One kind of image from one series, echoes stacked in the 4th axis, in physical units.

    Parameters
    ----------
    paths : NIfTI files with dcm2niix sidecars, DICOM files, or directories of either.
    kind : one of :data:`KINDS` to pick from a folder holding several (default: the only one).
    series : SeriesNumber to pick when several series are present.
    b0_from : see :func:`b0_from_sidecar`.

    Returns
    -------
    :class:`ScannerSeries`: phase / phasediff in rad, fieldmap in Hz; ``te`` per echo
    (``[TE1, TE2]`` for phasediff and field maps); ``b0`` in T.
    Mixed kinds or series, a phase without ``EchoTime`` and unknown phase ranges raise
    :class:`QSMInputError` naming the file.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    return series_from_images(read_scanner_images(paths), kind, series, b0_from, paths)


def series_from_images(images, kind=None, series=None, b0_from="frequency", paths=()) -> ScannerSeries:
    """:func:`read_scanner_series` on images already read (a folder is read once)."""
    images = _one_series(_select(images, kind, series), kind or "scanner", paths)
    kind = images[0].kind
    images, tes = _stack_echoes(images, kind)
    first = images[0]
    arrays, rules = [], []
    for im in images:
        if kind in ("phase", "phasediff"):
            rad, rule = convert_phase(im.volume.data, im.meta, im.source)
            arrays.append(rad)
            rules.append(rule)
        elif kind == "fieldmap":
            arrays.append(fieldmap_to_hz(im.volume.data, im.meta, im.source))
        else:
            arrays.append(im.volume.data)
    if kind == "phase":
        te = [_require_te(im, "phase") for im in images]
    elif kind in ("phasediff", "fieldmap"):
        if len(images) != 1:
            raise QSMInputError(f"expected one {kind} image, got {len(images)} ({_describe(images)})")
        m = first.meta
        te = [float(m["EchoTime1"]), float(m["EchoTime2"])] if "EchoTime1" in m and "EchoTime2" in m else []
    else:
        te = [float(t) for t in tes] if all(t is not None for t in tes) else []
    b0, b0_source = b0_from_sidecar(first.meta, first.source, b0_from)
    data = arrays[0] if len(arrays) == 1 else np.stack(arrays, axis=3)
    meta = dict(first.meta)
    meta.update({"scanner_kind": kind, "b0_source": b0_source, "files": [im.source for im in images],
                 "files_meta": [im.meta for im in images]})
    if kind in ("phase", "magnitude") and te:
        meta["EchoTime"] = te if len(te) > 1 else te[0]
    if rules:
        meta["phase_convention"] = rules[0] if all(r == rules[0] for r in rules) else rules
    vol = Volume(data, first.volume.affine, first.source, meta)
    return ScannerSeries(vol, te, float(b0), kind, meta)


def read_fieldmap_hz(paths, series=None, b0_from="frequency") -> ScannerSeries:
    """A B0 field map in Hz: a Siemens phase difference converted with
    :func:`phasediff_to_hz`, or a vendor field map (GE / Philips ``fieldmaphz``) as is.
    ``te`` is ``[TE1, TE2]`` when known."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    images = _select(read_scanner_images(paths), None, series)
    kinds = {im.kind for im in images}
    kind = "phasediff" if "phasediff" in kinds else "fieldmap" if "fieldmap" in kinds else None
    if kind is None:
        raise QSMInputError(f"no field map (phase difference or Hz map) in {', '.join(map(str, paths))} "
                            f"(found: {_describe(images) or 'nothing'})")
    s = series_from_images(images, kind, series, b0_from, paths)
    if kind == "phasediff":
        if len(s.te) != 2:
            raise QSMInputError("phase difference has no EchoTime1 / EchoTime2; give the echo times",
                                s.data.path)
        hz = phasediff_to_hz(s.data.data, *s.te)
        meta = dict(s.meta, Units="Hz", scanner_kind="fieldmap")
        s = ScannerSeries(Volume(hz, s.data.affine, s.data.path, meta), s.te, s.b0, "fieldmap", meta)
    return s


def _complex_series(images, series, b0_from, paths):
    """Magnitude and phase series from a real / imaginary export (GE and others)."""
    re_s = series_from_images(images, "real", series, b0_from, paths)
    im_s = series_from_images(images, "imaginary", series, b0_from, paths)
    check_same_grid(re_s.data, im_s.data, "real", "imaginary")
    if re_s.data.data.shape != im_s.data.data.shape or not np.allclose(re_s.te, im_s.te, atol=1e-6):
        raise QSMInputError("real and imaginary images differ in shape or echo times", im_s.data.path)
    mag, pha = complex_to_phase(re_s.data.data, im_s.data.data)
    rule = {"name": "complex", "scale": 1.0, "offset": 0.0,
            "source": "real and imaginary images: phase = atan2(imaginary, real)"}
    meta = dict(re_s.meta, scanner_kind="phase", phase_convention=rule)
    out = []
    for kind, data in (("magnitude", mag), ("phase", pha)):
        m = dict(meta, scanner_kind=kind)
        out.append(ScannerSeries(Volume(data, re_s.data.affine, re_s.data.path, m), list(re_s.te),
                                 re_s.b0, kind, m))
    return out


def load_gre_scanner(paths, series=None, b0_from="frequency"):
    """Magnitude and phase of a (multi-echo) GRE from DICOM or dcm2niix NIfTI + sidecars.

    Returns ``(magnitude Volume, phase Volume (rad, float32), te list (s), b0 (T))``, echoes
    in the 4th axis, like :func:`qsmkit.io.load_gre`. ``series`` is a SeriesNumber or a pair
    ``(magnitude series, phase series)`` when the folder holds several of either. Without
    phase images, real and imaginary images (a GE export) give magnitude and phase. The
    phase's ``meta["phase_convention"]`` records how it became radians.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    images = read_scanner_images(paths)
    ms, ps = series if isinstance(series, (tuple, list)) else (series, series)
    kinds = {im.kind for im in images}
    if "phase" not in kinds and {"real", "imaginary"} <= kinds:
        mag, pha = _complex_series(images, ps, b0_from, paths)
        if "magnitude" in kinds:
            mag = series_from_images(images, "magnitude", ms, b0_from, paths)
    else:
        mag = series_from_images(images, "magnitude", ms, b0_from, paths)
        pha = series_from_images(images, "phase", ps, b0_from, paths)
    check_same_grid(mag.data, pha.data, "magnitude", "phase")
    if mag.data.data.shape != pha.data.data.shape:
        raise QSMInputError(f"magnitude shape {mag.data.data.shape} does not match phase shape "
                            f"{pha.data.data.shape} ({pha.data.path})")
    if mag.te and not np.allclose(mag.te, pha.te, atol=1e-6):
        raise QSMInputError(f"magnitude echo times {mag.te} differ from phase echo times {pha.te}",
                            pha.data.path)
    return mag.data, pha.data, list(pha.te), pha.b0


__all__ = [
    "KINDS",
    "ScannerImage",
    "ScannerSeries",
    "image_kind",
    "manufacturer",
    "b0_from_sidecar",
    "phase_to_rad",
    "phase_convention",
    "convert_phase",
    "phasediff_to_hz",
    "fieldmap_to_hz",
    "read_nifti_image",
    "read_dicom",
    "read_scanner_images",
    "read_scanner_series",
    "series_from_images",
    "read_fieldmap_hz",
    "load_gre_scanner",
]
