"""Write the QSM module's Sample Data (QSMExtension/QSM/Resources/SampleData/) and print the
SHA256 checksums that QSM.py registers them with.

The data are qsmkit's simulated head phantom (``qsmkit simulate`` with :data:`SIMULATE_ARGS`:
64 x 64 x 32 voxels of 3.75 x 3.75 x 5 mm, one echo at 20 ms, 3 T, seed 0): magnitude, phase
(rad) and the phantom's regions as a Slicer segmentation (``.seg.nrrd``, one named segment per
label, written with slicerio). They ship with the extension, so that Sample Data loads them
without a download; Testing/test_slicer_sample_data.py checks that they are what this script
writes and that Slicer's SampleData logic loads them.

Run: ``.venv/bin/python tools/make_sample_data.py``
"""

from __future__ import annotations

import csv
import hashlib
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "QSMExtension" / "QSM" / "Resources" / "SampleData"
SIMULATE_ARGS = ["--shape", "64", "64", "32", "--voxel-size", "3.75", "3.75", "5", "--te", "0.02",
                 "--b0", "3", "--seed", "0"]
FILES = ("QSMPhantom_magnitude.nii.gz", "QSMPhantom_phase.nii.gz", "QSMPhantom_labels.seg.nrrd")


def simulate(folder: Path) -> Path:
    sys.path.insert(0, str(REPO / "QSMExtension"))
    from qsmkit import cli

    if cli.main(["simulate", "--out", str(folder), *SIMULATE_ARGS, "--quiet"]) != 0:
        raise RuntimeError("qsmkit simulate failed")
    return folder


def label_names(folder: Path) -> dict:
    with open(folder / "labels.tsv", newline="") as fh:
        return {int(r["index"]): r["name"] for r in csv.DictReader(fh, delimiter="\t")}


def write_segmentation(labels: np.ndarray, affine: np.ndarray, names: dict, path: Path) -> None:
    """One segment per label present (> 0), named from labels.tsv, on the image grid."""
    import slicerio

    ijk_to_lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # NIfTI is RAS, NRRD here LPS
    seg = slicerio.create_segmentation(labels.shape, ijk_to_lps)
    colors = np.random.default_rng(0).uniform(0.2, 1.0, (max(names) + 1, 3))
    for value in sorted(int(v) for v in np.unique(labels) if v > 0):
        slicerio.add_segment(seg, labels == value, {"id": names[value], "name": names[value],
                                                    "color": [float(c) for c in colors[value]]})
    slicerio.write_segmentation(str(path), seg)


def make(out: Path = OUT) -> dict:
    """Write the three files into ``out``; returns file name -> SHA256."""
    import nibabel as nib

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="qsm-sample-") as tmp:
        folder = simulate(Path(tmp))
        for stem in ("magnitude", "phase"):
            (out / f"QSMPhantom_{stem}.nii.gz").write_bytes((folder / f"{stem}.nii.gz").read_bytes())
        labels = nib.load(str(folder / "labels.nii.gz"))
        write_segmentation(np.rint(labels.get_fdata()).astype(np.int32), labels.affine,
                           label_names(folder), out / FILES[2])
    return {name: sha256(out / name) for name in FILES}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


if __name__ == "__main__":
    for name, digest in make().items():
        print(f"{name}  SHA256:{digest}")
