"""Statistics of chi per region of interest, referenced to a reference region (e.g. CSF).

The table QSM studies publish: per region, voxel count, volume, mean, SD, median, IQR, min,
max and the mean relative to the reference region's mean (``mean_ref``). Regions come from an
integer label map (with an optional name table: FreeSurfer LUT, ITK-SNAP label file, CSV or
BIDS ``dseg.tsv``) or from a 3D Slicer segmentation (``.seg.nrrd``, read with ``slicerio``),
whose segments may overlap. Column names (``COLUMNS``) are stable: scripts and the README rely
on them. Cohort tables are the same rows with a leading ``subject`` column (long format).
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import QSMInputError

COLUMNS = ("label", "name", "voxels", "volume_mm3", "mean", "sd", "median", "iqr", "min", "max",
           "mean_ref")


@dataclass
class Region:
    label: int
    name: str
    mask: np.ndarray  # bool, on the chi grid


# ---------------------------------------------------------------- label names

_INT = re.compile(r"-?[0-9]+", re.ASCII)
_NUMERIC_START = re.compile(r"^[-+]?\d", re.UNICODE)


def _read_text(path) -> str:
    """A text file as UTF-8 (a UTF-8 or UTF-16 byte-order mark honoured); one-line errors."""
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise QSMInputError(f"cannot read label-name table ({err.strerror})", path) from None
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        encoding = "utf-16"
    else:
        encoding = "utf-8-sig"
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as err:
        raise QSMInputError(f"label-name table is not {encoding.replace('-sig', '')} text (byte "
                            f"0x{raw[err.start]:02x} at offset {err.start}); save it as UTF-8",
                            path) from None
    if "\x00" in text:
        raise QSMInputError("label-name table is not a text file (it holds NUL bytes)", path)
    return text


def _label_id(token: str, path, lineno):
    """The integer label id of a first column, None for a line that is not a row (a header),
    an error for a token that starts like a number but is not an integer (``12a``, ``²``)."""
    token = token.strip()
    if _INT.fullmatch(token):
        return int(token)
    if _NUMERIC_START.match(token) or any(c.isdigit() for c in token[:1]):
        raise QSMInputError(f"line {lineno}: label id {token!r} is not an integer", path)
    return None


def read_label_names(path) -> dict:
    """Label id -> name from a FreeSurfer colour LUT (``id name R G B A``), an ITK-SNAP label
    description file (``id R G B A vis mesh "name"``), a CSV/TSV with a header naming an id
    column (``index``, ``label``, ``id`` or ``value``) and a ``name`` column (BIDS ``dseg.tsv``
    included), or plain ``id name`` lines. Lines starting with ``#`` are comments. The file
    is UTF-8 (or UTF-16 with a byte-order mark); an id that is not an integer, or an id named
    twice with different names, is an error naming the line."""
    path = str(path)
    text = _read_text(path)
    lines = [(n, ln) for n, ln in enumerate(text.splitlines(), start=1)
             if ln.strip() and not ln.lstrip().startswith("#")]
    names = {}

    def add(lab, name, lineno):
        if lab in names and names[lab] != name:
            raise QSMInputError(f"line {lineno}: label {lab} is named twice ({names[lab]!r} and "
                                f"{name!r})", path)
        names[lab] = name

    if lines:
        delim = "\t" if "\t" in lines[0][1] else ","
        header = [h.strip().lower() for h in lines[0][1].split(delim)]
        id_col = next((header.index(c) for c in ("index", "label", "id", "value") if c in header), None)
        if id_col is not None and "name" in header:  # CSV / TSV / BIDS dseg.tsv with a header
            name_col = header.index("name")
            for (lineno, _), row in zip(lines[1:], csv.reader([ln for _, ln in lines[1:]],
                                                              delimiter=delim)):
                if len(row) > max(id_col, name_col):
                    lab = _label_id(row[id_col], path, lineno)
                    if lab is None:
                        raise QSMInputError(f"line {lineno}: label id {row[id_col].strip()!r} is "
                                            "not an integer", path)
                    add(lab, row[name_col].strip(), lineno)
        else:
            for lineno, ln in lines:
                quoted = re.search(r'"([^"]*)"', ln)  # ITK-SNAP: the name is the quoted field
                parts = ln.replace(",", " ").replace("\t", " ").split()
                lab = _label_id(parts[0], path, lineno) if parts else None
                if lab is None:
                    continue
                if quoted:
                    add(lab, quoted.group(1), lineno)
                elif len(parts) >= 2:
                    add(lab, parts[1], lineno)  # FreeSurfer LUT / "id name"
    names.pop(0, None)  # 0 is the background of a label map ("Unknown", "Clear Label")
    if not names:
        raise QSMInputError("no 'id name' rows found in the label-name table", path)
    return names


# ---------------------------------------------------------------- regions

#: the most distinct non-zero labels a label map may hold (README "Input limits"); a map with
#: more is most likely an intensity image given as labels. ``$QSMKIT_MAX_LABELS`` overrides it.
MAX_LABELS = 2000
MAX_LABELS_ENV = "QSMKIT_MAX_LABELS"
#: how far from an integer a stored label value may be (float storage rounding)
LABEL_TOLERANCE = 1e-3


def max_labels() -> int:
    env = os.environ.get(MAX_LABELS_ENV, "").strip()
    if not env:
        return MAX_LABELS
    if not env.isdigit() or int(env) < 1:
        raise QSMInputError(f"{MAX_LABELS_ENV} must be a positive integer, got {env!r}")
    return int(env)


def label_map(data, path=None) -> np.ndarray:
    """A label image as int64, refused (one line naming ``path``) when it holds NaN/Inf,
    values that are not integers (e.g. labels x 0.5, or a map resampled with linear
    interpolation; rounding would merge regions), or more than ``max_labels()`` distinct
    non-zero labels (an intensity image given as labels)."""
    a = np.asarray(data)
    if np.iscomplexobj(a):
        raise QSMInputError("label map is complex-valued; labels must be integers", path)
    if a.dtype == np.bool_:
        a = a.astype(np.uint8)
    if np.issubdtype(a.dtype, np.floating):
        bad = ~np.isfinite(a)
        if bad.any():
            raise QSMInputError(f"label map has {int(bad.sum())} NaN/Inf voxels; labels must be "
                                "integers", path)
        frac = np.abs(a - np.rint(a)) > LABEL_TOLERANCE
        if frac.any():
            example = float(a[frac].flat[0])
            raise QSMInputError(
                f"label map has {int(frac.sum())} voxels with non-integer values (e.g. "
                f"{example:g}); labels must be integers (scaled, or resampled with linear "
                "interpolation? resample label maps with nearest neighbour)", path)
        if a.size and (a.max() > 2**62 or a.min() < -(2**62)):
            raise QSMInputError("label map values are out of the integer range", path)
    labels = np.rint(a).astype(np.int64) if not np.issubdtype(a.dtype, np.integer) else \
        a.astype(np.int64, copy=False)
    ids = np.unique(labels)
    n = int(np.count_nonzero(ids))
    cap = max_labels()
    if n > cap:
        raise QSMInputError(f"label map has {n} distinct labels, more than {cap} (an intensity "
                            f"image given as labels? set {MAX_LABELS_ENV} to allow more)", path)
    return labels


def regions_from_label_map(labels, label_names=None) -> list:
    """One region per non-zero integer label (a full mask each: for overlapping regions and
    callers that need the masks; ``roi_table`` on a label map needs none)."""
    labels = label_map(labels)
    names = dict(label_names or {})
    return [Region(int(v), str(names.get(int(v), int(v))), labels == v)
            for v in np.unique(labels) if v != 0]


def read_segmentation(path):
    """Regions and RAS affine from a 3D Slicer ``.seg.nrrd`` (segments may overlap, stored in
    layers). Labels are the segments' order in the file, from 1; names are the segment names."""
    try:
        import slicerio
    except ImportError:  # pragma: no cover - slicerio is a dependency
        raise QSMInputError("reading .seg.nrrd needs slicerio: pip install slicerio", path) from None
    from .io import check_image_size

    check_image_size(str(path), "segmentation")  # the header's claim, before slicerio reads
    try:
        seg = slicerio.read_segmentation(str(path))
    except Exception as err:  # slicerio raises plain errors on bad files
        raise QSMInputError(f"not a readable Slicer segmentation ({err})", path) from None
    lps_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
    affine = lps_to_ras @ np.asarray(seg["ijkToLPS"], dtype=float)
    regions = [Region(i, str(s.get("name", s.get("id", i))), slicerio.segment_mask(seg, s))
               for i, s in enumerate(seg.get("segments", []), start=1)]
    if not regions:
        raise QSMInputError("segmentation has no segments", path)
    return regions, affine


