"""Scanner input: DICOM and dcm2niix NIfTI + sidecars, vendor phase scaling, field maps in Hz.

Reference data (../shared/data/vendor-fieldmaps, dcm_qa_fmap): Siemens dual-echo GRE field
map DICOMs and dcm2niix's NIfTIs of the same series; GE and Philips scanner field maps in Hz.
There is no scanner Hz map for Siemens: the reference for our DICOM reader + scaling is
dcm2niix's NIfTI + sidecar of the same series. The Siemens phase is quantized in steps of
2 pi / 4096 rad (12 bits; -4096..4094 in steps of 2 after the DICOM rescale), i.e.
1 / (4096 dTE) = 0.099 Hz at dTE = 2.46 ms; the two paths agree exactly (0 Hz).
"""

import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest

from conftest import shared
from qsmkit import masking, scanner, units
from qsmkit.errors import QSMInputError
from qsmkit.io import load_volume

pydicom = pytest.importorskip("pydicom", reason="needs pydicom (a qsmkit dependency)")

FMAP = ("vendor-fieldmaps",)
DTE_SIEMENS = 0.00765 - 0.00519


def _in(*parts):
    return shared(*FMAP, "In", "Siemens", *parts)


def _ref(name):
    return shared(*FMAP, "Ref", name)


def _json(path):
    with open(str(path)[: -len(".nii")] + ".json") as f:
        return json.load(f)


# ----------------------------------------------------------------------------- DICOM vs dcm2niix


@pytest.mark.shared_data
@pytest.mark.parametrize("series, refs", [
    ("2_gre_field_magph", ["Si_2_gre_field_magph_e1.nii", "Si_2_gre_field_magph_e2.nii"]),
    ("3_gre_field_magph", ["Si_3_gre_field_magph_e2_ph.nii"]),
    ("4_gre_field_ph", ["Si_4_gre_field_ph_e2_ph.nii"]),
])
def test_dicom_matches_dcm2niix(series, refs):
    images = scanner.read_dicom(_in(series))
    assert len(images) == len(refs)
    for im, name in zip(images, refs):
        ref_path = _ref(name)
        ref = load_volume(ref_path)
        side = _json(ref_path)
        assert im.kind == scanner.image_kind(side)
        assert im.kind == ("phasediff" if name.endswith("_ph.nii") else "magnitude")
        assert im.volume.data.shape == ref.data.shape
        np.testing.assert_array_equal(im.volume.data, ref.data)  # same stored values, same voxels
        np.testing.assert_allclose(im.volume.affine, ref.affine, atol=1e-4)  # float32 in the NIfTI
        for key in ("EchoTime", "MagneticFieldStrength", "ImagingFrequency", "EchoNumber", "SeriesNumber"):
            assert im.meta[key] == pytest.approx(side[key], rel=1e-9), key
        if im.kind == "phasediff":  # TE1/TE2 from the Siemens protocol (ASCCONV alTE)
            assert im.meta["EchoTime1"] == pytest.approx(side["EchoTime1"])
            assert im.meta["EchoTime2"] == pytest.approx(side["EchoTime2"])


@pytest.mark.shared_data
def test_siemens_phase_difference_to_hz():
    dicom = scanner.read_fieldmap_hz(_in("3_gre_field_magph"))
    nifti_path = _ref("Si_3_gre_field_magph_e2_ph.nii")
    nifti = scanner.read_fieldmap_hz(nifti_path)
    assert dicom.kind == nifti.kind == "fieldmap"
    assert dicom.te == pytest.approx([0.00519, 0.00765]) and nifti.te == pytest.approx(dicom.te)
    # the 12-bit rule is chosen by the manufacturer, not by the range, in both forms
    for s in (dicom, nifti):
        assert s.meta["phase_convention"]["name"] == "siemens-12bit-signed"
        assert s.meta["phase_convention"]["source"].startswith("Manufacturer Siemens")
    quantum_hz = 1.0 / (4096 * DTE_SIEMENS)  # one 12-bit phase step
    assert quantum_hz == pytest.approx(0.0992, abs=1e-4)
    assert np.max(np.abs(dicom.data.data - nifti.data.data)) <= quantum_hz / 2
    np.testing.assert_allclose(dicom.data.affine, nifti.data.affine, atol=1e-4)
    # independent scaling from the raw NIfTI values: x pi / 4096 rad, / (2 pi dTE)
    raw = nib.load(str(nifti_path)).get_fdata()
    assert raw.min() == -4096 and raw.max() == 4094
    np.testing.assert_allclose(nifti.data.data, raw * (np.pi / 4096) / (2 * np.pi * DTE_SIEMENS),
                               atol=1e-3)
    assert np.max(np.abs(nifti.data.data)) <= 1 / (2 * DTE_SIEMENS) + 1e-3
    # physically sensible: a shimmed head at 3 T, inside the magnitude's brain mask
    mag = load_volume(_ref("Si_2_gre_field_magph_e1.nii"))  # same acquisition as series 3
    mask = masking.mask_threshold(mag.data, mag.voxel_size)
    hz = dicom.data.data[mask]
    assert abs(np.median(hz)) < 100  # measured 10.8 Hz
    assert np.mean(np.abs(hz) < 100) > 0.9
    assert np.percentile(hz, 95) - np.percentile(hz, 5) < 150  # measured 73 Hz


