"""Embedded masking and spatial unwrapping benchmark on the built-in phantom (256x256x64,
0.9375x0.9375x2.5 mm): 3 T, TE 20 ms, SNR 100, with the smooth receiver phase offset.

Per method: median wall time of N runs after one untimed first call (which loads numba's
on-disk cache, or compiles on a fresh machine; its time is the "first s" column), the ratio
to the baseline measured in the same run (scikit-image's ``unwrap_phase`` for the unwrappers,
the Otsu ``threshold`` mask for the masks), peak numpy memory of one run (tracemalloc; numba
allocates its few small work arrays outside it), and the accuracy against the truth: Dice with
the brain mask for masks; for unwrappers, the share of voxels whose phase is right up to one
global 2 pi multiple, in the true brain mask and in the ``surface`` mask the pipeline uses
(which stays 2 mm from the skull; the phantom's sharp-edged skull makes the true phase alias in
the outermost CSF layer, where no spatial unwrapper can be right).

Measured (2 cores shared with other work, load 3-5, 2026-12-07; ``python benchmarks/unwrap_mask.py``;
numba cache warm; the "x base" ratios carry across loads better than the seconds):

    method                       median s  first s  x base  peak MB  accuracy
    mask: threshold (baseline)       0.86     0.77    1.00       66  Dice 1.0000
    mask: surface                    3.32     3.66    3.86      144  Dice 0.9718
    unwrap: quality (skimage, base)  1.69     1.53    1.00      104  right 98.857 % brain / 99.935 % surface
    unwrap: romeo                    0.70     0.97    0.42      219  right 99.333 % / 99.992 %
    unwrap: romeo + magnitude        1.05     0.85    0.62      219  right 99.333 % / 99.992 %
    unwrap: romeo, whole FOV         4.13     4.86    2.44      342  right 99.343 % / 99.987 %
    unwrap: laplacian                0.71     1.14    0.42      127  (not congruent)

On a machine without numba's cache the first ``romeo`` call compiles for about 2 s and the first
``surface`` call for about 1 s; a new process then loads the cache in about 0.3 s.
"""

from __future__ import annotations

import statistics
import sys
import time
import tracemalloc

import numpy as np

from qsmkit import masking, units, unwrapping
from qsmkit.simulate import make_phantom, simulate_acquisition

TE, B0 = 0.020, 3.0


def _timed(func, args, kwargs, repeats):
    t0 = time.perf_counter()
    out = func(*args, **kwargs)
    first = time.perf_counter() - t0
    times = []
    for i in range(repeats):
        if i == 0:
            tracemalloc.start()
        t0 = time.perf_counter()
        out = func(*args, **kwargs)
        times.append(time.perf_counter() - t0)
        if i == 0:
            peak = tracemalloc.get_traced_memory()[1] / 2**20
            tracemalloc.stop()
    return out, first, times, peak


def right_fraction(unwrapped, truth, mask):
    """Share of ``mask`` voxels equal to ``truth`` up to the most common 2 pi multiple."""
    k = np.round((unwrapped - truth) / (2 * np.pi))[mask]
    if k.size == 0:
        return float("nan")
    _, counts = np.unique(k, return_counts=True)
    return float(counts.max() / k.size)


def dice(a, b):
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def run(repeats=5):
    ph = make_phantom()
    acq = simulate_acquisition(ph, te=(TE,), b0=B0, snr=100, phase_offset=True, seed=0)
    mag, phase = acq.magnitude[..., 0], acq.phase[..., 0]
    truth = units.ppm_to_rad(ph.field_total, B0, TE) + acq.phase_offset
    vs = ph.voxel_size
    rows = []
    print(f"phantom {ph.shape}, 3 T, TE 20 ms; median of {repeats} runs after one untimed first call")
    print(f"{'method':<34}{'median s':>9}{'first s':>9}{'x base':>8}{'peak MB':>9}  accuracy")

    base = None
    surface_mask = None
    for label, name, kw in (("mask: threshold (baseline)", "threshold", {}),
                            ("mask: surface", "surface", {})):
        func = masking.MASKING.get(name).func
        m, first, times, peak = _timed(func, (mag, vs), kw, repeats)
        med = statistics.median(times)
        base = med if base is None else base
        surface_mask = m if name == "surface" else surface_mask
        row = {"case": label, "median_s": med, "first_call_s": first, "runs_s": times,
               "ratio_to_baseline": med / base, "peak_numpy_mb": peak, "dice": dice(m, ph.mask)}
        rows.append(row)
        print(f"{label:<34}{med:>9.2f}{first:>9.2f}{med / base:>8.2f}{peak:>9.0f}"
              f"  Dice {row['dice']:.4f}")

    base = None
    for label, name, kw, use_mask in (
            ("unwrap: quality (skimage, baseline)", "quality", {}, True),
            ("unwrap: romeo", "romeo", {}, True),
            ("unwrap: romeo + magnitude", "romeo", {"magnitude": mag}, True),
            ("unwrap: romeo, whole FOV (no mask)", "romeo", {"magnitude": mag}, False),
            ("unwrap: laplacian (not congruent)", "laplacian", {}, True)):
        func = unwrapping.UNWRAPPING.get(name).func
        mask = ph.mask if use_mask else None
        u, first, times, peak = _timed(func, (phase,), dict(mask=mask, voxel_size=vs, **kw),
                                         repeats)
        med = statistics.median(times)
        base = med if base is None else base
        in_surface = (func(phase, mask=surface_mask, voxel_size=vs, **kw) if use_mask else u)
        row = {"case": label, "median_s": med, "first_call_s": first, "runs_s": times,
               "ratio_to_baseline": med / base, "peak_numpy_mb": peak,
               "right_in_brain_mask": right_fraction(u, truth, ph.mask),
               "right_in_surface_mask": right_fraction(in_surface, truth, surface_mask)}
        rows.append(row)
        print(f"{label:<34}{med:>9.2f}{first:>9.2f}{med / base:>8.2f}{peak:>9.0f}"
              f"  right {100 * row['right_in_brain_mask']:.3f} % of the brain mask, "
              f"{100 * row['right_in_surface_mask']:.3f} % of the surface mask")
    return rows


if __name__ == "__main__":
    run(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
