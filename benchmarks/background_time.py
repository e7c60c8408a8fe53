"""Background removal's time: ``tfi-fast`` (the default) against ``pdf`` on the same input.

Issue 17 asks for the default background removal within 2x PDF's time. Both methods run
interleaved in one process on the true total field (``repeats`` times each); the table gives the
median CPU seconds (``time.process_time``: both cores' work, so less sensitive to other jobs on a
shared machine than wall time) and wall seconds (what a user waits; ``tfi-fast``'s ADMM kernel runs
in one thread per core, and a third run gives the wall time with it on one thread), PDF's and the
start's iteration counts, the ratios and each method's local-field NRMSE in the mask against the
truth.

Cases: the built-in phantom at 256 x 256 x 64 (0.9375 x 0.9375 x 2.5 mm, head in air, large
field of view) and, with ``--e2e``, the end-to-end benchmark's heads (``benchmarks/e2e_cases.py``,
built and cached on first use; acquisition grids cropped to the brain's box grown by 8 mm).

    python benchmarks/background_time.py [--repeats 3] [--e2e 3T-1mm-z 3T-aniso-tilt]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METHODS = ("pdf", "tfi-fast")
#: tfi-fast with its ADMM kernel on one thread (``tfi.ADMM_THREADS = 1``), as before 2026-12-07 18:30
ONE_THREAD = "tfi-fast, ADMM kernel on one thread"


def phantom_case():
    from qsmkit.simulate import make_phantom

    ph = make_phantom(shape=(256, 256, 64), voxel_size=(0.9375, 0.9375, 2.5))
    return ("phantom 256x256x64", ph.field_total, ph.field_local, ph.mask.astype(bool),
            ph.voxel_size, ph.b0_dir, ph.magnitude)


def e2e_case(name):
    from benchmarks import e2e_cases

    from qsmkit.echoes import combine_magnitude

    c = e2e_cases.load(name)
    return (f"{name} {'x'.join(map(str, c.mask.shape))}", c.field_total, c.field_local, c.mask,
            c.voxel_size, c.b0_dir, combine_magnitude(c.magnitude))


def time_case(case, repeats):
    from qsmkit import metrics, tfi
    from qsmkit.background import BACKGROUND

    name, total, local_true, mask, vox, b0_dir, magnitude = case
    runs = (*METHODS, ONE_THREAD)
    cpu, wall = {m: [] for m in runs}, {m: [] for m in runs}
    row = {"case": name}
    for r in range(repeats):
        for m in runs:
            method = m.split(",")[0]
            kw = {"magnitude": magnitude} if method.startswith("tfi") else {}
            tfi.ADMM_THREADS = 1 if m == ONE_THREAD else None
            c0, w0 = time.process_time(), time.perf_counter()
            local, _, info = BACKGROUND.get(method).func(total, mask, vox, b0_dir, **kw)
            cpu[m].append(time.process_time() - c0)
            wall[m].append(time.perf_counter() - w0)
            if r == 0 and m in METHODS:
                row[f"{m} NRMSE %"] = metrics.nrmse(np.asarray(local), local_true, mask)
                row[f"{m} PDF iterations"] = info.get("pdf", info)["iterations"]
    tfi.ADMM_THREADS = None
    for m in runs:
        row[f"{m} CPU s"] = statistics.median(cpu[m])
        row[f"{m} wall s"] = statistics.median(wall[m])
    row["ratio"] = row["tfi-fast CPU s"] / row["pdf CPU s"]
    row["wall ratio"] = row["tfi-fast wall s"] / row["pdf wall s"]
    row["wall ratio one thread"] = row[f"{ONE_THREAD} wall s"] / row["pdf wall s"]
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--e2e", nargs="*", default=[], metavar="CASE",
                   help="end-to-end head cases to add (benchmarks/e2e_cases.py names)")
    a = p.parse_args(argv)
    rows = [time_case(phantom_case(), a.repeats)]
    rows += [time_case(e2e_case(n), a.repeats) for n in a.e2e]
    print("| case | pdf CPU s | tfi-fast CPU s | tfi-fast / pdf, CPU | pdf wall s | tfi-fast wall s "
          "| tfi-fast / pdf, wall | the same, ADMM kernel on one thread | PDF iterations (pdf / start) "
          "| local NRMSE % (pdf / tfi-fast) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['pdf CPU s']:.2f} | {r['tfi-fast CPU s']:.2f} | "
              f"{r['ratio']:.2f} | {r['pdf wall s']:.2f} | {r['tfi-fast wall s']:.2f} | "
              f"{r['wall ratio']:.2f} | {r['wall ratio one thread']:.2f} | "
              f"{r['pdf PDF iterations']} / {r['tfi-fast PDF iterations']} | "
              f"{r['pdf NRMSE %']:.1f} / {r['tfi-fast NRMSE %']:.1f} |")


if __name__ == "__main__":
    main()
