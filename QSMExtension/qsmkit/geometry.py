"""Voxel geometry: voxel size, direction matrix and the B0 direction in voxel axes.

Affines follow nibabel: ``world = A @ [i, j, k, 1]`` with world in RAS+ mm.
The main field B0 points along scanner z, which is world superior (0, 0, 1)
for axial and oblique acquisitions alike. The dipole kernel needs B0 expressed
in the voxel axes, i.e. ``R^-1 @ b_world`` where ``R`` is the direction matrix
(the affine's 3x3 part with its columns normalised to unit length). A
left-handed affine (flipped axis) simply gives a negative component; the kernel
depends on (k.b)^2 only through the axes' physical frame, so flips are exact.
"""

from __future__ import annotations

import numpy as np

from .errors import QSMInputError

WORLD_B0 = np.array([0.0, 0.0, 1.0])


def voxel_size(affine) -> np.ndarray:
    """Voxel size (mm) along each voxel axis: the column norms of the affine's 3x3 part."""
    m = np.asarray(affine, dtype=float)[:3, :3]
    return np.sqrt((m**2).sum(axis=0))


def direction_matrix(affine) -> np.ndarray:
    """Unit direction of each voxel axis in world coordinates (columns)."""
    m = np.asarray(affine, dtype=float)[:3, :3]
    return m / voxel_size(affine)


#: largest deviation (degrees) from 90 degrees allowed between two voxel axes: the dipole kernel
#: assumes orthogonal axes; float32 rounding in NIfTI headers stays far below this
SHEAR_TOLERANCE_DEG = 0.5


def shear_deg(affine) -> tuple:
    """The largest deviation from 90 degrees between two voxel axes, and that pair of axes."""
    r = direction_matrix(affine)
    worst, pair = 0.0, (0, 1)
    for i, j in ((0, 1), (0, 2), (1, 2)):
        cos = float(np.clip(abs(r[:, i] @ r[:, j]), 0.0, 1.0))
        dev = 90.0 - float(np.degrees(np.arccos(cos)))
        if dev > worst:
            worst, pair = dev, (i, j)
    return worst, pair


def check_orthogonal(affine, path=None, what="image") -> None:
    """Refuse an affine whose voxel axes are sheared by more than ``SHEAR_TOLERANCE_DEG``."""
    vox = voxel_size(affine)
    if not np.all(np.isfinite(vox)) or np.any(vox <= 0):
        raise QSMInputError(f"{what} affine has a zero or invalid voxel size {vox}", path)
    dev, (i, j) = shear_deg(affine)
    if dev > SHEAR_TOLERANCE_DEG:
        raise QSMInputError(
            f"{what} has sheared voxel axes ({i + 1} and {j + 1} meet at {90 - dev:.2f} degrees, "
            f"tolerance {SHEAR_TOLERANCE_DEG:g} degrees from 90): the dipole kernel needs "
            "orthogonal axes; resample the image onto an orthogonal grid first", path)


def b0_direction(affine, b0_world=None) -> np.ndarray:
    """B0 as a unit vector in voxel axes (one component per array axis).

    Parameters
    ----------
    affine : (4, 4) array
        Voxel-to-world (RAS+) affine of the image.
    b0_world : sequence of 3 floats, optional
        Field direction in world coordinates; default scanner z (0, 0, 1). This is
        what ``--b0-dir`` overrides.
    """
    b = WORLD_B0 if b0_world is None else np.asarray(b0_world, dtype=float)
    if b.shape != (3,) or not np.all(np.isfinite(b)) or np.linalg.norm(b) == 0:
        raise QSMInputError(f"B0 direction must be 3 finite numbers, not all zero; got {b0_world}")
    vox = voxel_size(affine)
    if not np.all(np.isfinite(vox)) or np.any(vox <= 0):
        raise QSMInputError(
            f"affine has a zero or invalid voxel size {vox}: cannot derive the B0 direction")
    r = direction_matrix(affine)
    if not abs(np.linalg.det(r)) >= 1e-6:
        raise QSMInputError("affine is singular: cannot derive the B0 direction")
    v = np.linalg.solve(r, b / np.linalg.norm(b))
    return v / np.linalg.norm(v)


def b0_angle_deg(b0_dir) -> float:
    """Angle (degrees) between B0 and the third voxel axis, for reports."""
    b = np.asarray(b0_dir, dtype=float)
    return float(np.degrees(np.arccos(abs(b[2]) / np.linalg.norm(b))))


def make_affine(voxel=(1.0, 1.0, 1.0), rotation=None, origin=None, flip=()) -> np.ndarray:
    """An affine from a voxel size, an optional 3x3 rotation and flipped axes (tests, simulation)."""
    r = np.eye(3) if rotation is None else np.asarray(rotation, dtype=float)
    s = np.array([-1.0 if ax in flip else 1.0 for ax in range(3)])
    a = np.eye(4)
    a[:3, :3] = r @ np.diag(np.asarray(voxel, dtype=float) * s)
    if origin is not None:
        a[:3, 3] = origin
    return a


