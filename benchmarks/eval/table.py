"""The suite's case x method table (markdown, with each NRMSE's ratio to the best peer on that
case/truth) and its figure (NRMSE and XSIM per case, ours against the best peer)."""

from __future__ import annotations

import math


def _f(v, fmt):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def best_peer(rows, key):
    """{(case, truth): the peer row with the lowest NRMSE}."""
    out = {}
    for r in rows:
        if r["source"] != "qsmrs":
            continue
        k = (r["case"], r["truth"])
        if k not in out or r["nrmse"] < out[k]["nrmse"]:
            out[k] = r
    return out


def markdown(rows):
    """One markdown table: case (role), truth, method, NRMSE % (ratio to the best peer), XSIM,
    HFEN, challenge RMSE, deep-gray NRMSE, ROI slope, ROI MAE (ppb), seconds."""
    best = best_peer(rows, "nrmse")
    head = ("| case | truth | method | NRMSE % | / best peer | XSIM | HFEN % | RMSE (2016) % | "
            "DGM NRMSE % | ROI slope | ROI MAE ppb | vessel | s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        b = best.get((r["case"], r["truth"]))
        ratio = r["nrmse"] / b["nrmse"] if b else None
        lines.append(
            f"| {r['case']} ({r['role']}) | {r['truth']} | {r['method']} | {_f(r['nrmse'], '.1f')} | "
            f"{_f(ratio, '.2f')} | {_f(r.get('xsim'), '.3f')} | {_f(r.get('hfen'), '.1f')} | "
            f"{_f(r.get('challenge_rmse'), '.1f')} | {_f(r.get('nrmse_dgm'), '.1f')} | "
            f"{_f(r.get('roi_slope'), '.2f')} | {_f(r.get('roi_mae_ppb'), '.1f')} | "
            f"{_f(r.get('vessel'), '.2f')} | {_f(r.get('seconds'), '.1f')} |")
    return "\n".join(lines)


def figure(rows, path, ours="qsmkit default"):
    """Bar chart: per case/truth, NRMSE and XSIM of ``ours`` beside the best peer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    best = best_peer(rows, "nrmse")
    mine = {(r["case"], r["truth"]): r for r in rows if r["method"] == ours}
    keys = [k for k in best if k in mine]
    if not keys:
        return None
    labels = [c if t == "truth" else f"{c}\n{t}" for c, t in keys]
    x = np.arange(len(keys))
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.1 * len(keys)), 7), sharex=True)
    for ax, key, name in ((axes[0], "nrmse", "NRMSE (%)"), (axes[1], "xsim", "XSIM")):
        ax.bar(x - 0.2, [mine[k][key] for k in keys], 0.4, label=ours)
        ax.bar(x + 0.2, [best[k][key] for k in keys], 0.4,
               label="best QSM.rs method per case")
        for i, k in enumerate(keys):
            ax.text(x[i] + 0.2, best[k][key], best[k]["method"].replace("qsmrs ", ""), ha="center",
                    va="bottom", fontsize=7)
        ax.set_ylabel(name)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[1].set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
    fig.suptitle("Dipole inversion suite (true local field in): qsmkit default vs QSM.rs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
