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

def read_label_names(path) -> dict:
    """Label id -> name from a FreeSurfer colour LUT (``id name R G B A``), an ITK-SNAP label
    description file (``id R G B A vis mesh "name"``), a CSV/TSV with a header naming an id
    column (``index``, ``label``, ``id`` or ``value``) and a ``name`` column (BIDS ``dseg.tsv``
    included), or plain ``id name`` lines. Lines starting with ``#`` are comments."""
    path = str(path)
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise QSMInputError(f"cannot read label-name table ({err.strerror})", path) from None
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    names = {}
    if lines:
        delim = "\t" if "\t" in lines[0] else ","
        header = [h.strip().lower() for h in lines[0].split(delim)]
        id_col = next((header.index(c) for c in ("index", "label", "id", "value") if c in header), None)
        if id_col is not None and "name" in header:  # CSV / TSV / BIDS dseg.tsv with a header
            name_col = header.index("name")
            for row in csv.reader(lines[1:], delimiter=delim):
                if len(row) > max(id_col, name_col) and row[id_col].strip().lstrip("-").isdigit():
                    names[int(row[id_col])] = row[name_col].strip()
        else:
            for ln in lines:
                quoted = re.search(r'"([^"]*)"', ln)  # ITK-SNAP: the name is the quoted field
                parts = ln.replace(",", " ").replace("\t", " ").split()
                if not parts or not parts[0].lstrip("-").isdigit():
                    continue
                if quoted:
                    names[int(parts[0])] = quoted.group(1)
                elif len(parts) >= 2:
                    names[int(parts[0])] = parts[1]  # FreeSurfer LUT / "id name"
    names.pop(0, None)  # 0 is the background of a label map ("Unknown", "Clear Label")
    if not names:
        raise QSMInputError("no 'id name' rows found in the label-name table", path)
    return names


# ---------------------------------------------------------------- regions

def regions_from_label_map(labels, label_names=None) -> list:
    """One region per non-zero integer label."""
    labels = np.asarray(labels)
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


def roi_table(chi, labels, voxel_size, label_names=None, reference=None, erode_mm=0.0):
    """One row (dict, keys ``COLUMNS``) per region.

    Parameters
    ----------
    chi : (X, Y, Z) susceptibility map.
    labels : integer label map on chi's grid, or a list of :class:`Region` (overlapping allowed).
    voxel_size : mm, for volumes and erosion.
    label_names : id -> name for a label map.
    reference : label number or name of the reference region; ``mean_ref`` = mean - its mean
        (NaN without a reference).
    erode_mm : erode every region, the reference included, by a ball of this radius first
        (fewer partial-volume voxels at region borders); a region eroded away is reported with
        0 voxels and NaN statistics.
    """
    from .masking import erode_mm as erode

    chi = np.asarray(chi, dtype=np.float64)
    if isinstance(labels, list):
        regions = labels
    else:
        labels = np.asarray(labels)
        if labels.shape[:3] != chi.shape[:3]:
            raise QSMInputError(f"labels shape {labels.shape} does not match chi shape {chi.shape}")
        regions = regions_from_label_map(labels, label_names)
    if not regions:
        raise QSMInputError("the label map has no non-zero labels")
    voxel_volume = float(np.prod(voxel_size))
    masks = {}
    for r in regions:
        if r.mask.shape != chi.shape[:3]:
            raise QSMInputError(f"region {r.name!r} shape {r.mask.shape} does not match chi {chi.shape}")
        masks[r.label] = erode(r.mask, voxel_size, erode_mm) if erode_mm > 0 else r.mask
    ref_id = resolve_reference(reference, regions)
    ref_mean = float("nan")
    if ref_id is not None:
        if ref_id not in masks:
            raise QSMInputError(f"reference label {ref_id} has no voxels")
        if not masks[ref_id].any():
            raise QSMInputError(f"reference region {ref_id} has no voxels left after eroding "
                                f"{erode_mm} mm")
        ref_mean = float(chi[masks[ref_id]].mean())
    rows = []
    for r in regions:
        values = chi[masks[r.label]]
        if values.size:
            stats = region_row(values, voxel_volume)
        else:
            stats = {c: float("nan") for c in COLUMNS[4:-1]}
            stats.update(voxels=0, volume_mm3=0.0)
        rows.append({"label": r.label, "name": r.name, **stats, "mean_ref": stats["mean"] - ref_mean})
    return rows


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
        existing = Path(path).read_text()
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
