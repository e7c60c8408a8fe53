"""What every command records and says: one sidecar record and one summary line.

Every output's JSON sidecar carries the same keys, whatever the command: ``software``,
``version``, ``created``, ``command``, ``python``, ``numpy``, ``precision`` (from
``pipeline.sidecar``), then ``stage``, ``method``, ``parameters`` (every parameter the method
received), ``device``, ``seconds`` (the stage's compute time) and ``peak_memory_mb`` (the
process's peak resident memory so far), ``inputs`` and ``info`` (what the method reports).
``run`` and ``demo`` add ``stages``, one such record per pipeline stage.

Every command ends with one summary line on stdout, silenced by ``--quiet``::

    qsmkit mask: surface, 1.2 s; wrote mask.nii.gz
"""

from __future__ import annotations

import os

from . import backend
from .pipeline import peak_memory_mb, sidecar


def record(stage, method, parameters, seconds, device="cpu", inputs=None, info=None,
           extra=None) -> dict:
    """The sidecar of one command's outputs (see the module docstring for the keys)."""
    body = {"stage": stage, "method": method, "parameters": dict(parameters or {}),
            "device": backend.device_name(device), "seconds": round(float(seconds), 3),
            "peak_memory_mb": round(peak_memory_mb(), 1)}
    if inputs is not None:
        body["inputs"] = inputs
    if info is not None:
        body["info"] = info
    return sidecar(extra={**body, **(extra or {})})


def pipeline_record(stages) -> dict:
    """The keys of :func:`record` for a whole pipeline run (``run``, ``demo``): the stages'
    methods, their total seconds and the peak memory (device and parameters come with the
    configuration, ``pipeline.sidecar``)."""
    return {"stage": "pipeline",
            "method": ", ".join(f"{s['stage']}={s['method']}" for s in stages),
            "seconds": round(sum(s["seconds"] for s in stages), 3),
            "peak_memory_mb": round(peak_memory_mb(), 1)}


def summary_line(command, method, seconds, written) -> str:
    """``qsmkit COMMAND: METHOD, S s; wrote FILES`` (files relative to their common folder)."""
    written = [str(w) for w in written if w]
    if len(written) > 6:
        folder = os.path.commonpath([os.path.abspath(w) for w in written])
        shown = f"{len(written)} files in {os.path.relpath(folder)}{os.sep}"
    elif len(written) > 2:
        folder = os.path.commonpath([os.path.abspath(w) for w in written])
        if os.path.isfile(folder):
            folder = os.path.dirname(folder)
        shown = f"{len(written)} files in {os.path.relpath(folder)}: " + ", ".join(
            os.path.relpath(os.path.abspath(w), folder) for w in written)
    else:
        shown = " and ".join(written)
    return f"qsmkit {command}: {method}, {seconds:.1f} s; wrote {shown}"


def summary(command, method, seconds, written, quiet=False) -> None:
    """Print :func:`summary_line` unless ``quiet``."""
    if not quiet:
        print(summary_line(command, method, seconds, written), flush=True)