def rotation_matrix(axis, angle_deg) -> np.ndarray:
    """Rotation by ``angle_deg`` about a world axis 0, 1 or 2 (right-hand rule)."""
    t = np.radians(angle_deg)
    c, s = np.cos(t), np.sin(t)
    i, j = [(1, 2), (2, 0), (0, 1)][axis]  # cyclic order keeps the right-hand rule for every axis
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def same_grid(affine_a, shape_a, affine_b, shape_b, atol=1e-3) -> bool:
    """True when two images share the voxel grid (shape of the first 3 axes and affine)."""
    return tuple(shape_a[:3]) == tuple(shape_b[:3]) and np.allclose(affine_a, affine_b, atol=atol)


def axcodes(affine) -> tuple:
    """The anatomical direction each voxel axis points to, e.g. ``("L", "A", "S")``."""
    from nibabel import orientations as ornt

    return ornt.aff2axcodes(np.asarray(affine, dtype=float))


class CanonicalOrder:
    """The voxel order closest to RAS+ (nibabel's ``as_closest_canonical``: axes permuted and
    flipped, no resampling) for an affine, and the way back.

    The stages discretise with forward differences and stop their iterative solvers early, so
    their results depend, slightly, on the order in which voxels are stored. Two exports of one
    scan (a scanner's DICOM and dcm2niix's NIfTI store this series' first axis in opposite
    directions) must give the same chi; running the stages in this one order, whatever the
    file's, makes the storage order irrelevant. Outputs go back to the file's order.
    """

    def __init__(self, affine, shape):
        from nibabel import orientations as ornt

        self.affine = np.asarray(affine, dtype=float)
        self.shape = tuple(int(n) for n in shape[:3])
        self._to = ornt.io_orientation(self.affine)
        self._back = ornt.ornt_transform(ornt.axcodes2ornt(("R", "A", "S")),
                                         ornt.axcodes2ornt(ornt.aff2axcodes(self.affine)))
        self.canonical_affine = self.affine @ ornt.inv_ornt_aff(self._to, self.shape)
        self.identity = bool(np.array_equal(self._to, [[0, 1], [1, 1], [2, 1]]))

    def forward(self, data):
        """``data`` (file order, extra axes last) in the canonical order."""
        from nibabel import orientations as ornt

        if data is None or self.identity:
            return data
        return np.ascontiguousarray(ornt.apply_orientation(np.asarray(data), self._to))

    def back(self, data):
        """``data`` in the canonical order back in the file's order."""
        from nibabel import orientations as ornt

        if data is None or self.identity:
            return data
        return np.ascontiguousarray(ornt.apply_orientation(np.asarray(data), self._back))


def affine_for_b0(voxel=(1.0, 1.0, 1.0), b0_dir=(0.0, 0.0, 1.0), shape=None) -> np.ndarray:
    """An affine whose B0 direction in voxel axes is ``b0_dir`` (a rotation taking b0_dir to world
    z, Rodrigues' formula), centred on the field of view when ``shape`` is given. Used to write
    simulated oblique acquisitions with consistent geometry."""
    b = np.asarray(b0_dir, dtype=float)
    b = b / np.linalg.norm(b)
    z = WORLD_B0
    v, c = np.cross(b, z), float(np.dot(b, z))
    if np.linalg.norm(v) < 1e-12:
        r = np.eye(3) if c > 0 else np.diag([1.0, -1.0, -1.0])
    else:
        vx = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
        r = np.eye(3) + vx + vx @ vx / (1 + c)
    a = make_affine(voxel, rotation=r)
    if shape is not None:
        centre = (np.asarray(shape[:3], dtype=float) - 1) / 2
        a[:3, 3] = -a[:3, :3] @ centre
    return a


class VoxelGrid:
    """Geometry read off ``data`` (voxel axes first) and ``affine`` (voxel to RAS+ mm), shared
    by every array-with-affine container (files in ``io``, Slicer nodes in ``slicer_adapter``).
    Here, not in ``io``, so that the Slicer side imports it without nibabel."""

    data: np.ndarray
    affine: np.ndarray

    @property
    def shape3(self) -> tuple:
        """Shape of the three spatial axes."""
        return tuple(int(n) for n in self.data.shape[:3])

    @property
    def voxel_size(self) -> np.ndarray:
        """Voxel size (mm) along each of the three voxel axes."""
        return voxel_size(self.affine)

    def b0_dir(self, b0_world=None) -> np.ndarray:
        """B0 as a unit vector in voxel axes; ``b0_world`` (world coordinates) overrides z."""
        return b0_direction(self.affine, b0_world)
