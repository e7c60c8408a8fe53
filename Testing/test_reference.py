"""The reference region of chi (``qsmkit.reference``): the automatic CSF reference against the
phantom's true CSF label, the whole-mask fallback when no CSF is found (said in the record), and
the other choices; ``roi_table`` with a reference region; the pipeline's ``reference`` option.
The same on the full head model: ``test_csf.py``; through ``qsmkit run``/``stats``:
``test_cli.py``."""

import numpy as np
import pytest

from qsmkit import reference, simulate, stats
from qsmkit.errors import QSMInputError
from qsmkit.pipeline import PipelineConfig, apply_reference

SMALL = {"shape": (64, 64, 32), "voxel_size": (3.75, 3.75, 5.0)}
CSF = simulate.LABEL_IDS["csf"]
OFFSET = 0.05  # ppm: a constant the inversion could leave on chi


@pytest.fixture(scope="module")
def phantom():
    return simulate.make_phantom(**SMALL)


@pytest.mark.parametrize("te, criterion", [((0.005, 0.010, 0.015), "r2star"),
                                           ((0.025,), "magnitude")])
def test_auto_reference_is_csf_and_recovers_the_offset(phantom, te, criterion):
    """On the phantom (3 T, SNR 100): the region found is CSF, and referencing chi + OFFSET to it
    recovers OFFSET to within 2 ppb (the true CSF chi is 0; measured 0.0 ppb, the region has no
    partial-volume voxel after the erosion), where the whole-mask mean is 20+ ppb off."""
    acq = simulate.simulate_acquisition(phantom, te=te, snr=100, seed=2)
    mag = acq.magnitude if acq.magnitude.ndim == 4 else acq.magnitude[..., None]
    m = phantom.mask
    region, info = reference.find_reference("auto", m, phantom.voxel_size, magnitude=mag, te=te)
    assert info["how"] == "csf" and info["csf"]["criterion"] == criterion
    assert info["voxels"] == region.sum() >= 8 and "fallback" not in info
    assert (region & (phantom.labels == CSF)).sum() / region.sum() > 0.95
    chi = np.where(m, phantom.chi_brain + OFFSET, 0).astype(np.float32)
    referenced, _, rec = apply_reference(chi, m, phantom.voxel_size, "auto", mag, te)
    assert abs(rec["offset_ppm"] - OFFSET) < 0.002
    assert abs(float(referenced[phantom.labels == CSF].mean())) < 0.002
    _, _, whole = apply_reference(chi, m, phantom.voxel_size, "mask")
    assert abs(whole["offset_ppm"] - OFFSET) > 0.01  # what the CSF reference is for


def test_no_csf_falls_back_to_the_whole_mask_and_says_so(phantom):
    flat = np.where(phantom.mask, 1.0, 0.0).astype(np.float32)  # no bright CSF: nothing found
    region, info = reference.find_reference("auto", phantom.mask, phantom.voxel_size,
                                            magnitude=flat)
    assert np.array_equal(region, phantom.mask)
    assert info["how"] == "mask" and info["requested"] == "auto" and "no CSF" in info["fallback"]
    assert "no CSF reference found" in reference.fallback_note(info)
    assert "fallback" in reference.describe(info)
    # no magnitude at all: the same, with the reason
    _, info = reference.find_reference("auto", phantom.mask, phantom.voxel_size)
    assert info["how"] == "mask" and "magnitude" in info["fallback"]


def test_reference_choices(phantom):
    m, vox = phantom.mask, phantom.voxel_size
    region, info = reference.find_reference("mask", m, vox)
    assert np.array_equal(region, m) and info["volume_ml"] == pytest.approx(
        m.sum() * np.prod(vox) / 1000, abs=0.01)
    assert reference.find_reference("none", m, vox) == (None, {"how": "none", "requested": "none"})
    given = phantom.labels == CSF
    region, info = reference.find_reference("region", m, vox, region=given)
    assert np.array_equal(region, given & m) and info["how"] == "region"
    with pytest.raises(QSMInputError, match="no voxels inside"):
        reference.find_reference("region", m, vox, region=~m)
    with pytest.raises(QSMInputError, match="unknown reference"):
        reference.find_reference("csf-please", m, vox)
    with pytest.raises(QSMInputError, match="reference must be one of"):
        PipelineConfig(reference="bogus").resolved()
    assert PipelineConfig().resolved().reference == "auto"


def test_roi_table_with_a_reference_region(phantom):
    chi = phantom.chi_brain + OFFSET
    region = phantom.labels == CSF
    rows = stats.roi_table(chi, phantom.labels, phantom.voxel_size, reference_region=region)
    by = {r["label"]: r for r in rows}
    for lab in (simulate.LABEL_IDS["putamen"], simulate.LABEL_IDS["globus_pallidus"]):
        assert by[lab]["mean_ref"] == pytest.approx(by[lab]["mean"] - chi[region].mean(), abs=1e-6)
        assert by[lab]["mean_ref"] == pytest.approx(simulate.CHI_PPM[lab], abs=2e-3)
    with pytest.raises(QSMInputError, match="not both"):
        stats.roi_table(chi, phantom.labels, phantom.voxel_size, reference="csf",
                        reference_region=region)
