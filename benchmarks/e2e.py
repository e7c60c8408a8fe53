"""End-to-end benchmark: from multi-echo magnitude and phase to chi and deep-gray values, on full
simulations of the head model (``benchmarks/e2e_cases.py``), with QSM.rs side by side and
truth-substitution rows that show where accuracy is lost. ``make eval-e2e`` runs it:

    python -m benchmarks.e2e [--cases 3T-1mm-z ...] [--tfi-on CASE ...] [--peer-pdf-on CASE ...] [--quick]
                             [--inversion-param KEY=VALUE ...] [--zero-weight-unresolved]

(the ``tfi`` rows and QSM.rs' PDF are opt-in per case: each takes many minutes on 2 cores)

Per case (the true brain mask is given to every pipeline; masking is not measured here):

- ``qsmkit default``: the default methods (what ``qsmkit run`` does with no method options),
  called stage by stage as ``run_pipeline`` calls them, so the field can be checked as well.
- ``qsmkit bg=<m>``: the same with each other background method of interest.
- truth substitution, default methods: ``field: truth`` (the true total field into the default
  background removal and inversion), ``local: truth`` (the true local field into the default
  inversion). The gap between consecutive rows is what that stage loses.
- QSM.rs (``../shared/peers/qsmrs``, via ``benchmarks/eval/peers.py``): our total field (QSM.rs'
  command line exposes no multi-echo field fit) through QSM.rs background removal (V-SHARP, PDF)
  and inversion (TV, RTS); ``bg=ours + qsmrs <inv>``: our default local field through QSM.rs'
  inversion. ``best QSM.rs`` in the summary is the best of the pure QSM.rs-stage rows by NRMSE.

Scores: QSM-CI's scorer (``benchmarks/eval/score.py``: NRMSE, XSIM, deep-gray NRMSE, ...) and
deep-gray ROI means (caudate, globus pallidus, putamen, red nucleus, dentate, substantia nigra,
thalamus) relative to CSF: ``slope`` and ``MAE`` against the truth's ROI means relative to the
true CSF label (``roi_*``), and the same with both maps referenced to the automatic ventricular
CSF mask of ``qsmkit.csf`` (from the case's own R2*: ``auto_*``, as ``qsmkit run`` reports them).
Cases: the four head-model simulations and the QSM-CI-style one built with qsm-forward's
acquisition model (``benchmarks/e2e_cases.py``). Field checks: NRMSE of the
total field, and the share of brain voxels whose unwrapped phase is exact (every echo within
pi of the truth, after removing the one global multiple of 2 pi per echo). Background split: the
default background removal applied to the true local field alone (what of the brain's own field
it loses) and to the true background alone (what it leaves).

Writes ``bench-output/e2e/results.json``, ``bench-output/e2e/table.md`` and
``Resources/Screenshots/e2e.png``; prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import platform
import time
from pathlib import Path

import numpy as np
from benchmarks import e2e_cases
from benchmarks.eval import peers, score

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench-output" / "e2e"
FIGURE = ROOT / "Resources" / "Screenshots" / "e2e.png"
PEER_BFR = ("vsharp", "pdf")
PEER_INV = ("tv", "rts")
#: parameters of the default inversion in every qsmkit row (``--inversion-param``), as
#: ``qsmkit run --inversion-param`` passes them: to measure a variant end to end
INVERSION_PARAMS: dict = {}
#: ``qsmkit run --zero-weight-unresolved`` in every qsmkit row (``--zero-weight-unresolved``)
ZERO_WEIGHT_UNRESOLVED = False


class ScoreCase:
    """What ``benchmarks.eval.score.score`` reads from a case. The case's chi is relative to air
    (about -9.2 ppm in the brain); ``score.score`` takes both maps relative to their mean in the
    mask, which XSIM, unlike NRMSE, needs (it came out 0.000 for every map before it did)."""

    def __init__(self, c: e2e_cases.E2ECase):
        self.name = c.name
        self.mask = c.mask
        self.truths = {"chi": c.chi}
        self.labels = c.labels
        self.rois = dict(e2e_cases.DGM)
        self.reference = e2e_cases.CSF
        self.seg = c.labels
        self.vessel = None


def auto_csf(c):
    """The automatic CSF mask and its record, found as ``qsmkit run`` finds it
    (``qsmkit.reference.find_reference("auto", ...)``: from R2* with two or more echoes, else from
    the magnitude; the whole mask if no CSF is found)."""
    from qsmkit.reference import find_reference

    region, info = find_reference("auto", c.mask, c.voxel_size, magnitude=c.magnitude, te=c.te)
    return region, info.get("csf", info)


def auto_csf_scores(chi, c, csf_mask):
    """Deep-gray means of ``chi`` relative to its mean in ``csf_mask`` (the automatic CSF mask,
    as ``qsmkit run`` references them) against the truth's relative to the truth's mean in the
    same region, as a user's table would compare them. That region lies in the ventricles (its
    truth is the pure CSF value to 0.03 ppb on these cases); an eroded CSF label is not pure at
    2.5 mm slices (3.4 ppb above it), which had flattered this score by up to 3.4 ppb."""
    ours, ref = [], []
    for lab in e2e_cases.DGM.values():
        r = c.mask & (c.labels == lab)
        if r.sum() < 5:
            continue
        ours.append(1000 * (chi[r].mean() - chi[csf_mask].mean()))
        ref.append(1000 * (c.chi[r].mean() - c.chi[csf_mask].mean()))
    a, b = np.array(ref), np.array(ours)
    return {"auto_slope": float(np.polyfit(a, b, 1)[0]), "auto_mae_ppb": float(np.mean(np.abs(a - b)))}


def unwrap_exact(unwrapped, c):
    """Share of brain voxels whose every echo's unwrapped phase is within pi of the truth, after
    removing each echo's most common multiple of 2 pi (a global offset changes no field)."""
    m = c.mask
    ok = np.ones(int(m.sum()), bool)
    for e in range(unwrapped.shape[-1]):
        k = np.rint((unwrapped[..., e][m] - c.true_phase[..., e][m]) / (2 * np.pi)).astype(int)
        ok &= k == np.bincount(k - k.min()).argmax() + k.min()
    return float(ok.mean())