@pytest.mark.shared_data
def test_b0_from_imaging_frequency_and_ppm():
    s = scanner.read_fieldmap_hz(_ref("Si_3_gre_field_magph_e2_ph.nii"))
    side = _json(_ref("Si_3_gre_field_magph_e2_ph.nii"))
    assert s.meta["b0_source"] == "ImagingFrequency"
    assert units.larmor_hz(s.b0) == pytest.approx(side["ImagingFrequency"] * 1e6, rel=1e-12)
    assert s.b0 == pytest.approx(2.8948, abs=1e-4)  # a "3 T" Prisma
    nominal = scanner.read_fieldmap_hz(_ref("Si_3_gre_field_magph_e2_ph.nii"), b0_from="nominal")
    assert nominal.b0 == 3.0 and nominal.meta["b0_source"] == "MagneticFieldStrength"
    np.testing.assert_allclose(units.hz_to_ppm(s.data.data, s.b0), s.data.data / side["ImagingFrequency"],
                               rtol=1e-6)


# ----------------------------------------------------------------------------- GE / Philips Hz maps


@pytest.mark.shared_data
@pytest.mark.parametrize("mag_name, hz_name, field_t", [
    ("GE_2_3db0maps_patient.nii", "GE_2_3db0maps_patient_fieldmaphz.nii", 7),
    ("GE_3_3db0maps_patient.nii", "GE_3_3db0maps_patient_fieldmaphz.nii", 7),
    ("GE_6_CV_Neuro_HH_Adv.nii", "GE_6_CV_Neuro_HH_Adv_fieldmaphz.nii", 3),
    ("Ph_801_WIP_B0_NS_e1.nii", "Ph_801_WIP_B0_NS_e2_fieldmaphz.nii", 3),
])
def test_vendor_fieldmaps_in_hz(mag_name, hz_name, field_t):
    hz_path = _ref(hz_name)
    side = _json(hz_path)
    s = scanner.read_fieldmap_hz(hz_path)
    assert s.kind == "fieldmap"
    np.testing.assert_allclose(s.data.data, nib.load(str(hz_path)).get_fdata(), atol=1e-4)  # Hz as stored
    # B0 from the Larmor frequency agrees with the nominal field (GE 7 T: 0.01%)
    assert s.b0 == pytest.approx(field_t, rel=0.005)
    ppm = units.hz_to_ppm(s.data.data, s.b0)
    np.testing.assert_allclose(ppm, s.data.data / side["ImagingFrequency"], rtol=1e-6)
    mag = scanner.read_scanner_series(_ref(mag_name))
    assert mag.kind in ("magnitude", "unknown")  # Philips' "T1 MIXED" image type says neither
    assert mag.data.shape3 == s.data.shape3
    np.testing.assert_allclose(mag.data.affine, s.data.affine, atol=1e-4)  # the pair shares a grid
    mask = masking.mask_threshold(mag.data.data, mag.data.voxel_size)
    assert abs(np.median(s.data.data[mask])) < 50  # shimmed heads: measured |median| <= 34 Hz
    if side["Manufacturer"] == "GE":
        # a dual-echo map is unambiguous within +-1/(2 dTE): GE's map reaches that limit
        # (integer Hz) in the noise outside the head, which checks EchoTime1/2 and the Hz units
        limit = 1 / (2 * (side["EchoTime2"] - side["EchoTime1"]))
        assert s.te == pytest.approx([side["EchoTime1"], side["EchoTime2"]])
        assert np.max(np.abs(s.data.data)) == np.floor(limit)
    else:
        # Philips: 12-bit values scaled by the sidecar's rescale slope/intercept (-500..500 Hz)
        lo = side["PhilipsRescaleIntercept"]
        hi = lo + side["PhilipsRescaleSlope"] * 4095
        assert lo - 1e-3 <= s.data.data.min() and s.data.data.max() <= hi + 1e-3
        assert s.te == []  # Philips does not record the field map's echo times


