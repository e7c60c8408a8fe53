"""``make bench``: time every stage on the built-in phantom (median of N runs) and print a table.

Each figure stands beside a baseline measured in the same run: the dipole forward model with
numpy.fft on a plain 2x-padded grid, against our real-FFT scipy.fft path (all cores) on the same padding.
A second table compares the background-removal methods (``background_removal.py``) on the
phantom and the head model, a third the dipole inversions (``inversion_methods.py``) on the
phantom and the 2016 challenge data, then coil combination (``coil_combination.py``, 32 channels),
masking and unwrapping (``unwrap_mask.py``) and the whole pipeline at 256x256x64 and 1 mm
whole-brain size, CPU and (when cupy sees one) GPU, per-stage time and memory
(``pipeline_speed.py``). Results are also written to bench-output/bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import background_removal
import coil_combination
import inversion_methods
import numpy as np
import pipeline_speed
import unwrap_mask

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
    p.add_argument("--only", choices=["stages", "background", "inversion", "coils", "unwrap",
                                      "pipeline"], help="run one table only")
    a = p.parse_args()

    def want(name):
        return a.only in (None, name)

    rows = stage_table(a) if want("stages") else []
    bg_rows = background_removal.run(a.repeats) if want("background") else []
    inv_rows = inversion_methods.run(a.repeats) if want("inversion") else []
    coil_rows = coil_combination.run(a.repeats) if want("coils") else []
    unwrap_rows = unwrap_mask.run(a.repeats) if want("unwrap") else []
    pipe_rows = pipeline_speed.run(a.repeats) if want("pipeline") else []
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "bench.json"), "w") as fh:
        json.dump({"shape": a.shape, "repeats": a.repeats, "rows": rows,
                   "background_removal": bg_rows, "inversion": inv_rows,
                   "coil_combination": coil_rows, "unwrap_mask": unwrap_rows,
                   "pipeline": pipe_rows}, fh, indent=2, default=float)


def stage_table(a):
    ph = make_phantom(shape=tuple(a.shape))
    acq = simulate_acquisition(ph, te=(0.02,), b0=3.0, snr=100, phase_offset=False)
    vs, b = ph.voxel_size, ph.b0_dir
    mask = masking.mask_surface(acq.magnitude[..., 0], vs)
    total, _ = field_from_phase(acq.magnitude, acq.phase, (0.02,), 3.0,
                                lambda p, mask=None: unwrapping.unwrap_romeo(
                                    p, mask=mask, voxel_size=vs, magnitude=acq.magnitude[..., 0]), mask)
    local, lmask, _ = background.pdf(total, mask, vs, b)
    cases = [
        ("forward model, numpy.fft 2x pad (baseline)", lambda: numpy_forward_2x(ph.chi_brain, vs, b)),
        ("forward model, scipy.fft real FFT, same 2x pad",
         lambda: dipole.forward_field(ph.chi_brain, vs, b, pad=[n // 2 for n in ph.chi.shape])),
        ("mask: surface", lambda: masking.mask_surface(acq.magnitude[..., 0], vs)),
        ("field: romeo unwrap", lambda: field_from_phase(
            acq.magnitude, acq.phase, (0.02,), 3.0,
            lambda p, mask=None: unwrapping.unwrap_romeo(
                p, mask=mask, voxel_size=vs, magnitude=acq.magnitude[..., 0]), mask)),
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
