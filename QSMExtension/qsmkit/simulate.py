"""The built-in numerical head phantom and a gradient-echo acquisition simulator.

The phantom reproduces the set-up of the original FOCUSS-QSM experiment: a 3 T,
TE 20 ms acquisition of 256 x 256 x 64 voxels of 0.9375 x 0.9375 x 2.5 mm, a
brain with the six deep gray nuclei whose susceptibility is reported relative to
CSF, air-filled cavities (frontal sinus, mastoid air cells) a few mm outside the
brain mask (strong background field) and a vein at the magic angle to B0.

Anatomy is defined in millimetres, in physical coordinates centred in the field
of view (axis 0 left-right, axis 1 posterior-anterior, axis 2 inferior-superior,
as the RAS+ world of the returned affine), so any grid gives the same head; when
the field of view is too small for the nominal head, the whole anatomy is scaled
down uniformly. Labels are evaluated on the voxel centres.

Fields (ppm of B0) come from ``qsmkit.dipole.forward_field``, zero-padded against
wrap-around. The head sits in an infinite volume of air: a uniform susceptibility
everywhere produces no field (D(0) = 0), so the total field is that of
``chi - CHI_AIR_PPM``, which vanishes outside the head. Consequently
``field_total == forward_field(chi - CHI_AIR_PPM)`` (not ``forward_field(chi)``,
which would add the field of a box of air the size of the field of view).
``field_local`` is the field of the brain's own susceptibility with its mean over
the mask removed, ``D * (mask (chi_brain - mean))``: a uniform susceptibility filling
the brain produces, inside it, a smooth field that no background-removal method can
tell from an external source, and QSM determines chi only up to a constant, so the
identifiable tissue field excludes it (the same definition as ``qsmkit.headmodel``).
``field_background`` is the rest, i.e. the field the head would produce if the brain
were uniform at its mean susceptibility.

The brain mask is intracranial: brain plus a thin layer of extra-cerebral CSF
(label ``csf_extracerebral``), minus air; label ``csf`` is the ventricles only, the
usual reference region for ROI statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import backend, units
from . import dipole as dipole_mod
from .dipole import forward_field
from .errors import QSMInputError

# --------------------------------------------------------------------------- labels

LABELS = {
    0: "background/air",
    1: "csf",
    2: "white_matter",
    3: "gray_matter",
    4: "globus_pallidus",
    5: "substantia_nigra",
    6: "dentate",
    7: "red_nucleus",
    8: "putamen",
    9: "caudate",
    10: "vessel",
    11: "air_cavity",
    12: "skull_scalp",
    13: "csf_extracerebral",
}
LABEL_IDS = {name: lab for lab, name in LABELS.items()}

#: the deep gray matter structures whose mean chi relative to CSF is the usual QSM readout
DEEP_GRAY = ("globus_pallidus", "substantia_nigra", "dentate", "red_nucleus", "putamen", "caudate")

# ------------------------------------------------------------- physical constants

#: air minus water volume susceptibility, ppm (SI): chi_air ~ +0.36, chi_water ~ -9.05
CHI_AIR_PPM = 9.4

#: susceptibility per label, ppm, relative to CSF (= water = 0).
#: Deep gray nuclei: typical published in-vivo values relative to CSF at 3 T.
#: White matter slightly diamagnetic (myelin), cortex slightly paramagnetic: chosen
#: within the ranges reported in vivo. Vein: deoxygenated blood (Hct ~0.4, Y ~0.6-0.7).
#: Skull/scalp: the shell is treated as cortical bone, about -2 ppm relative to water
#: (Hopkins & Wehrli, Magn Reson Med 1997, report bone ~2 ppm more diamagnetic than water).
CHI_PPM = {
    0: CHI_AIR_PPM,   # air outside the head
    1: 0.0,           # csf (reference)
    2: -0.030,        # white matter
    3: 0.010,         # gray matter (cortex)
    4: 0.123,         # globus pallidus
    5: 0.105,         # substantia nigra
    6: 0.062,         # dentate nucleus
    7: 0.045,         # red nucleus
    8: 0.032,         # putamen
    9: 0.023,         # caudate
    10: 0.400,        # vein
    11: CHI_AIR_PPM,  # frontal sinus (air)
    12: -2.0,         # skull / scalp
    13: 0.0,          # extra-cerebral csf
}

#: proton-density-like magnitude (T2*-free), max 1. Iron-rich nuclei are darker in
#: proportion to their susceptibility (iron shortens T2 and lowers the signal).
_GM_MAG = 0.75
_IRON_DARKENING_PER_PPM = 2.0
MAGNITUDE = {
    0: 0.0, 1: 1.0, 2: 0.65, 3: _GM_MAG,
    **{LABEL_IDS[n]: _GM_MAG - _IRON_DARKENING_PER_PPM * CHI_PPM[LABEL_IDS[n]] for n in DEEP_GRAY},
    10: 0.3, 11: 0.0, 12: 0.1, 13: 1.0,
}

#: T2* per label at 3 T, ms (typical in-vivo values; iron-rich nuclei shorter).
#: Air has no signal; its T2* is a placeholder that avoids dividing by zero.
T2STAR_MS = {
    0: 1.0, 1: 150.0, 2: 45.0, 3: 55.0, 4: 20.0, 5: 22.0, 6: 28.0, 7: 30.0,
    8: 35.0, 9: 40.0, 10: 15.0, 11: 1.0, 12: 10.0, 13: 150.0,
}

# -------------------------------------------------------------------- anatomy (mm)
# Nominal sizes for an adult head; centres are (x, y, z) = (left-right,
# posterior-anterior, inferior-superior) relative to the centre of the field of view.
# Bilateral structures are given for x > 0 and mirrored.

HEAD_SEMI_MM = (75.0, 90.0, 75.0)        # head ellipsoid semi-axes
BRAIN_CENTRE_MM = (0.0, -2.0, 6.0)       # brain ellipsoid
BRAIN_SEMI_MM = (64.0, 76.0, 58.0)
CSF_LAYER_MM = 2.5                       # extra-cerebral CSF around the brain; brain + this
                                         # layer is the intracranial mask. Between it and the
                                         # head surface: skull/scalp, 8.5 mm at the vertex and
                                         # sides, 20 mm at the skull base.
CORTEX_THICKNESS_MM = 3.5                # gray-matter rim
FIT_FRACTION = 0.95                      # the head fills at most this fraction of the half-FOV

# (label name, centre of the x > 0 member, semi-axes)
BILATERAL = (
    ("csf", (9.0, -2.0, 18.0), (5.0, 24.0, 8.0)),                  # lateral ventricles
    ("caudate", (20.0, 10.0, 18.0), (5.0, 10.0, 7.0)),             # beside the ventricles
    ("putamen", (28.0, 4.0, 2.0), (5.0, 14.0, 8.0)),               # lateral
    ("globus_pallidus", (19.0, 0.0, 0.0), (4.0, 8.0, 6.0)),        # medial to the putamen
    ("substantia_nigra", (11.0, -12.0, -15.0), (3.0, 7.0, 4.0)),   # ventral midbrain
    ("red_nucleus", (5.0, -9.0, -9.0), (3.5, 3.5, 3.5)),           # dorsal midbrain
    ("dentate", (14.0, -45.0, -25.0), (6.0, 8.0, 5.0)),            # cerebellum, low posterior
)

#: air cavities inside the head, outside the brain but a few mm from it (strong
#: background fields): the frontal sinus in front of / below the brain, and bilateral
#: mastoid air cells below the temporal lobes ((name, centre, semi-axes, bilateral)).
AIR_CAVITIES = (
    ("frontal_sinus", (0.0, 70.0, -37.0), (10.0, 8.0, 9.0), False),
    ("mastoid", (54.0, -20.0, -40.0), (6.0, 8.0, 6.0), True),
)

VESSEL_CENTRE_MM = (-28.0, -35.0, 26.0)  # vein through the (left) white matter
VESSEL_LENGTH_MM = 30.0
VESSEL_RADIUS_MM = 1.75
MAGIC_ANGLE_DEG = float(np.degrees(np.arccos(1.0 / np.sqrt(3.0))))  # 54.7356

# ------------------------------------------------------------------ acquisition
#: receiver phase offset: coefficients of a 2nd-order polynomial in coordinates
#: normalised to [-1, 1] over the field of view (rad): a few rad across the FOV.
PHASE_OFFSET_COEFFS = {
    "1": 0.6, "x": 1.2, "y": -0.9, "z": 0.7,
    "xx": 0.4, "yy": -0.3, "zz": -0.6, "xy": 0.5, "xz": -0.3, "yz": 0.2,
}
COIL_RING_FACTOR = 1.3          # coil centres on an ellipse this much larger than the head
COIL_DECAY_MM = 60.0            # |S| = (d0 / sqrt(d0^2 + d^2))^3 (loop-coil-like fall-off)
COIL_Z_OFFSET_MM = 25.0         # with 6+ coils, alternate coils sit above / below
COIL_PHASE_GRADIENT_RAD = 1.0   # linear phase across the half-FOV per coil
BODY_SNR_FACTOR = 3.0           # body coil SNR = snr / 3


# --------------------------------------------------------------------------- data


@dataclass(eq=False)
class Phantom:
    """Ground truth of the numerical phantom. Maps are (X, Y, Z) numpy arrays.

    ``chi`` includes every source (air +9.4 ppm outside the head and in the sinus);
    ``chi_brain = chi * mask``. Fields are ppm; see the module docstring for the
    air convention (``field_total = forward_field(chi - CHI_AIR_PPM)``).
    """

    chi: np.ndarray
    chi_brain: np.ndarray
    mask: np.ndarray
    labels: np.ndarray
    label_names: dict
    magnitude: np.ndarray
    t2star_ms: np.ndarray
    field_total: np.ndarray
    field_local: np.ndarray
    field_background: np.ndarray
    vessel_mask: np.ndarray
    voxel_size: np.ndarray
    b0_dir: np.ndarray
    affine: np.ndarray
    vessel_axis: np.ndarray = field(default_factory=lambda: np.zeros(3))
    vessel_angle_deg: float = MAGIC_ANGLE_DEG
    scale: float = 1.0
    pad: object = None  # zero padding of the field FFTs (make_phantom's ``pad``); None: half the shape

    @property
    def shape(self):
        return self.chi.shape


@dataclass(eq=False)
class Acquisition:
    """Simulated GRE data. Echoes in axis 3, coils in axis 4.

    ``magnitude``/``phase`` are the single (ideally combined) image with noise of SD
    ``noise_sigma`` in each of the real and imaginary parts. Coil images are
    ``sensitivities[..., c] * signal + noise`` (same ``noise_sigma``), the body-coil
    image ``body_sensitivity * signal + noise`` with SD ``noise_sigma * 3``.
    ``true_phase`` (X, Y, Z, E) is the unwrapped phase of the noise-free signal, what an
    unwrapper should recover up to one global multiple of 2 pi.
    """

    magnitude: np.ndarray
    phase: np.ndarray
    te: tuple
    b0: float
    snr: float
    noise_sigma: float
    coil_magnitude: np.ndarray | None = None
    coil_phase: np.ndarray | None = None
    body_magnitude: np.ndarray | None = None
    body_phase: np.ndarray | None = None
    sensitivities: np.ndarray | None = None
    phase_offset: np.ndarray | None = None
    body_sensitivity: np.ndarray | None = None
    true_phase: np.ndarray | None = None


# ---------------------------------------------------------------------- helpers


def grid_coordinates(shape, voxel_size):
    """1-D physical coordinates (mm) of the voxel centres along each axis, centred in the FOV."""
    return [(np.arange(n) - (n - 1) / 2.0) * float(d)
            for n, d in zip(shape, voxel_size, strict=True)]


def _box(coords, lo, hi):
    """Index slices of the voxels whose centres lie within [lo, hi] (mm) per axis."""
    sl = []
    for c, a, b in zip(coords, lo, hi, strict=True):
        i0 = int(np.searchsorted(c, a, side="left"))
        i1 = int(np.searchsorted(c, b, side="right"))
        sl.append(slice(i0, max(i0, i1)))
    return tuple(sl)


def _open(coords, sl, centre):
    """Broadcastable coordinate vectors (mm, relative to ``centre``) inside slices ``sl``."""
    out = []
    for ax in range(3):
        v = coords[ax][sl[ax]] - centre[ax]
        shape = [1, 1, 1]
        shape[ax] = v.size
        out.append(v.reshape(shape))
    return out


def _paint_ellipsoid(labels, coords, centre, semi, value, where=None):
    """Set ``labels`` to ``value`` inside an axis-aligned ellipsoid (only where
    ``labels`` is in ``where`` when given)."""
    centre = np.asarray(centre, float)
    semi = np.asarray(semi, float)
    sl = _box(coords, centre - semi, centre + semi)
    if any(s.stop <= s.start for s in sl):
        return
    x, y, z = _open(coords, sl, centre)
    inside = (x / semi[0]) ** 2 + (y / semi[1]) ** 2 + (z / semi[2]) ** 2 <= 1.0
    sub = labels[sl]
    if where is not None:
        inside &= np.isin(sub, where)
    sub[inside] = value


def _ellipsoid(coords, centre, semi, shape):
    out = np.zeros(shape, dtype=bool)
    centre = np.asarray(centre, float)
    semi = np.asarray(semi, float)
    sl = _box(coords, centre - semi, centre + semi)
    if any(s.stop <= s.start for s in sl):
        return out
    x, y, z = _open(coords, sl, centre)
    out[sl] = (x / semi[0]) ** 2 + (y / semi[1]) ** 2 + (z / semi[2]) ** 2 <= 1.0
    return out


def vessel_direction(b0_dir, angle_deg):
    """Unit axis at ``angle_deg`` to B0, in the plane of B0 and the first voxel axis
    (the second axis if B0 is along the first). Voxel axes are orthonormal in mm."""
    b = np.asarray(b0_dir, float)
    b = b / np.linalg.norm(b)
    e = np.array([1.0, 0.0, 0.0])
    perp = e - (e @ b) * b
    if np.linalg.norm(perp) < 1e-6:
        e = np.array([0.0, 1.0, 0.0])
        perp = e - (e @ b) * b
    perp /= np.linalg.norm(perp)
    a = np.radians(angle_deg)
    v = np.cos(a) * b + np.sin(a) * perp
    return v / np.linalg.norm(v)


def _rotation_to_z(b):
    """Rotation R with R @ b = (0, 0, 1) (Rodrigues), for an affine whose world B0 is
    superior while B0 in voxel axes is ``b``."""
    b = np.asarray(b, float) / np.linalg.norm(b)
    z = np.array([0.0, 0.0, 1.0])
    c = float(b @ z)
    if c > 1 - 1e-12:
        return np.eye(3)
    if c < -1 + 1e-12:
        return np.diag([1.0, -1.0, -1.0])
    v = np.cross(b, z)
    s = np.linalg.norm(v)
    k = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
    return np.eye(3) + k + k @ k * ((1 - c) / s**2)


def phantom_affine(shape, voxel_size, b0_dir=(0, 0, 1)):
    """Voxel-to-world affine: voxel size on the diagonal, the FOV centre at the world
    origin; for an oblique ``b0_dir`` the axes are rotated so that
    ``geometry.b0_direction(affine)`` returns ``b0_dir`` (world B0 is superior)."""
    r = _rotation_to_z(b0_dir)
    a = np.eye(4)
    a[:3, :3] = r @ np.diag(np.asarray(voxel_size, float))
    a[:3, 3] = -a[:3, :3] @ ((np.asarray(shape[:3], float) - 1) / 2.0)
    return a


def _check_grid(shape, voxel_size, b0_dir):
    try:
        shape = tuple(int(n) for n in shape)
        voxel_size = np.asarray(voxel_size, dtype=float).reshape(3)
        b0 = np.asarray(b0_dir, dtype=float).reshape(3)
    except (TypeError, ValueError) as exc:
        raise QSMInputError(
            f"phantom needs a 3-D shape, 3 voxel sizes and a 3-vector B0: {exc}") from exc
    if len(shape) != 3 or min(shape) < 8:
        raise QSMInputError(f"phantom shape must be 3 sizes of at least 8 voxels, got {shape}")
    units.check_positive("voxel size (mm)", voxel_size)
    if not np.all(np.isfinite(b0)) or np.linalg.norm(b0) == 0:
        raise QSMInputError(f"B0 direction must be finite and non-zero, got {b0_dir}")
    return shape, voxel_size, b0 / np.linalg.norm(b0)


# ---------------------------------------------------------------------- phantom


def _anatomy(coords, b, vessel_angle_deg, s, min_radius_mm):
    """Labels, intracranial mask, vessel mask and vessel axis at the points of the grid with
    1-D coordinates ``coords`` (mm, sorted; any sub-block of ``grid_coordinates`` gives that
    block of the full grid), for the anatomy scaled by ``s``; the vein's radius is at least
    ``min_radius_mm`` (make_phantom uses 0.6 of its largest voxel size: about a voxel wide)."""
    shape = tuple(c.size for c in coords)

    def sc(v):
        return np.asarray(v, float) * s

    labels = np.zeros(shape, dtype=np.uint8)
    _paint_ellipsoid(labels, coords, (0, 0, 0), sc(HEAD_SEMI_MM), LABEL_IDS["skull_scalp"])
    brain_c, brain_semi = sc(BRAIN_CENTRE_MM), sc(BRAIN_SEMI_MM)
    intracranial = _ellipsoid(coords, brain_c, brain_semi + CSF_LAYER_MM * s, shape)
    labels[intracranial] = LABEL_IDS["csf_extracerebral"]
    _paint_ellipsoid(labels, coords, brain_c, brain_semi, LABEL_IDS["gray_matter"])
    _paint_ellipsoid(labels, coords, brain_c, brain_semi - CORTEX_THICKNESS_MM * s,
                     LABEL_IDS["white_matter"])
    for name, centre, semi in BILATERAL:
        for side in (1.0, -1.0):
            c = sc(centre) * np.array([side, 1.0, 1.0])
            _paint_ellipsoid(labels, coords, c, sc(semi), LABEL_IDS[name])

    # the vein: a cylinder segment through white matter (painted only over white matter)
    axis = vessel_direction(b, vessel_angle_deg)
    vc = sc(VESSEL_CENTRE_MM)
    half_len = VESSEL_LENGTH_MM * s / 2.0
    radius = max(VESSEL_RADIUS_MM * s, min_radius_mm)
    ext = np.abs(axis) * half_len + radius
    sl = _box(coords, vc - ext, vc + ext)
    vessel_mask = np.zeros(shape, dtype=bool)
    if all(t.stop > t.start for t in sl):
        x, y, z = _open(coords, sl, vc)
        t = x * axis[0] + y * axis[1] + z * axis[2]
        r2 = x * x + y * y + z * z - t * t
        cyl = (np.abs(t) <= half_len) & (r2 <= radius**2)
        cyl &= labels[sl] == LABEL_IDS["white_matter"]
        vessel_mask[sl] = cyl
    labels[vessel_mask] = LABEL_IDS["vessel"]

    # air cavities last: air wins over everything, and is excluded from the brain mask
    for _name, centre, semi, bilateral in AIR_CAVITIES:
        for side in ((1.0, -1.0) if bilateral else (1.0,)):
            c = sc(centre) * np.array([side, 1.0, 1.0])
            _paint_ellipsoid(labels, coords, c, sc(semi), LABEL_IDS["air_cavity"])
    mask = intracranial & (labels != LABEL_IDS["air_cavity"])
    vessel_mask &= labels == LABEL_IDS["vessel"]
    return labels, mask, vessel_mask, axis


def make_phantom(shape=(256, 256, 64), voxel_size=(0.9375, 0.9375, 2.5), b0_dir=(0, 0, 1),
                 seed=0, vessel_angle_deg=MAGIC_ANGLE_DEG, pad=None) -> Phantom:
    """Build the head phantom on a grid.

    Parameters
    ----------
    shape, voxel_size : grid (voxels, mm). Default: the original 3 T protocol.
    b0_dir : B0 direction in voxel axes (normalised here).
    seed : accepted for symmetry with ``simulate_acquisition``; the anatomy is
        deterministic and does not depend on it.
    vessel_angle_deg : angle between the vein's axis and B0 (default: magic angle).
    pad : zero padding (voxels per side) of the forward-field FFTs; default half the
        shape on each axis.
    """
    del seed  # the anatomy is fixed
    shape, vox, b = _check_grid(shape, voxel_size, b0_dir)
    half_fov = np.asarray(shape) * vox / 2.0
    s = float(min(1.0, np.min(FIT_FRACTION * half_fov / np.asarray(HEAD_SEMI_MM))))

    labels, mask, vessel_mask, axis = _anatomy(grid_coordinates(shape, vox), b, vessel_angle_deg,
                                               s, 0.6 * float(vox.max()))

    n_lab = max(LABELS) + 1
    chi_lut = np.array([CHI_PPM.get(i, 0.0) for i in range(n_lab)], dtype=np.float32)
    mag_lut = np.array([MAGNITUDE.get(i, 0.0) for i in range(n_lab)], dtype=np.float32)
    t2s_lut = np.array([T2STAR_MS.get(i, 1.0) for i in range(n_lab)], dtype=np.float32)
    chi = chi_lut[labels]
    chi_brain = np.where(mask, chi, np.float32(0)).astype(np.float32)
    # local sources: the brain relative to its mean; background sources, relative to air: the
    # head outside the brain, and the brain as a uniform body at that mean
    brain_mean = np.float32(chi[mask].mean()) if mask.any() else np.float32(0)
    chi_local = np.where(mask, chi - brain_mean, np.float32(0)).astype(np.float32)
    chi_bg = np.where(mask, brain_mean - np.float32(CHI_AIR_PPM), chi - np.float32(CHI_AIR_PPM))
    chi_bg = chi_bg.astype(np.float32)

    if pad is None:
        pad = tuple(n // 2 for n in shape)
    # copies: forward_field returns a cropped view that keeps the whole padded array alive
    field_local = np.array(forward_field(chi_local, vox, b, pad=pad), dtype=np.float32)
    field_background = np.array(forward_field(chi_bg, vox, b, pad=pad), dtype=np.float32)
    del chi_bg, chi_local
    field_total = field_local + field_background

    return Phantom(
        chi=chi,
        chi_brain=chi_brain,
        mask=mask,
        labels=labels,
        label_names=dict(LABELS),
        magnitude=mag_lut[labels],
        t2star_ms=t2s_lut[labels],
        field_total=field_total,
        field_local=field_local,
        field_background=field_background,
        vessel_mask=vessel_mask,
        voxel_size=vox.copy(),
        b0_dir=b.copy(),
        affine=phantom_affine(shape, vox, b),
        vessel_axis=axis,
        vessel_angle_deg=float(vessel_angle_deg),
        scale=s,
        pad=pad,
    )


# ------------------------------------------------------------------ acquisition


def _normalised_coords(shape, voxel_size):
    """Coordinates scaled to [-1, 1] over the FOV, broadcastable (float64)."""
    coords = grid_coordinates(shape, voxel_size)
    half = np.asarray(shape) * np.asarray(voxel_size) / 2.0
    out = []
    for ax in range(3):
        v = coords[ax] / half[ax]
        sh = [1, 1, 1]
        sh[ax] = v.size
        out.append(v.reshape(sh))
    return out


def smooth_phase_offset(shape, voxel_size, coeffs=None):
    """Echo-independent receiver phase (rad): a 2nd-order polynomial over the FOV."""
    c = dict(PHASE_OFFSET_COEFFS if coeffs is None else coeffs)
    x, y, z = _normalised_coords(shape, voxel_size)
    terms = {"1": 1.0, "x": x, "y": y, "z": z, "xx": x * x, "yy": y * y, "zz": z * z,
             "xy": x * y, "xz": x * z, "yz": y * z}
    out = np.zeros(shape, dtype=np.float64)
    for key, val in c.items():
        out += float(val) * terms[key]
    return out


def coil_sensitivities(phantom, n_coils):
    """Smooth complex receive sensitivities (X, Y, Z, C, complex64) of ``n_coils`` loop
    coils on an ellipse around the head: magnitude falls with the distance to the
    coil, phase is a per-coil constant plus a gentle linear ramp."""
    shape = phantom.chi.shape
    vox = phantom.voxel_size
    coords = grid_coordinates(shape, vox)
    x, y, z = (c.reshape([-1 if a == ax else 1 for a in range(3)]).astype(np.float32)
               for ax, c in enumerate(coords))
    xn, yn, zn = (v.astype(np.float32) for v in _normalised_coords(shape, vox))
    ring = np.asarray(HEAD_SEMI_MM) * phantom.scale * COIL_RING_FACTOR
    d0 = COIL_DECAY_MM * phantom.scale
    out = np.empty(shape + (n_coils,), dtype=np.complex64)
    for c in range(n_coils):
        theta = 2 * np.pi * c / n_coils
        zc = (COIL_Z_OFFSET_MM * phantom.scale * (1 if c % 2 == 0 else -1)) if n_coils >= 6 else 0.0
        px, py = ring[0] * np.cos(theta), ring[1] * np.sin(theta)
        d2 = (x - np.float32(px)) ** 2 + (y - np.float32(py)) ** 2 + (z - np.float32(zc)) ** 2
        mag = (np.float32(d0) / np.sqrt(np.float32(d0 * d0) + d2)) ** 3
        g = np.float32(COIL_PHASE_GRADIENT_RAD)
        phase = np.float32(theta) + g * (np.float32(np.cos(theta)) * xn
                                         + np.float32(np.sin(theta)) * yn
                                         + np.float32(0.3 * (-1) ** c) * zn)
        out[..., c].real = mag * np.cos(phase)
        out[..., c].imag = mag * np.sin(phase)
    return out


def body_coil_sensitivity(phantom):
    """Near-uniform body-coil sensitivity (X, Y, Z, complex64): magnitude 0.85-1, smooth phase."""
    x, y, z = _normalised_coords(phantom.chi.shape, phantom.voxel_size)
    mag = 1.0 - 0.05 * (x * x + y * y + z * z)
    phase = 0.3 + 0.5 * x - 0.3 * z + 0.2 * y * y
    return (mag * np.exp(1j * phase)).astype(np.complex64)


def _noise(rng, shape, sigma):
    """Complex64 Gaussian noise, SD ``sigma`` in each of the real and imaginary parts."""
    z = rng.standard_normal(tuple(shape) + (2,), dtype=np.float32).view(np.complex64)[..., 0]
    z *= np.float32(sigma)
    return z


_PHASE_HI = np.nextafter(np.float32(np.pi), np.float32(0))   # largest float32 < pi
_PHASE_LO = np.nextafter(np.float32(-np.pi), np.float32(0))  # smallest float32 >= -pi


def _mag_phase(s):
    """|s| and angle(s) as float32, the angle wrapped to [-pi, pi)."""
    ph = np.angle(s).astype(np.float32, copy=False)  # in [-pi, pi]; +pi is the same as -pi
    np.clip(ph, _PHASE_LO, _PHASE_HI, out=ph)
    return np.abs(s).astype(np.float32, copy=False), ph


def block_mean(x, factors):
    """Mean over non-overlapping blocks of ``factors`` (3 ints) voxels of a 3-D array."""
    (fx, fy, fz), (nx, ny, nz) = factors, (n // f for n, f in zip(x.shape, factors, strict=True))
    return x.reshape(nx, fx, ny, fy, nz, fz).mean(axis=(1, 3, 5))


def _supersampling_factors(factor):
    """3 integers >= 1 from an int or a sequence of 3 (QSMInputError otherwise)."""
    try:
        f = np.broadcast_to(np.asarray(factor), (3,))
        ok = f.dtype.kind in "iuf" and np.all(np.asarray(f, float) == np.round(np.asarray(f, float)))
    except (TypeError, ValueError):
        ok = False
    if not ok or np.any(np.asarray(f, float) < 1):
        raise QSMInputError(f"supersampling factor must be an integer >= 1 or 3 of them, got {factor}")
    return tuple(int(v) for v in f)


def _dipole_kernel_slab(big, voxel_size, b, kz):
    """Samples ``kz`` (indices along the half-spectrum last axis) of the dipole kernel of an FFT
    box ``big``: the same D(k) as ``qsmkit.dipole.dipole_kernel`` (float32, D(0) = 0, the odd
    cross terms zero at Nyquist), built a slab at a time so the whole kernel is never held."""
    f32 = np.float32
    k, ks = [], []
    for ax, (n, d) in enumerate(zip(big, voxel_size, strict=True)):
        half = ax == 2
        a = dipole_mod.k_frequencies(n, d, half=half)
        a_sym = dipole_mod.k_frequencies(n, d, half=half, nyquist_zero=True)
        if half:
            a, a_sym = a[kz], a_sym[kz]
        view = [1, 1, 1]
        view[ax] = a.size
        k.append(a.reshape(view).astype(f32))
        ks.append(a_sym.reshape(view).astype(f32))
    kb_sym = sum(s * f32(bi) for s, bi in zip(ks, b, strict=True))
    kb2 = kb_sym * kb_sym + sum(f32(bi * bi) * (ki * ki - si * si)
                                for ki, si, bi in zip(k, ks, b, strict=True))
    k2 = k[0] * k[0] + k[1] * k[1] + k[2] * k[2]
    origin = k2 == 0  # the k = 0 sample only
    k2[origin] = 1
    d = f32(1 / 3) - kb2 / k2
    d[origin] = 0
    return d


def _field_half_spectrum(chi_slab, shape, voxel_size, b0_dir, big, chunk=8):
    """The field of a susceptibility (ppm) zero-padded into the periodic box ``big``, as its
    real-FFT half spectrum along the last axis only: (X, Y, big_z // 2 + 1) complex64. The inverse
    real FFT of ``[i0:i1]`` along the last axis (length ``big_z``, first Z samples kept) gives
    ``forward_field(chi, pad=...)[i0:i1]``. ``chi_slab(i0, i1)`` returns ``chi[i0:i1]`` (float32),
    so the susceptibility is never held whole: one axis at a time, the box is never allocated
    (the 4x supersampled phantom would need tens of GB through ``forward_field``)."""
    nx, ny, nz = shape
    px, py, pz = big
    spec = np.empty((nx, ny, pz // 2 + 1), dtype=np.complex64)
    for i in range(0, nx, chunk):
        spec[i:i + chunk] = backend.rfftn(chi_slab(i, min(i + chunk, nx)), s=(pz,), axes=(2,))
    step = max(1, 2**24 // (px * py))  # kz samples per pass: ~128 MB of (px, py) planes
    for j in range(0, spec.shape[2], step):
        sl = slice(j, min(j + step, spec.shape[2]))
        t = backend.fftn(spec[:, :, sl], s=(px, py), axes=(0, 1))
        t *= _dipole_kernel_slab(big, voxel_size, b0_dir, np.arange(sl.start, sl.stop))
        spec[:, :, sl] = backend.ifftn(t, axes=(0, 1))[:nx, :ny]
    return spec


def supersampled_signal(phantom: Phantom, te, b0, factor=2, chunk=4):
    """Noise-free voxel-integrated GRE signal of the phantom's anatomy, without receiver phase.

    A scanner measures the complex signal integrated over each voxel, not the phase at its
    centre: partial volumes and the intravoxel dephasing of the field's variation average the
    spins' phasors (Yablonskiy & Haacke, Magn Reson Med 32:749, 1994). As in the QSM challenge
    2.0 simulation (Marques et al., Magn Reson Med 85:1809, 2021: simulated at high resolution,
    then down-sampled), the anatomy is rebuilt on a grid ``factor`` times finer with the same
    field of view (fine voxel centres ``(j - (n f - 1) / 2) d / f``, so each voxel is exactly
    the mean of its block of fine voxels), the field of ``chi - CHI_AIR_PPM`` is computed there
    in the same physical periodic box as ``make_phantom`` (``f`` times the padded FFT shape of
    ``phantom.pad``), and ``magnitude exp(-TE/T2*) exp(i 2 pi gamma B0 TE field)`` is block
    averaged (complex mean) onto the phantom's grid. The block mean is the midpoint rule for
    the voxel integral: it converges as ``factor`` grows (see Testing/test_unwrapping.py).

    Only the phantom's grid, ``b0_dir``, ``vessel_angle_deg``, ``scale`` and ``pad`` are used,
    not its maps; the vein keeps the phantom's radius (at least 0.6 of its largest voxel).

    Parameters
    ----------
    phantom : from ``make_phantom``; te : echo times (s); b0 : tesla
    factor : int or 3 ints >= 1, supersampling per axis (e.g. ``(2, 2, 6)`` for near-isotropic
        0.47 mm sub-voxels of the default 0.9375 x 0.9375 x 2.5 mm grid)
    chunk : phantom slices (axis 0) processed at a time

    Returns
    -------
    signal : (X, Y, Z, E) complex128, the block-averaged signal (maximum modulus 1)
    true_phase : (X, Y, Z, E) float64, its phase unwrapped against the amplitude-weighted mean
        ``ref`` of the continuous fine phase over the block: ``ref + wrap(angle(signal) - ref)``,
        the circular mean nearest the field's own phase where the block's phases spread less
        than pi (the choice is arbitrary only where the voxel's signal has cancelled).
    """
    te = tuple(float(t) for t in np.atleast_1d(np.asarray(te, dtype=float)))
    units.check_positive("echo time (s)", te)
    units.check_positive("B0 (tesla)", b0)
    fac = _supersampling_factors(factor)
    shape = tuple(phantom.chi.shape)
    vox = np.asarray(phantom.voxel_size, float)
    b = np.asarray(phantom.b0_dir, float)
    fine_shape = tuple(n * f for n, f in zip(shape, fac, strict=True))
    fine_vox = vox / np.asarray(fac, float)
    coords = grid_coordinates(fine_shape, fine_vox)
    pad = tuple(n // 2 for n in shape) if phantom.pad is None else phantom.pad
    big = tuple(f * n for f, n in zip(fac, dipole_mod.padded_shape(shape, pad), strict=True))
    min_radius = 0.6 * float(vox.max())
    n_lab = max(LABELS) + 1
    chi_lut = np.array([CHI_PPM.get(i, 0.0) - CHI_AIR_PPM for i in range(n_lab)], np.float32)
    mag_lut = np.array([MAGNITUDE.get(i, 0.0) for i in range(n_lab)], np.float64)
    rate_lut = np.array([1e3 / T2STAR_MS.get(i, 1.0) for i in range(n_lab)], np.float64)

    def labels(i0, i1):  # fine slices [i0, i1) of axis 0, painted on the fly (points are independent)
        return _anatomy([coords[0][i0:i1], coords[1], coords[2]], b, phantom.vessel_angle_deg,
                        phantom.scale, min_radius)[0]

    fx = fac[0]
    spec = _field_half_spectrum(lambda i0, i1: chi_lut[labels(i0, i1)], fine_shape, fine_vox, b,
                                big, chunk=chunk * fx)
    n_e = len(te)
    signal = np.empty(shape + (n_e,), np.complex128)
    truth = np.empty(shape + (n_e,), np.float64)
    omega = 2 * np.pi * units.larmor_hz(b0) * 1e-6  # rad/s per ppm
    for i in range(0, shape[0], chunk):
        cs = slice(i, min(i + chunk, shape[0]))
        lab = labels(cs.start * fx, cs.stop * fx)
        fld = backend.irfftn(spec[cs.start * fx:cs.stop * fx], s=(big[2],), axes=(2,))
        fld = fld[..., :fine_shape[2]].astype(np.float64)
        for e, t in enumerate(te):
            signal[cs, ..., e], truth[cs, ..., e] = integrate_echo(
                mag_lut[lab], rate_lut[lab], fld, t, omega, fac)
    return signal, truth


def integrate_echo(m0, rate, field_ppm, te, omega, factors):
    """One echo's signal on the fine grid, averaged over blocks of ``factors`` voxels, as a
    scanner's voxel integrates it: ``m0 exp(-te rate) exp(i omega te field)``.

    Returns the block-averaged complex signal and its true phase, unwrapped against the
    amplitude-weighted mean phase ``ref`` of the block (see :func:`supersampled_signal`).
    ``omega`` is rad/s per ppm; ``rate`` 1/s (R2*)."""
    phi = (omega * te) * field_ppm
    amp = m0 * np.exp(-te * rate)
    s = block_mean(amp * np.exp(1j * phi), factors)
    w = block_mean(amp, factors)
    ref = np.where(w > 0, block_mean(amp * phi, factors) / np.where(w > 0, w, 1),
                   block_mean(phi, factors))
    return s, ref + units.wrap_phase(np.angle(s) - ref)


def simulate_acquisition(phantom: Phantom, te=(0.020,), b0=3.0, snr=100.0, n_coils=0,
                         body_coil=False, phase_offset=True, seed=0, supersample=1) -> Acquisition:
    """Gradient-echo magnitude and phase of ``phantom``.

    Signal per echo: ``magnitude * exp(-TE/T2*) * exp(i (2 pi gamma B0 TE field_total 1e-6
    + offset))`` plus complex Gaussian noise of SD ``1/snr`` in each of the real and
    imaginary parts (the maximum magnitude is 1). ``snr=None`` or ``inf`` gives
    noise-free data. Deterministic for a ``seed``; the seed changes only the noise.

    Parameters
    ----------
    te : echo times, seconds
    b0 : field strength, tesla
    n_coils : > 0 adds coil-by-coil images with known sensitivities
    body_coil : adds a body-coil image (SNR ``snr / 3``)
    phase_offset : add the smooth echo-independent receiver phase
    supersample : 1 (default) samples the signal at the voxel centres. An integer > 1 or 3
        integers (per axis) give the voxel-integrated signal instead: the anatomy is rebuilt that
        many times finer and the complex signal block-averaged (``supersampled_signal``), so
        partial volumes and intravoxel dephasing shape magnitude and phase as on a scanner; the
        smooth receiver phase, coil sensitivities and noise are then applied on the phantom's
        grid as for 1. Only the phantom's geometry is used then, not its maps.

    Returns
    -------
    Acquisition
        Its ``true_phase`` is ``ppm_to_rad(field_total) + offset`` for ``supersample=1``, else
        the unwrapped phase of the block-averaged signal plus the offset.
    """
    te = tuple(float(t) for t in np.atleast_1d(np.asarray(te, dtype=float)))
    units.check_positive("echo time (s)", te)
    units.check_positive("B0 (tesla)", b0)
    if snr is None or (np.isscalar(snr) and np.isinf(snr)):
        sigma = 0.0
        snr = float("inf")
    else:
        units.check_positive("SNR", snr)
        sigma = 1.0 / float(snr)
    n_coils = int(n_coils)
    if n_coils < 0:
        raise QSMInputError(f"number of coils must be >= 0, got {n_coils}")
    point_sampled = _supersampling_factors(supersample) == (1, 1, 1)

    shape = phantom.chi.shape
    n_e = len(te)
    rng = np.random.default_rng(seed)
    offset = (smooth_phase_offset(shape, phantom.voxel_size) if phase_offset
              else np.zeros(shape, dtype=np.float64))
    if point_sampled:
        omega = (2 * np.pi * units.larmor_hz(b0) * 1e-6) * phantom.field_total.astype(np.float64)
        rate = 1.0 / (phantom.t2star_ms.astype(np.float64) * 1e-3)
        m0 = phantom.magnitude.astype(np.float64)
    else:
        integrated, integrated_phase = supersampled_signal(phantom, te, b0, supersample)
        rotation = np.exp(1j * offset)

    mag = np.empty(shape + (n_e,), dtype=np.float32)
    pha = np.empty(shape + (n_e,), dtype=np.float32)
    true_phase = np.empty(shape + (n_e,), dtype=np.float32)
    sens = coil_sensitivities(phantom, n_coils) if n_coils > 0 else None
    body = body_coil_sensitivity(phantom) if body_coil else None
    if sens is not None:
        cmag = np.empty(shape + (n_e, n_coils), dtype=np.float32)
        cpha = np.empty(shape + (n_e, n_coils), dtype=np.float32)
    else:
        cmag = cpha = None
    if body is not None:
        bmag = np.empty(shape + (n_e,), dtype=np.float32)
        bpha = np.empty(shape + (n_e,), dtype=np.float32)
    else:
        bmag = bpha = None

    for e, t in enumerate(te):
        if point_sampled:
            amp = m0 * np.exp(-t * rate)
            theta = omega * t + offset  # float64: exact phase before the cast
            signal = np.empty(shape, dtype=np.complex64)
            signal.real = amp * np.cos(theta)
            signal.imag = amp * np.sin(theta)
            true_phase[..., e] = theta
            del amp, theta
        else:
            signal = (integrated[..., e] * rotation).astype(np.complex64)
            true_phase[..., e] = integrated_phase[..., e] + offset
        s = signal + _noise(rng, shape, sigma) if sigma > 0 else signal
        mag[..., e], pha[..., e] = _mag_phase(s)
        if sens is not None:  # all coils of this echo at once
            s = sens * signal[..., None]
            if sigma > 0:
                s += _noise(rng, s.shape, sigma)
            cmag[..., e, :], cpha[..., e, :] = _mag_phase(s)
            del s
        if body is not None:
            s = body * signal
            if sigma > 0:
                s += _noise(rng, shape, sigma * BODY_SNR_FACTOR)
            bmag[..., e], bpha[..., e] = _mag_phase(s)

    return Acquisition(
        magnitude=mag,
        phase=pha,
        te=te,
        b0=float(b0),
        snr=float(snr),
        noise_sigma=sigma,
        coil_magnitude=cmag,
        coil_phase=cpha,
        body_magnitude=bmag,
        body_phase=bpha,
        sensitivities=sens,
        phase_offset=offset.astype(np.float32),
        body_sensitivity=body,
        true_phase=true_phase,
    )