def field_stage(c):
    """The pipeline's field stage, run alone so its unwrapped echoes can be checked."""
    from qsmkit.echoes import combine_magnitude, fit_field
    from qsmkit.unwrapping import UNWRAPPING

    mag3 = combine_magnitude(c.magnitude)
    unwrap = UNWRAPPING.get("auto").func

    def unwrap3(p, mask=None):
        return unwrap(p, mask=mask, voxel_size=c.voxel_size, magnitude=mag3)

    return fit_field(c.magnitude, c.phase, c.te, c.b0, unwrap3, c.mask), mag3


def run_stages(c, field_total, weights, mag3, background=None, local=None, local_mask=None,
               unknown=None):
    """Default (or named) background removal and the default inversion, as the pipeline calls
    them; ``unknown``: the voxels whose field the pipeline does not know (``weights`` already
    zero there), which get zero data weight in the inversion too."""
    from qsmkit.background import BACKGROUND
    from qsmkit.inversion import INVERSION
    from qsmkit.pipeline import accepts, inversion_noise_weights

    t0 = time.perf_counter()
    if local is None:
        bg = BACKGROUND.get(background)
        kw = {"weights": weights}
        if accepts(bg.func, "magnitude"):
            kw["magnitude"] = mag3
        local, local_mask, _ = bg.func(field_total, c.mask, c.voxel_size, c.b0_dir, **kw)
    inv = INVERSION.get("auto").func
    params = dict(INVERSION_PARAMS)
    if unknown is not None and unknown.any():
        params.update(inversion_noise_weights(inv, params, mag3, unknown))
    chi, _ = inv(local, local_mask, c.voxel_size, c.b0_dir, magnitude=mag3, **params)
    return np.asarray(chi), np.asarray(local), time.perf_counter() - t0


def background_split(c, method, mag3):
    """What background removal ``method`` does to each part of the true total field alone: the
    true local field (``local_kept``: NRMSE of what comes out against it, the brain's own field
    the method loses) and the true background (``background_left``: what comes out, as a share of
    the local field's norm). Background removal is linear for PDF and nearly so for TFI, so the
    two say which part its error in the default row comes from. Both run unweighted (the default
    row uses the field fit's noise weights)."""
    from qsmkit import metrics
    from qsmkit.background import BACKGROUND
    from qsmkit.pipeline import accepts

    bg = BACKGROUND.get(method)
    kw = {"magnitude": mag3} if accepts(bg.func, "magnitude") else {}
    kept = np.asarray(bg.func(c.field_local, c.mask, c.voxel_size, c.b0_dir, **kw)[0])
    left = np.asarray(bg.func(c.field_total - c.field_local, c.mask, c.voxel_size, c.b0_dir,
                              **kw)[0])
    norm = float(np.sqrt((c.field_local[c.mask].astype(np.float64) ** 2).sum()))
    return {"local_kept_nrmse": metrics.nrmse(kept, c.field_local, c.mask),
            "background_left_percent": 100 * float(np.sqrt((left[c.mask].astype(np.float64) ** 2)
                                                           .sum())) / norm}


