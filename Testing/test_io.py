"""Tests for qsmkit.io: NIfTI / NRRD / MHA round trips, geometry (RAS vs LPS), atomic writes,
one-line errors, sidecars, multi-echo loading and real vendor field maps."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from qsmkit import geometry, io, units
from qsmkit.errors import QSMInputError

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
VENDOR = SHARED_DATA / "vendor-fieldmaps" / "Ref"
needs_shared = pytest.mark.skipif(
    not VENDOR.is_dir(), reason="needs ../shared/data (reference data not present)"
)


def oblique_affine():
    """Oblique (two rotations), anisotropic, left-handed (x flipped) affine with an offset."""
    rot = geometry.rotation_matrix(0, 20.0) @ geometry.rotation_matrix(2, -35.0)
    return geometry.make_affine(
        voxel=(0.8, 1.1, 2.5), rotation=rot, origin=(-90.0, 12.5, 40.25), flip=(0,)
    )


def ramp(shape, dtype=np.float32):
    rng = np.random.default_rng(0)
    return (rng.standard_normal(shape) * 3.0).astype(dtype)


def listing(folder):
    return sorted(os.listdir(folder))


# ----------------------------------------------------------------------------- NIfTI


def test_nifti_round_trip_oblique_left_handed(tmp_path):
    aff = oblique_affine()
    assert np.linalg.det(aff[:3, :3]) < 0  # really left-handed
    data = ramp((8, 9, 10))
    out = io.save_volume(tmp_path / "sub" / "chi.nii.gz", data, aff)
    assert out == str(tmp_path / "sub" / "chi.nii.gz")
    assert listing(tmp_path / "sub") == ["chi.nii.gz"]  # parent created, no temp file left

    vol = io.load_volume(out)
    assert vol.data.dtype == np.float32
    assert vol.data.shape == (8, 9, 10) and vol.shape3 == (8, 9, 10)
    np.testing.assert_array_equal(vol.data, data)
    assert np.allclose(vol.affine, aff, atol=1e-5)
    assert np.allclose(vol.voxel_size, [0.8, 1.1, 2.5], atol=1e-5)
    assert np.allclose(vol.b0_dir(), geometry.b0_direction(aff), atol=1e-5)
    assert vol.path == out and vol.meta == {}

    # both sform and qform hold the affine (qform through qfac = -1), scanner code, mm / s
    img = nib.load(out)
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    assert np.allclose(img.get_sform(), aff, atol=1e-5)
    assert np.allclose(img.get_qform(), aff, atol=1e-5)
    assert img.header.get_xyzt_units() == ("mm", "sec")


def test_nifti_4d_round_trip(tmp_path):
    aff = oblique_affine()
    data = ramp((6, 7, 5, 3))
    path = io.save_volume(tmp_path / "echoes.nii", data, aff)
    vol = io.load_volume(path)
    assert vol.data.shape == (6, 7, 5, 3) and vol.shape3 == (6, 7, 5)
    np.testing.assert_array_equal(vol.data, data)
    assert np.allclose(vol.affine, aff, atol=1e-5)


def test_uint8_mask_and_int16_round_trip_exact(tmp_path):
    aff = geometry.make_affine((1.0, 1.0, 2.0))
    mask = np.zeros((7, 8, 9), dtype=bool)
    mask[2:5, 3:6, 1:8] = True
    p = io.save_volume(tmp_path / "mask.nii.gz", mask, aff, dtype=np.uint8)
    vol = io.load_volume(p)
    assert vol.data.dtype == np.uint8
    np.testing.assert_array_equal(vol.data, mask.astype(np.uint8))
    assert int(vol.data.sum()) == 3 * 3 * 7

    phase = np.arange(-4096, 4096, dtype=np.int16)[: 8 * 8 * 8].reshape(8, 8, 8)
    p = io.save_volume(tmp_path / "phase.nii", phase, aff, dtype=np.int16)
    vol = io.load_volume(p)
    assert vol.data.dtype == np.int16
    np.testing.assert_array_equal(vol.data, phase)
    # a float mask going to uint8 is rounded, not truncated
    p = io.save_volume(tmp_path / "soft.nii", np.full((3, 3, 3), 0.9999), aff, dtype=np.uint8)
    assert io.load_volume(p).data.min() == 1


def test_nifti_dtype_policy(tmp_path):
    aff = np.eye(4)
    raw = np.arange(4 * 4 * 4, dtype=np.int16).reshape(4, 4, 4)
    nib.save(nib.Nifti1Image(raw, aff), tmp_path / "int.nii")
    assert io.load_volume(tmp_path / "int.nii").data.dtype == np.int16
    v = io.load_volume(tmp_path / "int.nii", dtype=np.float64)
    assert v.data.dtype == np.float64 and v.data[3, 3, 3] == 63.0

    nib.save(nib.Nifti1Image(raw.astype(np.float64) / 7, aff), tmp_path / "f64.nii")
    v = io.load_volume(tmp_path / "f64.nii")
    assert v.data.dtype == np.float32
    assert np.isclose(v.data[3, 3, 3], 9.0)

    # dcm2niix-style Siemens phase: stored 0..4095 with slope 2, intercept -4096 -> integers
    img = nib.Nifti1Image(raw * 64, aff)  # 0..4032
    img.header.set_data_dtype(np.int16)
    img.header.set_slope_inter(2.0, -4096.0)
    img.to_filename(tmp_path / "ph.nii")
    v = io.load_volume(tmp_path / "ph.nii")
    assert np.issubdtype(v.data.dtype, np.integer)
    assert v.data.min() == -4096 and v.data.max() == 63 * 64 * 2 - 4096

    # non-integer scaling -> float32 with the slope/intercept applied
    img = nib.Nifti1Image(raw, aff)
    img.header.set_slope_inter(0.25, -5.0)
    img.to_filename(tmp_path / "hz.nii")
    v = io.load_volume(tmp_path / "hz.nii")
    assert v.data.dtype == np.float32
    assert np.isclose(v.data[0, 0, 0], -5.0) and np.isclose(v.data[3, 3, 3], 63 * 0.25 - 5.0)


def test_complex_nifti(tmp_path):
    z = (ramp((4, 5, 6)) + 1j * ramp((4, 5, 6))).astype(np.complex128)
    nib.save(nib.Nifti1Image(z, np.eye(4)), tmp_path / "z.nii")
    v = io.load_volume(tmp_path / "z.nii")
    assert v.data.dtype == np.complex64
    assert np.allclose(v.data, z, atol=1e-5)
    # saving complex with the default float32 dtype keeps the imaginary part
    p = io.save_volume(tmp_path / "z2.nii.gz", v.data, v.affine)
    assert np.allclose(io.load_volume(p).data, z, atol=1e-5)


# ----------------------------------------------------------------------------- ITK formats


@pytest.mark.parametrize("ext", [".nrrd", ".mha"])
def test_itk_round_trip_keeps_data_and_ras_affine(tmp_path, ext):
    aff = oblique_affine()
    data = ramp((8, 9, 10))
    p = io.save_volume(tmp_path / f"vol{ext}", data, aff)
    assert listing(tmp_path) == [f"vol{ext}"]
    vol = io.load_volume(p)
    assert vol.data.shape == (8, 9, 10)
    np.testing.assert_array_equal(vol.data, data)
    assert np.allclose(vol.affine, aff, atol=1e-9)
    assert np.allclose(vol.voxel_size, [0.8, 1.1, 2.5], atol=1e-9)

    four = ramp((5, 6, 7, 3))
    p = io.save_volume(tmp_path / f"vol4{ext}", four, aff)
    vol = io.load_volume(p)
    assert vol.data.shape == (5, 6, 7, 3)
    np.testing.assert_array_equal(vol.data, four)
    assert np.allclose(vol.affine, aff, atol=1e-9)

    labels = np.arange(5 * 6 * 7).reshape(5, 6, 7) % 5
    p = io.save_volume(tmp_path / f"lab{ext}", labels, aff, dtype=np.uint8)
    vol = io.load_volume(p)
    assert vol.data.dtype == np.uint8
    np.testing.assert_array_equal(vol.data, labels)


def test_nrrd_from_simpleitk_lps_to_ras(tmp_path):
    # array in ITK order (z, y, x): value encodes the index so the axis order is checkable
    nx, ny, nz = 4, 3, 2
    k, j, i = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    arr = (100 * i + 10 * j + k).astype(np.int16)
    img = sitk.GetImageFromArray(arr)
    # LPS: voxel axis i -> +P (y), axis j -> -L (x), axis k -> +S (z)
    img.SetDirection([0, -1, 0, 1, 0, 0, 0, 0, 1])
    img.SetSpacing([0.5, 2.0, 3.0])
    img.SetOrigin([10.0, -20.0, 30.0])
    sitk.WriteImage(img, str(tmp_path / "itk.nrrd"))

    vol = io.load_volume(tmp_path / "itk.nrrd")
    assert vol.data.shape == (4, 3, 2) and vol.data.dtype == np.int16
    assert vol.data[3, 1, 0] == 310 and vol.data[1, 2, 1] == 121
    # by hand: LPS affine = [D diag(s) | o]; RAS = diag(-1, -1, 1) @ LPS
    lps = np.array(
        [
            [0.0, -2.0, 0.0, 10.0],
            [0.5, 0.0, 0.0, -20.0],
            [0.0, 0.0, 3.0, 30.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    ras = np.array(
        [
            [0.0, 2.0, 0.0, -10.0],
            [-0.5, 0.0, 0.0, 20.0],
            [0.0, 0.0, 3.0, 30.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    assert np.allclose(np.diag([-1, -1, 1, 1]) @ lps, ras)
    assert np.allclose(vol.affine, ras, atol=1e-12)
    # and it agrees with ITK's own index -> physical point mapping
    p_lps = np.array(img.TransformIndexToPhysicalPoint((3, 1, 1)))
    p_ras = vol.affine @ [3, 1, 1, 1]
    assert np.allclose(p_ras[:3], p_lps * [-1, -1, 1])
    assert np.allclose(vol.voxel_size, [0.5, 2.0, 3.0])
    # B0 (world S) lies along voxel axis k
    assert np.allclose(vol.b0_dir(), [0, 0, 1])


def test_itk_4d_scalar_image_becomes_xyzt(tmp_path):
    arr = np.arange(3 * 2 * 4 * 5, dtype=np.float32).reshape(3, 2, 4, 5)  # (t, z, y, x)
    sitk.WriteImage(sitk.GetImageFromArray(arr, isVector=False), str(tmp_path / "t.nrrd"))
    vol = io.load_volume(tmp_path / "t.nrrd")
    assert vol.data.shape == (5, 4, 2, 3)
    np.testing.assert_array_equal(vol.data, arr.transpose(3, 2, 1, 0))


# ----------------------------------------------------------------------------- writing


def test_sidecar_json_with_numpy_values(tmp_path):
    side = {
        "EchoTime": np.float32(0.02),
        "EchoTimes": np.array([0.004, 0.008]),
        "n": np.int64(5),
        "ok": np.bool_(True),
        "nested": {"voxel": np.array([1.0, 1.0, 2.0]), 3: "three"},
        "where": Path("/x/y"),
    }
    p = io.save_volume(tmp_path / "chi.nii.gz", np.zeros((3, 3, 3)), np.eye(4), sidecar=side)
    jp = tmp_path / "chi.json"
    assert io.sidecar_path(p) == str(jp)
    text = jp.read_text()
    assert '\n  "EchoTime"' in text  # indent=2
    back = json.loads(text)
    assert back["EchoTime"] == pytest.approx(0.02)
    assert back["EchoTimes"] == [0.004, 0.008]
    assert back["n"] == 5 and back["ok"] is True
    assert back["nested"] == {"voxel": [1.0, 1.0, 2.0], "3": "three"}
    assert back["where"] == "/x/y"
    assert listing(tmp_path) == ["chi.json", "chi.nii.gz"]
    # the sidecar comes back as meta
    assert io.load_volume(p).meta["n"] == 5


def test_sidecar_path():
    assert io.sidecar_path("a/x.nii.gz") == os.path.join("a", "x.json")
    assert io.sidecar_path("x.nii") == "x.json"
    assert io.sidecar_path("x.nrrd") == "x.json"
    assert io.sidecar_path("d/x.seg.nrrd") == os.path.join("d", "x.seg.json")
    assert io.sidecar_path("X.NII.GZ") == "X.json"


def test_write_json_atomic_and_creates_parent(tmp_path):
    p = tmp_path / "deep" / "er" / "params.json"
    io.write_json(p, {"a": np.arange(3, dtype=np.int16), "b": np.float64(1.5)})
    assert json.loads(p.read_text()) == {"a": [0, 1, 2], "b": 1.5}
    assert listing(p.parent) == ["params.json"]


def test_atomic_save_failure_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "out.nii.gz"

    def broken_save(img, filename, *args, **kwargs):
        with open(filename, "wb") as f:  # half-written file, then a crash
            f.write(b"\x00" * 100)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(nib, "save", broken_save)
    with pytest.raises((QSMInputError, OSError)) as err:
        io.save_volume(target, np.ones((4, 4, 4)), np.eye(4), sidecar={"a": 1})
    assert "disk full" in str(err.value)
    assert listing(tmp_path) == []  # neither target, temp file nor sidecar

    # an existing output is left intact by a failed overwrite
    target.write_bytes(b"previous")
    with pytest.raises((QSMInputError, OSError)):
        io.save_volume(target, np.ones((4, 4, 4)), np.eye(4))
    assert target.read_bytes() == b"previous"
    assert listing(tmp_path) == ["out.nii.gz"]


def test_atomic_save_failure_itk(tmp_path, monkeypatch):
    def broken_write(img, filename, *args, **kwargs):
        Path(filename).write_bytes(b"NRRD0004\n")
        raise RuntimeError("ITK ERROR: simulated failure")

    monkeypatch.setattr(sitk, "WriteImage", broken_write)
    with pytest.raises((QSMInputError, RuntimeError)):
        io.save_volume(tmp_path / "x.nrrd", np.ones((4, 4, 4)), np.eye(4))
    assert listing(tmp_path) == []


def test_save_rejects_object_array(tmp_path):
    data = np.empty((2, 2, 2), dtype=object)
    with pytest.raises((QSMInputError, TypeError, ValueError)):
        io.save_volume(tmp_path / "o.nii.gz", data, np.eye(4), dtype=None)
    assert listing(tmp_path) == []


# ----------------------------------------------------------------------------- errors


def assert_one_line(err, *fragments):
    msg = str(err.value)
    assert "\n" not in msg
    for frag in fragments:
        assert frag in msg, (frag, msg)


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.nii.gz"
    with pytest.raises(QSMInputError) as err:
        io.load_volume(missing, what="phase")
    assert_one_line(err, str(missing), "file not found")
    assert str(err.value) == f"{missing}: file not found"


def test_two_d_file(tmp_path):
    p = tmp_path / "slice.nii"
    nib.save(nib.Nifti1Image(np.zeros((4, 5), np.float32), np.eye(4)), p)
    with pytest.raises(QSMInputError) as err:
        io.load_volume(p, what="magnitude")
    assert_one_line(err, str(p), "magnitude must be 3-D or 4-D", "(4, 5)")

    p2 = tmp_path / "slice.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((5, 4), np.float32)), str(p2))
    with pytest.raises(QSMInputError) as err:
        io.load_volume(p2)
    assert_one_line(err, str(p2), "must be 3-D or 4-D", "(4, 5)")


@pytest.mark.parametrize("name", ["junk.nii.gz", "junk.nii", "junk.nrrd", "junk.xyz"])
def test_unreadable_file(tmp_path, name):
    p = tmp_path / name
    p.write_bytes(b"this is not an image\n" * 3)
    with pytest.raises(QSMInputError) as err:
        io.load_volume(p, what="phase")
    assert_one_line(err, str(p), "cannot read phase (")


def test_require_finite(tmp_path):
    data = np.ones((5, 5, 5), np.float32)
    io.require_finite(data, "ok.nii")
    io.require_finite(np.zeros((3, 3, 3), np.int16), "int.nii")
    data[0, 0, :3] = np.nan
    data[1, 1, 1] = np.inf
    data[2, 2, 2] = -np.inf
    with pytest.raises(QSMInputError) as err:
        io.require_finite(data, "/data/phase.nii", what="phase")
    assert_one_line(err, "/data/phase.nii", "phase", " 5 ")


def make_vol(shape, aff, path):
    return io.Volume(np.zeros(shape, np.float32), aff, path=path)


def test_check_same_grid():
    aff = geometry.make_affine((1.0, 1.0, 2.0))
    a = make_vol((4, 5, 6), aff, "mag.nii")
    io.check_same_grid(a, make_vol((4, 5, 6, 3), aff.copy(), "ph.nii"))  # echoes allowed
    with pytest.raises(QSMInputError) as err:
        io.check_same_grid(a, make_vol((4, 5, 7), aff, "ph.nii"))
    assert_one_line(err, "mag.nii", "ph.nii", "(4, 5, 6)", "(4, 5, 7)", "magnitude", "phase")
    shifted = aff.copy()
    shifted[0, 3] += 1.0
    with pytest.raises(QSMInputError) as err:
        io.check_same_grid(a, make_vol((4, 5, 6), shifted, "ph.nii"), "mask", "field")
    assert_one_line(err, "mag.nii", "ph.nii", "mask", "field", "affine")


def test_volume_properties():
    aff = geometry.make_affine((0.5, 0.5, 2.0), rotation=geometry.rotation_matrix(0, 30.0))
    v = io.Volume(np.zeros((2, 3, 4, 5)), aff)
    assert v.shape3 == (2, 3, 4)
    assert v.affine.dtype == np.float64
    assert np.allclose(v.voxel_size, [0.5, 0.5, 2.0])
    assert np.allclose(v.b0_dir(), [0.0, 0.5, np.sqrt(3) / 2])
    assert np.allclose(v.b0_dir([0, 0, 5]), v.b0_dir())


# ----------------------------------------------------------------------------- echoes, meta


def test_load_echoes_stacks_3d_files(tmp_path):
    aff = oblique_affine()
    echoes = [ramp((6, 7, 8)) + e for e in range(3)]
    paths = [io.save_volume(tmp_path / f"ph_e{e + 1}.nii.gz", d, aff) for e, d in enumerate(echoes)]
    vol = io.load_echoes(paths)
    assert vol.data.shape == (6, 7, 8, 3)
    for e in range(3):
        np.testing.assert_array_equal(vol.data[..., e], echoes[e])
    assert np.allclose(vol.affine, aff, atol=1e-5)
    assert vol.meta["files"] == paths

    single4d = io.save_volume(tmp_path / "all.nii.gz", vol.data, aff)
    v4 = io.load_echoes([single4d])
    assert v4.data.shape == (6, 7, 8, 3)
    np.testing.assert_array_equal(v4.data, vol.data)
    assert io.load_echoes([paths[0]]).data.shape == (6, 7, 8)  # a single file as is
    assert io.load_echoes(paths[0]).data.shape == (6, 7, 8)  # a plain path is accepted too


def test_load_echoes_collects_echo_times(tmp_path):
    paths = []
    for e, te in enumerate([0.004, 0.008, 0.012]):
        side = {"EchoTime": te, "MagneticFieldStrength": 3, "EchoNumber": e + 1}
        paths.append(
            io.save_volume(tmp_path / f"e{e + 1}.nii", np.zeros((3, 4, 5)), np.eye(4), sidecar=side)
        )
    vol = io.load_echoes(paths)
    assert vol.data.shape == (3, 4, 5, 3)
    assert vol.meta["EchoTime"] == [0.004, 0.008, 0.012]
    assert vol.meta["MagneticFieldStrength"] == 3
    assert [m["EchoNumber"] for m in vol.meta["files_meta"]] == [1, 2, 3]


def test_load_echoes_rejects_mismatch(tmp_path):
    aff = np.eye(4)
    a = io.save_volume(tmp_path / "e1.nii", np.zeros((6, 7, 8)), aff)
    b = io.save_volume(tmp_path / "e2.nii", np.zeros((6, 7, 9)), aff)
    with pytest.raises(QSMInputError) as err:
        io.load_echoes([a, b])
    assert_one_line(err, "e1.nii", "e2.nii", "(6, 7, 8)", "(6, 7, 9)")
    moved = aff.copy()
    moved[2, 3] = 5.0
    c = io.save_volume(tmp_path / "e3.nii", np.zeros((6, 7, 8)), moved)
    with pytest.raises(QSMInputError):
        io.load_echoes([a, c])
    with pytest.raises(QSMInputError):
        io.load_echoes([])


def test_dcm2niix_sidecar_lands_in_meta(tmp_path):
    p = io.save_volume(tmp_path / "gre_ph_e2.nii.gz", np.zeros((3, 3, 3)), np.eye(4))
    (tmp_path / "gre_ph_e2.json").write_text(
        json.dumps({"EchoTime": 0.00765, "MagneticFieldStrength": 3, "Manufacturer": "Siemens"})
    )
    meta = io.load_volume(p).meta
    assert meta["EchoTime"] == 0.00765 and meta["MagneticFieldStrength"] == 3
    # an unparsable sidecar is ignored
    (tmp_path / "gre_ph_e2.json").write_text("{not json")
    assert io.load_volume(p).meta == {}


# ----------------------------------------------------------------------------- real data


@pytest.mark.shared_data
@needs_shared
def test_siemens_phase_difference_real_data():
    path = VENDOR / "Si_4_gre_field_ph_e2_ph.nii"
    vol = io.load_volume(path, what="phase")
    assert vol.shape3 == (64, 64, 36)
    assert np.allclose(vol.voxel_size, [3.25, 3.25, 3.6], atol=1e-3)
    # dcm2niix stores 0..4095 with slope 2, intercept -4096: raw phase -4096..4094, integers
    assert np.issubdtype(vol.data.dtype, np.integer)
    assert int(vol.data.min()) == -4096 and int(vol.data.max()) == 4094
    assert vol.meta["EchoTime"] == pytest.approx(0.00765)
    assert vol.meta["Manufacturer"] == "Siemens"
    rad = units.rescale_phase(vol.data)
    assert rad.dtype == np.float32
    assert rad.min() == np.float32(-np.pi) and rad.max() < np.pi
    np.testing.assert_allclose(rad, vol.data * (np.pi / 4096), atol=1e-6)


@pytest.mark.shared_data
@needs_shared
def test_ge_b0_map_in_hz_real_data():
    vol = io.load_volume(VENDOR / "GE_2_3db0maps_patient_fieldmaphz.nii", what="field")
    assert vol.shape3 == (128, 128, 80)
    data = vol.data.astype(np.float64)
    assert np.all(np.isfinite(data))
    io.require_finite(data, vol.path)
    assert data.min() == -506 and data.max() == 506
    ppm = units.to_ppm(data, "hz", b0_tesla=3.0)
    assert np.isclose(ppm.max(), 506 / 127.7325)
    assert np.allclose(vol.b0_dir(), [0, 0, 1], atol=1e-3)
