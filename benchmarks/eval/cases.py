"""Cases of the dipole-inversion suite: truth chi, true local field, mask, magnitude, voxel size,
B0 direction and ROI labels, built once and cached under ``bench-output/eval-cases/``.

Every case is the *true local field* (plus noise where stated) so the inversion alone is measured.
Field noise, where added, is what a single-echo GRE at 3 T, TE 20 ms, peak SNR 100 gives: phase SD
1 / (SNR m) rad for a voxel of relative magnitude m, i.e. 6.2e-4 ppm / m (``NOISE_PPM``).

``head-*`` -- the QSM-CI-style head: the QSM challenge 2.0 segmentation (../shared/data/head-model,
0.64 mm, chi per label from its ``chiref``) cropped to the brain's bounding box (+5 mm). Local field
= D * (M (chi - mean_M chi)) at 0.64 mm (``qsmkit.dipole.forward_field``, the same kernel as
qsm-forward's ``generate_field``, padded by a quarter instead of doubled to fit 2 busy cores), then
chi, field and magnitude resampled to the case's voxel size with qsm-forward's ``resize`` (nilearn,
continuous) as QSM-CI's ``generate_bids`` does, segmentation and mask with ``resize(.., 'nearest')``.
At 1 mm the grid is 138 x 180 x 160 (about 158^3). Magnitude: proton density x exp(-TE R2*) per
label (``qsmkit.headmodel.GRE_TISSUE_3T``, TE 20 ms), so it shares chi's label edges exactly.
Variants: noise-free; noisy (field noise as above, magnitude with complex noise at SNR 100);
B0 tilted by 20 degrees in the y-z plane of the voxel axes; smooth texture (Gaussian noise
filtered with sigma 2 mm, SD 0.01 ppm, inside the brain) added to chi and its field but not to the
magnitude; 0.94 x 0.94 x 2.5 mm in two builds:

- ``head-aniso-noisy``: as a scanner measures thick slices (``_head_integrated``). Each
  acquisition voxel is split 2 x 2 x 4 (sub-voxels 0.47 x 0.47 x 0.63 mm); on the sub-voxels the
  label, chi and magnitude are the nearest 0.64 mm voxel's and the local field the trilinear
  interpolation of the 0.64 mm one; the complex signal m exp(i omega TE field) (TE 20 ms, 3 T) is
  averaged over each acquisition voxel (``qsmkit.simulate.integrate_echo``, as
  ``simulate_acquisition(..., supersample=)`` and the end-to-end cases do); the field is the
  unwrapped phase of that mean over omega TE, the magnitude its modulus, chi the block mean of the
  sub-voxels' chi, labels and mask their majority. Its field is its chi's: ``D chi_truth`` on the
  acquisition grid differs from it by about what it does on the 1 mm heads
  (``python -m benchmarks.eval.consistency``).
- ``head-aniso-resampled``: the former ``head-aniso-noisy``, kept for comparison: the 0.64 mm chi,
  field and magnitude resampled to 2.5 mm slices by qsm-forward's ``resize`` (spline point
  interpolation, no voxel integration), so its field is not the dipole field of its own chi at the
  acquisition grid (61 % NRMSE from ``D chi_truth``, README "Dipole inversion", "Thick slices").

``qsm2016`` -- the 2016 challenge (its local field; truths chi_33 and COSMOS; ROI labels its
``evaluation_mask``, 11 regions; ROI means relative to the mask's mean, as the challenge paper).

``fansi-*`` -- the FANSI analytic phantom (256 x 256 x 98, 0.9375 x 0.9375 x 1.5 mm), its field
simulated here with the noise above; a magnitude that shares chi's edges is synthesised from chi
(m = clip(0.75 - chi / 0.5 ppm, 0.1, 1), complex noise at SNR 100). ``fansi-oblique``: the same
slices acquired obliquely, i.e. B0 at 23 degrees from the slice normal in voxel axes.

``phantom`` -- the project's own phantom (``qsmkit.simulate.make_phantom``, 256 x 256 x 64,
0.9375 x 0.9375 x 2.5 mm, magic-angle vein), noise as above, noise-free magnitude.

Roles: constants of the default inversion are chosen on ``TUNING`` only; every other case is held out.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT / ".." / "shared" / "data"
CACHE = ROOT / "bench-output" / "eval-cases"

GAMMA_MHZ_T, B0_T, TE_S, SNR = 42.5775, 3.0, 0.020, 100.0
NOISE_PPM = 1.0 / SNR / (2 * math.pi * GAMMA_MHZ_T * B0_T * TE_S)  # 6.2e-4 ppm at m = 1

#: head segmentation labels (challenge 2.0 / QSM-CI dseg scheme)
HEAD_DGM = {"caudate": 1, "globus_pallidus": 2, "putamen": 3, "red_nucleus": 4, "dentate": 5,
            "substantia_nigra": 6, "thalamus": 7}
HEAD_CSF = 10

TUNING = ("head-1mm-noisy", "qsm2016", "phantom")
ALL = ("head-1mm", "head-1mm-noisy", "head-aniso-noisy", "head-aniso-resampled", "head-tilt-noisy",
       "head-texture-noisy", "qsm2016", "fansi-axial", "fansi-oblique", "phantom")


@dataclass
class Case:
    name: str
    field: np.ndarray                  # true local field (+ noise), ppm, zero outside the mask
    mask: np.ndarray                   # bool
    magnitude: np.ndarray | None
    voxel_size: tuple
    b0_dir: tuple
    truths: dict                       # name -> chi (ppm)
    labels: np.ndarray | None = None   # ROI label map (int)
    rois: dict = field(default_factory=dict)   # ROI name -> label id
    reference: int | None = None       # label of the reference region (None: the whole mask)
    seg: np.ndarray | None = None      # QSM-CI dseg-scheme segmentation (head cases)
    vessel: np.ndarray | None = None   # magic-angle vessel mask (our phantom)
    shares_edges: bool = False         # the magnitude shows chi's edges
    noise_ppm: float = 0.0             # field noise SD where the magnitude is 1
    note: str = ""

    @property
    def role(self):
        return "tuning" if self.name in TUNING else "held-out"

    @property
    def shape(self):
        return self.field.shape


# ------------------------------------------------------------------------------ cache


_ARRAYS = ("field", "mask", "magnitude", "labels", "seg", "vessel")
_META = ("voxel_size", "b0_dir", "rois", "reference", "shares_edges", "noise_ppm", "note")
#: a case's recipe number, raised when its recipe changes so that a cache of the former recipe is
#: rebuilt, not read under the same name (head-aniso-noisy 2: voxel-integrated, 2026-12-07;
#: 1: spline-resampled, now ``head-aniso-resampled``)
RECIPE = {"head-aniso-noisy": 2}


def _save(case: Case):
    CACHE.mkdir(parents=True, exist_ok=True)
    arrays = {k: getattr(case, k) for k in _ARRAYS if getattr(case, k) is not None}
    arrays.update({"truth__" + k: v.astype(np.float32) for k, v in case.truths.items()})
    np.savez(CACHE / f"{case.name}.npz", **arrays)
    meta = {k: getattr(case, k) for k in _META}
    meta["voxel_size"] = [float(v) for v in case.voxel_size]
    meta["b0_dir"] = [float(v) for v in case.b0_dir]
    meta["recipe"] = RECIPE.get(case.name, 1)
    (CACHE / f"{case.name}.json").write_text(json.dumps(meta, indent=1))


def _load(name) -> Case | None:
    npz, js = CACHE / f"{name}.npz", CACHE / f"{name}.json"
    if not (npz.exists() and js.exists()):
        return None
    meta = json.loads(js.read_text())
    if meta.pop("recipe", 1) != RECIPE.get(name, 1):
        return None  # made by a former recipe: rebuild
    with np.load(npz) as z:
        arrays = {k: z[k] for k in z.files}
    truths = {k[len("truth__"):]: v for k, v in arrays.items() if k.startswith("truth__")}
    kw = {k: arrays.get(k) for k in _ARRAYS}
    meta["voxel_size"], meta["b0_dir"] = tuple(meta["voxel_size"]), tuple(meta["b0_dir"])
    return Case(name=name, truths=truths, **kw, **meta)


def load(name: str) -> Case:
    """The case ``name`` (one of ``ALL``), from the cache or built (and cached)."""
    if name not in ALL:
        raise ValueError(f"unknown case {name!r}; choose from {', '.join(ALL)}")
    case = _load(name)
    if case is None:
        case = BUILDERS[name]()
        _save(case)
    return case


# ------------------------------------------------------------------------------ helpers


def _noisy_field(field, mask, magnitude, rng):
    """Field plus the noise of a GRE with this magnitude (SD NOISE_PPM / m, m the magnitude
    relative to its 99th percentile in the mask, floored at 0.05)."""
    m = magnitude / np.percentile(magnitude[mask], 99)
    sd = NOISE_PPM / np.maximum(m, 0.05)
    return ((field + sd * rng.standard_normal(field.shape)) * mask).astype(np.float32)


def _noisy_magnitude(magnitude, mask, rng):
    """|m + complex noise| at peak SNR 100 (noise SD 1 / SNR of the 99th percentile)."""
    sd = np.percentile(magnitude[mask], 99) / SNR
    noise = sd * (rng.standard_normal(magnitude.shape) + 1j * rng.standard_normal(magnitude.shape))
    return np.abs(magnitude + noise).astype(np.float32)


def tilted(deg):
    t = math.radians(deg)
    return (0.0, math.sin(t), math.cos(t))


# ------------------------------------------------------------------------------ head model


def _head_native():
    """0.64 mm chi (relative to the brain mean, zero outside the brain), mask, segmentation and
    noise-free magnitude, cropped to the brain's bounding box + 5 mm; cached."""
    path = CACHE / "_head_native.npz"
    if path.exists():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    import nibabel as nib

    from qsmkit.headmodel import GRE_TISSUE_3T, read_chiref

    folder = SHARED / "head-model"
    seg = np.asarray(nib.load(str(folder / "SegmentedModel.nii.gz")).dataobj).astype(np.int16)
    brain = np.asarray(nib.load(str(folder / "BrainMask.nii.gz")).dataobj) > 0.5
    table = read_chiref(folder / "SusceptibilityValues.mat")
    lut = np.zeros(max(table) + 1, np.float32)
    for k, (_, v) in table.items():
        lut[k] = v
    margin = 8  # 5 mm at 0.64 mm
    box = []
    for ax in range(3):
        idx = np.where(brain.any(axis=tuple(j for j in range(3) if j != ax)))[0]
        box.append(slice(max(0, idx[0] - margin), min(brain.shape[ax], idx[-1] + margin + 1)))
    box = tuple(box)
    seg, brain = seg[box], brain[box]
    chi = lut[seg]
    chi = np.where(brain, chi - chi[brain].mean(), 0).astype(np.float32)
    m0 = np.zeros(max(GRE_TISSUE_3T) + 1, np.float32)
    for lab, (pd, t2s) in GRE_TISSUE_3T.items():
        m0[lab] = pd * math.exp(-TE_S * 1e3 / t2s)
    mag = m0[seg]
    out = {"chi": chi, "mask": brain, "seg": np.where(brain, seg, 0).astype(np.int16), "mag": mag}
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(path, **out)
    return out


