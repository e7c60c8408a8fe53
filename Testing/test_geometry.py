"""Tests for qsmkit.geometry: voxel sizes and the B0 direction in voxel axes."""

from __future__ import annotations

import numpy as np
import pytest

from qsmkit import geometry
from qsmkit.errors import QSMInputError

S30, C30 = 0.5, np.sqrt(3) / 2  # sin / cos of 30 degrees


def test_voxel_size_anisotropic():
    assert np.allclose(geometry.voxel_size(np.diag([0.5, 0.75, 2.0, 1.0])), [0.5, 0.75, 2.0])
    rot = geometry.rotation_matrix(1, 40.0) @ geometry.rotation_matrix(2, 15.0)
    aff = geometry.make_affine((0.9375, 0.9375, 1.5), rotation=rot, flip=(1,), origin=(1, 2, 3))
    assert np.allclose(geometry.voxel_size(aff), [0.9375, 0.9375, 1.5])
    # a flip does not change the size, the origin is ignored
    assert np.allclose(geometry.voxel_size(np.diag([-2.0, 3.0, -4.0, 1.0])), [2.0, 3.0, 4.0])
    d = geometry.direction_matrix(aff)
    assert np.allclose(np.linalg.norm(d, axis=0), 1.0)


def test_identity_b0_along_third_axis():
    b = geometry.b0_direction(np.eye(4))
    assert np.allclose(b, [0.0, 0.0, 1.0])
    assert geometry.b0_angle_deg(b) == pytest.approx(0.0)


def test_rotation_about_x_30_degrees():
    rot = geometry.rotation_matrix(0, 30.0)
    # R about x: rows (1,0,0), (0,c,-s), (0,s,c); b_vox = R^T e_z = third row of R
    assert np.allclose(rot, [[1, 0, 0], [0, C30, -S30], [0, S30, C30]])
    b = geometry.b0_direction(geometry.make_affine(rotation=rot))
    assert np.allclose(b, [0.0, S30, C30])
    assert np.linalg.norm(b) == pytest.approx(1.0)
    assert geometry.b0_angle_deg(b) == pytest.approx(30.0)


def test_rotation_about_y_with_flipped_x():
    # right-handed rotation about y by 30 degrees, written out by hand: z turns towards +x
    rot = np.array([[C30, 0.0, S30], [0.0, 1.0, 0.0], [-S30, 0.0, C30]])
    b = geometry.b0_direction(geometry.make_affine(rotation=rot))
    assert np.allclose(b, [-S30, 0.0, C30])
    # flipping voxel axis 0 (left-handed) flips the sign of that component only
    aff = geometry.make_affine(rotation=rot, flip=(0,))
    assert np.linalg.det(aff[:3, :3]) < 0
    b_flip = geometry.b0_direction(aff)
    assert np.allclose(b_flip, [S30, 0.0, C30])
    assert np.linalg.norm(b_flip) == pytest.approx(1.0)
    assert geometry.b0_angle_deg(b_flip) == pytest.approx(30.0)


def test_rotation_matrix_right_hand_rule_x_and_z():
    # about x: y turns towards +z; about z: x turns towards +y
    assert np.allclose(geometry.rotation_matrix(0, 90.0) @ [0, 1, 0], [0, 0, 1])
    assert np.allclose(geometry.rotation_matrix(2, 90.0) @ [1, 0, 0], [0, 1, 0])
    for axis in range(3):
        r = geometry.rotation_matrix(axis, 37.0)
        assert np.allclose(r @ r.T, np.eye(3)) and np.linalg.det(r) == pytest.approx(1.0)


def test_rotation_matrix_right_hand_rule_y():
    # about y (right-hand rule): z turns towards +x
    assert np.allclose(geometry.rotation_matrix(1, 90.0) @ [0, 0, 1], [1, 0, 0])


def test_flipped_third_axis():
    b = geometry.b0_direction(geometry.make_affine(flip=(2,)))
    assert np.allclose(b, [0.0, 0.0, -1.0])
    rot = geometry.rotation_matrix(0, 30.0)
    b = geometry.b0_direction(geometry.make_affine(rotation=rot, flip=(2,)))
    assert np.allclose(b, [0.0, S30, -C30])
    assert np.linalg.norm(b) == pytest.approx(1.0)
    assert geometry.b0_angle_deg(b) == pytest.approx(30.0)