def resample_nearest(data, src_affine, dst_shape, dst_affine):
    """Nearest-neighbour resampling of ``data`` (on ``src_affine``) onto a grid of ``dst_shape``
    and ``dst_affine``; voxels that fall outside ``data`` are 0. Returns (resampled, fraction
    of destination voxels inside the source grid)."""
    src_to_dst = np.linalg.inv(src_affine) @ dst_affine
    ijk = np.indices(dst_shape, dtype=np.float32).reshape(3, -1)
    pos = src_to_dst[:3, :3].astype(np.float32) @ ijk + src_to_dst[:3, 3:4].astype(np.float32)
    idx = np.rint(pos).astype(np.int64)
    inside = np.all((idx >= 0) & (idx < np.array(data.shape[:3])[:, None]), axis=0)
    out = np.zeros(int(np.prod(dst_shape)), dtype=data.dtype)
    out[inside] = data[tuple(i[inside] for i in idx)]
    return out.reshape(dst_shape), float(inside.mean())


# ---------------------------------------------------------------- the table

def resolve_reference(reference, regions_or_names):
    """The reference region's label from a label number or a name (case-insensitive); None
    passes through."""
    if reference is None or reference == "":
        return None
    names = ({r.label: r.name for r in regions_or_names} if isinstance(regions_or_names, list)
             else dict(regions_or_names))
    try:
        return int(reference)
    except (TypeError, ValueError):
        pass
    for lab, name in names.items():
        if str(name).lower() == str(reference).lower():
            return int(lab)
    raise QSMInputError(f"reference region {reference!r} is not among the labels "
                        f"({', '.join(map(str, names.values())) or 'no names given'})")