def _resize(x, vox, kind="continuous"):
    """qsm-forward's resize (nilearn resampling) from 0.64 mm to ``vox``."""
    import nibabel as nib
    from qsm_forward import resize

    img = nib.Nifti1Image(np.asarray(x, np.float32), np.diag([0.64, 0.64, 0.64, 1.0]))
    return np.asarray(resize(img, np.asarray(vox, float), kind).get_fdata(), np.float32)


def _head(vox=(1.0, 1.0, 1.0), b0=(0.0, 0.0, 1.0), tag="z"):
    """Noise-free head at ``vox`` with B0 ``b0``: chi, field, mask, seg, magnitude; cached."""
    path = CACHE / f"_head_{tag}_{'x'.join(f'{v:g}' for v in vox)}.npz"
    if path.exists():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    from qsmkit.dipole import forward_field

    nat = _head_native()
    fld = np.asarray(forward_field(nat["chi"], (0.64,) * 3, b0, pad=[n // 4 for n in nat["chi"].shape]))
    mask = _resize(nat["mask"], vox, "nearest") > 0.5
    out = {"chi": _resize(nat["chi"], vox) * mask, "field": _resize(fld, vox) * mask, "mask": mask,
           "seg": np.rint(_resize(nat["seg"], vox, "nearest")).astype(np.int16) * mask,
           "mag": np.maximum(_resize(nat["mag"], vox), 0)}
    np.savez(path, **out)
    return out


#: sub-voxels per acquisition voxel of ``_head_integrated`` (0.47 x 0.47 x 0.63 mm at 2.5 mm slices)
INTEGRATION_FACTORS = {(0.9375, 0.9375, 2.5): (2, 2, 4)}


def _head_integrated(vox=(0.9375, 0.9375, 2.5), b0=(0.0, 0.0, 1.0), tag="z"):
    """Noise-free head at ``vox`` as a scanner measures it (module docstring, ``head-aniso-noisy``):
    chi, field, mask, seg, magnitude; cached."""
    path = CACHE / f"_headint_{tag}_{'x'.join(f'{v:g}' for v in vox)}.npz"
    if path.exists():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    from benchmarks import subvoxel

    from qsmkit import units
    from qsmkit.dipole import forward_field
    from qsmkit.simulate import block_mean, integrate_echo

    nat = _head_native()
    fld_n = np.asarray(forward_field(nat["chi"], (0.64,) * 3, b0, pad=[n // 4 for n in nat["chi"].shape]),
                       np.float32)
    fac = INTEGRATION_FACTORS[tuple(float(v) for v in vox)]
    shape = tuple(int(n * 0.64 // v) for n, v in zip(nat["chi"].shape, vox))
    # sub-voxel centres in native voxel units (native voxel i spans [i - 0.5, i + 0.5])
    axes = [(-0.5 + (np.arange(n * f) + 0.5) * v / f / 0.64) for n, f, v in zip(shape, fac, vox)]
    omega = 2 * np.pi * units.larmor_hz(B0_T) * 1e-6
    n_lab = int(nat["seg"].max()) + 1
    out = {k: np.empty(shape, np.float32) for k in ("chi", "field", "mag", "mask")}
    seg = np.empty(shape, np.int16)
    for i0, i1 in subvoxel.slabs(shape[0], 8):
        grid, near = subvoxel.slab_points(axes, fac, i0, i1, nat["seg"].shape)
        fld = subvoxel.interpolate(fld_n, grid).astype(np.float64)
        sig, phase = integrate_echo(nat["mag"][near], 0.0, fld, TE_S, omega, fac)
        out["field"][i0:i1] = phase / (omega * TE_S)
        out["mag"][i0:i1] = np.abs(sig)
        out["chi"][i0:i1] = block_mean(nat["chi"][near], fac)
        out["mask"][i0:i1] = block_mean(nat["mask"][near].astype(np.float32), fac)
        seg[i0:i1] = subvoxel.block_mode(nat["seg"][near], fac, n_lab)
    mask = out["mask"] > 0.5
    h = {"chi": out["chi"] * mask, "field": out["field"] * mask, "mask": mask, "seg": seg * mask,
         "mag": out["mag"]}
    np.savez(path, **h)
    return h


@dataclass(frozen=True)
class HeadBuild:
    """How a suite head case is made: the noise-free head (``_head`` or, with ``integrate``,
    ``_head_integrated``, at ``vox`` with B0 ``b0``, cached under ``tag``), then what
    ``_head_case`` adds (smooth ``texture`` SD in ppm, field and magnitude ``noise``)."""
    note: str
    vox: tuple = (1.0, 1.0, 1.0)
    b0: tuple = (0.0, 0.0, 1.0)
    tag: str = "z"
    integrate: bool = False
    noise: bool = True
    texture: float = 0.0

    def noise_free(self) -> dict:
        """chi, field, mask, seg and magnitude before texture and noise (cached)."""
        return (_head_integrated if self.integrate else _head)(self.vox, self.b0, self.tag)


_ANISO = (0.9375, 0.9375, 2.5)
HEAD_BUILDS = {
    "head-1mm": HeadBuild("QSM-CI-style head, 1 mm, noise-free", noise=False),
    "head-1mm-noisy": HeadBuild("QSM-CI-style head, 1 mm, SNR 100"),
    "head-aniso-noisy": HeadBuild("QSM-CI-style head, 0.94 x 0.94 x 2.5 mm voxel-integrated, SNR 100",
                                  vox=_ANISO, integrate=True),
    "head-aniso-resampled": HeadBuild("QSM-CI-style head, 0.94 x 0.94 x 2.5 mm spline-resampled, "
                                      "SNR 100", vox=_ANISO),
    "head-tilt-noisy": HeadBuild("QSM-CI-style head, 1 mm, B0 tilted 20 deg, SNR 100",
                                 b0=tilted(20.0), tag="tilt20"),
    "head-texture-noisy": HeadBuild("head, 1 mm, smooth texture (SD 10 ppb) not in the magnitude, "
                                    "SNR 100", texture=0.01),
}


def _head_case(name):
    r = HEAD_BUILDS[name]
    h = r.noise_free()
    vox, b0 = r.vox, r.b0
    mask, chi, fld, mag = h["mask"], h["chi"], h["field"], h["mag"]
    rng = np.random.default_rng(16)
    if r.texture > 0:
        from scipy import ndimage

        from qsmkit.dipole import forward_field

        sig = [2.0 / v for v in vox]
        tex = ndimage.gaussian_filter(rng.standard_normal(chi.shape), sig)
        tex = r.texture * tex / tex[mask].std()
        tex = np.where(mask, tex - tex[mask].mean(), 0).astype(np.float32)
        chi = chi + tex
        fld = (fld + np.asarray(forward_field(tex, vox, b0, pad=[n // 4 for n in chi.shape]))) * mask
    if r.noise:
        fld = _noisy_field(fld, mask, mag, rng)
        mag = _noisy_magnitude(mag, mask, rng)
    return Case(name=name, field=fld.astype(np.float32), mask=mask, magnitude=mag.astype(np.float32),
                voxel_size=tuple(vox), b0_dir=tuple(b0), truths={"truth": chi.astype(np.float32)},
                labels=h["seg"], rois=dict(HEAD_DGM), reference=HEAD_CSF, seg=h["seg"],
                shares_edges=r.texture == 0, noise_ppm=NOISE_PPM if r.noise else 0.0, note=r.note)


# ------------------------------------------------------------------------------ 2016 challenge


def qsm2016():
    import nibabel as nib

    folder = SHARED / "qsm2016"

    def rd(name):
        return np.asarray(nib.load(str(folder / name)).get_fdata(), dtype=np.float32)

    mask = rd("msk.nii.gz") > 0
    labels = np.rint(rd("evaluation_mask.nii.gz")).astype(np.int16)
    return Case(name="qsm2016", field=rd("phs_tissue.nii.gz") * mask, mask=mask,
                magnitude=rd("magn.nii.gz"), voxel_size=(1.0625, 1.0625, 1.0714), b0_dir=(0.0, 0.0, 1.0),
                truths={"chi_33": rd("chi_33.nii.gz"), "cosmos": rd("chi_cosmos.nii.gz")},
                labels=labels, rois={f"roi{k}": k for k in range(1, 12)}, reference=None,
                shares_edges=False, noise_ppm=float("nan"),
                note="2016 challenge, in vivo, 160^3, ROI = evaluation_mask 1..11")


# ------------------------------------------------------------------------------ FANSI phantom


def _fansi(name, b0, note):
    import scipy.io as sio

    from qsmkit.dipole import forward_field

    folder = SHARED / "fansi-phantom"
    chi = sio.loadmat(str(folder / "chi_phantom.mat"))["chi"].astype(np.float32)
    mask = sio.loadmat(str(folder / "mask_phantom.mat"))["mask_use"] > 0
    vox = (0.9375, 0.9375, 1.5)
    chi = np.where(mask, chi - chi[mask].mean(), 0).astype(np.float32)
    fld = np.asarray(forward_field(chi, vox, b0, pad=[n // 4 for n in chi.shape]))
    rng = np.random.default_rng(16)
    mag0 = np.clip(0.75 - chi / 0.5, 0.1, 1.0).astype(np.float32) * mask
    return Case(name=name, field=_noisy_field(fld, mask, np.where(mask, mag0, 1), rng), mask=mask,
                magnitude=_noisy_magnitude(mag0, mask, rng), voxel_size=vox, b0_dir=tuple(b0),
                truths={"truth": chi}, shares_edges=True, noise_ppm=NOISE_PPM, note=note)


def fansi_axial():
    return _fansi("fansi-axial", (0.0, 0.0, 1.0), "FANSI phantom, axial, SNR 100")


def fansi_oblique():
    return _fansi("fansi-oblique", tilted(23.0), "FANSI phantom, oblique slices (B0 23 deg), SNR 100")


# ------------------------------------------------------------------------------ our phantom


def phantom():
    from qsmkit.simulate import DEEP_GRAY, LABEL_IDS, make_phantom

    ph = make_phantom()
    rng = np.random.default_rng(0)
    fld = ((ph.field_local + NOISE_PPM * rng.standard_normal(ph.chi.shape)) * ph.mask).astype(np.float32)
    return Case(name="phantom", field=fld, mask=ph.mask, magnitude=ph.magnitude.astype(np.float32),
                voxel_size=tuple(float(v) for v in ph.voxel_size), b0_dir=tuple(float(v) for v in ph.b0_dir),
                truths={"truth": ph.chi_brain.astype(np.float32)}, labels=ph.labels.astype(np.int16),
                rois={n: LABEL_IDS[n] for n in DEEP_GRAY}, reference=LABEL_IDS["csf"],
                vessel=ph.vessel_mask, shares_edges=True, noise_ppm=NOISE_PPM,
                note="qsmkit phantom 256x256x64, noise 6.2e-4 ppm, noise-free magnitude")


BUILDERS = {**{name: functools.partial(_head_case, name) for name in HEAD_BUILDS},
            "qsm2016": qsm2016, "fansi-axial": fansi_axial, "fansi-oblique": fansi_oblique,
            "phantom": phantom}
