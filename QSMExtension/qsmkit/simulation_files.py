"""Write a simulated data set (``qsmkit simulate``, ``qsmkit demo``): the truth and the
acquisition as NIfTI, one JSON sidecar each, and the label names as ``labels.tsv``."""

from __future__ import annotations

import os

import numpy as np

from . import geometry, io, report


def write_simulation(out, ph, acq, params, seconds=0.0):
    """Write ``ph`` (a ``simulate.Phantom``) and ``acq`` (its acquisition) to folder ``out``;
    ``params`` (how they were simulated) and ``seconds`` (how long it took) go into every
    sidecar. Returns the paths written."""
    affine = geometry.affine_for_b0(ph.voxel_size, ph.b0_dir, ph.chi.shape)
    meta = report.record("simulate", "phantom", params, seconds, extra={
        "simulation": params, "te": list(acq.te), "b0": acq.b0,
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
    written = []
    with io.OutputSet() as outset:  # the set moves into place together, or not at all
        for name, (data, dtype) in volumes.items():
            target = os.path.join(out, f"{name}.nii.gz")
            io.save_volume(outset.path(target), data, affine, sidecar=meta, dtype=dtype)
            written.append(target)
        with open(outset.path(os.path.join(out, "labels.tsv")), "w") as fh:
            fh.write("index\tname\n")
            for k, v in sorted(ph.label_names.items()):
                fh.write(f"{k}\t{v}\n")
    return written
