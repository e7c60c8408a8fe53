"""Where a suite case's inversion error comes from, and what the candidate fixes measured.

    python -m benchmarks.eval.diagnose --case qsm2016              # decomposition, tv and focuss
    python -m benchmarks.eval.diagnose --case qsm2016 --tries      # plus the candidate fixes

For the default (``tv``) and ``focuss`` on one case, against each truth (both maps relative to
their mean in the mask, as ``score``):

- the error by distance from the mask's edge (share of the squared error, share of the voxels);
- the error by k-space band: |k| (cycles/mm) x |D(k)| (near the magic-angle cone or not), with the
  map's power over the truth's (``pow``) and the least-squares gain cross / power (``gain``: 1 for a
  map whose band is the truth's plus nothing, < 1 where it holds power the truth lacks), and the
  NRMSE an oracle with one gain per band would reach (no linear filter of the map does better);
- the share of the squared error in the 1 % and 10 % largest voxel errors;
- the field that the truth does not explain, delta - A chi_true in the mask: its RMS against the
  robust Laplacian noise estimate that sets tv's alpha, its lag-1 correlation (0 for white noise),
  the share of it at scales above 2 / 4 / 8 mm, and the least-squares scale of delta on A chi_true.

``--tries`` adds the candidate fixes (each scored with ``score.score``): tv with twice the rule's
alpha, tv with half the edges (edge_fraction 0.15), plain TV (no magnitude) with one Bregman step
(Osher et al., Multiscale Model Simul 4:460, 2005: re-solve with the residual added back, which
restores contrast), and focuss followed by a region refit (one constant per connected region of
the map's 8 quantile bins, >= 100 voxels, fitted to the field's residual by CG: a data-consistency
step that restores region means). Writes ``bench-output/eval-diagnose/<case>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.eval import cases, score  # noqa: E402

K_BANDS = (0.0, 0.05, 0.1, 0.2, 0.3, 1.0)   # |k|, cycles/mm
D_BANDS = (0.0, 0.1, 0.3, 1.01)             # |D(k)|
RIM_SHELLS = ((0, 2), (2, 4), (4, 8), (8, 1e9))  # voxels from the mask's edge


def _demean(x, m):
    x = np.asarray(x, np.float64)
    return np.where(m, x - x[m].mean(), 0.0)


def error_by_rim(x, t, m):
    from scipy import ndimage as ndi

    e2 = ((x - t) * m) ** 2
    dist = ndi.distance_transform_edt(m)
    out = []
    for lo, hi in RIM_SHELLS:
        s = m & (dist > lo) & (dist <= hi)
        out.append({"shell_vox": [lo, hi], "voxels": float(s.sum() / m.sum()),
                    "error_share": float(e2[s].sum() / e2.sum())})
    return out


def error_by_band(x, t, case):
    """Per (|k| band, |D| band): error share (% of ||t||^2), power ratio, gain; and the oracle
    NRMSE with one least-squares gain per band."""
    from qsmkit.dipole import dipole_kernel

    m = case.mask
    D = np.abs(dipole_kernel(m.shape, case.voxel_size, case.b0_dir, real=False, dtype=np.float64))
    kk = np.meshgrid(*[np.fft.fftfreq(n, d) for n, d in zip(m.shape, case.voxel_size)], indexing="ij")
    kr = np.sqrt(sum(k ** 2 for k in kk))
    X, T = np.fft.fftn(x), np.fft.fftn(t)
    tt = float((np.abs(T) ** 2).sum())
    gains = np.ones(m.shape)
    cells = []
    for a, b in zip(K_BANDS[:-1], K_BANDS[1:]):
        for da, db in zip(D_BANDS[:-1], D_BANDS[1:]):
            s = (kr >= a) & (kr < b) & (D >= da) & (D < db)
            px, pt = float((np.abs(X[s]) ** 2).sum()), float((np.abs(T[s]) ** 2).sum())
            cr = float((X[s] * np.conj(T[s])).real.sum())
            gains[s] = cr / px if px > 0 else 1.0
            cells.append({"k": [a, b], "D": [da, db],
                          "error_pct": 100 * float((np.abs(X[s] - T[s]) ** 2).sum()) / tt,
                          "power_ratio": px / pt if pt > 0 else None, "gain": cr / px if px > 0 else None})
    y = _demean(np.real(np.fft.ifftn(X * gains)), m)
    oracle = 100 * float(np.linalg.norm(y - t) / np.linalg.norm(t))
    return cells, oracle


def top_error_share(x, t, m):
    a = np.abs((x - t)[m])
    e2 = a ** 2
    q90, q99 = np.quantile(a, [0.9, 0.99])
    return {"top1pct": float(e2[a > q99].sum() / e2.sum()), "top10pct": float(e2[a > q90].sum() / e2.sum())}


def unexplained_field(case, truth):
    from scipy import ndimage as ndi

    from qsmkit.dipole import forward_field
    from qsmkit.inversion_base import noise_sd

    m = case.mask
    d = np.asarray(case.field, np.float64) * m
    f = np.asarray(forward_field(np.asarray(truth, np.float64) * m, case.voxel_size, case.b0_dir), np.float64)
    r = np.where(m, d - f, 0.0)
    rc = np.where(m, r - r[m].mean(), 0.0)
    dc, fc = _demean(d, m), _demean(f, m)
    inner = ndi.binary_erosion(m, iterations=3)
    lag1 = [float((rc * np.roll(rc, 1, ax))[inner].sum() / (rc * rc)[inner].sum()) for ax in range(3)]
    low = {}
    for sg in (2, 4, 8):
        w = ndi.gaussian_filter(m.astype(float), sg)
        lp = ndi.gaussian_filter(rc, sg) / np.maximum(w, 1e-3)
        low[f"sigma{sg}"] = float((lp[m] ** 2).sum() / (rc[m] ** 2).sum())
    return {"rms_ppm": float(rc[m].std()),
            "rms_over_field": float(np.linalg.norm(rc[m]) / np.linalg.norm(dc[m])),
            "laplacian_noise_sd_ppm": noise_sd(d.astype(np.float32), m), "lag1_corr": lag1,
            "low_pass_share": low, "field_scale_on_truth": float((fc[m] * dc[m]).sum() / (fc[m] ** 2).sum())}


def region_refit(x, case, bins=8, min_vox=100, cg_iter=25):
    """x plus one constant per region (connected components of the map's quantile bins, >= min_vox
    voxels), the constants fitting the weighted field residual (CG on the normal equations)."""
    from scipy import ndimage as ndi

    from qsmkit.dipole import forward_field

    m = case.mask
    edges = np.quantile(x[m], np.linspace(0, 1, bins + 1)[1:-1])
    q = np.where(m, np.digitize(x, edges) + 1, 0)
    lab = np.zeros(m.shape, np.int64)
    n = 0
    for b in range(1, bins + 1):
        lb, k = ndi.label(q == b)
        if not k:
            continue
        sizes = np.bincount(lb.ravel(), minlength=k + 1)[1:]
        keep = np.flatnonzero(sizes >= min_vox) + 1
        remap = np.zeros(k + 1, np.int64)
        remap[keep] = np.arange(n + 1, n + 1 + keep.size)
        lab = np.where(lb > 0, remap[lb], lab)
        n += keep.size

    def A(v):
        return np.asarray(forward_field(v, case.voxel_size, case.b0_dir), np.float64) * m

    w = np.asarray(case.magnitude, np.float64) * m
    w2 = (w / w[m].mean()) ** 2

    def normal(c):
        g = A(w2 * A(np.concatenate([[0.0], c])[lab]))
        return np.bincount(lab.ravel(), weights=g.ravel(), minlength=n + 1)[1:]

    r0 = (np.asarray(case.field, np.float64) - A(x)) * m
    rhs = np.bincount(lab.ravel(), weights=A(w2 * r0).ravel(), minlength=n + 1)[1:]
    c, res = np.zeros(n), rhs.copy()
    p, rs = res.copy(), float(res @ res)
    for _ in range(cg_iter):
        ap = normal(p)
        a = rs / float(p @ ap)
        c += a * p
        res -= a * ap
        rs, rs_old = float(res @ res), rs
        p = res + rs / rs_old * p
    return x + np.concatenate([[0.0], c])[lab] * m, {"regions": int(n), "covered": float((lab[m] > 0).mean())}


def _tries(case, rule_alpha):
    from qsmkit.dipole import forward_field
    from qsmkit.inversion import INVERSION

    tv, focuss = INVERSION.get("tv").func, INVERSION.get("focuss").func
    args = (case.mask, case.voxel_size, case.b0_dir, case.magnitude)
    yield "tv, alpha x2", tv(case.field, *args, alpha=2 * rule_alpha)[0]
    yield "tv, edge_fraction 0.15", tv(case.field, *args, edge_fraction=0.15)[0]
    plain = {"alpha": 2 * rule_alpha, "edge_fraction": 0.0, "magnitude_weights": False}
    chi = np.asarray(tv(case.field, *args, **plain)[0])
    yield "plain TV, alpha x2", chi
    fit = np.asarray(forward_field(chi * case.mask, case.voxel_size, case.b0_dir))
    bregman = case.field + (case.field - fit) * case.mask
    yield "plain TV, alpha x2, 1 Bregman step", tv(bregman, *args, **plain)[0]
    x = np.asarray(focuss(case.field, *args)[0], np.float64)
    yield "focuss + region refit", region_refit(x, case)[0]


def _short(r):
    s = f"NRMSE {r['nrmse']:5.1f} %  XSIM {r['xsim']:.3f}"
    if "roi_slope" in r:
        s += f"  ROI slope {r['roi_slope']:.2f}  MAE {r['roi_mae_ppb']:.1f} ppb"
    return s


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", default="qsm2016", choices=cases.ALL)
    p.add_argument("--tries", action="store_true", help="also run the candidate fixes")
    p.add_argument("--out", default=str(ROOT / "bench-output" / "eval-diagnose"))
    a = p.parse_args(argv)
    from qsmkit.inversion import INVERSION

    case = cases.load(a.case)
    m = case.mask
    report = {"case": case.name, "maps": {}, "unexplained_field": {}, "tries": {}}
    alpha = None
    for name in ("tv", "focuss"):
        t0 = time.perf_counter()
        chi, info = INVERSION.get(name).func(case.field, m, case.voxel_size, case.b0_dir, case.magnitude)
        if name == "tv":
            alpha = info["alpha"]
        x = _demean(chi, m)
        print(f"[{name}] {time.perf_counter() - t0:.0f} s", flush=True)
        for tn, truth in case.truths.items():
            t = _demean(truth, m)
            cells, oracle = error_by_band(x, t, case)
            rep = {"score": score.score(chi, case, tn), "rim": error_by_rim(x, t, m), "bands": cells,
                   "oracle_band_gain_nrmse": oracle, "top_errors": top_error_share(x, t, m),
                   "power_ratio_total": float(x[m].var() / t[m].var()),
                   "correlation": float(np.corrcoef(x[m], t[m])[0, 1])}
            report["maps"][f"{name} vs {tn}"] = rep
            print(f"  vs {tn}: {_short(rep['score'])}; oracle band gains {oracle:.1f} %; "
                  f"power {rep['power_ratio_total']:.2f} x truth, corr {rep['correlation']:.3f}; "
                  f"top 1 / 10 % voxels {rep['top_errors']['top1pct']:.2f} / "
                  f"{rep['top_errors']['top10pct']:.2f} of the error")
            print("    rim (voxels from the edge: voxel share / error share): " + ", ".join(
                f"{s['shell_vox'][0]}-{s['shell_vox'][1]:g}: {s['voxels']:.2f}/{s['error_share']:.2f}"
                for s in rep["rim"]).replace("1e+09", "inf"))
            print("    |k| band   " + " | ".join(f"|D| {c['D'][0]}-{min(c['D'][1], 1):g}: err% pow gain"
                                            for c in cells[:len(D_BANDS) - 1]))
            for i in range(len(K_BANDS) - 1):
                row = cells[i * (len(D_BANDS) - 1):(i + 1) * (len(D_BANDS) - 1)]
                print(f"    {K_BANDS[i]:.2f}-{K_BANDS[i + 1]:.2f}  " + " | ".join(
                    f"{c['error_pct']:5.1f} {c['power_ratio']:5.2f} {c['gain']:5.2f}" for c in row))
    for tn, truth in case.truths.items():
        u = unexplained_field(case, truth)
        report["unexplained_field"][tn] = u
        print(f"field not explained by {tn}: RMS {u['rms_ppm']:.2e} ppm "
              f"({100 * u['rms_over_field']:.0f} % of the "
              f"field), Laplacian noise estimate {u['laplacian_noise_sd_ppm']:.2e} ppm, lag-1 correlation "
              + "/".join(f"{v:.2f}" for v in u["lag1_corr"]) + ", share above sigma 2/4/8 voxels "
              + "/".join(f"{v:.2f}" for v in u["low_pass_share"].values())
              + f"; field = {u['field_scale_on_truth']:.3f} x A {tn} (least squares)")
    if a.tries:
        for name, chi in _tries(case, alpha):
            rows = {tn: score.score(chi, case, tn) for tn in case.truths}
            report["tries"][name] = rows
            print(f"  {name:<36} " + " | ".join(f"{tn}: {_short(r)}" for tn, r in rows.items()), flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{case.name}.json").write_text(json.dumps(report, indent=1, default=float))
    print(f"wrote {out / (case.name + '.json')}")


if __name__ == "__main__":
    main()
