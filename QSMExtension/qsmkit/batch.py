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
PARTS = ("mag", "phase")


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


def _name_problem(path: Path, ent: dict, name: str):
    """Why a ``*_part-*`` image name cannot be used (None when it can)."""
    stem = IMAGE.sub("", name)
    bad = [p for p in stem.split("_")[:-1] if not ENTITY.fullmatch(p)]
    if bad:
        return f"'{bad[0]}' is not a BIDS key-value entity"
    folder_sub = next((p.name for p in path.parents if p.name.startswith("sub-")), None)
    if "sub" not in ent:
        return "no sub-<label> entity in the file name"
    if folder_sub and folder_sub != f"sub-{ent['sub']}":
        return f"sub-{ent['sub']} in the name but in folder {folder_sub}"
    if "echo" in ent and not (ent["echo"].isdigit() and int(ent["echo"]) > 0):
        return f"echo-{ent['echo']} is not a positive echo number"
    if ent.get("part") not in PARTS:
        return f"part-{ent.get('part')} is not supported (part-mag and part-phase are)"
    return None


def find_subjects(root, participants=None, sessions=None, problems=None) -> list:
    """The GRE acquisitions of a BIDS dataset, sorted by subject and session.

    ``participants`` / ``sessions``: labels to keep (with or without the ``sub-``/``ses-``
    prefix); default all. Magnitude and phase files pair on all entities but ``part`` and
    ``echo``; echoes are ordered by their ``echo-N`` entity. Files whose names do not follow
    BIDS (``_name_problem``) are skipped; ``problems`` (a list), when given, receives
    ``(path, reason)`` for each.
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
        problem = _name_problem(path, ent, path.name)
        if problem:
            if problems is not None:
                problems.append((str(path), problem))
            continue
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
    from .pipeline import PipelineConfig, sidecar
    from .ras_order import run_pipeline_in_ras_order
    t0 = time.perf_counter()
    try:
        if not subject.magnitude or not subject.phase:
            missing = "magnitude" if not subject.magnitude else "phase"
            raise QSMInputError(f"no {missing} image (part-{'mag' if missing == 'magnitude' else 'phase'})",
                                (subject.phase or subject.magnitude)[0])
        mag, pha, te, b0 = io.load_gre(subject.magnitude, subject.phase)
        cfg = PipelineConfig(**config).resolved()
        res = run_pipeline_in_ras_order(mag.data, io.phase_in_rad(pha, subject.phase[0]), te, b0,
                                        pha.affine, config=cfg)[0]
        paths = output_paths(out_root, subject)
        meta = sidecar(cfg, res.stages, inputs={"magnitude": subject.magnitude,
                                                "phase": subject.phase, "te": te, "b0": b0},
                       extra={"units": {"chi": "ppm", "field": "ppm"}, "subject": subject.key,
                              **report.pipeline_record(res.stages), "reference": res.reference})
        # all derivatives are staged and move into place together (``io.OutputSet``): a
        # subject that fails or is interrupted leaves none of them
        with io.OutputSet() as outset:
            for name in ("mask", "field_total", "field_local", "chi"):
                data = getattr(res, name)
                io.save_volume(outset.path(paths[name]), data, pha.affine, sidecar=meta,
                               dtype=np.uint8 if data.dtype == bool else np.float32)
            if subject.labels:
                lab = io.load_volume(subject.labels, what="label map")
                io.check_same_grid(pha, lab, "phase", "label map")
                names = stats.read_label_names(subject.label_names) if subject.label_names else {}
                # without a reference label: the pipeline's reference (CSF found in the data)
                rows = stats.roi_table(res.chi, stats.label_map(lab.data, subject.labels),
                                       pha.voxel_size, names, reference=reference,
                                       reference_region=None if reference else
                                       res.reference_region)
                stats.write_table(rows, outset.path(paths["stats"]), subject=subject.key)
            qc_png(outset.path(paths["qc"]), combine_magnitude(mag.data), res, subject.key)
        return {"subject": subject.key, "status": "ok", "seconds": time.perf_counter() - t0,
                "outputs": paths}
    except Exception as err:  # bad input, or a bug or resource problem: report, keep going
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
    if memory_limit not in (None, "auto"):
        from dask.utils import parse_bytes

        try:
            parse_bytes(memory_limit)
        except (ValueError, TypeError):
            raise QSMInputError(f"--memory-limit {memory_limit!r} is not a size such as 4GB or "
                                "500MB") from None
    if scheduler:
        try:
            return Client(scheduler, timeout=30)
        except (OSError, ValueError, TypeError) as err:
            raise QSMInputError(f"cannot reach the Dask scheduler {scheduler} ("
                                f"{' '.join(str(err).split())[:200]})") from None
    if device == "gpu":
        try:
            from dask_cuda import LocalCUDACluster  # one worker pinned to each GPU
        except ImportError:
            raise QSMInputError("--device gpu with local workers needs dask-cuda "
                                "(pip install dask-cuda), or give --scheduler") from None
        return Client(LocalCUDACluster(memory_limit=memory_limit))
    import dask

    n = workers or max(1, (os.cpu_count() or 2) // 2)
    # threads_per_worker=1: each subject's FFTs already use the worker's cores through scipy;
    # a subject whose worker dies (out of memory, a crash) is retried once on a fresh worker,
    # then reported as failed (Dask's default is three retries); a worker is sent one subject
    # at a time (saturation 1.0), so only the subject it was running is blamed for its death
    with dask.config.set({"distributed.scheduler.allowed-failures": ALLOWED_FAILURES,
                          "distributed.scheduler.worker-saturation": 1.0}):
        return Client(LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                   memory_limit=memory_limit, dashboard_address=None))


#: times a subject is retried after its worker process died
ALLOWED_FAILURES = 1


def _task_failure(subject, err, memory_limit) -> dict:
    """The outcome of a subject whose task raised on the Dask side (its worker died)."""
    name = type(err).__name__
    if name == "KilledWorker":
        reason = (f"the worker process died while processing it, {ALLOWED_FAILURES + 1} times "
                  f"(out of memory - per-worker limit {memory_limit} - or a crash); "
                  "try --memory-limit or fewer --workers")
    else:
        reason = f"{name}: {' '.join(str(err).split())[:300]}"
    return {"subject": subject.key, "status": "failed", "error": reason, "seconds": 0.0}


def run_batch(bids_root, out_root=None, participants=None, sessions=None, config=None,
              workers=None, memory_limit="auto", scheduler=None, force=False, reference=None,
              progress=True, task=None):
    """Process every subject of a BIDS dataset; returns a summary dict (``done``, ``skipped``,
    ``failed`` lists of subject keys, ``errors`` key -> reason, ``bad_names`` path -> reason
    for files skipped for their names, the group table path).

    ``batch_summary.json`` is always written, also when the run is interrupted or the Dask
    cluster fails (``interrupted`` then says so and ``not_run`` lists the subjects left).
    ``task`` replaces ``process_subject`` (same signature), e.g. in tests.
    """
    from .errors import warn
    from .pipeline import PipelineConfig
    from .progress import Progress

    out_root = Path(out_root or Path(bids_root) / "derivatives" / "qsmkit")
    problems = []
    subjects = find_subjects(bids_root, participants, sessions, problems=problems)
    for path, reason in problems:
        warn(f"skipped: {reason}", path)
    if not subjects:
        raise QSMInputError("no *_part-mag_* / *_part-phase_* images found under sub-*/anat",
                            str(bids_root))
    config = dict(config or {})
    PipelineConfig(**config).resolved()  # method names and every parameter, before any work
    out_root.mkdir(parents=True, exist_ok=True)
    write_dataset_description(out_root, bids_root)
    todo = [s for s in subjects if force or not is_complete(out_root, s)]
    skipped = [s.key for s in subjects if s not in todo]
    results, interrupted = [], None
    try:
        if todo:
            _run_tasks(results, todo, out_root, config, reference, workers, memory_limit,
                                 scheduler, progress, task or process_subject, Progress)
    except BaseException as err:  # Ctrl-C, SIGTERM, a cluster that went away: still summarise
        interrupted = f"{type(err).__name__}: {' '.join(str(err).split())}".rstrip(": ")
        raise
    finally:
        summary = _summary(out_root, subjects, todo, skipped, results, problems, config,
                           interrupted)
    return summary


def _run_tasks(results, todo, out_root, config, reference, workers, memory_limit, scheduler,
               progress, task, progress_class) -> None:
    """One Dask task per subject; a task that fails on the Dask side (a killed worker) gives
    a failed outcome for its subject, the others go on. Outcomes are appended to ``results``
    as they come, so an interrupted run still reports the finished ones."""
    from dask.distributed import as_completed

    client = make_client(workers, memory_limit, scheduler, config.get("device", "cpu"))
    try:
        futures = {client.submit(task, s, str(out_root), config, reference,
                                 key=f"qsmkit-{s.key}-{time.time_ns()}", pure=False): s
                   for s in todo}
        # a bar on a terminal, plain lines in a log (qsmkit.progress)
        with progress_class(len(futures), not progress, "qsmkit batch", "subject") as bar:
            for fut in as_completed(futures):
                try:
                    r = fut.result()
                except Exception as err:  # KilledWorker (OOM, segfault) and the like
                    r = _task_failure(futures[fut], err, memory_limit)
                results.append(r)
                bar(f"{r['subject']} {r['status']}", len(results))
    finally:
        cluster = getattr(client, "cluster", None)
        client.close()
        if cluster is not None and not scheduler:
            cluster.close()


def _summary(out_root, subjects, todo, skipped, results, problems, config, interrupted):
    from .io import write_json

    failed = {r["subject"]: r["error"] for r in results if r["status"] != "ok"}
    finished = {r["subject"] for r in results}
    summary = {
        "done": sorted(r["subject"] for r in results if r["status"] == "ok"),
        "skipped": skipped, "failed": sorted(failed), "errors": failed,
        "bad_names": dict(problems),
        "group_table": None, "out": str(out_root),
        "seconds": {r["subject"]: round(r["seconds"], 2) for r in results},
        "config": config,
    }
    if interrupted:
        summary["interrupted"] = interrupted
        summary["not_run"] = sorted(s.key for s in todo if s.key not in finished)
    try:
        summary["group_table"] = group_table(out_root, subjects)
    except Exception as err:  # a summary is still written
        summary["group_table_error"] = str(err)
    write_json(out_root / "batch_summary.json", summary)
    return summary
