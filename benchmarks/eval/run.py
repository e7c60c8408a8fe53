"""Run the dipole-inversion suite: every case through qsmkit's methods and QSM.rs's, in one run,
scored the same way; print the table, write it (``bench-output/eval/table.md``, ``rows.json``)
and the figure (``bench-output/eval/inversion.png``).

    python -m benchmarks.eval.run                       # all cases, default method list
    python -m benchmarks.eval.run --cases head-1mm qsm2016 --methods default tv --peers tv rts

Methods: ``default`` is ``qsmkit invert`` with no parameters (the registry's default); the other
names are registry methods or variants from ``VARIANTS``. Cases are cached under
``bench-output/eval-cases``, QSM.rs results under ``bench-output/eval-peers``.
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

from benchmarks.eval import cases, peers, score, table  # noqa: E402

#: qsmkit methods of the suite: name -> (registry method, parameters)
VARIANTS = {
    "default": (None, {}),
    "focuss": ("focuss", {}),
    "focuss-noprior": ("focuss", {"prior": "none"}),
    "tv": ("tv", {}),
    "tv-noprior": ("tv", {"magnitude_weights": False, "edge_fraction": 0.0}),
    "tv-edge-half": ("tv", {"edge_weight": 0.5}),
    "tv-edge-0.15": ("tv", {"edge_fraction": 0.15}),
    "tv-iter100": ("tv", {"max_iter": 100}),
    "tv-nobalance": ("tv", {"balance": False}),
    # the thick-slice rule (README "Thick slices"; tv's default since session 13): alpha's noise
    # SD from the physical Laplacian (per mm^2) and the edge share scaled with the voxels'
    # anisotropy (``edge_share``), both (``tv-aniso``) and each alone; ``tv-voxlap`` is the
    # former default (voxel Laplacian, 30 % edges)
    "tv-aniso": ("tv", {"noise_laplacian": "physical", "edge_fraction": "voxel"}),
    "tv-physlap": ("tv", {"noise_laplacian": "physical", "alpha_h": "geometric", "edge_fraction": 0.3}),
    "tv-physlap-harm": ("tv", {"noise_laplacian": "physical", "alpha_h": "harmonic", "edge_fraction": 0.3}),
    "tv-voxlap": ("tv", {"noise_laplacian": "voxel", "alpha_h": "geometric", "edge_fraction": 0.3}),
    "tv-edge-voxel": ("tv", {"noise_laplacian": "voxel", "edge_fraction": "voxel"}),
    # the edge share by the mean voxel edge against 1 mm (README, "Held-out geometries")
    "tv-edge-size": ("tv", {"noise_laplacian": "voxel", "edge_fraction": "size"}),
    # the edge share from the magnitude's own noise (``inversion_baselines.edge_share_from_noise``)
    "tv-edge-noise": ("tv", {"noise_laplacian": "voxel", "edge_fraction": "noise"}),
    # alpha = 0.5 sigma x 1 mm: the same contrast loss on a structure of a given size at any voxel
    # size (``alpha_h="unit"``), with the physical Laplacian, and with the edge share by size too
    "tv-unit-h": ("tv", {"noise_laplacian": "physical", "alpha_h": "unit", "edge_fraction": 0.3}),
    "tv-unit-h-size": ("tv", {"noise_laplacian": "physical", "alpha_h": "unit", "edge_fraction": "size"}),
    "l2": ("l2", {}),
    # FOCUSS at a fixed edge trust t (``focuss.rule_parameters``), the sweep that chose SNR_HIGH
    **{f"focuss-t{t:g}": ("focuss", {"edge_trust": t}) for t in (0.0, 0.21, 0.45, 0.6, 0.8, 1.0)},
    "tkd": ("tkd", {}),
}
DEFAULT_METHODS = ("default", "focuss")  # the default (tv) and the project's original method


def run_ours(case, name):
    from qsmkit.inversion import INVERSION

    method, params = VARIANTS[name]
    func = INVERSION.get(method).func
    if "edge_trust" in params:
        from qsmkit.focuss import rule_parameters

        params = rule_parameters(params["edge_trust"])
    t0 = time.perf_counter()
    chi, info = func(case.field, case.mask, case.voxel_size, case.b0_dir, case.magnitude, **params)
    return np.asarray(chi), info, time.perf_counter() - t0


def rows_for(case, method, source, chi, seconds, info=None):
    out = []
    for truth in case.truths:
        r = {"case": case.name, "role": case.role, "truth": truth, "method": method, "source": source,
             "seconds": seconds, **score.score(chi, case, truth)}
        if info:
            keys = ("method", "alpha", "iterations", "noise_sd_ppm", "stopped_by", "mu1", "mu2", "residuals")
            r["info"] = {k: info[k] for k in keys if k in info}
        out.append(r)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=list(cases.ALL), choices=cases.ALL)
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=list(VARIANTS))
    p.add_argument("--peers", nargs="*", default=None, choices=peers.DIPOLE,
                   help=f"QSM.rs methods (default, and a bare --peers: {' '.join(peers.DEFAULT_DIPOLE)})")
    p.add_argument("--no-peers", action="store_true", help="run no QSM.rs method")
    p.add_argument("--out", default=str(ROOT / "bench-output" / "eval"))
    a = p.parse_args(argv)
    a.peers = [] if a.no_peers else (a.peers or list(peers.DEFAULT_DIPOLE))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    why = peers.available()
    if why and a.peers:
        print(f"skipping the peer: {why}", flush=True)
    rows = []
    for name in a.cases:
        t0 = time.perf_counter()
        case = cases.load(name)
        print(f"[{name}] {case.shape} {case.voxel_size} mm ({case.role}; {time.perf_counter() - t0:.0f} s "
              f"to load)", flush=True)
        for m in a.methods:
            chi, info, sec = run_ours(case, m)
            new = rows_for(case, m if m != "default" else "qsmkit default", "qsmkit", chi, sec, info)
            rows += new
            print(f"  {new[0]['method']:<18} NRMSE {new[0]['nrmse']:6.1f} %  XSIM {new[0]['xsim']:.3f}  "
                  f"ROI slope {new[0].get('roi_slope', float('nan')):.2f}  {sec:.1f} s", flush=True)
        if len(case.truths) > 1:  # how far the references are from each other (2016: COSMOS vs chi_33)
            first, *others = list(case.truths)
            for other in others:
                r = {"case": case.name, "role": case.role, "truth": first, "method": f"reference {other}",
                     "source": "reference", "seconds": None,
                     **score.score(case.truths[other], case, first)}
                rows.append(r)
                print(f"  {r['method']:<18} NRMSE {r['nrmse']:6.1f} %  ROI slope "
                      f"{r.get('roi_slope', 0):.2f}  MAE {r.get('roi_mae_ppb', 0):.1f} ppb (against {first})",
                      flush=True)
        if not why:
            for m in a.peers:
                chi, info = peers.dipole_cached(case, m)
                new = rows_for(case, f"qsmrs {m}", "qsmrs", chi, info["seconds"])
                rows += new
                print(f"  {new[0]['method']:<18} NRMSE {new[0]['nrmse']:6.1f} %  XSIM {new[0]['xsim']:.3f}  "
                      f"ROI slope {new[0].get('roi_slope', float('nan')):.2f}  {info['seconds']:.1f} s"
                      f"{' (cached)' if info.get('cached') else ''}", flush=True)
    md = table.markdown(rows)
    print(md)
    (out / "table.md").write_text(md + "\n")
    (out / "rows.json").write_text(json.dumps(rows, indent=1, default=float))
    fig = table.figure(rows, out / "inversion.png")
    print(f"wrote {out / 'table.md'}, {out / 'rows.json'}" + (f", {fig}" if fig else ""))


if __name__ == "__main__":
    main()
