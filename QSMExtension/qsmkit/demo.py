"""``qsmkit demo``: simulate the built-in phantom, run the whole pipeline, measure every stage
against the truth, and write NIfTI outputs, a metrics table and a PNG overview."""

from __future__ import annotations

import csv
import os
import time

import numpy as np

from . import backend, metrics, report
from .inversion import INVERSION
from .pipeline import STAGES, PipelineConfig, run_pipeline, sidecar
from .progress import Progress
from .simulation_files import write_simulation


def dice(a, b) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def stage_metrics(ph, res, chi_from_true_field, te):
    """Rows (stage, method, seconds, metric, value) comparing each stage with the truth."""
    times = {s["stage"]: (s["method"], s["seconds"]) for s in res.stages}
    both = res.mask & ph.mask
    local = res.local_mask & ph.mask
    truth_chi = ph.chi_brain
    rows = [
        ("mask", *times["mask"], "Dice vs true brain mask", dice(res.mask, ph.mask)),
        ("field", *times["field"], "NRMSE total field % (mask)",
         metrics.nrmse(res.field_total, ph.field_total, both)),
        ("background", *times["background"], "NRMSE local field % (valid mask)",
         metrics.nrmse(res.field_local, ph.field_local, local)),
        ("background", *times["background"], "valid mask / brain mask %",
         100 * float(local.sum() / ph.mask.sum())),
    ]
    method, seconds = times["inversion"]
    s = metrics.summary(res.chi, truth_chi, local, labels=ph.labels * local,
                        vessel_mask=ph.vessel_mask & local)
    # the error of a local field concentrates at the mask's edge, where background removal is
    # least certain: the same NRMSE two voxels in from that edge separates the two
    from scipy import ndimage

    inner = ndimage.binary_erosion(local, iterations=2)
    rows += [("inversion", method, seconds, "NRMSE chi %", s["nrmse"]),
             ("inversion", method, seconds, "NRMSE chi % (2 voxels in from the edge)",
              metrics.nrmse(res.chi, truth_chi, inner)),
             ("inversion", method, seconds, "HFEN chi %", s["hfen"]),
             ("inversion", method, seconds, "SSIM chi", s["ssim"]),
             ("inversion", method, seconds, "vessel contrast recovered / true",
              s.get("vessel_contrast", float("nan")))]
    for lab, err in sorted(s.get("roi_error_ppb", {}).items()):
        name = ph.label_names.get(lab, str(lab))
        if name in ("globus_pallidus", "substantia_nigra", "dentate", "red_nucleus", "putamen",
                    "caudate"):
            rows.append(("inversion", method, seconds, f"{name} error ppb (mask mean ref.)", err))
    chi_t, t_true = chi_from_true_field
    rows.append(("inversion*", method, t_true, "NRMSE chi % from true local field",
                 metrics.nrmse(chi_t, truth_chi, ph.mask)))
    total = sum(s["seconds"] for s in res.stages)
    rows.append(("pipeline", "total", total, "wall seconds (mask..inversion)", total))
    return rows


def deep_gray_table(ph, maps):
    """Mean chi relative to CSF (ventricles) in the deep gray nuclei, ppb, one column per map:
    the table QSM studies publish, for the truth and the reconstructions side by side."""
    from . import stats
    from .simulate import DEEP_GRAY, LABEL_IDS

    keep = [LABEL_IDS[n] for n in (*DEEP_GRAY, "csf")]
    labels = np.where(np.isin(ph.labels, keep), ph.labels, 0)
    columns = {}
    for title, chi in maps.items():
        rows = stats.roi_table(chi, labels, ph.voxel_size, ph.label_names, reference="csf")
        columns[title] = {r["name"]: 1000 * r["mean_ref"] for r in rows}
    return [(name, *(columns[t][name] for t in maps)) for name in DEEP_GRAY]