def _aligned(src, dst):
    """``src`` resampled onto ``dst``'s grid when the two differ by axis flips / permutations."""
    t = np.linalg.inv(dst.affine) @ src.affine
    perm = np.abs(np.round(t[:3, :3]))
    assert np.allclose(t[:3, :3], np.round(t[:3, :3]), atol=1e-4) and np.all(perm.sum(0) == 1)
    data = src.data
    for ax in range(3):
        if np.round(t[:3, :3])[:, ax].sum() < 0:
            data = np.flip(data, axis=ax)
    order = [int(np.argmax(perm[:, ax])) for ax in range(3)]
    return np.moveaxis(data, list(range(3)), order)


@pytest.mark.shared_data
def test_ge_2d_and_3d_field_maps_of_one_session_agree():
    """Two GE B0 maps (2-D and 3-D sequences, same shim) of one head, stored with opposite
    x axes: aligned through their affines, they measure the same field."""
    a = scanner.read_fieldmap_hz(_ref("GE_2_3db0maps_patient_fieldmaphz.nii")).data
    b = scanner.read_fieldmap_hz(_ref("GE_3_3db0maps_patient_fieldmaphz.nii")).data
    assert a.affine[0, 0] < 0 < b.affine[0, 0]
    a_on_b = _aligned(a, b)
    mag = scanner.read_scanner_series(_ref("GE_3_3db0maps_patient.nii")).data
    mask = masking.mask_threshold(mag.data, mag.voxel_size, erode=4.0)
    d = a_on_b[mask] - b.data[mask]
    r = np.corrcoef(a_on_b[mask], b.data[mask])[0, 1]
    assert abs(np.median(d)) <= 5  # measured -3 Hz
    assert r > 0.6  # measured 0.68 (0.28 without the flip)
    assert np.median(np.abs(d - np.median(d))) <= 12  # measured 10 Hz (2-D vs 3-D, 4 min apart)


# ----------------------------------------------------------------------------- synthetic DICOM


def _rotation():
    a, b, c = 0.3, -0.2, 0.5
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


GEOM = {"rows": 4, "cols": 5, "slices": 6, "dr": 1.5, "dc": 1.25, "dz": 2.5,
        "origin": np.array([-30.0, 12.0, 40.0]), "R": _rotation()}


def _code(c, r, s):
    return c + 10 * r + 100 * s


