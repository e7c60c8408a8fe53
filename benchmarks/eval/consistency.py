"""Is a case's field the dipole field of its own chi truth on its grid? And how do inversion
variants rank when it is?

    python -m benchmarks.eval.consistency [--cases head-1mm head-aniso-noisy ...]
                                          [--e2e 3T-1mm-z 3T-aniso-tilt ...] [--methods default tv-aniso ...]

For each suite head case (``benchmarks/eval/cases.py``; the texture case is left out, its
noise-free field is not cached) and each end-to-end case (``benchmarks/e2e_cases.py``): the
NRMSE (%) of ``D chi_truth`` (``qsmkit.dipole.forward_field`` on the case's grid, chi taken
relative to its mean in the mask, half of each axis of zero padding) against the case's
noise-free local field. The suite's 1 mm heads and ``head-aniso-resampled`` resample the 0.64 mm
field and chi separately with qsm-forward's ``resize`` (point interpolation); ``head-aniso-noisy``
and the end-to-end cases average both over each voxel.

``--methods``: each named suite method (``benchmarks.eval.run.VARIANTS``) inverts, for each suite
head case, (a) the case's field and (b) a self-consistent one, ``D chi_truth`` plus the case's own
noise (its field minus its noise-free field), both scored against the same truth
(``benchmarks/eval/score.py``). Writes ``bench-output/eval-consistency/results.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from benchmarks.eval import cases, score

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "bench-output" / "eval-consistency"
HEADS = ("head-1mm", "head-1mm-noisy", "head-aniso-noisy", "head-aniso-resampled", "head-tilt-noisy")


def dipole_of(chi, mask, voxel_size, b0_dir):
    """D chi on the case's grid (chi relative to its mean in ``mask``, zero outside)."""
    from qsmkit.dipole import forward_field

    chi0 = np.where(mask, chi - chi[mask].mean(), 0).astype(np.float32)
    f = forward_field(chi0, voxel_size, b0_dir, pad=[n // 2 for n in chi0.shape])
    return (np.asarray(f) * mask).astype(np.float32)


def noise_free_field(case):
    """The suite head case's field before noise (its ``cases.HEAD_BUILDS`` entry's cache)."""
    return (cases.HEAD_BUILDS[case.name].noise_free()["field"] * case.mask).astype(np.float32)


def main(argv=None):
    from benchmarks import e2e_cases
    from benchmarks.eval.run import VARIANTS, run_ours

    from qsmkit import metrics

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", nargs="*", default=list(HEADS), choices=HEADS)
    p.add_argument("--e2e", nargs="*", default=[], choices=list(e2e_cases.CASES))
    p.add_argument("--methods", nargs="*", default=[], choices=list(VARIANTS))
    a = p.parse_args(argv)
    out = {"consistency": {}, "rows": []}
    for name in a.cases:
        case = cases.load(name)
        clean = noise_free_field(case)
        model = dipole_of(case.truths["truth"], case.mask, case.voxel_size, case.b0_dir)
        out["consistency"][name] = metrics.nrmse(model, clean, case.mask)
        print(f"{name}: D chi_truth against its noise-free field, NRMSE "
              f"{out['consistency'][name]:.1f} %", flush=True)
        given = case.field
        consistent = (model + (given - clean) * case.mask).astype(np.float32)
        for method in a.methods:
            for source, fld in (("case field", given), ("D chi_truth + noise", consistent)):
                case.field = fld
                chi, _, secs = run_ours(case, method)
                s = score.score(chi, case, "truth")
                row = {"case": name, "field": source, "method": method, "seconds": round(secs, 1),
                       **{k: s.get(k) for k in ("nrmse", "xsim", "roi_slope", "roi_mae_ppb")}}
                out["rows"].append(row)
                print(f"  {source:20s} {method:16s} NRMSE {row['nrmse']:.1f} %, XSIM "
                      f"{row['xsim']:.3f}, ROI slope {row['roi_slope']:.2f}, MAE "
                      f"{row['roi_mae_ppb']:.1f} ppb", flush=True)
    for name in a.e2e:
        c = e2e_cases.load(name)
        model = dipole_of(c.chi, c.mask, c.voxel_size, c.b0_dir)
        out["consistency"][name] = metrics.nrmse(model, c.field_local, c.mask)
        print(f"{name}: D chi_truth against its true local field, NRMSE "
              f"{out['consistency'][name]:.1f} %", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(out, indent=1))
    print(f"wrote {(OUT / 'results.json').relative_to(ROOT)}")


if __name__ == "__main__":
    main()