def digest(data) -> str:
    """A short hash of an array's values: the peers' cache key, so that a changed input (our
    field or local field after a change to our stages) is never answered from a stale cache."""
    return hashlib.sha1(np.ascontiguousarray(data, dtype=np.float32).tobytes()).hexdigest()[:12]


def peer(c, stage, method, data, mask, tag):
    """QSM.rs ``stage``/``method`` on ``data``, cached under bench-output/e2e/peers, keyed by
    the case, the tag and ``data``'s hash."""
    d = OUT / "peers"
    d.mkdir(parents=True, exist_ok=True)
    key = digest(data)
    npy, js = d / f"{c.name}__{tag}.npy", d / f"{c.name}__{tag}.json"
    if npy.exists() and js.exists():
        info = json.loads(js.read_text())
        if info.get("input_sha1") == key:
            return np.load(npy), info
    out, _, info = peers.run(stage, method, data, mask, c.voxel_size, c.b0_dir, b0_t=c.b0)
    out = (out * mask).astype(np.float32)
    info["input_sha1"] = key
    np.save(npy, out)
    js.write_text(json.dumps(info))
    return out, info


def evaluate(c, with_tfi=True, peer_pdf=True, log=print, quick=False):
    """Rows (one per pipeline) and the case's field checks; ``quick``: the default pipeline and
    the truth-substitution rows only."""
    from qsmkit import metrics
    from qsmkit.background import BACKGROUND
    from qsmkit.pipeline import known_field_weights

    sc = ScoreCase(c)
    auto_csf_region, csf_info = auto_csf(c)
    rows = []

    def add(name, chi, seconds, local=None, kind="qsmkit"):
        row = {"case": c.name, "row": name, "kind": kind, "seconds": round(seconds, 1)}
        s = score.score(chi, sc, "chi")
        row.update({k: s.get(k) for k in ("nrmse", "xsim", "nrmse_dgm", "roi_slope", "roi_mae_ppb",
                                           "roi_means_ppb", "roi_truth_ppb")})
        row.update(auto_csf_scores(chi, c, auto_csf_region))
        if local is not None:
            row["local_nrmse"] = metrics.nrmse(local, c.field_local, c.mask)
        rows.append(row)
        log(f"  {c.name} | {name}: NRMSE {row['nrmse']:.1f} %, XSIM {row['xsim']:.3f}, "
            f"slope {row['roi_slope']:.2f}, MAE {row['roi_mae_ppb']:.1f} ppb (auto-CSF "
            f"{row['auto_slope']:.2f} / {row['auto_mae_ppb']:.1f}), {row['seconds']} s")
        return row

    default_bg = BACKGROUND.resolve("auto")
    # the default pipeline, stage by stage as run_pipeline calls them (given mask, field fit with
    # the default unwrapping, default background removal with the fit's noise weights and the
    # magnitude, default inversion with the magnitude), so its field can be checked too
    t0 = time.perf_counter()
    fit, mag3 = field_stage(c)
    weights, unknown = known_field_weights(fit, c.mask)
    n_unresolved = int(unknown.sum())
    if not ZERO_WEIGHT_UNRESOLVED:
        weights, unknown = fit.weights, None
    t_field = time.perf_counter() - t0
    chi, local_default, s = run_stages(c, fit.field_ppm, weights, mag3, background=default_bg,
                                       unknown=unknown)
    add(f"qsmkit default (bg={default_bg})", chi, t_field + s, local_default)
    stage_s = {"field": round(t_field, 1), "background + inversion": round(s, 1)}
    field_checks = {"field_nrmse": metrics.nrmse(fit.field_ppm, c.field_total, c.mask),
                    "unwrap_exact": unwrap_exact(fit.unwrapped_phase, c),
                    "unresolved_voxels": n_unresolved,
                    **background_split(c, default_bg, mag3)}
    log(f"  {c.name} | field NRMSE {field_checks['field_nrmse']:.2f} %, unwrapped exact "
        f"{100 * field_checks['unwrap_exact']:.3f} %; {default_bg} on the true local field alone "
        f"{field_checks['local_kept_nrmse']:.1f} %, on the true background alone "
        f"{field_checks['background_left_percent']:.1f} % left")
    others = [m for m in ("pdf", "tfi-fast", "tfi") if m != default_bg and (with_tfi or m != "tfi")
              and not quick]
    for m in others:
        chi, loc, s = run_stages(c, fit.field_ppm, weights, mag3, background=m, unknown=unknown)
        add(f"qsmkit bg={m}", chi, s + t_field, loc)
    chi, loc, s = run_stages(c, c.field_total, fit.weights, mag3, background=default_bg)
    add("truth: field", chi, s, loc, kind="truth")
    chi, _, s = run_stages(c, None, None, mag3, local=c.field_local, local_mask=c.mask)
    add("truth: field + local field", chi, s, c.field_local, kind="truth")

    why = "--quick" if quick else peers.available()
    if why is None:
        bfrs = [b for b in PEER_BFR if peer_pdf or b != "pdf"]
        for b in bfrs:
            loc, info = peer(c, "bfr", b, fit.field_ppm, c.mask, f"bfr-{b}")
            for inv in PEER_INV:
                chi, info2 = peer(c, "dipole", inv, loc, c.mask, f"bfr-{b}__{inv}")
                add(f"QSM.rs {b} + {inv}", chi, info.get("seconds", 0) + info2.get("seconds", 0),
                    loc, kind="qsmrs")
        for inv in PEER_INV:
            chi, info2 = peer(c, "dipole", inv, local_default, c.mask, f"ours-{default_bg}__{inv}")
            add(f"bg=ours + QSM.rs {inv}", chi, info2.get("seconds", 0), kind="mixed")
    else:
        log(f"  QSM.rs rows skipped: {why}")
    return rows, {"case": c.name, **field_checks, "stage_seconds": stage_s,
                  "csf": csf_info, "shape": list(c.mask.shape), "voxel_size": list(c.voxel_size),
                  "b0": c.b0, "b0_dir": [round(v, 4) for v in c.b0_dir], "te": list(c.te)}


