"""Shared fixtures: paths to the reference data and skip markers for what a machine lacks."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()


def shared(*parts) -> Path:
    """Path under ../shared/data, or skip the test when the reference data are absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs ../shared/data (reference data not present: {path})")
    return path


def new_mr_slice():
    """An empty classic MR Image Storage dataset with its file meta and fresh UIDs (pydicom),
    for tests that write DICOM slices."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = MRImageStorage
    fm.MediaStorageSOPInstanceUID = generate_uid()
    fm.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = fm
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, fm.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    return ds


def load_qsm2016() -> dict:
    """The 2016 QSM challenge data as float32 arrays: field (ppm), magnitude, mask, chi_33,
    cosmos, labels (evaluation_mask, 1..11), voxel size and B0 direction; skips without it."""
    import nibabel as nib
    import numpy as np

    folder = shared("qsm2016")

    def load(name):
        return np.asarray(nib.load(str(folder / name)).get_fdata(), dtype=np.float32)

    return {"field": load("phs_tissue.nii.gz"), "magnitude": load("magn.nii.gz"),
            "mask": load("msk.nii.gz") > 0, "chi_33": load("chi_33.nii.gz"),
            "cosmos": load("chi_cosmos.nii.gz"),
            "labels": np.rint(load("evaluation_mask.nii.gz")).astype(int),
            "voxel_size": (1.0625, 1.0625, 1.0714), "b0_dir": (0.0, 0.0, 1.0)}


@pytest.fixture
def shared_data():
    return shared


def _read_only(*arrays):
    for a in arrays:
        if a is not None:
            a.setflags(write=False)


@pytest.fixture(scope="session")
def default_phantom():
    """The built-in phantom at its default grid (256 x 256 x 64, ``make_phantom()``), made once
    per session for every module that needs it; read-only."""
    from qsmkit.simulate import make_phantom

    ph = make_phantom()
    _read_only(ph.chi, ph.chi_brain, ph.mask, ph.labels, ph.magnitude, ph.t2star_ms,
               ph.field_total, ph.field_local, ph.field_background, ph.vessel_mask)
    return ph


@pytest.fixture(scope="session")
def head_model():
    """The challenge 2.0 head model at 1.28 mm with its true fields (``load_head_model(block=2)``,
    15-30 s on 2 cores), loaded once per session for every module that needs it. Its arrays are
    read-only, so no test can change what the others see."""
    from qsmkit.headmodel import load_head_model

    hm = load_head_model(shared("head-model"), block=2)
    _read_only(hm.chi, hm.labels, hm.mask, hm.field_total, hm.field_local)
    return hm
