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

from . import units
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
    coords = grid_coordinates(shape, vox)
    half_fov = np.asarray(shape) * vox / 2.0
    s = float(min(1.0, np.min(FIT_FRACTION * half_fov / np.asarray(HEAD_SEMI_MM))))

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
    radius = max(VESSEL_RADIUS_MM * s, 0.6 * float(vox.max()))  # at least ~1 voxel wide
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


def simulate_acquisition(phantom: Phantom, te=(0.020,), b0=3.0, snr=100.0, n_coils=0,
                         body_coil=False, phase_offset=True, seed=0) -> Acquisition:
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

    shape = phantom.chi.shape
    n_e = len(te)
    rng = np.random.default_rng(seed)
    offset = (smooth_phase_offset(shape, phantom.voxel_size) if phase_offset
              else np.zeros(shape, dtype=np.float64))
    omega = (2 * np.pi * units.larmor_hz(b0) * 1e-6) * phantom.field_total.astype(np.float64)
    rate = 1.0 / (phantom.t2star_ms.astype(np.float64) * 1e-3)
    m0 = phantom.magnitude.astype(np.float64)

    mag = np.empty(shape + (n_e,), dtype=np.float32)
    pha = np.empty(shape + (n_e,), dtype=np.float32)
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
        amp = m0 * np.exp(-t * rate)
        theta = omega * t + offset  # float64: exact phase before the cast
        signal = np.empty(shape, dtype=np.complex64)
        signal.real = amp * np.cos(theta)
        signal.imag = amp * np.sin(theta)
        del amp, theta
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
    )
