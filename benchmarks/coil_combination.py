"""Coil combination benchmark: 32 channels of the built-in phantom (256 x 256 x 64, one echo,
TE 20 ms, default SNR) with a body coil.

Per method: median wall time of N runs, the ratio to the baseline measured in the same run (the
complex sum of the channels, ``phase_of_sum``: one pass over the data, the least any method can
do), peak numpy memory of the call beyond its inputs (tracemalloc, first run; the output image
and, where kept, the 32 sensitivity maps included), and the quality against the simulation's
truth inside the brain mask: RMS of the phase error and the number of 2-D residues of the phase
error (singularities the combination added). The truth is the phase of B rho for the body-coil
method (the body coil's own phase stays in its result), of rho otherwise; the adaptive method's
phase carries a smooth reference phase on top, so only its residues are comparable.

Run: ``.venv/bin/python benchmarks/coil_combination.py [--repeats N]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import tracemalloc

import numpy as np

from qsmkit import coils
from qsmkit.simulate import make_phantom, simulate_acquisition

N_COILS = 32


def _wrap(x):
    return (x + np.pi) % (2 * np.pi) - np.pi


def run(repeats=5, shape=(256, 256, 64)):
    ph = make_phantom(shape=tuple(shape))
    acq = simulate_acquisition(ph, n_coils=N_COILS, body_coil=True)
    ref = simulate_acquisition(ph, snr=None)
    mag, pha = acq.coil_magnitude[..., 0, :], acq.coil_phase[..., 0, :]
    body = dict(body=acq.body_magnitude[..., 0], body_phase=acq.body_phase[..., 0])
    vox, mask = ph.voxel_size, ph.mask
    obj = ref.phase[..., 0]
    obj_body = np.angle(acq.body_sensitivity * np.exp(1j * obj))
    cases = [
        ("phase_of_sum (baseline)", "phase_of_sum", {}, obj),
        ("bodycoil", "bodycoil", body, obj_body),
        ("bodycoil, no sensitivity maps", "bodycoil", dict(body, return_sensitivities=False), obj_body),
        ("adaptive (no body coil)", "adaptive", dict(return_sensitivities=False), obj),
    ]
    print(f"\ncoil combination, {N_COILS} channels, {tuple(shape)}, one echo, {os.cpu_count()} CPU cores, "
          f"median of {repeats} runs")
    print(f"{'method':<32}{'median s':>9}{'x base':>8}{'peak MB':>9}{'phase RMS':>11}{'residues':>10}")
    rows, base = [], None
    for label, method, kwargs, truth in cases:
        times = []
        for i in range(repeats):
            if i == 0:
                tracemalloc.start()
            t0 = time.perf_counter()
            res = coils.combine(mag, pha, method=method, voxel_size=vox, **kwargs)
            times.append(time.perf_counter() - t0)
            if i == 0:
                peak = tracemalloc.get_traced_memory()[1] / 2**20
                tracemalloc.stop()
            if i < repeats - 1:
                del res
        med = statistics.median(times)
        base = med if base is None else base
        err = _wrap(np.angle(res.image) - truth)
        row = {"case": label, "method": method, "median_s": med, "runs_s": times,
               "ratio_to_baseline": med / base, "peak_numpy_mb": peak,
               "phase_rms_rad": float(np.sqrt(np.mean(err[mask] ** 2))),
               "error_residues": coils.phase_residues(err, mask)}
        rows.append(row)
        rms = "-" if method == "adaptive" else f"{row['phase_rms_rad']:.4f}"
        print(f"{label:<32}{med:>9.2f}{med / base:>8.2f}{peak:>9.0f}{rms:>11}{row['error_residues']:>10}")
        del res
    return rows


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--shape", nargs=3, type=int, default=[256, 256, 64])
    a = p.parse_args()
    run(a.repeats, tuple(a.shape))
