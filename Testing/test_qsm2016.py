"""The 2016 QSM reconstruction challenge (Langkammer et al., MRM 2018): in-vivo local field with
COSMOS and chi_33 references. A sanity bar for the foundation's inversions; accuracy goals live
in the inversion issue's benchmark."""

import json

import nibabel as nib
import numpy as np
import pytest

from qsmkit import inversion, metrics
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


def test_l2_lambda_from_the_l_curve(challenge, tmp_path):
    """``--param lam=lcurve`` picks lambda at the L-curve's corner: on the challenge data its
    NRMSE vs COSMOS is within 5 points of the best fixed lambda of a grid (measured: lambda
    0.032, 67.5 % against the grid's best 64.4 %)."""
    out = tmp_path / "chi.nii.gz"
    assert main(["invert", "--field", str(challenge / "phs_tissue.nii.gz"), "--mask",
                 str(challenge / "msk.nii.gz"), "--method", "l2", "--param", "lam=lcurve",
                 "--out", str(out), "--quiet"]) == 0
    info = json.loads((tmp_path / "chi.json").read_text())["info"]
    assert info["lambda_from"] == "l-curve" and 0.005 < info["lambda"] < 0.5
    field = nib.load(str(challenge / "phs_tissue.nii.gz")).get_fdata().astype(np.float32)
    mask = nib.load(str(challenge / "msk.nii.gz")).get_fdata() > 0
    ref = nib.load(str(challenge / "chi_cosmos.nii.gz")).get_fdata()
    vox = (1.0625, 1.0625, 1.0714)
    best = min(metrics.nrmse(inversion.l2(field, mask, vox, (0, 0, 1), lam=lam)[0], ref, mask)
               for lam in (0.003, 0.01, 0.03, 0.07, 0.1, 0.3, 1.0))
    err = metrics.nrmse(nib.load(str(out)).get_fdata(), ref, mask)
    assert err <= best + 5.0, (err, best)
