"""Wall time of the default dipole inversion on the 2016 challenge (160^3, in vivo), median of
``--repeats`` runs in one process: the inversion issue's "160^3 in <= 15 s on 2 cores".

    python benchmarks/inversion_time.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "Testing"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    from conftest import load_qsm2016  # skips (raises) without ../shared
    from qsmkit.inversion import INVERSION

    d = load_qsm2016()
    method = INVERSION.get("auto")
    times = []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        _, info = method.func(d["field"] * d["mask"], d["mask"], d["voxel_size"], d["b0_dir"], d["magnitude"])
        times.append(time.perf_counter() - t0)
    print(f"{method.name} on the 2016 challenge {d['field'].shape}: "
          f"{', '.join(f'{t:.1f}' for t in times)} s, median {np.median(times):.1f} s "
          f"({info.get('iterations')} iterations on a {info.get('grid')} grid)")


if __name__ == "__main__":
    main()