def table(rows, checks):
    def f(v, p=1):
        return "" if v is None else f"{v:.{p}f}"

    lines = ["| case | pipeline | chi NRMSE % | XSIM | DGM NRMSE % | slope | MAE ppb | "
             "slope (auto CSF) | MAE ppb (auto CSF) | local NRMSE % | s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['row']} | {f(r['nrmse'])} | {f(r.get('xsim'), 3)} | "
                     f"{f(r['nrmse_dgm'])} | {f(r['roi_slope'], 2)} | {f(r['roi_mae_ppb'])} | "
                     f"{f(r['auto_slope'], 2)} | {f(r['auto_mae_ppb'])} | {f(r.get('local_nrmse'))} | "
                     f"{f(r['seconds'])} |")
    lines += ["", "| case | total field NRMSE % | unwrapped voxels exact % | default background "
                  "on the true local field alone: NRMSE % | on the true background alone: left, "
                  "% of the local field | auto CSF mL | field s / background + inversion s "
                  "(default) |", "|---|---|---|---|---|---|---|"]
    for k in checks:
        st = k["stage_seconds"]
        lines.append(f"| {k['case']} | {k['field_nrmse']:.2f} | {100 * k['unwrap_exact']:.3f} | "
                     f"{f(k.get('local_kept_nrmse'))} | {f(k.get('background_left_percent'))} | "
                     f"{k['csf']['volume_ml']} | {st['field']:.1f} / "
                     f"{st['background + inversion']:.1f} |")
    return "\n".join(lines)