def region_row(values, voxel_volume):
    """The statistics of one region's chi values (1-D)."""
    q1, med, q3 = np.percentile(values, [25, 50, 75])
    return {
        "voxels": int(values.size),
        "volume_mm3": values.size * voxel_volume,
        "mean": float(values.mean()),
        "sd": float(values.std(ddof=1)) if values.size > 1 else 0.0,
        "median": float(med),
        "iqr": float(q3 - q1),
        "min": float(values.min()),
        "max": float(values.max()),
    }


def _erode_labels(labels, voxel_size, radius_mm):
    """Every label eroded by a ball of ``radius_mm`` in one pass: a voxel keeps its label when
    the whole ball around it carries that label (voxels beyond the border count as 0), the
    same as eroding each region's mask on its own (``masking.erode_mm``)."""
    from scipy import ndimage

    from .masking import ellipsoid_structure

    st = ellipsoid_structure(radius_mm, voxel_size)
    low = ndimage.minimum_filter(labels, footprint=st, mode="constant", cval=0)
    high = ndimage.maximum_filter(labels, footprint=st, mode="constant", cval=0)
    return np.where((low == labels) & (high == labels), labels, 0)


def label_statistics(chi, labels) -> dict:
    """Per non-zero label of an integer map, the ``COLUMNS`` statistics of ``chi`` computed in
    one sort of the labelled voxels (not one mask per label): returns label -> stats dict.
    Percentiles interpolate linearly between order statistics (numpy's default)."""
    lab = np.asarray(labels).ravel()
    sel = lab != 0
    values = np.asarray(chi, dtype=np.float64).ravel()[sel]
    lab = lab[sel]
    if lab.size == 0:
        return {}
    order = np.lexsort((values, lab))
    lab, values = lab[order], values[order]
    ids, starts, counts = np.unique(lab, return_index=True, return_counts=True)
    mean = np.add.reduceat(values, starts) / counts
    ss = np.add.reduceat((values - np.repeat(mean, counts)) ** 2, starts)
    sd = np.where(counts > 1, np.sqrt(ss / np.maximum(counts - 1, 1)), 0.0)
    last = starts + counts - 1

    def percentile(q):
        pos = starts + q * (counts - 1)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, last)
        return values[lo] + (pos - lo) * (values[hi] - values[lo])

    q1, med, q3 = percentile(0.25), percentile(0.5), percentile(0.75)
    return {int(i): {"voxels": int(c), "mean": float(m), "sd": float(d), "median": float(md),
                     "iqr": float(b - a), "min": float(values[s0]), "max": float(values[e])}
            for i, c, m, d, md, a, b, s0, e in zip(ids, counts, mean, sd, med, q1, q3, starts,
                                                   last)}


