"""The 2016 QSM reconstruction challenge (Langkammer et al., MRM 2018): in-vivo local field with
COSMOS and chi_33 references. A sanity bar for the foundation's inversions; accuracy goals live
in the inversion issue's benchmark."""

import nibabel as nib
import numpy as np
import pytest

from qsmkit import metrics
from qsmkit.cli import main


@pytest.fixture(scope="module")
def challenge(request):
    from conftest import shared

    return shared("qsm2016")


@pytest.mark.parametrize("method, bar", [("tkd", 90.0), ("l2", 75.0)])
def test_invert_challenge_data(challenge, tmp_path, method, bar):
    out = tmp_path / "chi.nii.gz"
    assert main(["invert", "--field", str(challenge / "phs_tissue.nii.gz"), "--mask",
                 str(challenge / "msk.nii.gz"), "--method", method, "--out", str(out)]) == 0
    chi = nib.load(str(out)).get_fdata()
    ref = nib.load(str(challenge / "chi_cosmos.nii.gz")).get_fdata()
    mask = nib.load(str(challenge / "msk.nii.gz")).get_fdata() > 0
    err = metrics.nrmse(chi, ref, mask)
    assert err < bar, f"{method}: NRMSE vs COSMOS {err:.1f}%"
    # the reconstruction is positively related to COSMOS in the deep gray ROIs
    labels = nib.load(str(challenge / "evaluation_mask.nii.gz")).get_fdata().astype(int)
    means = [(chi[labels == k].mean(), ref[labels == k].mean()) for k in range(1, 12)
             if (labels == k).any()]
    assert np.corrcoef(np.array(means).T)[0, 1] > 0.8