def figure(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(r["case"] for r in rows))
    fig, axes = plt.subplots(1, len(cases), figsize=(4.2 * len(cases), 4.2), squeeze=False)
    for ax, case in zip(axes[0], cases):
        rs = [r for r in rows if r["case"] == case]
        truth = rs[0]["roi_truth_ppb"]
        names = list(truth)
        x = np.array([truth[n] for n in names])
        pick = [r for r in rs if r["kind"] in ("qsmkit", "truth")][:1]
        q = [r for r in rs if r["kind"] == "qsmrs"]
        if q:
            pick.append(min(q, key=lambda r: r["nrmse"]))
        pick += [r for r in rs if r["row"] == "truth: field + local field"]
        for r, mk in zip(pick, ("o", "s", "^")):
            y = np.array([r["roi_means_ppb"][n] for n in names])
            ax.plot(x, y, mk, label=f"{r['row']} (NRMSE {r['nrmse']:.0f} %)")
        lim = [min(x.min(), 0) - 10, x.max() + 20]
        ax.plot(lim, lim, "k:", lw=1)
        ax.set_xlim(lim)
        ax.set_ylim(lim)
        ax.set_title(case, fontsize=10)
        ax.set_xlabel("true chi - CSF (ppb)")
        ax.set_ylabel("measured chi - CSF (ppb)")
        ax.legend(fontsize=6, loc="upper left")
    fig.suptitle("Deep-gray nuclei relative to CSF, end to end (python -m benchmarks.e2e)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    names = list(e2e_cases.CASES) + list(e2e_cases.QSMFORWARD_CASES)
    p.add_argument("--cases", nargs="+", default=names, choices=names + list(e2e_cases.HELDOUT_CASES),
                   help="default: the five cases of the README table; also the held-out geometries "
                        "of e2e_cases.HELDOUT_CASES, by name")
    p.add_argument("--tfi-on", nargs="*", default=[],
                   help="cases with a tfi (200 iterations) row (opt-in: minutes per case)")
    p.add_argument("--peer-pdf-on", nargs="*", default=[],
                   help="cases with QSM.rs PDF rows (opt-in: QSM.rs PDF did not finish within "
                        "15 minutes per case on 2 cores)")
    p.add_argument("--no-figure", action="store_true")
    p.add_argument("--quick", action="store_true",
                   help="only the default pipeline and the truth-substitution rows (no other "
                        "background methods, no QSM.rs)")
    p.add_argument("--part", metavar="NAME",
                   help="write bench-output/e2e/NAME.json only (no table or figure): to run cases "
                        "in several processes, then --combine")
    p.add_argument("--combine", nargs="+", metavar="NAME",
                   help="make the table and figure from parts written with --part, run nothing")
    p.add_argument("--inversion-param", nargs="+", default=[], metavar="KEY=VALUE",
                   help="parameters of the default inversion in every qsmkit row (values read "
                        "as JSON, else as text), e.g. noise_laplacian=physical")
    p.add_argument("--zero-weight-unresolved", action="store_true",
                   help="as qsmkit run --zero-weight-unresolved in every qsmkit row")
    a = p.parse_args(argv)
    global ZERO_WEIGHT_UNRESOLVED
    ZERO_WEIGHT_UNRESOLVED = a.zero_weight_unresolved
    for kv in a.inversion_param:
        key, sep, val = kv.partition("=")
        if not sep or not key:
            p.error(f"--inversion-param: expected KEY=VALUE, got {kv!r}")
        try:
            INVERSION_PARAMS[key] = json.loads(val)
        except json.JSONDecodeError:
            INVERSION_PARAMS[key] = val
    rows, checks = [], []
    if a.combine:
        for part in a.combine:
            d = json.loads((OUT / f"{part}.json").read_text())
            rows += d["rows"]
            checks += d["checks"]
        return report(rows, checks, a.no_figure)
    for name in a.cases:
        c = e2e_cases.load(name)
        print(f"{name}: {c.mask.shape} voxels {c.voxel_size} mm, {c.b0} T, B0 {c.b0_dir}", flush=True)
        r, k = evaluate(c, with_tfi=name in a.tfi_on, peer_pdf=name in a.peer_pdf_on,
                        log=lambda s: print(s, flush=True), quick=a.quick)
        rows += r
        checks.append(k)
        del c
        if a.part:  # after every case, so a long run keeps what it has
            OUT.mkdir(parents=True, exist_ok=True)
            (OUT / f"{a.part}.json").write_text(json.dumps({
                "rows": rows, "checks": checks, "inversion_params": INVERSION_PARAMS,
                "zero_weight_unresolved": ZERO_WEIGHT_UNRESOLVED}, indent=1))
    if a.part:
        return
    report(rows, checks, a.no_figure)


def report(rows, checks, no_figure=False):
    text = table(rows, checks)
    print(text)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "table.md").write_text(text + "\n")
    (OUT / "results.json").write_text(json.dumps({
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()}", "inversion_params": INVERSION_PARAMS,
        "zero_weight_unresolved": ZERO_WEIGHT_UNRESOLVED, "rows": rows, "checks": checks}, indent=1))
    if not no_figure:
        figure(rows, FIGURE)
        print(f"figure: {FIGURE.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
