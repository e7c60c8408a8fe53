"""``make bench``: time every stage on the built-in phantom (median of N runs) and print a table.

Each figure stands beside a baseline measured in the same run: the dipole forward model with
numpy.fft on a plain 2x-padded grid, against our real-FFT scipy.fft path (all cores) on the same padding.
A second table compares the background-removal methods (``background_removal.py``) on the
phantom and the head model, a third the dipole inversions (``inversion_methods.py``) on the
phantom and the 2016 challenge data. Results are also written to bench-output/bench.json. The speed
issue extends this (GPU, whole-brain size, peak memory per stage).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import background_removal
import inversion_methods
import numpy as np

from qsmkit import background, dipole, inversion, masking, unwrapping
from qsmkit.echoes import field_from_phase
from qsmkit.simulate import make_phantom, simulate_acquisition


def median_time(func, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        func()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def numpy_forward_2x(chi, voxel, b0_dir):
    """Baseline: numpy.fft, complex full spectrum, blind 2x padding."""
    big = tuple(2 * n for n in chi.shape)
    d = dipole.dipole_kernel(big, voxel, b0_dir, real=False)
    x = np.zeros(big, np.float32)
    x[tuple(slice(0, n) for n in chi.shape)] = chi
    return np.fft.ifftn(np.fft.fftn(x) * d).real[tuple(slice(0, n) for n in chi.shape)]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", nargs=3, type=int, default=[256, 256, 64])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="bench-output")
    p.add_argument("--only", choices=["stages", "background", "inversion"],
                   help="run one table only")
    a = p.parse_args()
    rows = stage_table(a) if a.only in (None, "stages") else []
    bg_rows = background_removal.run(a.repeats) if a.only in (None, "background") else []
    inv_rows = inversion_methods.run(a.repeats) if a.only in (None, "inversion") else []
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "bench.json"), "w") as fh:
        json.dump({"shape": a.shape, "repeats": a.repeats, "rows": rows,
                   "background_removal": bg_rows, "inversion": inv_rows}, fh, indent=2)


def stage_table(a):
    ph = make_phantom(shape=tuple(a.shape))
    acq = simulate_acquisition(ph, te=(0.02,), b0=3.0, snr=100, phase_offset=False)
    vs, b = ph.voxel_size, ph.b0_dir
    mask = masking.mask_threshold(acq.magnitude[..., 0], vs)
    total, _ = field_from_phase(acq.magnitude, acq.phase, (0.02,), 3.0,
                                lambda p, mask=None: unwrapping.unwrap_quality(p, mask=mask), mask)
    local, lmask, _ = background.pdf(total, mask, vs, b)
    cases = [
        ("forward model, numpy.fft 2x pad (baseline)", lambda: numpy_forward_2x(ph.chi_brain, vs, b)),
        ("forward model, scipy.fft real FFT, same 2x pad",
         lambda: dipole.forward_field(ph.chi_brain, vs, b, pad=[n // 2 for n in ph.chi.shape])),
        ("mask: threshold", lambda: masking.mask_threshold(acq.magnitude[..., 0], vs)),
        ("field: quality unwrap", lambda: field_from_phase(
            acq.magnitude, acq.phase, (0.02,), 3.0,
            lambda p, mask=None: unwrapping.unwrap_quality(p, mask=mask), mask)),
        ("field: laplacian unwrap", lambda: unwrapping.unwrap_laplacian(acq.phase[..., 0], mask, vs)),
        ("background: pdf", lambda: background.pdf(total, mask, vs, b, weights=acq.magnitude[..., 0])),
        ("background: vsharp", lambda: background.vsharp(total, mask, vs)),
        ("background: resharp", lambda: background.resharp(total, mask, vs)),
        ("inversion: tkd", lambda: inversion.tkd(local, lmask, vs, b)),
        ("inversion: l2", lambda: inversion.l2(local, lmask, vs, b)),
        ("inversion: focuss", lambda: inversion.INVERSION.get("focuss").func(
            local, lmask, vs, b, magnitude=acq.magnitude[..., 0])),
    ]
    rows = []
    base = None
    print(f"phantom {tuple(a.shape)}, {os.cpu_count()} CPU cores, median of {a.repeats} runs")
    print(f"{'case':<46}{'median s':>10}{'x baseline':>12}")
    for name, fn in cases:
        med, times = median_time(fn, a.repeats)
        base = med if base is None else base
        rows.append({"case": name, "median_s": med, "runs_s": times, "ratio_to_baseline": med / base})
        print(f"{name:<46}{med:>10.3f}{med / base:>12.2f}")
    return rows


if __name__ == "__main__":
    main()
