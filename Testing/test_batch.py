"""``qsmkit batch`` on a synthetic BIDS dataset of 4 subjects (one deliberately broken), with
local Dask worker processes and with an existing Dask cluster reached through --scheduler."""

import csv
import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest

from qsmkit import io, metrics
from qsmkit.batch import find_subjects, output_paths
from qsmkit.cli import main
from qsmkit.pipeline import PipelineConfig, run_pipeline
from qsmkit.ras_order import run_pipeline_in_ras_order
from qsmkit.units import rescale_phase

SMALL = ["--shape", "64", "64", "32", "--voxel-size", "3.75", "3.75", "5"]


@pytest.fixture(scope="module")
def bids(tmp_path_factory):
    """sub-01..04, single-echo GRE at 3 T, TE 20 ms, with a dseg label map; sub-03's phase
    sidecar has no EchoTime."""
    root = tmp_path_factory.mktemp("bids")
    (root / "dataset_description.json").write_text(json.dumps({"Name": "sim", "BIDSVersion": "1.10.0"}))
    for i in range(1, 5):
        sim = tmp_path_factory.mktemp(f"sim{i}")
        assert main(["simulate", "--out", str(sim), *SMALL, "--seed", str(i), "--no-phase-offset",
                     "--quiet"]) == 0
        anat = root / f"sub-0{i}" / "anat"
        anat.mkdir(parents=True)
        for part, src in (("mag", "magnitude"), ("phase", "phase")):
            shutil.copy(sim / f"{src}.nii.gz", anat / f"sub-0{i}_part-{part}_GRE.nii.gz")
            side = {"EchoTime": 0.02, "MagneticFieldStrength": 3.0}
            if i == 3 and part == "phase":
                side.pop("EchoTime")
            (anat / f"sub-0{i}_part-{part}_GRE.json").write_text(json.dumps(side))
        shutil.copy(sim / "labels.nii.gz", anat / f"sub-0{i}_dseg.nii.gz")
        shutil.copy(sim / "labels.tsv", anat / f"sub-0{i}_dseg.tsv")
        shutil.copy(sim / "chi_true.nii.gz", root / f"truth_sub-0{i}.nii.gz")
    return root


def test_find_subjects(bids):
    subjects = find_subjects(bids)
    assert [s.key for s in subjects] == ["sub-01", "sub-02", "sub-03", "sub-04"]
    assert subjects[0].magnitude[0].endswith("sub-01_part-mag_GRE.nii.gz")
    assert subjects[0].labels.endswith("sub-01_dseg.nii.gz") and subjects[0].label_names
    assert [s.key for s in find_subjects(bids, participants=["sub-02", "04"])] == ["sub-02", "sub-04"]


def test_batch_local_workers(bids, capsys):
    out = bids / "derivatives" / "qsmkit"
    code = main(["batch", str(bids), "--workers", "2", "--reference", "csf", "--quiet"])
    assert code == 1  # partial failure
    err = capsys.readouterr().err
    assert "sub-03" in err and "echo time" in err  # its sidecar has no EchoTime
    summary = json.loads((out / "batch_summary.json").read_text())
    assert summary["done"] == ["sub-01", "sub-02", "sub-04"] and summary["failed"] == ["sub-03"]
    assert json.loads((out / "dataset_description.json").read_text())["DatasetType"] == "derivative"
    for s in find_subjects(bids):
        paths = output_paths(out, s)
        if s.key == "sub-03":
            assert not any((out / "sub-03").rglob("*.nii.gz"))
            continue
        assert all(os.path.exists(p) for p in paths.values())
        chi = nib.load(paths["chi"]).get_fdata()
        sidecar = json.loads(open(paths["chi"].replace(".nii.gz", ".json")).read())
        assert sidecar["subject"] == s.key and sidecar["parameters"]["background"] == "tfi-fast"
        # the same numbers as the single-subject pipeline on the same files
        mag, pha, te, b0 = io.load_gre(s.magnitude, s.phase)
        ref = run_pipeline_in_ras_order(mag.data, rescale_phase(pha.data), te, b0, pha.affine)[0]
        np.testing.assert_allclose(chi, ref.chi, atol=1e-5)
        truth = nib.load(str(bids / f"truth_{s.key}.nii.gz")).get_fdata()
        assert metrics.nrmse(chi, truth, ref.local_mask) == pytest.approx(
            metrics.nrmse(ref.chi, truth, ref.local_mask), abs=0.01)
    with open(out / "group_stats.tsv") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    assert sorted({r["subject"] for r in rows}) == ["sub-01", "sub-02", "sub-04"]
    csf = [r for r in rows if r["name"] == "csf"]
    assert len(csf) == 3 and all(abs(float(r["mean_ref"])) < 1e-9 for r in csf)

    # a second run redoes nothing that is complete (the broken subject fails again)
    chi_file = output_paths(out, find_subjects(bids)[0])["chi"]
    before = os.path.getmtime(chi_file)
    assert main(["batch", str(bids), "--workers", "2", "--quiet"]) == 1
    summary = json.loads((out / "batch_summary.json").read_text())
    assert summary["skipped"] == ["sub-01", "sub-02", "sub-04"] and summary["done"] == []
    assert os.path.getmtime(chi_file) == before


