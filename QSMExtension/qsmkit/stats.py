"""Statistics of chi per region of interest, referenced to a reference region (e.g. CSF).

The table users publish: per label, voxel count, volume, mean, SD, median and
the mean relative to the reference region's mean.
"""

from __future__ import annotations

import csv

import numpy as np

from .errors import QSMInputError

COLUMNS = ("label", "name", "voxels", "volume_mm3", "mean", "sd", "median", "mean_ref")


def resolve_reference(reference, label_names):
    """A label id from an id or a name (case-insensitive); None passes through."""
    if reference is None or reference == "":
        return None
    try:
        return int(reference)
    except (TypeError, ValueError):
        pass
    for lab, name in label_names.items():
        if str(name).lower() == str(reference).lower():
            return int(lab)
    raise QSMInputError(f"reference region {reference!r} is not among the labels "
                        f"({', '.join(map(str, label_names.values())) or 'no names given'})")


def roi_table(chi, labels, voxel_size, label_names=None, reference=None):
    """One row (dict, keys ``COLUMNS``) per non-zero label present in ``labels``.

    ``mean_ref`` = mean - mean(reference region); NaN when no reference is given.
    """
    chi = np.asarray(chi, dtype=np.float64)
    labels = np.asarray(labels)
    if chi.shape[:3] != labels.shape[:3]:
        raise QSMInputError(f"labels shape {labels.shape} does not match chi shape {chi.shape}")
    label_names = dict(label_names or {})
    ids = [int(v) for v in np.unique(labels) if v != 0]
    ref_id = resolve_reference(reference, label_names)
    if ref_id is not None and ref_id not in ids:
        raise QSMInputError(f"reference label {ref_id} has no voxels")
    ref_mean = float(chi[labels == ref_id].mean()) if ref_id is not None else float("nan")
    voxel_volume = float(np.prod(voxel_size))
    rows = []
    for lab in ids:
        values = chi[labels == lab]
        mean = float(values.mean())
        rows.append({
            "label": lab,
            "name": str(label_names.get(lab, lab)),
            "voxels": int(values.size),
            "volume_mm3": values.size * voxel_volume,
            "mean": mean,
            "sd": float(values.std(ddof=1)) if values.size > 1 else 0.0,
            "median": float(np.median(values)),
            "mean_ref": mean - ref_mean,
        })
    return rows


def write_table(rows, path, delimiter=","):
    """Write rows to CSV (or TSV with ``delimiter='\\t'``)."""
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS, delimiter=delimiter)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def read_label_names(path):
    """Label names from a TSV/CSV with columns index/label and name, or 'id name' lines."""
    names = {}
    with open(path) as fh:
        for line in fh:
            parts = [p for p in line.replace(",", " ").replace("\t", " ").split() if p]
            if len(parts) >= 2 and parts[0].lstrip("-").isdigit():
                names[int(parts[0])] = parts[1]
    if not names:
        raise QSMInputError(f"{path}: no 'id name' rows found in the label-name table")
    return names