def overview_png(path, ph, acq, res):
    """One axial slice through the deep gray nuclei of every stage, plus a coronal view of chi."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z = int(np.argmax(np.isin(ph.labels, [4, 8, 9]).sum(axis=(0, 1))))
    panels = [
        ("magnitude", acq.magnitude[..., 0], "gray", None),
        ("wrapped phase (rad)", acq.phase[..., 0], "gray", (-np.pi, np.pi)),
        ("total field (ppm)", res.field_total * res.mask, "RdBu_r", None),
        ("local field (ppm)", res.field_local, "RdBu_r", (-0.05, 0.05)),
        ("chi (ppm)", res.chi, "gray", (-0.15, 0.25)),
        ("true chi (ppm)", ph.chi_brain, "gray", (-0.15, 0.25)),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(12, 8.5))
    for ax, (title, vol, cmap, lim) in zip(axes.ravel(), panels):
        img = np.asarray(vol)[:, :, z].T
        if lim is None:
            lim = np.percentile(img, [1, 99])
        ax.imshow(img, cmap=cmap, vmin=lim[0], vmax=lim[1], origin="lower",
                  aspect=ph.voxel_size[1] / ph.voxel_size[0])
        ax.set_title(title)
        ax.axis("off")
    fig.suptitle(f"qsmkit demo: slice z={z}; methods: "
                 + ", ".join(f"{s['stage']}={s['method']}" for s in res.stages))
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)


def format_table(rows) -> str:
    lines = ["Each stage against the truth. ROI errors: mean of chi minus the true mean per "
             "structure, each map",
             "relative to its own mean over the labelled voxels of the mask (mask mean ref.).",
             f"{'stage':<12}{'method':<11}{'seconds':>8}  {'metric':<42}{'value':>9}"]
    for stage, method, seconds, metric, value in rows:
        lines.append(f"{stage:<12}{method:<11}{seconds:>8.2f}  {metric:<42}{value:>9.3f}")
    return "\n".join(lines)


def simulate(shape=(256, 256, 64), voxel_size=(0.9375, 0.9375, 2.5), seed=0, snr=100.0,
             te=(0.020,), b0=3.0):
    """The demo's phantom and acquisition, (phantom, acquisition): also what
    ``benchmarks/demo_peers.py`` hands to the peer."""
    from .simulate import make_phantom, simulate_acquisition

    ph = make_phantom(shape=shape, voxel_size=voxel_size, seed=seed)
    # The original experiment: single echo, no receiver phase offset (it cannot be separated
    # from the field with one echo). Multi-echo demos keep the offset; the echo difference removes it.
    return ph, simulate_acquisition(ph, te=te, b0=b0, snr=snr, phase_offset=len(te) > 1, seed=seed)


def run_demo(out, shape=(256, 256, 64), voxel_size=(0.9375, 0.9375, 2.5), seed=0, snr=100.0,
             te=(0.020,), b0=3.0, config: PipelineConfig | None = None, quiet=False):
    """Simulate, reconstruct, measure; returns the metric rows."""
    from . import io

    t_start = time.perf_counter()
    cfg = (config or PipelineConfig()).resolved()
    ph, acq = simulate(shape, voxel_size, seed, snr, te, b0)
    t_sim = time.perf_counter() - t_start
    inputs = os.path.join(out, "inputs")
    write_simulation(inputs, ph, acq, {"shape": list(shape), "voxel_size": list(voxel_size),
                                       "seed": seed, "snr": snr, "te": list(te), "b0": b0},
                     seconds=t_sim)
    progress = Progress(len(STAGES), quiet, "qsmkit demo")
    try:
        res = run_pipeline(acq.magnitude, acq.phase, te, b0, ph.voxel_size, ph.b0_dir,
                           config=cfg, progress=progress)
    finally:
        progress.close()
    # The inversion alone, from the true local field inside the true mask, isolates its error.
    t0 = time.perf_counter()
    chi_t, _ = INVERSION.get(cfg.inversion).func(
        backend.to_device(ph.field_local, cfg.device, backend.FLOAT),
        backend.to_device(ph.mask, cfg.device), ph.voxel_size, ph.b0_dir,
        magnitude=backend.to_device(ph.magnitude, cfg.device, backend.FLOAT),
        **cfg.inversion_params)
    chi_t = backend.to_numpy(chi_t)
    rows = stage_metrics(ph, res, (chi_t, time.perf_counter() - t0), te)

    from .geometry import affine_for_b0

    affine = affine_for_b0(ph.voxel_size, ph.b0_dir, ph.chi.shape)
    meta = sidecar(cfg, res.stages, inputs={"simulation": inputs, "te": list(te), "b0": b0},
                   extra={"units": {"chi": "ppm", "field": "ppm"},
                          **report.pipeline_record(res.stages)})
    titles = ("truth", "pipeline", "from true local field")
    roi = deep_gray_table(ph, dict(zip(titles, (ph.chi_brain, res.chi, chi_t))))
    written = []
    with io.OutputSet() as outset:  # every output moves into place together at the end
        def at(name):
            return outset.path(os.path.join(out, name))

        for name in ("mask", "field_total", "field_local", "local_mask", "chi"):
            data = getattr(res, name)
            io.save_volume(at(f"{name}.nii.gz"), data, affine, sidecar=meta,
                           dtype=np.uint8 if data.dtype == bool else np.float32)
            written.append(os.path.join(out, f"{name}.nii.gz"))
        with open(at("metrics.csv"), "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["stage", "method", "seconds", "metric", "value"])
            w.writerows([[r[0], r[1], f"{r[2]:.3f}", r[3], f"{r[4]:.4f}"] for r in rows])
        io.write_json(at("metrics.json"),
                      {"rows": [dict(zip(["stage", "method", "seconds", "metric", "value"], r))
                                for r in rows], "simulation_seconds": t_sim,
                       "total_seconds": time.perf_counter() - t_start, **meta})
        overview_png(at("overview.png"), ph, acq, res)
        with open(at("roi_stats.csv"), "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["structure", *(f"{t} chi - csf (ppb)" for t in titles)])
            w.writerows([[r[0], *(f"{v:.1f}" for v in r[1:])] for r in roi])
    if not quiet:
        print(format_table(rows))
        print("\nDeep gray matter, chi relative to CSF (ventricles), ppb: the true map, the "
              "pipeline's and the\ninversion of the true local field (roi_stats.csv).")
        print(f"{'chi - CSF (ppb)':<20}" + "".join(f"{t:>24}" for t in titles))
        for r in roi:
            print(f"{r[0]:<20}" + "".join(f"{v:>24.1f}" for v in r[1:]))
    written += [os.path.join(out, n) for n in ("metrics.csv", "roi_stats.csv", "overview.png")]
    report.summary("demo", meta["method"], time.perf_counter() - t_start, written, quiet)
    return rows
