"""``tv``'s error as a function of its weight alpha on suite cases, and the alphas that the
discrepancy principle and the L-curve would pick.

    python -m benchmarks.eval.alpha_sweep --case qsm2016 --kappas 0.25 0.5 1 2 4 8 16
    python -m benchmarks.eval.alpha_sweep --case qsm2016 --param edge_fraction=0 magnitude_weights=False

alpha = kappa sigma h (sigma: the robust Laplacian noise estimate of the field, h: the geometric
mean voxel size; kappa 0.5 is the default rule). For every kappa: the suite's scores against
each truth (``score.score``), the weighted data residual RMS ||W M (A chi - delta)|| / sqrt(N)
over sigma (the discrepancy principle, Morozov 1966, picks the largest alpha with that ratio
<= tau = 1), and ||M_g G chi||_1 (the L-curve's other axis; its corner by the largest Menger
curvature as ``tv``'s ``alpha="lcurve"``). Where the error lies (``error_by_region``): the voxels
with an unpenalised gradient in any axis under the default edge mask (30 %), the veins (the
truth's top 2 % in the mask) and the rest, each with its share of NRMSE^2 (points of ||t||^2) and
the map's power there over the truth's. Quantities measured on the input, printed first: the
magnitude's SNR (99th percentile in the mask over its robust noise SD, as ``focuss``), the field's SNR
(its SD in the mask over sigma); and per map (and per truth) the edge enrichment: the mean |G chi| on
the default edge mask's gradients over the mean on all (1: the magnitude's edges are not chi's).
Writes ``bench-output/eval-alpha/<case>[-tag].json``.
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


def _value(s):
    for conv in (int, float):
        try:
            return conv(s)
        except ValueError:
            pass
    return {"True": True, "False": False}.get(s, s)


def data_terms(chi, case, info_edges):
    """(weighted residual RMS in ppm, ||M_g G chi||_1) of a map, as ``tv`` weighs them."""
    from qsmkit.dipole import forward_field
    from qsmkit.inversion_baselines import edge_mask

    m = case.mask
    chi = np.asarray(chi, np.float64)
    r = (np.asarray(forward_field(chi * m, case.voxel_size, case.b0_dir), np.float64)
         - np.asarray(case.field, np.float64)) * m
    w = np.ones(m.shape) if case.magnitude is None else np.asarray(case.magnitude, np.float64) * m
    w = w / w[m].mean()
    res = float(np.sqrt(((w * r)[m] ** 2).mean()))
    if case.magnitude is not None and info_edges > 0:
        mg = edge_mask(np.asarray(case.magnitude, np.float32), m, case.voxel_size, info_edges)
    else:
        mg = [np.ones(m.shape, np.float32)] * 3
    tvv = sum(float(np.abs(np.diff(chi, axis=ax, append=np.take(chi, [0], axis=ax)) / d * g).sum())
              for ax, (d, g) in enumerate(zip(case.voxel_size, mg)))
    return res, tvv


def error_by_region(chi, truth, case):
    """{region: (voxel share, points of NRMSE^2, map power / truth power)} for the default edge
    mask's voxels (any axis unpenalised, veins excluded), the veins (truth's top 2 %), the rest."""
    from qsmkit.inversion_baselines import edge_mask

    m = case.mask
    t = np.asarray(truth, np.float64)
    t = np.where(m, t - t[m].mean(), 0.0)
    x = np.asarray(chi, np.float64)
    x = np.where(m, x - x[m].mean(), 0.0)
    vein = m & (t > np.quantile(t[m], 0.98))
    if case.magnitude is not None:
        mg = edge_mask(np.asarray(case.magnitude, np.float32), m, case.voxel_size, 0.3)
        edge = m & ((mg[0] == 0) | (mg[1] == 0) | (mg[2] == 0)) & ~vein
    else:
        edge = np.zeros_like(m)
    tt = float((t[m] ** 2).sum())
    e2 = (x - t) ** 2
    out = {}
    for name, s in (("edges", edge), ("veins", vein), ("other", m & ~edge & ~vein)):
        if s.any():
            out[name] = (float(s.sum() / m.sum()), 100 * float(e2[s].sum()) / tt,
                         float(x[s].var() / t[s].var()))
    return out


def _edges(case):
    from qsmkit.inversion_baselines import edge_mask

    if case.magnitude is None:
        return None
    return edge_mask(np.asarray(case.magnitude, np.float32), case.mask, case.voxel_size, 0.3)


def edge_enrichment(chi, case, mg):
    """mean |G_i chi| over the edge mask's (unpenalised) gradients / mean over all, in the mask."""
    if mg is None:
        return None
    m = case.mask
    chi = np.asarray(chi, np.float64) * m
    g = np.concatenate([(np.abs(np.diff(chi, axis=ax, append=np.take(chi, [0], axis=ax))) / d)[m]
                        for ax, d in enumerate(case.voxel_size)])
    e = np.concatenate([(w == 0)[m] for w in mg])
    return float(g[e].mean() / g.mean())