def _empty_stats():
    out = {c: float("nan") for c in COLUMNS[4:-1]}
    out.update(voxels=0, volume_mm3=0.0)
    return out


def roi_table(chi, labels, voxel_size, label_names=None, reference=None, erode_mm=0.0,
              empty_labels=(), reference_region=None):
    """One row (dict, keys ``COLUMNS``) per region.

    Parameters
    ----------
    chi : (X, Y, Z) susceptibility map.
    labels : integer label map on chi's grid (checked by ``label_map``; statistics in one
        pass), or a list of :class:`Region` (overlapping allowed).
    voxel_size : mm, for volumes and erosion.
    label_names : id -> name for a label map.
    reference : label number or name of the reference region; ``mean_ref`` = mean - its mean
        (NaN without a reference).
    erode_mm : erode every region, the reference included, by a ball of this radius first
        (fewer partial-volume voxels at region borders); a region eroded away is reported with
        0 voxels and NaN statistics.
    empty_labels : labels of a label map to list with 0 voxels and NaN statistics although
        absent from ``labels`` (regions that lie wholly outside the chi map's mask).
    reference_region : instead of a label, the reference as a region on chi's grid (bool), e.g.
        the automatic CSF mask of ``qsmkit.reference`` (not eroded again).
    """
    if reference_region is not None and reference not in (None, ""):
        raise QSMInputError("give a reference label or a reference region, not both")
    chi = np.asarray(chi, dtype=np.float64)
    voxel_volume = float(np.prod(voxel_size))
    if isinstance(labels, list):
        per_label = _region_statistics(chi, labels, voxel_size, erode_mm)
        names = {r.label: r.name for r in labels}
    else:
        labels = np.asarray(labels)
        if labels.shape[:3] != chi.shape[:3]:
            raise QSMInputError(f"labels shape {labels.shape} does not match chi shape {chi.shape}")
        labels = label_map(labels)
        present = sorted({int(v) for v in np.unique(labels) if v != 0} | set(map(int, empty_labels)))
        if not present:
            raise QSMInputError("the label map has no non-zero labels")
        given = dict(label_names or {})
        names = {v: str(given.get(v, v)) for v in present}
        eroded = _erode_labels(labels, voxel_size, erode_mm) if erode_mm > 0 else labels
        stats = label_statistics(chi, eroded)
        per_label = {v: stats.get(v) for v in present}
    ref_id = resolve_reference(reference, names)
    ref_mean = float("nan")
    if ref_id is not None:
        if ref_id not in per_label:
            raise QSMInputError(f"reference label {ref_id} has no voxels")
        if per_label[ref_id] is None:
            raise QSMInputError(f"reference region {ref_id} has no voxels left after eroding "
                                f"{erode_mm} mm")
        ref_mean = per_label[ref_id]["mean"]
    if reference_region is not None:
        region = np.asarray(reference_region).astype(bool)
        if region.shape != chi.shape[:3] or not region.any():
            raise QSMInputError("the reference region is empty or not on the chi map's grid")
        ref_mean = float(chi[region].mean())
    rows = []
    for lab, st in per_label.items():
        if st is None:
            st = _empty_stats()
        else:
            st = {**st, "volume_mm3": st["voxels"] * voxel_volume}
        row = {"label": lab, "name": names[lab], **{c: st[c] for c in COLUMNS[2:-1]}}
        row["mean_ref"] = st["mean"] - ref_mean
        rows.append(row)
    return rows


