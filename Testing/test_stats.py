"""ROI statistics: exact values on the head model, an independent numpy computation on the 2016
challenge, Slicer segmentations with overlapping segments, label-name tables, resampling and
geometry errors, erosion, cohort tables."""

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from qsmkit import stats
from qsmkit.cli import main
from qsmkit.errors import QSMInputError


def read_csv(path, delimiter=","):
    with open(path) as fh:
        return list(csv.DictReader(fh, delimiter=delimiter))


def test_head_model_means_equal_chiref():
    """chi built from chiref per label: every label's mean is its chiref, SD 0, and values
    referenced to CSF are chiref - chiref(CSF)."""
    from conftest import shared
    from qsmkit.headmodel import read_chiref

    folder = shared("head-model")
    labels = np.asarray(nib.load(str(folder / "SegmentedModel.nii.gz")).dataobj).astype(np.int16)
    table = read_chiref(folder / "SusceptibilityValues.mat")
    lut = np.zeros(max(table) + 1)
    for k, (_, v) in table.items():
        lut[k] = v
    chi = lut[labels]
    names = {k: n for k, (n, _) in table.items()}
    rows = stats.roi_table(chi, labels, (0.64, 0.64, 0.64), names, reference="CSF")
    by_name = {r["name"]: r for r in rows}
    assert set(by_name) == {n for k, (n, _) in table.items() if (labels == k).any()}
    csf = table[10][1]
    for k, (name, value) in table.items():
        if name not in by_name:
            continue
        r = by_name[name]
        assert r["mean"] == pytest.approx(value, abs=1e-12)
        assert r["median"] == pytest.approx(value, abs=1e-12) and r["sd"] == pytest.approx(0, abs=1e-12)
        assert r["mean_ref"] == pytest.approx(value - csf, abs=1e-12)
        assert r["voxels"] == int(np.count_nonzero(labels == k))
        assert r["volume_mm3"] == pytest.approx(r["voxels"] * 0.64**3)


