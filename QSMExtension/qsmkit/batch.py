"""Cohorts: a BIDS dataset in, a BIDS-derivatives folder and one statistics table out, one
subject per task on Dask (local processes, or any existing Dask cluster such as SLURM/PBS
through dask-jobqueue).

BIDS input is read by a small parser of our own rather than pybids: we need one glob of
``sub-*/[ses-*/]anat/*_part-mag_*`` / ``*_part-phase_*`` images with their JSON sidecars
(``EchoTime``, ``MagneticFieldStrength``) and ``echo-N`` entities, and pybids would add an
SQL database, pandas and formulaic to every install for that. Optional ``*_dseg.nii[.gz]``
(with ``*_dseg.tsv`` names) beside the images gives the ROI statistics.

Outputs per subject (``derivatives/qsmkit/sub-X/[ses-Y/]anat/``, each NIfTI with a JSON
sidecar of every parameter): ``*_Chimap.nii.gz`` (ppm), ``*_desc-brain_mask.nii.gz``,
``*_desc-total_fieldmap.nii.gz`` and ``*_desc-local_fieldmap.nii.gz`` (ppm), ``*_qc.png``, and
``*_desc-rois_stats.tsv`` when labels exist; the cohort table ``group_stats.tsv`` (long format,
one row per subject and region) and ``dataset_description.json`` at the top. A subject whose
outputs are all present is skipped (resumable) unless ``force``.
"""

from __future__ import annotations

import os
import re
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from .errors import QSMInputError

ENTITY = re.compile(r"(?P<key>[a-zA-Z]+)-(?P<value>[a-zA-Z0-9]+)")
IMAGE = re.compile(r"\.nii(\.gz)?$")


@dataclass
class Subject:
    """One GRE acquisition of one subject (and session)."""

    key: str                      # e.g. "sub-01_ses-1"
    subject: str
    session: str | None
    magnitude: list = field(default_factory=list)   # one path per echo (or one 4-D file)
    phase: list = field(default_factory=list)
    labels: str | None = None
    label_names: str | None = None


def _entities(name):
    stem = IMAGE.sub("", name)
    parts = stem.split("_")
    return {m["key"]: m["value"] for p in parts[:-1] if (m := ENTITY.fullmatch(p))}, parts[-1]


def find_subjects(root, participants=None, sessions=None) -> list:
    """The GRE acquisitions of a BIDS dataset, sorted by subject and session.

    ``participants`` / ``sessions``: labels to keep (with or without the ``sub-``/``ses-``
    prefix); default all. Magnitude and phase files pair on all entities but ``part`` and
    ``echo``; echoes are ordered by their ``echo-N`` entity.
    """
    root = Path(root)
    if not root.is_dir():
        raise QSMInputError("not a folder", str(root))
    keep_sub = {p.removeprefix("sub-") for p in participants} if participants else None
    keep_ses = {s.removeprefix("ses-") for s in sessions} if sessions else None
    groups = {}
    for path in sorted(root.glob("sub-*/**/anat/*_part-*")):
        if not IMAGE.search(path.name):
            continue
        ent, suffix = _entities(path.name)
        if keep_sub is not None and ent.get("sub") not in keep_sub:
            continue
        if keep_ses is not None and ent.get("ses") not in keep_ses:
            continue
        group = tuple(sorted((k, v) for k, v in ent.items() if k not in ("part", "echo"))) + (suffix,)
        echo = int(ent.get("echo", 1))
        groups.setdefault(group, {}).setdefault(ent.get("part"), []).append((echo, str(path)))
    subjects = []
    for group, parts in sorted(groups.items()):
        ent = dict(group[:-1])
        # BIDS entity order, not alphabetical
        key = "_".join(f"{k}-{ent[k]}" for k in ("sub", "ses", "acq", "rec", "run") if k in ent)
        s = Subject(key=key, subject=ent["sub"], session=ent.get("ses"),
                    magnitude=[p for _, p in sorted(parts.get("mag", []))],
                    phase=[p for _, p in sorted(parts.get("phase", []))])
        anat = Path((s.phase or s.magnitude)[0]).parent
        prefix = "_".join(f"{k}-{ent[k]}" for k in ("sub", "ses") if k in ent)
        dseg = sorted(anat.glob(f"{prefix}*_dseg.nii*"))
        if dseg:
            s.labels = str(dseg[0])
            tsv = Path(IMAGE.sub("", str(dseg[0])) + ".tsv")
            s.label_names = str(tsv) if tsv.exists() else None
        subjects.append(s)
    return subjects


