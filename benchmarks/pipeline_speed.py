"""Whole-pipeline benchmark of ``run_pipeline``'s default stages.

Surface mask -> ROMEO unwrap and field fit -> tfi-fast -> tv with the magnitude's edges, on the
built-in phantom at 256x256x64 and at 1 mm whole-brain size (224x224x160), on the CPU and, when
cupy sees one, on the GPU.

Each (size, device) runs in a fresh Python process, so that its peak resident memory (the
operating system's figure, ``ru_maxrss``, read after the pipeline runs and before the baseline)
is the pipeline's own plus the simulated data it starts from (``setup_peak_mb``), and not left
over from another case. Inside it, the pipeline runs ``repeats`` times: the table gives the
median wall time per stage and in total, the peak memory per stage as numpy sees it
(tracemalloc: array allocations, not FFT scratch space inside scipy or cuFFT; traced in one more
run that is not timed, since tracing slows every allocation) and the process peak. The baseline
measured in the same process is one dipole forward model with numpy's own FFT on a blind
2x-padded grid, so the ratios stay comparable across machines.

    python benchmarks/pipeline_speed.py [--repeats 5] [--sizes 256x256x64 224x224x160]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import tracemalloc

import numpy as np

SIZES = {"256x256x64": ((256, 256, 64), (0.9375, 0.9375, 2.5)),
         "224x224x160": ((224, 224, 160), (1.0, 1.0, 1.0))}


def numpy_forward_2x(chi, voxel, b0_dir):
    """Baseline: numpy.fft, complex full spectrum, blind 2x padding."""
    from qsmkit import dipole

    big = tuple(2 * n for n in chi.shape)
    d = dipole.dipole_kernel(big, voxel, b0_dir, real=False)
    x = np.zeros(big, np.float32)
    x[tuple(slice(0, n) for n in chi.shape)] = chi
    return np.fft.ifftn(np.fft.fftn(x) * d).real[tuple(slice(0, n) for n in chi.shape)]


def traced_stage_peaks(pipeline) -> dict:
    """One more, untimed run of ``pipeline(progress)`` under tracemalloc: {stage: peak bytes}."""
    peaks = {}

    def progress(stage, done, total):
        # called before and after each stage: the traced peak since the last call
        peaks[stage] = max(peaks.get(stage, 0), tracemalloc.get_traced_memory()[1])
        tracemalloc.reset_peak()

    tracemalloc.start()
    try:
        res = pipeline(progress)
    finally:
        tracemalloc.stop()
    return {rec["stage"]: peaks.get(rec["stage"], 0) for rec in res.stages}


def one_case(size: str, device: str, repeats: int) -> dict:
    """Run in the child process: the pipeline ``repeats`` times on one size and device."""
    from qsmkit import backend, metrics
    from qsmkit.pipeline import PipelineConfig, peak_memory_mb, run_pipeline
    from qsmkit.simulate import make_phantom, simulate_acquisition

    shape, vox = SIZES[size]
    ph = make_phantom(shape=shape, voxel_size=vox)
    acq = simulate_acquisition(ph, te=(0.02,), b0=3.0, snr=100)
    setup_mb = peak_memory_mb()

    config = PipelineConfig(device=device)

    def pipeline(progress=None):
        return run_pipeline(acq.magnitude, acq.phase, acq.te, acq.b0, ph.voxel_size, ph.b0_dir,
                            config=config, progress=progress)

    stage_times, totals = {}, []
    for _ in range(repeats):  # timed, not traced (tracemalloc slows every allocation)
        t0 = time.perf_counter()
        res = pipeline()
        totals.append(time.perf_counter() - t0)
        for rec in res.stages:
            stage_times.setdefault(rec["stage"], []).append(rec["seconds"])
    stage_peaks = traced_stage_peaks(pipeline)
    pipeline_mb = peak_memory_mb()  # before the baseline, whose complex128 2x grid is larger
    t0 = time.perf_counter()
    numpy_forward_2x(ph.chi_brain, ph.voxel_size, ph.b0_dir)
    baseline = time.perf_counter() - t0
    local = res.local_mask & ph.mask
    return {
        "size": size, "device": backend.device_name(backend.resolve_device(device)),
        "repeats": repeats, "baseline_s": baseline,
        "methods": {rec["stage"]: rec["method"] for rec in res.stages},
        "stage_median_s": {k: statistics.median(v) for k, v in stage_times.items()},
        "stage_peak_traced_mb": {k: v / 2**20 for k, v in stage_peaks.items()},
        "total_median_s": statistics.median(totals), "total_runs_s": totals,
        "process_peak_mb": pipeline_mb, "setup_peak_mb": setup_mb,
        "chi_nrmse_percent": metrics.nrmse(res.chi, ph.chi_brain, local),
    }


def run(repeats=5, sizes=tuple(SIZES), devices=None):
    """Each (size, device) in a child process; returns the rows."""
    from qsmkit import backend

    devices = devices or (["cpu", "gpu"] if backend.gpu_available() else ["cpu"])
    rows = []
    for size in sizes:
        for device in devices:
            out = subprocess.run([sys.executable, __file__, "--child", size, device, str(repeats)],
                                 capture_output=True, text=True, check=False)
            if out.returncode != 0:
                print(f"{size} {device}: failed\n{out.stderr[-2000:]}")
                continue
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print_table(rows)
    return rows


def print_table(rows):
    stages = ("mask", "field", "background", "inversion")
    print(f"\nwhole pipeline, median of runs; {os.cpu_count()} CPU cores on this machine")
    head = (f"{'size':<13}{'device':<22}" + "".join(f"{s + ' s':>13}" for s in stages)
            + f"{'total s':>10}{'x base':>8}{'peak MB':>9}{'chi NRMSE %':>13}")
    print(head)
    for r in rows:
        t = r["stage_median_s"]
        print(f"{r['size']:<13}{r['device'][:21]:<22}"
              + "".join(f"{t.get(s, float('nan')):>13.2f}" for s in stages)
              + f"{r['total_median_s']:>10.2f}{r['total_median_s'] / r['baseline_s']:>8.1f}"
              f"{r['process_peak_mb']:>9.0f}{r['chi_nrmse_percent']:>13.1f}")
    print("peak numpy memory per stage (tracemalloc, MB):")
    for r in rows:
        p = r["stage_peak_traced_mb"]
        print(f"  {r['size']:<13}{r['device'][:21]:<22}"
              + "  ".join(f"{s} {p.get(s, 0):.0f}" for s in stages))
    print("methods: " + ", ".join(f"{k}={v}" for k, v in rows[0]["methods"].items()) if rows else "")
    print("x base: total over one numpy.fft dipole forward model on a 2x-padded grid, same process")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--devices", nargs="+", choices=["cpu", "gpu"])
    p.add_argument("--out", default="bench-output")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        size, device, repeats = a.child
        print(json.dumps(one_case(size, device, int(repeats))))
        return
    rows = run(a.repeats, a.sizes, a.devices)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "pipeline_speed.json"), "w") as fh:
        json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
