"""Background removal benchmark: every method on the built-in phantom (256x256x64, its air
cavities) and on the QSM challenge 2.0 head model (128x160x160 at 1.28 mm, when ../shared/data
is present; also at its native 0.64 mm, cropped to a slab), on the true total field.

Per method: median wall time of N runs, the ratio to the baseline measured in the same run (the
same PDF solver on a plain 2x-padded grid), CG iterations, peak numpy memory (tracemalloc),
NRMSE of the local field in the mask and in the mask eroded by 3 voxels, and the residual
background (the method applied to the true background alone, relative to the local field).
"""

from __future__ import annotations

import statistics
import time
import tracemalloc
from pathlib import Path

import numpy as np
from scipy import ndimage

from qsmkit import background, metrics

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"

METHODS = [
    ("pdf, 2x padding (baseline)", "pdf", {"pad": "2x"}),
    ("pdf", "pdf", {}),
    ("pdf, magnitude-weighted", "pdf", {"weights": "magnitude"}),
    ("vsharp", "vsharp", {}),
    ("resharp", "resharp", {}),
    ("tfi-fast (default)", "tfi-fast", {"magnitude": "magnitude"}),
    ("tfi (pdf + source prior)", "tfi", {"magnitude": "magnitude"}),
    ("tfi, no magnitude (plain TV)", "tfi", {}),
]
#: methods timed once (minutes per run on 2 cores)
SLOW = ("pdf, 2x padding (baseline)", "tfi (pdf + source prior)", "tfi, no magnitude (plain TV)")


def datasets():
    from qsmkit.simulate import make_phantom

    ph = make_phantom()
    yield ("phantom 256x256x64", ph.field_total, ph.field_local, ph.field_background, ph.mask,
           ph.voxel_size, ph.b0_dir, ph.magnitude)
    if (SHARED / "head-model").exists():
        from qsmkit.headmodel import load_head_model

        hm = load_head_model(SHARED / "head-model", block=2)
        yield ("head model 128x160x160", hm.field_total, hm.field_local, hm.field_background,
               hm.mask, hm.voxel_size, hm.b0_dir, gre_magnitude(hm))
        del hm
        # native 0.64 mm, cropped after simulation to a 102 x 123 x 82 mm field of view around
        # the deep gray matter: the brain mask is cut on every side, as in a slab acquisition
        crop = (slice(49, 209), slice(56, 248), slice(84, 212))
        hm = load_head_model(SHARED / "head-model", block=1, crop=crop)
        yield ("head model 0.64 mm crop 160x192x128", hm.field_total, hm.field_local,
               hm.field_background, hm.mask, hm.voxel_size, hm.b0_dir, gre_magnitude(hm))
    else:
        print(f"(head model skipped: {SHARED / 'head-model'} not present)")


def gre_magnitude(hm):
    """The magnitude of a 3 T, TE 20 ms, SNR 100 acquisition of the head model (realistic
    contrast and noise, for magnitude weights and TFI's edge prior)."""
    from qsmkit.headmodel import simulate_gre

    return simulate_gre(hm, te=(0.020,), b0=3.0, snr=100).magnitude[..., 0]


def run(repeats=5):
    rows = []
    for name, total, local, bg, mask, vox, b0, magnitude in datasets():
        eroded = ndimage.binary_erosion(mask, iterations=3)
        print(f"\nbackground removal on {name}, median of {repeats} runs")
        print(f"{'method':<30}{'median s':>9}{'x base':>8}{'iter':>6}{'peak MB':>9}"
              f"{'NRMSE %':>9}{'eroded %':>9}{'resid. bg %':>12}")
        base = None
        for label, method, params in METHODS:
            kw = dict(params)
            # "magnitude" stands for the data set's magnitude image (weights, TFI's edges)
            if "magnitude" in kw.values():
                if magnitude is None:
                    continue
                kw = {k: magnitude if v == "magnitude" else v for k, v in kw.items()}
            if kw.get("pad") == "2x":
                kw["pad"] = [n // 2 for n in total.shape]
            func = background.BACKGROUND.get(method).func
            times = []
            n_runs = 1 if label in SLOW else repeats
            for i in range(n_runs):
                if i == 0:
                    tracemalloc.start()
                t0 = time.perf_counter()
                est, valid, info = func(total, mask, vox, b0, **kw)
                times.append(time.perf_counter() - t0)
                if i == 0:
                    peak = tracemalloc.get_traced_memory()[1] / 2**20
                    tracemalloc.stop()
            med = statistics.median(times)
            base = med if base is None else base
            left, _, _ = func(bg, mask, vox, b0, **kw)
            row = {
                "dataset": name, "method": label, "median_s": med, "runs_s": times,
                "ratio_to_baseline": med / base, "iterations": info.get("iterations"),
                "peak_numpy_mb": peak,
                "nrmse": metrics.nrmse(est, local, valid),
                "nrmse_eroded": metrics.nrmse(est, local, valid & eroded),
                "residual_background": 100 * float(np.linalg.norm(left[valid])
                                                   / np.linalg.norm(local[valid])),
                "valid_fraction": float(valid.sum() / mask.sum()),
            }
            rows.append(row)
            it = "" if row["iterations"] is None else row["iterations"]
            print(f"{label:<30}{med:>9.2f}{med / base:>8.2f}{it:>6}{peak:>9.0f}"
                  f"{row['nrmse']:>9.1f}{row['nrmse_eroded']:>9.1f}{row['residual_background']:>12.1f}")
    return rows