def _region_statistics(chi, regions, voxel_size, erode_mm) -> dict:
    """label -> statistics (None when empty) for explicit, possibly overlapping regions."""
    from .masking import erode_mm as erode

    if not regions:
        raise QSMInputError("the label map has no non-zero labels")
    out = {}
    for r in regions:
        if r.mask.shape != chi.shape[:3]:
            raise QSMInputError(f"region {r.name!r} shape {r.mask.shape} does not match chi {chi.shape}")
        mask = erode(r.mask, voxel_size, erode_mm) if erode_mm > 0 else r.mask
        values = chi[mask]
        out[r.label] = region_row(values, 1.0) if values.size else None
    return out


# ---------------------------------------------------------------- output

def _format(v):
    return f"{v:.6g}" if isinstance(v, float) else v


def write_table(rows, path, subject=None, append=False):
    """Write rows as CSV, TSV (``.tsv``) or JSON (``.json``), atomically.

    With ``subject`` a leading ``subject`` column is added (long format). With ``append`` the
    rows are added to an existing CSV/TSV, whose columns must match (a new file gets a header).
    """
    path = str(path)
    fields = (("subject",) if subject is not None else ()) + COLUMNS
    rows = [{"subject": subject, **r} if subject is not None else dict(r) for r in rows]
    if path.endswith(".json"):
        if append:
            raise QSMInputError("--append needs a CSV or TSV table", path)
        _atomic_write(path, json.dumps([{k: r[k] for k in fields} for r in rows], indent=2,
                                       allow_nan=True))
        return
    delim = "\t" if path.endswith(".tsv") else ","
    existing = ""
    if append and os.path.exists(path):
        try:
            existing = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise QSMInputError(f"cannot append: the table is not readable UTF-8 text ({err})",
                                path) from None
        header = existing.splitlines()[0].split(delim) if existing.strip() else []
        if header and tuple(header) != fields:
            raise QSMInputError(f"cannot append: the table's columns {header} are not {list(fields)}"
                                " (give --subject to append to a cohort table)", path)
    import io as _io

    buf = _io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, delimiter=delim, lineterminator="\n")
    if not existing.strip():
        w.writeheader()
    for r in rows:
        w.writerow({k: _format(r[k]) for k in fields})
    _atomic_write(path, existing + buf.getvalue())


def _atomic_write(path, text):
    from .io import atomic_write

    def writer(tmp):
        with open(tmp, "w", newline="") as fh:
            fh.write(text)

    atomic_write(path, writer)


def plot_referenced_means(rows, path, reference_name=None, title="chi per region"):
    """A PNG bar chart of ``mean_ref`` (or ``mean`` without a reference) with SD error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    use_ref = any(np.isfinite(r["mean_ref"]) for r in rows)
    key = "mean_ref" if use_ref else "mean"
    shown = [r for r in rows if r["voxels"] and (not use_ref or r["name"] != reference_name)]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(shown) + 1.5), 3.5), dpi=100)
    ax.bar(range(len(shown)), [r[key] * 1000 for r in shown],
           yerr=[r["sd"] * 1000 for r in shown], color="#4477aa", capsize=3)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(shown)))
    ax.set_xticklabels([r["name"] for r in shown], rotation=45, ha="right")
    ax.set_ylabel(f"chi {'- ' + str(reference_name) + ' ' if use_ref else ''}(ppb)")
    ax.set_title(title)
    fig.tight_layout()
    from .io import atomic_write

    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