def _decode(v):
    v = np.asarray(v, dtype=np.int64)
    return v % 10, (v // 10) % 10, v // 100


def _dicom_position(c, r, s):
    g = GEOM
    R = g["R"]
    return g["origin"] + s * g["dz"] * R[:, 2] + c * g["dc"] * R[:, 0] + r * g["dr"] * R[:, 1]


def _phase_raw(code, echo):
    return (np.asarray(code) * 37 + echo * 500) % 4096


def _write_series(folder, *, kind, series, tes, rng, extra=None):
    from pydicom.uid import generate_uid

    from conftest import new_mr_slice

    g = GEOM
    uid = generate_uid()
    files = []
    for e, te in enumerate(tes, start=1):
        for s in range(g["slices"]):
            ds = new_mr_slice()
            ds.Manufacturer = "SIEMENS"
            ds.MagneticFieldStrength = 3
            ds.ImagingFrequency = 123.2
            ds.SeriesInstanceUID = uid
            ds.SeriesNumber = series
            ds.ImageType = ["ORIGINAL", "PRIMARY", "P" if kind == "phase" else "M", "ND"]
            ds.EchoTime = te * 1000
            ds.EchoNumbers = e
            ds.Rows, ds.Columns = g["rows"], g["cols"]
            ds.PixelSpacing = [g["dr"], g["dc"]]
            ds.ImageOrientationPatient = [float(v) for v in (*g["R"][:, 0], *g["R"][:, 1])]
            ds.ImagePositionPatient = [float(v) for v in _dicom_position(0, 0, s)]
            ds.SliceThickness = g["dz"]
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
            r, c = np.mgrid[: g["rows"], : g["cols"]]
            code = _code(c, r, s)
            if kind == "phase":
                ds.RescaleSlope, ds.RescaleIntercept = 2, -4096
                px = _phase_raw(code, e)
            else:
                px = code + 1000 * e
            for key, value in (extra or {}).items():
                setattr(ds, key, value)
            ds.PixelData = px.astype(np.uint16).tobytes()
            path = os.path.join(folder, f"x{rng.integers(1e9):09d}.dcm")  # file order is random
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
    return files


def _world_lps(affine, shape):
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    ras = ijk @ affine[:3, :3].T + affine[:3, 3]
    return ras * np.array([-1, -1, 1])


def test_dicom_multi_echo_oblique_geometry(tmp_path):
    rng = np.random.default_rng(0)
    tes = [0.008, 0.004, 0.012]  # written out of order: echoes come back sorted by TE
    _write_series(tmp_path, kind="magnitude", series=10, tes=tes, rng=rng)
    _write_series(tmp_path, kind="phase", series=11, tes=tes, rng=rng)
    open(tmp_path / "notes.txt", "w").write("not DICOM")  # skipped
    mag, pha, te, b0 = scanner.load_gre_scanner(tmp_path)
    assert te == pytest.approx([0.004, 0.008, 0.012])
    assert b0 == pytest.approx(123.2 / units.GAMMA_MHZ_PER_T)
    shape = (GEOM["cols"], GEOM["rows"], GEOM["slices"])
    assert mag.data.shape == pha.data.shape == (*shape, 3)
    # every voxel's world position (through our affine) is where DICOM put that pixel
    for e in range(3):
        code = mag.data[..., e].astype(np.int64) - 1000 * (tes.index(te[e]) + 1)
        c, r, s = _decode(code.reshape(-1))
        expected = np.array([_dicom_position(ci, ri, si) for ci, ri, si in zip(c, r, s)])
        np.testing.assert_allclose(_world_lps(mag.affine, shape), expected, atol=1e-6)
        want = units.wrap_phase((2.0 * _phase_raw(code, tes.index(te[e]) + 1) - 4096) * np.pi / 4096)
        np.testing.assert_allclose(pha.data[..., e], want, atol=1e-6)
    assert pha.data.dtype == np.float32
    np.testing.assert_allclose(mag.affine, pha.affine)
    # B0 (scanner z, the same in LPS and RAS) in voxel axes: the z components of the row
    # direction, the column direction (j flipped, as dcm2niix stores rows) and the normal
    R = GEOM["R"]
    np.testing.assert_allclose(mag.b0_dir(), [R[2, 0], -R[2, 1], R[2, 2]], atol=1e-9)


def test_dicom_errors(tmp_path):
    rng = np.random.default_rng(1)
    with pytest.raises(QSMInputError, match="no DICOM images"):
        scanner.read_dicom(tmp_path)
    dup = tmp_path / "dup"
    dup.mkdir()
    _write_series(dup, kind="magnitude", series=3, tes=[0.005], rng=rng)
    _write_series(dup, kind="magnitude", series=3, tes=[0.005], rng=rng)
    for f in os.listdir(dup):  # make both copies one series: every slice position twice
        ds = pydicom.dcmread(dup / f)
        ds.SeriesInstanceUID = "1.2.3.4"
        ds.save_as(dup / f)
    with pytest.raises(QSMInputError, match="two slices share a position"):
        scanner.read_dicom(dup)
    multi = tmp_path / "multi"
    multi.mkdir()
    (path,) = _write_series(multi, kind="magnitude", series=3, tes=[0.005], rng=rng,
                            extra={"NumberOfFrames": 2})[:1]
    with pytest.raises(QSMInputError, match="2 frames but 0 per-frame functional groups"):
        scanner.read_dicom(path)  # multi-frame without the enhanced functional groups


# ----------------------------------------------------------------------------- bad scanner input


@pytest.mark.shared_data
def test_mixed_series_are_rejected():
    with pytest.raises(QSMInputError, match="mixed series: magnitude, phasediff"):
        scanner.read_scanner_series([_in("2_gre_field_magph"), _in("3_gre_field_magph")])
    with pytest.raises(QSMInputError, match="several series"):
        scanner.read_scanner_series([_in("3_gre_field_magph"), _in("4_gre_field_ph")], kind="phasediff")
    s = scanner.read_scanner_series([_in("3_gre_field_magph"), _in("4_gre_field_ph")], series=4)
    assert s.kind == "phasediff" and s.meta["SeriesNumber"] == 4
    mag = scanner.read_scanner_series(_in("2_gre_field_magph"))
    assert mag.kind == "magnitude" and mag.data.data.shape == (64, 64, 36, 2)
    assert mag.te == pytest.approx([0.00519, 0.00765])
    with pytest.raises(QSMInputError, match="mixed series"):
        scanner.read_scanner_series([_ref("Si_2_gre_field_magph_e1.nii"),
                                     _ref("Si_3_gre_field_magph_e2_ph.nii")])


@pytest.mark.shared_data
def test_phase_sidecar_without_echo_time(tmp_path):
    src = _ref("Si_3_gre_field_magph_e2_ph.nii")
    dst = tmp_path / "phase.nii"
    shutil.copy(src, dst)
    side = _json(src)
    for key in ("EchoTime", "EchoTime1", "EchoTime2"):
        side.pop(key)
    (tmp_path / "phase.json").write_text(json.dumps(side))
    with pytest.raises(QSMInputError) as err:
        scanner.read_scanner_series(dst)
    assert str(dst) in str(err.value) and "EchoTime" in str(err.value)
    os.remove(tmp_path / "phase.json")
    with pytest.raises(QSMInputError, match="no JSON sidecar"):
        scanner.read_scanner_series(dst)


def test_phase_to_rad_vendor_rules():
    siemens = {"Manufacturer": "Siemens"}
    signed = np.array([-4096, -2048, 0, 2048, 4094], dtype=np.int16)
    np.testing.assert_allclose(scanner.phase_to_rad(signed, siemens), [-np.pi, -np.pi / 2, 0, np.pi / 2,
                                                                       np.pi * 4094 / 4096], atol=1e-6)
    unsigned = np.array([0, 1024, 2048, 4095], dtype=np.uint16)  # raw 12-bit: offset by pi
    np.testing.assert_allclose(scanner.phase_to_rad(unsigned, siemens),
                               [-np.pi, -np.pi / 2, 0, np.pi * 2047 / 2048], atol=1e-6)
    ge = {"Manufacturer": "GE MEDICAL SYSTEMS"}
    mrad = np.array([-3142, -1571, 0, 1000, 3141], dtype=np.int16)
    np.testing.assert_allclose(scanner.phase_to_rad(mrad, ge),
                               units.wrap_phase(mrad / 1000.0), atol=1e-6)
    philips = {"Manufacturer": "Philips"}
    rad = np.linspace(-np.pi, np.pi - 1e-3, 7).astype(np.float32)
    np.testing.assert_allclose(scanner.phase_to_rad(rad, philips), rad, atol=1e-6)
    np.testing.assert_allclose(scanner.phase_to_rad(rad + np.pi, {}), units.wrap_phase(rad + np.pi),
                               atol=1e-6)
    for data, meta in [(np.array([0, 20000], dtype=np.int32), siemens),  # beyond 12 bits
                       (signed, ge),  # GE does not write Siemens 12-bit phase
                       (np.array([-300, 300], dtype=np.int16), siemens),  # too narrow for raw phase
                       (np.array([-7.5, 7.5]), philips)]:  # floats beyond one cycle
        with pytest.raises(QSMInputError, match="unknown phase range"):
            scanner.phase_to_rad(data, meta, path="p.nii")
    with pytest.raises(QSMInputError, match=r"^p.nii: unknown phase range 0..20000 for manufacturer Siemens"):
        scanner.phase_to_rad(np.array([0, 20000]), siemens, path="p.nii")


def test_image_kind_and_b0_rules():
    assert scanner.image_kind({"ImageType": ["ORIGINAL", "PRIMARY", "P", "ND", "PHASE"]}) == "phase"
    assert scanner.image_kind({"ImageType": ["ORIGINAL", "PRIMARY", "M", "ND"]}) == "magnitude"
    assert scanner.image_kind({"ImageType": ["ORIGINAL", "PRIMARY", "OTHER", "FIELDMAPHZ"]}) == "fieldmap"
    assert scanner.image_kind({"ImageType": ["P"], "EchoTime1": 0.004, "EchoTime2": 0.006}) == "phasediff"
    assert scanner.image_kind({"ImageType": ["ORIGINAL", "PRIMARY", "OTHER"], "GEImageType": 1}) == "phase"
    assert scanner.image_kind({"ImageType": ["ORIGINAL", "PRIMARY", "T1", "MIXED"]}) == "unknown"
    assert scanner.b0_from_sidecar({"MagneticFieldStrength": 3, "ImagingFrequency": 123.25483}) == (
        pytest.approx(123.25483 / 42.5775), "ImagingFrequency")
    # a frequency far from the nominal field (another nucleus) is not used
    assert scanner.b0_from_sidecar({"MagneticFieldStrength": 3, "ImagingFrequency": 32.1})[1] == \
        "MagneticFieldStrength"
    with pytest.raises(QSMInputError, match="missing field strength"):
        scanner.b0_from_sidecar({}, "x.nii")
    with pytest.raises(QSMInputError, match="TE2 > TE1"):
        scanner.phasediff_to_hz(np.zeros(3), 0.006, 0.004)
