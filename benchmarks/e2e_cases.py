"""Full simulations for the end-to-end benchmark (``benchmarks/e2e.py``), built from the QSM
challenge 2.0 head model (``../shared/data/head-model``) and cached under ``bench-output/e2e/``.

How a case is made (every figure of the benchmark depends on this):

1. Native model, 0.64 mm, 256 x 320 x 320: chi per label from ``chiref``, relative to air (0
   outside the head). Total field = D * chi and true local field = D * (M (chi - mean_M chi)), M
   the brain mask, both by FFT with a quarter of each axis of zero padding
   (``qsmkit.headmodel`` definitions), for the case's B0 direction. Cached per direction.
2. Acquisition grid: the brain's bounding box grown by 8 mm, at the case's voxel size (1 mm or
   0.9375 x 0.9375 x 2.5 mm). Fine grid: each acquisition voxel split ``factor`` times per axis
   (2 x 2 x 2 for 1 mm, 2 x 2 x 4 for 2.5 mm slices, sub-voxels of 0.47-0.63 mm). On the fine grid
   the label is the nearest native voxel's and the fields are trilinear interpolations of the
   native ones.
3. Signal, per echo, on the fine grid: ``PD exp(-TE R2*) exp(i 2 pi gamma B0 TE field)`` with
   proton density and T2* per label from ``qsmkit.headmodel.GRE_TISSUE_3T`` (R2* scaled by
   (B0 + 1) / 4 from 3 T, Peters et al. 2007), then the complex mean over each acquisition voxel
   (voxel integration: partial volumes and intravoxel dephasing, as
   ``qsmkit.simulate.supersampled_signal`` does for the phantom). Then, on the acquisition grid,
   the smooth receiver phase of ``qsmkit.simulate.smooth_phase_offset`` and complex Gaussian
   noise of SD 1 / SNR (SNR 100, proton density of CSF = 1).
4. Truths on the acquisition grid: chi = block mean of the fine chi; local field = block mean of
   the fine local field; total field = block mean of the fine total field; brain mask = majority
   of the fine mask; labels = majority label; true (unwrapped) phase per echo = the
   amplitude-weighted mean of the fine phase ``ref`` plus ``wrap(angle(signal) - ref)`` plus the
   offset (the unwrapped phase of the integrated signal, as in ``supersampled_signal``).

Cases: 3 T and 7 T; 1 mm with B0 along z and 0.94 x 0.94 x 2.5 mm with B0 tilted 20 degrees in
the y-z plane of the voxel axes. Echoes: 3 T 4/12/20/28 ms, 7 T 3/8/13/18 ms. None of these
cases chose a constant of the pipeline's default (those were chosen on the 1.28 mm head model
with the true total field, and on the 2016 challenge and the phantom), so all are held out.

Held-out geometries (``HELDOUT_CASES``, not in ``make eval-e2e``'s default list; run them by
name): 3 T 1 mm with B0 tilted 20 degrees and 3 T 0.94 x 0.94 x 2.5 mm along z (the two
combinations the cases above leave out), and, added on 2026-12-07 to check the claims outside
the voxel sizes the constants were set at, voxel sizes, noise levels and echo counts that no
case above has: 3 T 1.5 mm isotropic with B0 tilted 20 degrees, SNR 50, three echoes
(5/15/25 ms); 3 T 2 mm isotropic along z; 3 T 1 mm along z with a single echo (20 ms); 7 T
1.2 x 1.2 x 2 mm tilted, SNR 40, three echoes (4/10/16 ms). Sub-voxels of 0.6-0.75 mm.

A QSM-CI-style case (``QSMFORWARD_CASES``, ``build_qsmforward``) takes the acquisition from
qsm-forward (PyPI, the simulator behind the QSM-CI leaderboard's data) instead of ours, at its
defaults (7 T, TE 4/12/20/28 ms, TR 50 ms, flip 15 degrees, 1 mm, B0 along z): the native total
field of step 1 (the same kernel as qsm-forward's ``generate_field``, which would need a 2x
padded 26 M-voxel complex FFT, about 10 GB) shimmed to second order in the brain
(``generate_shimmed_field``), qsm-forward's receiver phase (``generate_phase_offset``) and
spoiled-GRE signal with T1 weighting (``generate_signal``; proton density and T2* per label as
above, T1 per label from ``T1_7T_S``), k-space truncation to the acquisition grid
(``crop_kspace``: Gibbs ringing, no voxel integration) and noise at a peak SNR of 100
(``add_noise``). Truths: chi resampled as qsm-forward writes its chi map (``resize``, nilearn's
continuous interpolation), labels and brain mask by nearest neighbour, the local field k-space
truncated like the signal, the total field the echo-time slope of the noise-free signal's
unwrapped phase. Its whole field of view is kept (the head and the air around it).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HEAD = ROOT / ".." / "shared" / "data" / "head-model"
CACHE = ROOT / "bench-output" / "e2e"

NATIVE_MM = 0.64
SNR = 100.0
TILT_DEG = 20.0
TE = {3.0: (0.004, 0.012, 0.020, 0.028), 7.0: (0.003, 0.008, 0.013, 0.018)}
GEOMETRY = {"1mm": ((1.0, 1.0, 1.0), (2, 2, 2)), "aniso": ((0.9375, 0.9375, 2.5), (2, 2, 4)),
            "1.5mm": ((1.5, 1.5, 1.5), (2, 2, 2)), "2mm": ((2.0, 2.0, 2.0), (3, 3, 3)),
            "1.2x1.2x2mm": ((1.2, 1.2, 2.0), (2, 2, 3))}
#: name -> (B0 tesla, geometry, B0 tilt in degrees)
CASES = {"3T-1mm-z": (3.0, "1mm", 0.0), "7T-1mm-z": (7.0, "1mm", 0.0),
         "3T-aniso-tilt": (3.0, "aniso", TILT_DEG), "7T-aniso-tilt": (7.0, "aniso", TILT_DEG)}
#: held-out geometries (module docstring): name -> (B0 tesla, geometry, B0 tilt in degrees, SNR,
#: echo times s)
HELDOUT_CASES = {
    "3T-1mm-tilt": (3.0, "1mm", TILT_DEG, SNR, TE[3.0]),
    "3T-aniso-z": (3.0, "aniso", 0.0, SNR, TE[3.0]),
    "3T-1.5mm-tilt-snr50-3echo": (3.0, "1.5mm", TILT_DEG, 50.0, (0.005, 0.015, 0.025)),
    "3T-2mm-z": (3.0, "2mm", 0.0, SNR, TE[3.0]),
    "3T-1mm-z-1echo": (3.0, "1mm", 0.0, SNR, (0.020,)),
    "7T-1.2x1.2x2mm-tilt-snr40-3echo": (7.0, "1.2x1.2x2mm", TILT_DEG, 40.0, (0.004, 0.010, 0.016)),
}
#: QSM-CI-style cases (qsm-forward's acquisition): name -> (B0 tesla, voxel size mm, echo times s)
QSMFORWARD_CASES = {"qsmforward-7T-1mm": (7.0, (1.0, 1.0, 1.0), (0.004, 0.012, 0.020, 0.028))}
#: T1 (s) per head-model label at 7 T for qsm-forward's spoiled-GRE signal, rounded from
#: Rooney et al., MRM 2007;57:308 (WM 1.2, cortex 2.0, caudate 1.7, putamen 1.7, GP 1.2, CSF
#: 4.4, blood 2.6 s) and Wright et al., MAGMA 2008;21:121; the others are plausible guesses
#: (they only set the magnitude's contrast).
T1_7T_S = {1: 1.7, 2: 1.2, 3: 1.7, 4: 1.4, 5: 1.4, 6: 1.4, 7: 1.6, 8: 1.2, 9: 2.0, 10: 4.4,
           11: 2.6, 12: 0.6, 13: 0.4, 14: 1.0, 15: 1.9, 16: 1.0}
#: deep gray nuclei of the head model (label ids) and its CSF label
DGM = {"caudate": 1, "globus_pallidus": 2, "putamen": 3, "red_nucleus": 4, "dentate": 5,
       "substantia_nigra": 6, "thalamus": 7}
CSF = 10


@dataclass
class E2ECase:
    name: str
    magnitude: np.ndarray      # (X, Y, Z, E)
    phase: np.ndarray          # (X, Y, Z, E) wrapped, rad
    te: tuple
    b0: float
    voxel_size: tuple
    b0_dir: tuple
    mask: np.ndarray           # true brain mask
    labels: np.ndarray         # majority label
    chi: np.ndarray            # true chi (ppm, relative to air)
    field_total: np.ndarray    # true total field (ppm)
    field_local: np.ndarray    # true local field (ppm), zero outside the mask
    true_phase: np.ndarray     # (X, Y, Z, E) unwrapped phase of the signal, offset included
    phase_offset: np.ndarray   # receiver phase (rad)


def b0_direction(tilt_deg):
    t = math.radians(tilt_deg)
    return (0.0, math.sin(t), math.cos(t))


def _native(b0_dir):
    """(chi, labels, brain mask, total field, local field) at 0.64 mm for ``b0_dir`` (cached)."""
    import nibabel as nib

    from qsmkit.dipole import forward_field
    from qsmkit.headmodel import read_chiref

    CACHE.mkdir(parents=True, exist_ok=True)
    seg = np.asarray(nib.load(str(HEAD / "SegmentedModel.nii.gz")).dataobj).astype(np.int16)
    brain = np.asarray(nib.load(str(HEAD / "BrainMask.nii.gz")).dataobj) > 0.5
    table = read_chiref(HEAD / "SusceptibilityValues.mat")
    air = next(v for _, (n, v) in table.items() if n.lower() == "air")
    lut = np.zeros(max(table) + 1, np.float32)
    for k, (_, v) in table.items():
        lut[k] = v - air
    chi = lut[seg]
    tag = "native_b%.4f_%.4f_%.4f" % tuple(b0_dir)
    files = [CACHE / f"{tag}_{k}.npy" for k in ("total", "local")]
    if not all(f.exists() for f in files):
        pad = [n // 4 for n in chi.shape]
        vox = (NATIVE_MM,) * 3
        total = forward_field(chi, vox, b0_dir, pad=pad).astype(np.float32)
        np.save(files[0], total)
        del total
        own = np.where(brain, chi - chi[brain].mean(), 0).astype(np.float32)
        np.save(files[1], forward_field(own, vox, b0_dir, pad=pad).astype(np.float32))
        del own
    total, local = (np.load(f) for f in files)
    return chi, seg, brain, total, local


def _tissue_luts(b0):
    """Proton density and R2* (s^-1) per head-model label at ``b0`` tesla (``GRE_TISSUE_3T``,
    R2* scaled by (B0 + 1) / 4 from 3 T; labels without an entry: no signal, R2* 1000)."""
    from qsmkit.headmodel import GRE_TISSUE_3T

    n_lab = max(GRE_TISSUE_3T) + 1
    pd_lut = np.zeros(n_lab, np.float32)
    r2_lut = np.full(n_lab, 1000.0, np.float32)
    for lab, (pd, t2s) in GRE_TISSUE_3T.items():
        pd_lut[lab] = pd
        r2_lut[lab] = 1e3 / t2s * (b0 + 1.0) / 4.0
    return pd_lut, r2_lut


def build(name, progress=print) -> E2ECase:
    """Simulate case ``name`` (a key of ``CASES`` or ``HELDOUT_CASES``); see the module
    docstring."""
    from benchmarks import subvoxel

    from qsmkit import units
    from qsmkit.headmodel import GRE_TISSUE_3T
    from qsmkit.simulate import block_mean, integrate_echo, smooth_phase_offset

    if name in HELDOUT_CASES:
        b0, geom, tilt, snr, te = HELDOUT_CASES[name]
    else:
        (b0, geom, tilt), snr, te = CASES[name], SNR, TE[CASES[name][0]]
    vox, fac = GEOMETRY[geom]
    b0_dir = b0_direction(tilt)
    t0 = time.perf_counter()
    chi_n, seg, brain, total_n, local_n = _native(b0_dir)
    progress(f"{name}: native fields ready ({time.perf_counter() - t0:.0f} s)")
    idx = np.argwhere(brain)
    lo_mm = idx.min(0) * NATIVE_MM - 8.0
    hi_mm = idx.max(0) * NATIVE_MM + 8.0
    lo_mm = np.maximum(lo_mm, 0.0)
    hi_mm = np.minimum(hi_mm, (np.array(brain.shape) - 1) * NATIVE_MM)
    shape = tuple(int((h - lo) // v) for lo, h, v in zip(lo_mm, hi_mm, vox))
    fine_vox = [v / f for v, f in zip(vox, fac)]
    # fine voxel centres (mm, native frame; native voxel i is centred at i * 0.64 mm)
    axes = [lo + (np.arange(n * f) + 0.5) * d for lo, n, f, d in zip(lo_mm, shape, fac, fine_vox)]
    n_lab = max(GRE_TISSUE_3T) + 1
    pd_lut, r2_lut = _tissue_luts(b0)
    omega = 2 * np.pi * units.larmor_hz(b0) * 1e-6
    out = {k: np.empty(shape, np.float32) for k in ("chi", "total", "local", "mask")}
    labels = np.empty(shape, np.int16)
    sig = np.empty(shape + (len(te),), np.complex64)
    ref = np.empty(shape + (len(te),), np.float32)
    step = 4
    axes = [a / NATIVE_MM for a in axes]  # native voxel units
    for i0, i1 in subvoxel.slabs(shape[0], step):
        grid, near = subvoxel.slab_points(axes, fac, i0, i1, seg.shape)
        lab = seg[near]
        fld = subvoxel.interpolate(total_n, grid).astype(np.float64)
        loc = subvoxel.interpolate(local_n, grid) * brain[near]
        out["chi"][i0:i1] = block_mean(chi_n[near], fac)
        out["total"][i0:i1] = block_mean(fld, fac)
        out["local"][i0:i1] = block_mean(loc, fac)
        out["mask"][i0:i1] = block_mean(brain[near].astype(np.float32), fac)
        labels[i0:i1] = subvoxel.block_mode(lab, fac, n_lab)
        for e, t in enumerate(te):
            sig[i0:i1, ..., e], ref[i0:i1, ..., e] = integrate_echo(
                pd_lut[lab], r2_lut[lab], fld, t, omega, fac)
        if i0 % (8 * step) == 0:
            progress(f"{name}: slab {i0}/{shape[0]} ({time.perf_counter() - t0:.0f} s)")
    offset = smooth_phase_offset(shape, vox).astype(np.float32)
    rng = np.random.default_rng(17)
    noisy = sig * np.exp(1j * offset)[..., None]
    noisy += (rng.standard_normal(sig.shape) + 1j * rng.standard_normal(sig.shape)).astype(np.complex64) / snr
    mask = out["mask"] > 0.5
    return E2ECase(name=name, magnitude=np.abs(noisy).astype(np.float32),
                   phase=np.angle(noisy).astype(np.float32), te=te, b0=b0, voxel_size=tuple(vox),
                   b0_dir=b0_dir, mask=mask, labels=labels, chi=out["chi"],
                   field_total=out["total"], field_local=(out["local"] * mask).astype(np.float32),
                   true_phase=(ref + offset[..., None]).astype(np.float32), phase_offset=offset)


def build_qsmforward(name, progress=print) -> E2ECase:
    """Simulate QSM-CI-style case ``name`` (a key of ``QSMFORWARD_CASES``) with qsm-forward's
    acquisition model; see the module docstring."""
    import nibabel as nib
    import qsm_forward as qf

    from qsmkit import units

    b0, vox, te = QSMFORWARD_CASES[name]
    b0_dir = (0.0, 0.0, 1.0)
    t0 = time.perf_counter()
    chi_n, seg, brain, total_n, local_n = _native(b0_dir)
    pd_lut, r2_lut = _tissue_luts(b0)
    r1_lut = np.zeros(len(pd_lut), np.float32)
    for lab, t1 in T1_7T_S.items():
        r1_lut[lab] = 1.0 / t1
    m0, r2s, r1 = pd_lut[seg], r2_lut[seg], r1_lut[seg]
    _, field, _ = qf.generate_shimmed_field(total_n.astype(np.float64), brain, order=2)
    offset = qf.generate_phase_offset(m0, brain, seg.shape)
    dims = np.round(NATIVE_MM / np.asarray(vox) * np.asarray(seg.shape)).astype(int)
    progress(f"{name}: native field shimmed ({time.perf_counter() - t0:.0f} s); acquisition {tuple(dims)}")

    def acquired(x):  # a real map truncated in k-space like the signal (as a complex array:
        # crop_kspace's path for real input also removes Gibbs ringing and returns magnitudes)
        return np.real(qf.crop_kspace(x.astype(np.complex128), dims)).astype(np.float32)

    omega = 2 * np.pi * units.larmor_hz(b0) * 1e-6
    field_acq, offset_acq = acquired(field), acquired(offset)
    rng = np.random.default_rng(17)
    mag, pha, true_phase, weight = [], [], [], []
    for t in te:
        sig = qf.crop_kspace(qf.generate_signal(field, B0=b0, TR=0.05, TE=t, flip_angle=15,
                                                phase_offset=offset, R1=r1, R2star=r2s, M0=m0), dims)
        # the unwrapped phase of the noise-free acquired signal: the truncated phase model plus
        # the wrapped rest (ringing and partial volumes make the two differ near air and bone)
        ref = omega * t * field_acq + offset_acq
        true_phase.append((ref + np.angle(sig * np.exp(-1j * ref))).astype(np.float32))
        weight.append((np.abs(sig) ** 2).astype(np.float32))
        sig = qf.add_noise(sig, peak_snr=SNR, rng=rng)
        mag.append(np.abs(sig).astype(np.float32))
        pha.append(np.angle(sig).astype(np.float32))
        del sig
        progress(f"{name}: echo {t * 1e3:.0f} ms ({time.perf_counter() - t0:.0f} s)")
    del m0, r2s, r1, field, offset
    # true total field: the weighted least-squares slope of that phase over the echo times, the
    # field the acquisition encodes (the k-space truncated native field is not: Gibbs ringing of
    # the air's field, where there is no signal, reaches into the brain)
    tt = np.asarray(te)[None, None, None, :]
    ph, w = np.stack(true_phase, -1), np.stack(weight, -1) + 1e-30
    tm = (w * tt).sum(-1) / w.sum(-1)
    pm = (w * ph).sum(-1) / w.sum(-1)
    slope = (w * (tt - tm[..., None]) * (ph - pm[..., None])).sum(-1) / (
        w * (tt - tm[..., None]) ** 2).sum(-1)
    field_true = (slope / omega).astype(np.float32)
    local_acq = acquired(local_n)
    aff = np.diag([NATIVE_MM] * 3 + [1.0])

    def resampled(x, kind):
        return np.asarray(qf.resize(nib.Nifti1Image(x, aff), list(vox), kind).dataobj)

    chi = resampled(chi_n.astype(np.float32), "continuous").astype(np.float32)
    labels = resampled(seg.astype(np.float32), "nearest").astype(np.int16)
    mask = resampled(brain.astype(np.float32), "nearest") > 0.5
    progress(f"{name}: truths resampled ({time.perf_counter() - t0:.0f} s)")
    return E2ECase(name=name, magnitude=np.stack(mag, -1), phase=np.stack(pha, -1), te=te, b0=b0,
                   voxel_size=tuple(vox), b0_dir=b0_dir, mask=mask, labels=labels, chi=chi,
                   field_total=field_true, field_local=(local_acq * mask).astype(np.float32),
                   true_phase=ph, phase_offset=offset_acq)


_ARRAYS = ("magnitude", "phase", "mask", "labels", "chi", "field_total", "field_local",
           "true_phase", "phase_offset")


def load(name, progress=print) -> E2ECase:
    """Case ``name`` from ``bench-output/e2e/`` or built and cached there."""
    npz, js = CACHE / f"{name}.npz", CACHE / f"{name}.json"
    if npz.exists() and js.exists():
        meta = json.loads(js.read_text())
        with np.load(npz) as z:
            arrays = {k: z[k] for k in _ARRAYS}
        return E2ECase(name=name, te=tuple(meta["te"]), b0=meta["b0"],
                       voxel_size=tuple(meta["voxel_size"]), b0_dir=tuple(meta["b0_dir"]), **arrays)
    case = (build_qsmforward if name in QSMFORWARD_CASES else build)(name, progress)
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(npz, **{k: getattr(case, k) for k in _ARRAYS})
    js.write_text(json.dumps({"te": case.te, "b0": case.b0, "voxel_size": case.voxel_size,
                              "b0_dir": case.b0_dir, "shape": list(case.mask.shape)}))
    return case