def input_snrs(case, sigma):
    from qsmkit.inversion_base import noise_sd

    m = case.mask
    f = np.asarray(case.field, np.float64)[m]
    out = {"field_snr": float(f.std() / sigma)}
    if case.magnitude is not None:
        mag = np.asarray(case.magnitude, np.float32) * m
        s = noise_sd(mag, m)
        out["magnitude_snr"] = float(np.percentile(mag[m], 99) / s) if s > 0 else float("inf")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", default="qsm2016", choices=cases.ALL)
    p.add_argument("--kappas", nargs="+", type=float, default=[0.25, 0.5, 1, 2, 4, 8, 16])
    p.add_argument("--param", nargs="*", default=[], help="extra tv parameters, name=value")
    p.add_argument("--smooth-mm", type=float, default=0.0,
                   help="Gaussian SD (mm) applied to the magnitude that tv gets (edges and weights)")
    p.add_argument("--tag", default="")
    p.add_argument("--out", default=str(ROOT / "bench-output" / "eval-alpha"))
    a = p.parse_args(argv)
    from qsmkit.inversion import INVERSION
    from qsmkit.inversion_baselines import ALPHA_KAPPA

    tv = INVERSION.get("tv").func
    params = {k: _value(v) for k, v in (s.split("=", 1) for s in a.param)}
    case = cases.load(a.case)
    if a.smooth_mm > 0 and case.magnitude is not None:
        import dataclasses

        from scipy import ndimage as ndi

        mag = np.asarray(case.magnitude, np.float32) * case.mask
        sm = ndi.gaussian_filter(mag, [a.smooth_mm / v for v in case.voxel_size]).astype(np.float32)
        case = dataclasses.replace(case, magnitude=sm)
        params_note = f"magnitude smoothed {a.smooth_mm} mm"
    else:
        params_note = ""
    # the rule's alpha (kappa = ALPHA_KAPPA) gives sigma h
    _, info0 = tv(case.field, case.mask, case.voxel_size, case.b0_dir, case.magnitude, max_iter=1, **params)
    sigma, unit = info0["noise_sd_ppm"], info0["alpha"] / ALPHA_KAPPA
    snrs = input_snrs(case, sigma)
    mg = _edges(case)
    truth_enrich = {tn: edge_enrichment(t, case, mg) for tn, t in case.truths.items()}
    print(f"[{case.name}] sigma {sigma:.3e} ppm, sigma h {unit:.3e}; params {params} {params_note}; "
          + ", ".join(f"{k} {v:.1f}" for k, v in snrs.items()) + "; truth's edge enrichment "
          + ", ".join(f"{k} {v:.2f}" for k, v in truth_enrich.items() if v is not None), flush=True)
    rows = []
    for k in a.kappas:
        t0 = time.perf_counter()
        chi, info = tv(case.field, case.mask, case.voxel_size, case.b0_dir, case.magnitude,
                       alpha=k * unit, **params)
        sec = time.perf_counter() - t0
        res, tvv = data_terms(chi, case, info.get("edge_fraction", 0.0))
        row = {"kappa": k, "alpha": k * unit, "seconds": sec, "iterations": info["iterations"],
               "residual_rms_ppm": res, "residual_over_sigma": res / sigma, "tv_l1": tvv,
               "scores": {tn: score.score(chi, case, tn) for tn in case.truths},
               "regions": {tn: error_by_region(chi, t, case) for tn, t in case.truths.items()},
               "edge_enrichment": edge_enrichment(chi, case, mg)}
        rows.append(row)
        s = "  ".join(f"{tn}: {r['nrmse']:5.1f} % XSIM {r['xsim']:.3f}"
                      + (f" slope {r['roi_slope']:.2f} MAE {r['roi_mae_ppb']:4.1f}"
                         if "roi_slope" in r else "")
                      for tn, r in row["scores"].items())
        print(f"  kappa {k:6.3g}  res/sigma {res / sigma:5.2f}  TV {tvv:.3e}  {s}  ({sec:.0f} s)"
              + (f"  edge enrichment {row['edge_enrichment']:.2f}" if mg is not None else ""), flush=True)
        first = next(iter(case.truths))
        print("      " + first + ": " + ", ".join(
            f"{g} {v[0]:.2f} of voxels, {v[1]:.1f} pts, power {v[2]:.2f}"
            for g, v in row["regions"][first].items()), flush=True)
    ratios = [r["residual_over_sigma"] for r in rows]
    ok = [r["kappa"] for r in rows if r["residual_over_sigma"] <= 1.0]
    dp = max(ok) if ok else None
    corner = None
    if len(rows) >= 3:
        from qsmkit.inversion_baselines import _menger_corner

        srt = sorted(rows, key=lambda r: -r["kappa"])
        kc, _ = _menger_corner([r["residual_rms_ppm"] for r in srt], [r["tv_l1"] for r in srt])
        corner = srt[kc]["kappa"]
    print(f"discrepancy principle (tau 1): kappa {dp}; L-curve corner: kappa {corner}; "
          f"res/sigma {', '.join(f'{x:.2f}' for x in ratios)}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    name = case.name + (f"-{a.tag}" if a.tag else "")
    (out / f"{name}.json").write_text(json.dumps(
        {"case": case.name, "params": params, "sigma_ppm": sigma, "sigma_h": unit, **snrs,
         "truth_edge_enrichment": truth_enrich, "rows": rows,
         "discrepancy_kappa": dp, "lcurve_kappa": corner}, indent=1, default=float))
    print(f"wrote {out / (name + '.json')}")


if __name__ == "__main__":
    main()