def test_batch_on_existing_cluster(bids, tmp_path):
    """The path a real cluster (dask-jobqueue on SLURM) takes: a scheduler address."""
    from dask.distributed import LocalCluster

    out = tmp_path / "deriv"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster:
        # the fastest methods: what is checked here is the scheduler path, not the methods
        # (test_batch_local_workers checks the default pipeline's numbers)
        args = ["batch", str(bids), "--out", str(out), "--participant-label", "01", "02",
                "--scheduler", cluster.scheduler_address, "--unwrapping", "laplacian",
                "--background", "vsharp", "--inversion", "tkd", "--quiet"]
        assert main(args) == 0
        summary = json.loads((out / "batch_summary.json").read_text())
        assert summary["done"] == ["sub-01", "sub-02"] and summary["failed"] == []
        assert len(list(out.rglob("*_Chimap.nii.gz"))) == 2
        assert main([*args, "--force"]) == 0  # complete, but redone on request
        summary = json.loads((out / "batch_summary.json").read_text())
        assert summary["done"] == ["sub-01", "sub-02"] and summary["skipped"] == []


def test_find_multi_echo_and_sessions(tmp_path):
    anat = tmp_path / "sub-7" / "ses-pre" / "anat"
    anat.mkdir(parents=True)
    for echo in (3, 1, 2):
        for part in ("mag", "phase"):
            (anat / f"sub-7_ses-pre_echo-{echo}_part-{part}_MEGRE.nii.gz").write_bytes(b"")
    (anat / "sub-7_ses-pre_dseg.nii.gz").write_bytes(b"")
    (s,) = find_subjects(tmp_path)
    assert s.key == "sub-7_ses-pre" and s.session == "pre"
    assert [os.path.basename(p).split("_")[2] for p in s.magnitude] == ["echo-1", "echo-2", "echo-3"]
    assert [os.path.basename(p).split("_")[2] for p in s.phase] == ["echo-1", "echo-2", "echo-3"]
    assert s.labels.endswith("_dseg.nii.gz") and s.label_names is None
    assert output_paths(tmp_path / "d", s)["chi"].endswith(
        "sub-7/ses-pre/anat/sub-7_ses-pre_Chimap.nii.gz")
    assert find_subjects(tmp_path, sessions=["post"]) == []


def test_batch_bad_folder(tmp_path, capsys):
    assert main(["batch", str(tmp_path), "--quiet"]) == 2
    assert "no *_part-mag_*" in capsys.readouterr().err


def test_failed_subject_leaves_no_partial_derivatives(bids, tmp_path):
    """A label map on another grid fails after the maps are written: they are removed again."""
    from qsmkit.batch import process_subject

    s = find_subjects(bids, participants=["01"])[0]
    img = nib.load(s.labels)
    moved = tmp_path / "moved_dseg.nii.gz"
    aff = img.affine.copy()
    aff[0, 3] += 7
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), aff), str(moved))
    s.labels, s.label_names = str(moved), None
    r = process_subject(s, str(tmp_path / "out"), {"device": "cpu"})
    assert r["status"] == "failed" and "not on the same" in r["error"]
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]


def reoriented(path, out):
    """A copy of a NIfTI image stored in another voxel order: the first axis reversed, then the
    first two axes swapped (the same voxels in the same world positions)."""
    img = nib.load(path)
    n = img.shape[0]
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1, n - 1          # i = n - 1 - i'
    swap = np.eye(4)[[1, 0, 2, 3]]              # (i, j) = (j', i')
    data = np.swapaxes(np.asarray(img.dataobj)[::-1], 0, 1)
    nib.save(nib.Nifti1Image(data, img.affine @ flip @ swap), str(out))
    shutil.copy(path.replace(".nii.gz", ".json"), str(out).replace(".nii.gz", ".json"))
    return str(out)


def test_reordered_copy_gives_the_same_chi(bids, tmp_path):
    """Like ``qsmkit run``, batch runs the stages in the voxel order closest to RAS: a copy of a
    subject stored with its first axis reversed and two axes swapped gives the same chi, voxel
    for voxel; in the file's own order the stages give a different one (``tfi-fast`` stops
    early). The threshold mask keeps it fast; the order is the same whatever the methods."""
    from qsmkit.batch import Subject, process_subject

    s = find_subjects(bids, participants=["01"])[0]
    moved = Subject("sub-01", "01", None,
                    [reoriented(s.magnitude[0], tmp_path / "mag.nii.gz")],
                    [reoriented(s.phase[0], tmp_path / "phase.nii.gz")])
    for subject, out in ((s, tmp_path / "a"), (moved, tmp_path / "b")):
        r = process_subject(subject, str(out), {"device": "cpu", "masking": "threshold"})
        assert r["status"] == "ok", r
    chi_a = nib.load(output_paths(tmp_path / "a", s)["chi"])
    chi_b = nib.load(output_paths(tmp_path / "b", moved)["chi"])
    assert np.allclose(chi_b.affine, nib.load(moved.phase[0]).affine)
    back = np.swapaxes(chi_b.get_fdata(), 0, 1)[::-1]
    np.testing.assert_array_equal(back, chi_a.get_fdata())
    mag, pha, te, b0 = io.load_gre(moved.magnitude, moved.phase)
    own = run_pipeline(mag.data, rescale_phase(pha.data), te, b0, pha.voxel_size, pha.b0_dir(),
                       config=PipelineConfig(masking="threshold"))
    own = np.swapaxes(own.chi, 0, 1)[::-1]
    assert metrics.nrmse(own, chi_a.get_fdata(), own != 0) > 5  # %, measured 15.9: order matters
