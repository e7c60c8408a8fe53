"""The peer, QSM.rs (../shared/peers/qsmrs: the library behind QSMxT v9 and QSM-CI's ``*-qsmrs``
methods), run on arrays through its raw-array command line ``qsmrs-cli`` (the binary that
``run_qsmrs.py`` wraps for NIfTI files). Library defaults; MEDI and TGV wired as QSM-CI does.

Results are cached under ``bench-output/eval-peers/`` keyed by case, stage and method (the peer is
deterministic and the cases are fixed); ``seconds`` is the peer's own solver time of the run that
filled the cache. Benchmarks only: the peer is never part of the package.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
PEER = ROOT / ".." / "shared" / "peers" / "qsmrs"
BIN = PEER / "qsmrs-cli"
CACHE = ROOT / "bench-output" / "eval-peers"

DIPOLE = ("tkd", "tsvd", "tikhonov", "tv", "rts", "nltv", "ilsqr", "medi", "tgv")
BFR = ("pdf", "vsharp", "sharp", "resharp", "ismv", "lbv")
#: the peer methods run by default in the suite (the QSM-CI leaderboard's strongest by default)
DEFAULT_DIPOLE = ("tv", "rts", "tkd")


def available() -> str | None:
    """None when the peer can run here, else the reason it cannot."""
    if not BIN.exists():
        return f"QSM.rs peer not found at {BIN} (../shared absent)"
    if not os.access(BIN, os.X_OK):
        return f"QSM.rs peer at {BIN} is not executable"
    return None


def run(stage, method, field, mask, voxel_size, b0_dir=(0, 0, 1), magnitude=None, b0_t=3.0, te_s=0.02):
    """Run one QSM.rs method on arrays. ``stage``: "dipole" (local field ppm -> chi ppm) or "bfr"
    (total field ppm -> local field ppm). Returns (result float32, mask used, info dict with the
    peer's ``seconds`` and ``wall_seconds`` including the raw-array I/O)."""
    why = available()
    if why:
        raise RuntimeError(why)
    if method not in (DIPOLE if stage == "dipole" else BFR):
        raise ValueError(f"unknown QSM.rs {stage} method {method!r}")
    t0 = time.perf_counter()
    dims = field.shape
    with tempfile.TemporaryDirectory() as td:
        fi, mi, fo, mo = (os.path.join(td, n) for n in ("f.raw", "m.raw", "o.raw", "om.raw"))
        np.asarray(field, "<f8").ravel(order="F").tofile(fi)
        np.asarray(mask, np.uint8).ravel(order="F").tofile(mi)
        cmd = [str(BIN), stage, method, *map(str, dims), *map(str, voxel_size), *map(str, b0_dir),
               fi, mi, fo, mo, "--b0", str(b0_t), "--te", str(te_s)]
        if magnitude is not None:
            mp = os.path.join(td, "mag.raw")
            np.asarray(magnitude, "<f8").ravel(order="F").tofile(mp)
            cmd += ["--mag", mp]
        r = subprocess.run(cmd, check=True, capture_output=True, text=True)
        info = json.loads(r.stdout.strip().splitlines()[-1])
        out = np.fromfile(fo, "<f8").reshape(dims, order="F").astype(np.float32)
        om = np.fromfile(mo, np.uint8).reshape(dims, order="F") > 0
    info["wall_seconds"] = round(time.perf_counter() - t0, 2)
    return out, om, info


def dipole_cached(case, method):
    """QSM.rs dipole inversion ``method`` on ``case`` (cached). Returns (chi, info)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    npy, js = CACHE / f"{case.name}__{method}.npy", CACHE / f"{case.name}__{method}.json"
    if npy.exists() and js.exists():
        return np.load(npy), {**json.loads(js.read_text()), "cached": True}
    chi, _, info = run("dipole", method, case.field, case.mask, case.voxel_size, case.b0_dir,
                       magnitude=case.magnitude)
    chi = (chi * case.mask).astype(np.float32)
    np.save(npy, chi)
    js.write_text(json.dumps(info))
    return chi, {**info, "cached": False}
