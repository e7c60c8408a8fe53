"""Dipole inversion benchmark: every method's time and accuracy side by side, in one run.

Built-in phantom (256x256x64, 0.9375x0.9375x2.5 mm): the true local field plus Gaussian noise
of 6.2e-4 ppm (phase noise 1/SNR at SNR 100, TE 20 ms, 3 T), truth ``chi_brain``. 2016 QSM
challenge (160^3, when ../shared/data is present): its local field, truth chi_33 and COSMOS.
Median wall time of N runs; the ratio is to TKD measured in the same run.

On the challenge data a second table uses the challenge's own error measures, so our figures can
be set beside Langkammer et al., MRM 2018 (Table 1 there): RMSE = 100 ||x - ref|| / ||ref|| over
the whole volume with x multiplied by the mask, *without* removing means (FANSI's
``compute_rmse`` as called by the challenge's ``qsm2016_script_recon_evaluation.m``), and HFEN
the same on Laplacian-of-Gaussian images (15^3 voxels, sigma 1.5). The script's two baselines
are in the method list with its recipes: TKD at threshold 0.19 and closed-form L2 at 9e-2 per
voxel^2 (0.102 mm^2 in our millimetre units on 1.06 x 1.06 x 1.07 mm voxels).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

from qsmkit import focuss, inversion, metrics, units

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"

METHODS = [
    ("tkd (baseline)", inversion.tkd, {}),
    ("l2", inversion.l2, {}),
    ("l2, challenge recipe (lam 9e-2/voxel^2)", inversion.l2, {"lam": 0.102}),
    ("focuss, magnitude prior (default: the edge-trust rule)", focuss.focuss, {}),
    ("focuss, no prior", focuss.focuss, {"prior": "none"}),
    ("focuss, k-space prior", focuss.focuss, {"prior": "kspace"}),
    ("focuss, the rule at edge trust 0", focuss.focuss, focuss.rule_parameters(0.0)),
    ("focuss, the rule at edge trust 1", focuss.focuss, focuss.rule_parameters(1.0)),
    ("lsqr (5 iterations)", inversion.INVERSION.get("lsqr").func, {}),
    ("lsqr, 30 iterations", inversion.INVERSION.get("lsqr").func, {"max_iter": 30}),
    ("tv-admm, MEDI edges", inversion.INVERSION.get("tv").func, {}),
    ("tv-admm, alpha l-curve", inversion.INVERSION.get("tv").func, {"alpha": "lcurve"}),
]


def datasets():
    from qsmkit.simulate import DEEP_GRAY, LABEL_IDS, make_phantom

    ph = make_phantom()
    noise = float(units.rad_to_ppm(0.01, 3.0, 0.02))
    rng = np.random.default_rng(0)
    field = ((ph.field_local + noise * rng.standard_normal(ph.chi.shape)) * ph.mask).astype(np.float32)
    # per-structure ROIs: the deep gray nuclei (the usual QSM readout), labels inside the mask
    rois = {n: (ph.labels == LABEL_IDS[n]) & ph.mask for n in DEEP_GRAY}
    yield ("phantom 256x256x64", field, ph.mask, ph.voxel_size, ph.b0_dir, ph.magnitude,
           {"truth": ph.chi_brain}, ph.vessel_mask, rois)
    folder = SHARED / "qsm2016"
    if folder.exists():
        import nibabel as nib

        def load(name):
            return np.asarray(nib.load(str(folder / name)).get_fdata(), dtype=np.float32)

        img = nib.load(str(folder / "phs_tissue.nii.gz"))
        ev = np.rint(load("evaluation_mask.nii.gz")).astype(int)
        rois = {f"roi {k}": ev == k for k in range(1, int(ev.max()) + 1) if (ev == k).any()}
        yield ("2016 challenge 160^3", load("phs_tissue.nii.gz"), load("msk.nii.gz") > 0,
               tuple(float(v) for v in img.header.get_zooms()[:3]), (0.0, 0.0, 1.0),
               load("magn.nii.gz"), {"chi_33": load("chi_33.nii.gz"),
                                     "cosmos": load("chi_cosmos.nii.gz")}, None, rois)
    else:
        print(f"(2016 challenge skipped: {folder} not present)")


def run(repeats=3):
    rows = []
    for name, field, mask, vox, b0, mag, truths, vessel, rois in datasets():
        print(f"\ndipole inversion on {name}, median of {repeats} runs")
        head = "".join(f"{'NRMSE ' + t:>14}{'HFEN ' + t:>13}" for t in truths)
        print(f"{'method':<48}{'median s':>9}{'x tkd':>8}{head}{'SSIM':>7}"
              + (f"{'vessel':>8}" if vessel is not None else ""))
        base = None
        for label, func, params in METHODS:
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                chi, _ = func(field, mask, vox, b0, magnitude=mag, **params)
                times.append(time.perf_counter() - t0)
            med = statistics.median(times)
            base = med if base is None else base
            first = next(iter(truths.values()))
            row = {"dataset": name, "method": label, "median_s": med, "runs_s": times,
                   "ratio_to_tkd": med / base, "ssim": metrics.ssim(chi, first, mask)}
            cells = ""
            for t, ref in truths.items():
                row[f"nrmse_{t}"] = metrics.nrmse(chi, ref, mask)
                row[f"hfen_{t}"] = metrics.hfen(chi, ref, mask)
                cells += f"{row[f'nrmse_{t}']:>14.1f}{row[f'hfen_{t}']:>13.1f}"
            row["roi_ppb"] = roi_means_ppb(chi, mask, rois)
            row["roi_error_ppb"] = {
                t: float(np.mean([abs(row["roi_ppb"][k] - v)
                                  for k, v in roi_means_ppb(ref, mask, rois).items()]))
                for t, ref in truths.items()}
            if "chi_33" in truths:
                for t, ref in truths.items():
                    row[f"challenge_rmse_{t}"] = challenge_rmse(chi * mask, ref)
                    row[f"challenge_hfen_{t}"] = challenge_hfen(chi * mask, ref)
            if vessel is not None:
                row["vessel_contrast"] = metrics.vessel_contrast_recovery(chi, first, vessel)
            rows.append(row)
            print(f"{label:<48}{med:>9.2f}{med / base:>8.2f}{cells}{row['ssim']:>7.3f}"
                  + (f"{row['vessel_contrast']:>8.2f}" if vessel is not None else ""))
        print(f"\n{name}: mean chi per ROI (ppb, each map relative to its mean in the mask) and "
              "the mean absolute ROI error against each truth")
        print(f"{'method':<48}" + "".join(f"{k[:9]:>10}" for k in rois)
              + "".join(f"{'err ' + t[:6]:>12}" for t in truths))
        for t, ref in truths.items():
            print(f"{t:<48}" + "".join(f"{v:>10.1f}" for v in roi_means_ppb(ref, mask, rois).values()))
        for r in rows:
            if r["dataset"] == name:
                print(f"{r['method']:<48}" + "".join(f"{v:>10.1f}" for v in r["roi_ppb"].values())
                      + "".join(f"{r['roi_error_ppb'][t]:>12.1f}" for t in truths))
        if "chi_33" in truths:
            print(f"\n{name}, the challenge's measures (no demeaning, recon x mask; "
                  "Langkammer et al. 2018)")
            print(f"{'method':<48}{'RMSE chi_33':>12}{'HFEN chi_33':>12}{'RMSE COSMOS':>12}"
                  f"{'HFEN COSMOS':>12}")
            for r in rows:
                if r["dataset"] == name:
                    print(f"{r['method']:<48}{r['challenge_rmse_chi_33']:>12.1f}"
                          f"{r['challenge_hfen_chi_33']:>12.1f}{r['challenge_rmse_cosmos']:>12.1f}"
                          f"{r['challenge_hfen_cosmos']:>12.1f}")
    return rows


def roi_means_ppb(chi, mask, rois):
    """Mean chi (ppb) in each ROI, the map taken relative to its mean in the mask (chi is
    defined up to a constant; the NRMSE removes the same mean)."""
    chi = np.asarray(chi, np.float64)
    base = chi[mask].mean()
    return {k: 1000 * float(chi[r].mean() - base) for k, r in rois.items()}


def challenge_rmse(x, ref):
    """The 2016 challenge's RMSE (%): 100 ||x - ref|| / ||ref|| over the whole volume, no means
    removed."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(100 * np.linalg.norm(x - ref) / np.linalg.norm(ref))


def challenge_hfen(x, ref, sigma=1.5):
    """The 2016 challenge's HFEN (%): ``challenge_rmse`` of Laplacian-of-Gaussian filtered maps
    (kernel 15^3 voxels, i.e. truncated at 7 voxels = 4.67 sigma)."""
    from scipy import ndimage

    def log(v):
        return ndimage.gaussian_laplace(np.asarray(v, np.float64), sigma, truncate=7 / sigma)

    return challenge_rmse(log(x), log(ref))