def output_paths(out_root, subject: Subject) -> dict:
    """The derivative files of one subject (all must exist for it to count as done)."""
    folder = Path(out_root) / f"sub-{subject.subject}"
    if subject.session:
        folder = folder / f"ses-{subject.session}"
    folder = folder / "anat"
    k = subject.key
    paths = {
        "chi": folder / f"{k}_Chimap.nii.gz",
        "mask": folder / f"{k}_desc-brain_mask.nii.gz",
        "field_total": folder / f"{k}_desc-total_fieldmap.nii.gz",
        "field_local": folder / f"{k}_desc-local_fieldmap.nii.gz",
        "qc": folder / f"{k}_qc.png",
    }
    if subject.labels:
        paths["stats"] = folder / f"{k}_desc-rois_stats.tsv"
    return {n: str(p) for n, p in paths.items()}


def is_complete(out_root, subject) -> bool:
    return all(os.path.exists(p) for p in output_paths(out_root, subject).values())


def qc_png(path, magnitude, result, title):
    """Mid-axial slices: magnitude, mask outline, local field, chi."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io import atomic_write

    z = magnitude.shape[2] // 2
    panels = [("magnitude", magnitude, "gray", None), ("local field (ppm)", result.field_local,
              "RdBu_r", (-0.05, 0.05)), ("chi (ppm)", result.chi, "gray", (-0.1, 0.2))]
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.3), dpi=80)
    for ax, (name, img, cmap, lim) in zip(axes, panels):
        sl = np.rot90(img[:, :, z])
        ax.imshow(sl, cmap=cmap, vmin=lim[0] if lim else None, vmax=lim[1] if lim else None)
        if name == "magnitude":
            ax.contour(np.rot90(result.mask[:, :, z]), levels=[0.5], colors="r", linewidths=0.6)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)


def process_subject(subject: Subject, out_root, config: dict, reference=None) -> dict:
    """Run the pipeline on one subject and write its derivatives. Never raises: the outcome
    (``status`` ok/failed, ``error`` one line, ``seconds``) is returned, so one broken subject
    does not stop a cohort."""
    from . import io, report, stats
    from .echoes import combine_magnitude
    from .pipeline import PipelineConfig, run_pipeline, sidecar
    t0 = time.perf_counter()
    written = []  # removed again if the subject fails: no half set of derivatives
    try:
        if not subject.magnitude or not subject.phase:
            missing = "magnitude" if not subject.magnitude else "phase"
            raise QSMInputError(f"no {missing} image (part-{'mag' if missing == 'magnitude' else 'phase'})",
                                (subject.phase or subject.magnitude)[0])
        mag, pha, te, b0 = io.load_gre(subject.magnitude, subject.phase)
        cfg = PipelineConfig(**config).resolved()
        res = run_pipeline(mag.data, io.phase_in_rad(pha, subject.phase[0]), te, b0,
                           pha.voxel_size, pha.b0_dir(),
                           config=cfg)
        paths = output_paths(out_root, subject)
        meta = sidecar(cfg, res.stages, inputs={"magnitude": subject.magnitude,
                                                "phase": subject.phase, "te": te, "b0": b0},
                       extra={"units": {"chi": "ppm", "field": "ppm"}, "subject": subject.key,
                              **report.pipeline_record(res.stages)})
        # a subject counts as done when every file exists (``is_complete``); the QC image is last
        for name in ("mask", "field_total", "field_local", "chi"):
            data = getattr(res, name)
            written.append(io.save_volume(paths[name], data, pha.affine, sidecar=meta,
                                          dtype=np.uint8 if data.dtype == bool else np.float32))
            written.append(io.sidecar_path(paths[name]))
        if subject.labels:
            lab = io.load_volume(subject.labels, what="label map")
            io.check_same_grid(pha, lab, "phase", "label map")
            names = stats.read_label_names(subject.label_names) if subject.label_names else {}
            rows = stats.roi_table(res.chi, np.rint(lab.data).astype(np.int64), pha.voxel_size,
                                   names, reference=reference)
            stats.write_table(rows, paths["stats"], subject=subject.key)
            written.append(paths["stats"])
        qc_png(paths["qc"], combine_magnitude(mag.data), res, subject.key)
        return {"subject": subject.key, "status": "ok", "seconds": time.perf_counter() - t0,
                "outputs": paths}
    except Exception as err:  # bad input, or a bug or resource problem: report, keep going
        for path in written:
            if path and os.path.exists(path):
                os.remove(path)
        if isinstance(err, QSMInputError):
            reason = str(err)
        else:
            where = traceback.extract_tb(err.__traceback__)[-1]
            reason = f"{type(err).__name__}: {err} ({Path(where.filename).name}:{where.lineno})"
        return {"subject": subject.key, "status": "failed", "error": reason,
                "seconds": time.perf_counter() - t0}


def write_dataset_description(out_root, source):
    from .io import write_json

    path = Path(out_root) / "dataset_description.json"
    if not path.exists():
        write_json(path, {
            "Name": "qsmkit QSM derivatives", "BIDSVersion": "1.10.0", "DatasetType": "derivative",
            "GeneratedBy": [{"Name": "qsmkit", "Version": __version__,
                             "CodeURL": "https://github.com/QSMExtension/QSMExtension"}],
            "SourceDatasets": [{"URL": Path(source).resolve().as_uri()}],
        })


def group_table(out_root, subjects):
    """Concatenate the per-subject statistics into ``group_stats.tsv`` (long format)."""
    from .io import atomic_write

    lines, header = [], None
    for s in subjects:
        p = output_paths(out_root, s).get("stats")
        if p and os.path.exists(p):
            rows = Path(p).read_text().splitlines()
            header = header or rows[0]
            lines += rows[1:]
    if header is None:
        return None
    path = str(Path(out_root) / "group_stats.tsv")

    def writer(tmp):
        Path(tmp).write_text("\n".join([header, *lines]) + "\n")

    atomic_write(path, writer)
    return path


def make_client(workers=None, memory_limit="auto", scheduler=None, device="cpu"):
    """A Dask client: an existing scheduler (``scheduler`` address, e.g. a dask-jobqueue SLURM
    cluster's), else a local cluster of single-threaded worker processes (one per GPU with
    dask-cuda when ``device`` is gpu)."""
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        raise QSMInputError("qsmkit batch needs Dask: pip install 'dask[distributed]' (or "
                            "pip install -e '.[batch]' in the qsmkit checkout)") from None
    if scheduler:
        return Client(scheduler)
    if device == "gpu":
        try:
            from dask_cuda import LocalCUDACluster  # one worker pinned to each GPU
        except ImportError:
            raise QSMInputError("--device gpu with local workers needs dask-cuda "
                                "(pip install dask-cuda), or give --scheduler") from None
        return Client(LocalCUDACluster(memory_limit=memory_limit))
    n = workers or max(1, (os.cpu_count() or 2) // 2)
    # threads_per_worker=1: each subject's FFTs already use the worker's cores through scipy
    return Client(LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                               memory_limit=memory_limit, dashboard_address=None))


def run_batch(bids_root, out_root=None, participants=None, sessions=None, config=None,
              workers=None, memory_limit="auto", scheduler=None, force=False, reference=None,
              progress=True):
    """Process every subject of a BIDS dataset; returns a summary dict (``done``, ``skipped``,
    ``failed`` lists of subject keys, ``errors`` key -> reason, the group table path)."""
    from .progress import Progress

    out_root = Path(out_root or Path(bids_root) / "derivatives" / "qsmkit")
    subjects = find_subjects(bids_root, participants, sessions)
    if not subjects:
        raise QSMInputError("no *_part-mag_* / *_part-phase_* images found under sub-*/anat",
                            str(bids_root))
    out_root.mkdir(parents=True, exist_ok=True)
    write_dataset_description(out_root, bids_root)
    config = dict(config or {})
    todo = [s for s in subjects if force or not is_complete(out_root, s)]
    skipped = [s.key for s in subjects if s not in todo]
    results = []
    if todo:
        from dask.distributed import as_completed

        client = make_client(workers, memory_limit, scheduler, config.get("device", "cpu"))
        try:
            futures = [client.submit(process_subject, s, str(out_root), config, reference,
                                     key=f"qsmkit-{s.key}-{time.time_ns()}", pure=False)
                       for s in todo]
            # a bar on a terminal, plain lines in a log (qsmkit.progress)
            with Progress(len(futures), not progress, "qsmkit batch", "subject") as bar:
                for fut in as_completed(futures):
                    r = fut.result()
                    results.append(r)
                    bar(f"{r['subject']} {r['status']}", len(results))
        finally:
            cluster = getattr(client, "cluster", None)
            client.close()
            if cluster is not None and not scheduler:
                cluster.close()
    failed = {r["subject"]: r["error"] for r in results if r["status"] != "ok"}
    summary = {
        "done": sorted(r["subject"] for r in results if r["status"] == "ok"),
        "skipped": skipped, "failed": sorted(failed), "errors": failed,
        "group_table": group_table(out_root, subjects), "out": str(out_root),
        "seconds": {r["subject"]: round(r["seconds"], 2) for r in results},
        "config": config,
    }
    from .io import write_json

    write_json(out_root / "batch_summary.json", summary)
    return summary