def test_challenge_table_matches_numpy(tmp_path):
    """``qsmkit stats`` on chi_33 with the challenge's evaluation mask equals a direct numpy
    computation, region by region and column by column."""
    from conftest import shared

    folder = shared("qsm2016")
    out = tmp_path / "stats.csv"
    assert main(["stats", "--chi", str(folder / "chi_33.nii.gz"), "--labels",
                 str(folder / "evaluation_mask.nii.gz"), "--reference", "3", "--out", str(out),
                 "--quiet"]) == 0
    chi = nib.load(str(folder / "chi_33.nii.gz")).get_fdata()
    lab_img = nib.load(str(folder / "evaluation_mask.nii.gz"))
    labels = np.rint(lab_img.get_fdata()).astype(int)
    vox = np.prod(lab_img.header.get_zooms()[:3])
    rows = read_csv(out)
    ids = sorted(set(np.unique(labels)) - {0})
    assert [int(r["label"]) for r in rows] == ids
    ref = chi[labels == 3].mean()
    for r in rows:
        v = chi[labels == int(r["label"])]
        q1, q3 = np.percentile(v, [25, 75])
        expect = {"voxels": v.size, "volume_mm3": v.size * vox, "mean": v.mean(), "sd": v.std(ddof=1),
                  "median": np.median(v), "iqr": q3 - q1, "min": v.min(), "max": v.max(),
                  "mean_ref": v.mean() - ref}
        for key, value in expect.items():
            assert float(r[key]) == pytest.approx(value, rel=1e-5, abs=1e-7), (r["label"], key)
    meta = json.loads((tmp_path / "stats.json").read_text())
    assert meta["parameters"]["reference"] == "3" and len(meta["rows"]) == len(rows)
    assert (tmp_path / "stats.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _grid():
    shape = (30, 32, 34)
    affine = np.array([[-1.0, 0, 0, 20], [0, 1.2, 0, -10], [0, 0, 2.0, 5], [0, 0, 0, 1]])
    rng = np.random.default_rng(1)
    chi = rng.normal(0, 0.05, shape).astype(np.float32)
    a = np.zeros(shape, bool)
    a[5:20, 5:20, 5:20] = True
    b = np.zeros(shape, bool)
    b[12:28, 10:30, 10:30] = True  # overlaps a
    csf = np.zeros(shape, bool)
    csf[0:4, 0:4, 0:10] = True
    return shape, affine, chi, {"caudate": a, "putamen": b, "CSF": csf}


def test_slicer_segmentation_with_overlap_equals_label_maps(tmp_path):
    import slicerio

    shape, affine, chi, masks = _grid()
    nib.save(nib.Nifti1Image(chi, affine), str(tmp_path / "chi.nii.gz"))
    # Slicer stores LPS; our affine is RAS
    seg = slicerio.create_segmentation(shape, np.diag([-1.0, -1, 1, 1]) @ affine)
    for name, m in masks.items():
        slicerio.add_segment(seg, m, {"id": name, "name": name})
    assert seg["voxels"].ndim == 4  # the overlap forced a second layer
    slicerio.write_segmentation(str(tmp_path / "seg.seg.nrrd"), seg)
    out = tmp_path / "seg.csv"
    assert main(["stats", "--chi", str(tmp_path / "chi.nii.gz"), "--labels",
                 str(tmp_path / "seg.seg.nrrd"), "--reference", "CSF", "--out", str(out),
                 "--quiet"]) == 0
    rows = {r["name"]: r for r in read_csv(out)}
    # the same regions as two label maps (the overlap cannot live in one)
    for name, m in masks.items():
        lm = m.astype(np.int16)
        ref = stats.roi_table(chi, masks["CSF"].astype(np.int16), (1, 1.2, 2))[0]["mean"]
        row = stats.roi_table(chi, lm, (1.0, 1.2, 2.0), {1: name})[0]
        assert int(rows[name]["voxels"]) == row["voxels"] == m.sum()
        for key in ("mean", "sd", "median", "iqr", "min", "max", "volume_mm3"):
            assert float(rows[name][key]) == pytest.approx(row[key], rel=1e-5, abs=1e-8)
        assert float(rows[name]["mean_ref"]) == pytest.approx(row["mean"] - ref, rel=1e-5, abs=1e-8)


def test_resampling_and_geometry_errors(tmp_path, capsys):
    shape, affine, chi, masks = _grid()
    nib.save(nib.Nifti1Image(chi, affine), str(tmp_path / "chi.nii.gz"))
    labels = np.zeros(shape, np.int16)
    labels[masks["caudate"]] = 1
    labels[masks["CSF"]] = 2
    # the same labels on a grid shifted by whole voxels (and larger): resampling is exact
    big = np.zeros((40, 40, 40), np.int16)
    big[3:33, 2:34, 1:35] = labels
    shifted = affine.copy()
    shifted[:3, 3] -= affine[:3, :3] @ np.array([3, 2, 1])
    nib.save(nib.Nifti1Image(big, shifted), str(tmp_path / "moved.nii.gz"))
    nib.save(nib.Nifti1Image(labels, affine), str(tmp_path / "same.nii.gz"))
    args = ["stats", "--chi", str(tmp_path / "chi.nii.gz"), "--quiet", "--no-plot"]
    assert main([*args, "--labels", str(tmp_path / "moved.nii.gz"), "--out",
                 str(tmp_path / "x.csv")]) == 2
    err = capsys.readouterr().err
    assert "moved.nii.gz" in err and "--resample" in err and "\n" not in err.strip()
    assert main([*args, "--labels", str(tmp_path / "moved.nii.gz"), "--resample", "--out",
                 str(tmp_path / "r.csv")]) == 0
    assert "warning" in capsys.readouterr().err
    assert main([*args, "--labels", str(tmp_path / "same.nii.gz"), "--out",
                 str(tmp_path / "s.csv")]) == 0
    assert read_csv(tmp_path / "r.csv") == read_csv(tmp_path / "s.csv")
    # far away: no overlap is an error, and nothing is written
    far = affine.copy()
    far[:3, 3] += 1000
    nib.save(nib.Nifti1Image(labels, far), str(tmp_path / "far.nii.gz"))
    assert main([*args, "--labels", str(tmp_path / "far.nii.gz"), "--resample", "--out",
                 str(tmp_path / "f.csv")]) == 2
    assert "do not overlap" in capsys.readouterr().err
    assert not (tmp_path / "f.csv").exists()


def test_erosion_and_reference_errors():
    shape, affine, chi, masks = _grid()
    labels = np.zeros(shape, np.int16)
    labels[5:20, 5:20, 5:20] = 1
    labels[0:2, 0:2, 0:2] = 2
    rows = stats.roi_table(chi, labels, (1.0, 1.0, 1.0), erode_mm=1.0)
    assert rows[0]["voxels"] == 13**3  # a 1 mm ball removes one voxel layer from each face
    assert rows[0]["mean"] == pytest.approx(chi[6:19, 6:19, 6:19].mean(), rel=1e-6)
    assert rows[1]["voxels"] == 0 and np.isnan(rows[1]["mean"])  # eroded away, reported as such
    with pytest.raises(QSMInputError, match="no voxels left after eroding"):
        stats.roi_table(chi, labels, (1.0, 1.0, 1.0), reference=2, erode_mm=1.0)
    with pytest.raises(QSMInputError, match="'csf' is not among the labels"):
        stats.roi_table(chi, labels, (1.0, 1.0, 1.0), {1: "caudate", 2: "GP"}, reference="csf")


@pytest.mark.parametrize("kind, text", [
    ("freesurfer", "#No. Label Name:  R G B A\n0  Unknown  0 0 0 0\n4  Left-Lateral-Ventricle  120 18 134 0\n"
                   "11 Left-Caudate 122 186 220 0\n"),
    ("itksnap", '# ITK-SnAP Label Description File\n    0     0    0    0        0  0  0    "Clear Label"\n'
                '    4   255    0    0        1  1  1    "Left-Lateral-Ventricle"\n'
                '   11     0  255    0        1  1  1    "Left-Caudate"\n'),
    ("csv", "label,name\n4,Left-Lateral-Ventricle\n11,Left-Caudate\n"),
    ("dseg", "index\tname\tabbreviation\n4\tLeft-Lateral-Ventricle\tLLV\n11\tLeft-Caudate\tLC\n"),
])
def test_label_name_tables(tmp_path, kind, text):
    path = tmp_path / f"names.{'tsv' if kind == 'dseg' else 'txt'}"
    path.write_text(text)
    assert stats.read_label_names(path) == {4: "Left-Lateral-Ventricle", 11: "Left-Caudate"}


def test_cohort_table_long_format(tmp_path):
    shape, affine, chi, masks = _grid()
    labels = np.zeros(shape, np.int16)
    labels[masks["caudate"]] = 1
    labels[masks["CSF"]] = 2
    nib.save(nib.Nifti1Image(labels, affine), str(tmp_path / "labels.nii.gz"))
    table = tmp_path / "cohort.tsv"
    for i, subject in enumerate(("sub-01", "sub-02")):
        path = tmp_path / f"{subject}_Chimap.nii.gz"
        nib.save(nib.Nifti1Image(chi + 0.01 * i, affine), str(path))
        assert main(["stats", "--chi", str(path), "--labels", str(tmp_path / "labels.nii.gz"),
                     "--reference", "2", "--out", str(table), "--append", "--quiet"]) == 0
    rows = read_csv(table, "\t")
    assert [r["subject"] for r in rows] == ["sub-01_Chimap"] * 2 + ["sub-02_Chimap"] * 2
    means = [float(r["mean"]) for r in rows if r["label"] == "1"]
    assert means[1] - means[0] == pytest.approx(0.01, abs=1e-6)
    assert list(rows[0]) == ["subject", *stats.COLUMNS]
    # appending a plain table to the cohort table is refused
    plain = tmp_path / "plain.tsv"
    assert main(["stats", "--chi", str(tmp_path / "sub-01_Chimap.nii.gz"), "--labels",
                 str(tmp_path / "labels.nii.gz"), "--out", str(plain), "--quiet"]) == 0
    with pytest.raises(QSMInputError, match="cannot append"):
        stats.write_table(stats.roi_table(chi, labels, (1, 1, 1)), plain, subject="x", append=True)
