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