def test_sagittal_acquisition():
    # voxel axis 0 -> anterior (world y), axis 1 -> superior (world z), axis 2 -> right (world x)
    aff = np.eye(4)
    aff[:3, :3] = np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]]) @ np.diag([1.0, 1.0, 1.2])
    b = geometry.b0_direction(aff)
    assert np.allclose(b, [0.0, 1.0, 0.0])
    assert geometry.b0_angle_deg(b) == pytest.approx(90.0)
    # coronal: axis 0 -> right, axis 1 -> superior, axis 2 -> anterior (left-handed)
    aff[:3, :3] = np.array([[1, 0, 0], [0, 0, 1], [0, 1, 0]])
    assert np.allclose(geometry.b0_direction(aff), [0.0, 1.0, 0.0])


def test_anisotropic_voxels_do_not_change_direction():
    rot = geometry.rotation_matrix(0, 30.0) @ geometry.rotation_matrix(1, -12.0)
    iso = geometry.b0_direction(geometry.make_affine((1.0, 1.0, 1.0), rotation=rot))
    aniso = geometry.b0_direction(geometry.make_affine((0.4, 0.9, 3.0), rotation=rot))
    assert np.allclose(iso, aniso)
    assert np.allclose(iso, rot.T @ [0, 0, 1])


def test_b0_world_override():
    assert np.allclose(geometry.b0_direction(np.eye(4), b0_world=(0, 1, 0)), [0, 1, 0])
    # not normalised on input; normalised on output
    assert np.allclose(geometry.b0_direction(np.eye(4), b0_world=(0, 0, 5)), [0, 0, 1])
    w = np.array([1.0, 0.0, 1.0]) / np.sqrt(2)
    rot = geometry.rotation_matrix(2, 90.0)  # voxel axis 0 -> world y, axis 1 -> world -x
    b = geometry.b0_direction(geometry.make_affine((2.0, 2.0, 2.0), rotation=rot), b0_world=w)
    assert np.allclose(b, rot.T @ w)
    assert np.allclose(b, [0.0, -1 / np.sqrt(2), 1 / np.sqrt(2)])
    for bad in [(0, 0, 0), (1, 2), (np.nan, 0, 1)]:
        with pytest.raises(QSMInputError):
            geometry.b0_direction(np.eye(4), b0_world=bad)


def test_singular_affine_raises():
    aff = np.eye(4)
    aff[:3, :3] = [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]]  # two equal columns
    with pytest.raises(QSMInputError) as err:
        geometry.b0_direction(aff)
    assert "singular" in str(err.value)


def test_zero_voxel_size_affine_raises():
    aff = np.diag([1.0, 1.0, 0.0, 1.0])  # e.g. pixdim 0 in a broken header
    with np.errstate(invalid="ignore", divide="ignore"):
        with pytest.raises(QSMInputError):
            geometry.b0_direction(aff)


def test_same_grid():
    a = geometry.make_affine((1.0, 1.0, 2.0))
    assert geometry.same_grid(a, (4, 5, 6), a + 1e-5, (4, 5, 6, 3))
    assert not geometry.same_grid(a, (4, 5, 6), a, (4, 5, 7))
    b = a.copy()
    b[0, 3] = 0.5
    assert not geometry.same_grid(a, (4, 5, 6), b, (4, 5, 6))



def test_canonical_order_matches_nibabel_and_goes_back():
    """``CanonicalOrder`` against nibabel's ``as_closest_canonical`` (the independent reference)
    for permuted, flipped, oblique affines and 4-D data, and the way back to the file's order."""
    import nibabel as nib

    rng = np.random.default_rng(0)
    for _ in range(12):
        a = np.eye(4)
        a[:3, :3] = (geometry.rotation_matrix(0, 10) @ np.eye(3)[:, rng.permutation(3)]
                     * rng.choice([-1.0, 1.0], 3) * [1.0, 1.5, 2.5])
        a[:3, 3] = rng.normal(size=3) * 50
        data = rng.normal(size=(5, 6, 7, 2))
        order = geometry.CanonicalOrder(a, data.shape)
        ref = nib.as_closest_canonical(nib.Nifti1Image(data, a))
        np.testing.assert_array_equal(order.forward(data), np.asarray(ref.dataobj))
        np.testing.assert_allclose(order.canonical_affine, ref.affine)
        assert geometry.axcodes(order.canonical_affine) == ("R", "A", "S")
        np.testing.assert_array_equal(order.back(order.forward(data)), data)
