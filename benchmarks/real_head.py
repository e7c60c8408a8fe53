"""A real head from a real scanner (../shared/data/philips-invivo-gre: Philips 3 T, 2-echo 3-D
GRE, TE 2.3 / 4.6 ms, 3 mm): the pipeline from its three forms (classic DICOM, enhanced DICOM,
dcm2niix NIfTI), with the defaults and with the two options this protocol needs
(``--apodize 0.5 --steep-field 3``: a Tukey k-space window against the Gibbs rings of its
80-point elliptical k-space, and the steepest-field voxels next to the sinuses left out before
background removal), and with ``--background vsharp`` (V-SHARP, whose erosion of the mask
drops the outer rim that the other methods must attribute); the plausibility checks of the
data set's README, and the README figure (magnitude with the mask outline, total field, local
field, chi; three planes). About 2 min on 2 cores. Beside them, the peer QSM.rs
(``../shared/peers/qsmrs``: V-SHARP then RTS, its library defaults) on the same total field
and mask, so that what is the data's and what is ours can be told apart. Run from the repository root:

    python -m benchmarks.real_head [--out bench-output/real_head] [--figure PATH]

The pipeline runs through ``qsmkit run``'s own function (``ras_order.run_pipeline_in_ras_order``:
the stages in the voxel order closest to RAS): dcm2niix stores this series with the first voxel
axis reversed against the DICOM row order our reader keeps, and the maps are compared in that
one order.
"""

import argparse
import os
import time
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
from benchmarks.eval import peers
from scipy import ndimage

from qsmkit import geometry, io, masking, metrics, qc, scanner
from qsmkit.pipeline import PipelineConfig
from qsmkit.ras_order import run_pipeline_in_ras_order

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "philips-invivo-gre"
FORMS = ("dicom-classic", "dicom-enhanced", "nifti")
#: name -> (k-space apodization alpha, steep-field fence, background method or None)
OPTIONS = "--apodize 0.5 --steep-field 3"
VSHARP = "--background vsharp"
SETTINGS = {"defaults": (0.0, 0.0, None), OPTIONS: (0.5, 3.0, None), VSHARP: (0.0, 0.0, "vsharp")}


def run_form(form, apodize=0.0, fence=0.0, background=None):
    mag, pha, te, b0 = scanner.load_gre_scanner(DATA / form)
    t0 = time.perf_counter()
    cfg = PipelineConfig(steep_field_fence=fence)
    if background:
        cfg = replace(cfg, background=background)
    res, order = run_pipeline_in_ras_order(mag.data, pha.data, te, b0, pha.affine, config=cfg,
                                           apodize=apodize)
    seconds = time.perf_counter() - t0
    # the forms are compared, and drawn, in the one order the stages ran in
    res = replace(res, **{n: order.forward(getattr(res, n))
                          for n in ("mask", "local_mask", "field_total", "field_local", "chi")})
    mag = io.Volume(order.forward(mag.data), order.canonical_affine)
    pha = io.Volume(order.forward(pha.data), order.canonical_affine, meta=pha.meta)
    out = {name: getattr(res, name).astype(np.float32)
           for name in ("mask", "local_mask", "field_total", "field_local", "chi")}
    out["mask"] = out["mask"] > 0.5
    out["local_mask"] = out["local_mask"] > 0.5
    out["magnitude"] = np.sqrt(np.mean(mag.data.astype(np.float32) ** 2, axis=3))
    out["voxel_size"] = nib.affines.voxel_sizes(pha.affine)
    out["seconds"] = seconds
    out["rule"] = pha.meta.get("phase_convention", {}).get("name")
    out["inversion"] = res.config.inversion
    out["te"], out["b0"] = te, b0
    out["b0_dir"] = geometry.b0_direction(order.canonical_affine)
    return out


def ripple_sd(chi, mask):
    """SD (ppm) of chi minus its 3 x 3 x 3 median, over the mask eroded by 2 voxels: the
    voxel-to-voxel oscillation that Gibbs rings add and a median removes (a ring measure; the
    rim, where background residuals sit, is left out)."""
    inner = ndimage.binary_erosion(mask, iterations=2)
    return float(np.std((chi - ndimage.median_filter(chi, 3))[inner]))


def peer_chi(r):
    """The peer, QSM.rs, on the same input: our total field and mask through its V-SHARP and
    RTS (library defaults, ``benchmarks/eval/peers.py``). None where ../shared lacks it."""
    if peers.available():
        return None
    vox = tuple(float(v) for v in r["voxel_size"])
    field = np.where(r["mask"], r["field_total"], 0)
    local, lm, _ = peers.run("bfr", "vsharp", field, r["mask"], vox, r["b0_dir"], b0_t=r["b0"],
                             te_s=float(r["te"][-1]))
    lm = lm > 0
    chi, _, _ = peers.run("dipole", "rts", local, lm, vox, r["b0_dir"], b0_t=r["b0"],
                          te_s=float(r["te"][-1]))
    chi = chi - chi[lm].mean()  # its offset is arbitrary: relative to the mask's mean
    return {**r, "chi": np.where(lm, chi, 0).astype(np.float32), "local_mask": lm,
            "field_local": np.where(lm, local, 0).astype(np.float32)}


def window(chi, mask, half=0.12):
    """Grey window +-``half`` ppm around the median in the mask (chi is relative to CSF)."""
    mid = float(np.median(chi[mask]))
    return mid - half, mid + half


def spreads(chi, mask, voxel_size, rim_mm=6.0):
    """chi's 1st-99th percentile range (ppm) within ``rim_mm`` of the mask's edge and deeper:
    residual background and edge streaks widen the first, not the second."""
    depth = masking.depth_mm(mask, voxel_size)
    out = []
    for part in (mask & (depth <= rim_mm), mask & (depth > rim_mm)):
        p1, p99 = np.percentile(chi[part], [1, 99])
        out.append(float(p99 - p1))
    return out


def figure(plain, options, vsharp, peer, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def chi_row(label, res):
        """chi inside the result's own local mask, grey window about its median."""
        cm = res["local_mask"]
        return (f"chi, {label} (ppm)", np.where(cm, res["chi"], np.nan), "gray", *window(res["chi"], cm),
                None)

    r = plain
    vox, m, lm = r["voxel_size"], r["mask"], r["local_mask"]
    centre = qc.centre_of(m)
    rows = [("magnitude + mask", r["magnitude"], "gray", 0, float(np.percentile(r["magnitude"], 99.5)), m),
            ("total field (ppm)", np.where(m, r["field_total"], np.nan), "RdBu_r", -1.0, 1.0, None),
            ("local field (ppm)", np.where(lm, r["field_local"], np.nan), "RdBu_r", -0.04, 0.04, None)]
    chis = [("defaults", plain), ("options", options), ("V-SHARP", vsharp), ("QSM.rs", peer)]
    rows += [chi_row(label, res) for label, res in chis if res is not None]
    fig, axes = plt.subplots(len(rows), 3, figsize=(9.5, 2.6 * len(rows)))
    for ax_row, (title, vol, cmap, lo, hi, outline) in zip(axes, rows):
        im = qc.plot_planes(ax_row, vol, vox, centre, cmap=cmap, vmin=lo, vmax=hi, outline=outline,
                            title=title)
        fig.colorbar(im, ax=ax_row.tolist(), shrink=0.8, pad=0.01)
    fig.suptitle("Philips 3 T, 2 echoes TE 2.3 / 4.6 ms, 3 mm (NIfTI form). Rows 1-4: qsmkit run with "
                 f"defaults (mask {qc.mask_volume_ml(m, vox):.0f} ml, inversion {r['inversion']});\n"
                 f"options: {OPTIONS}; V-SHARP: {VSHARP};\nQSM.rs: V-SHARP + RTS on the same "
                 "total field and mask. python -m benchmarks.real_head", fontsize=9)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench-output/real_head")
    ap.add_argument("--figure", default=None, help="figure path (default OUT/real_head.png)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    kept = {}
    header = (f"{'form':<16}{'mask ml':>9}{'bg mask ml':>11}{'chi p1':>9}{'chi p99':>9}{'ripple':>8}"
              f"{'rim p1-p99':>11}{'inner p1-p99':>13}{'NRMSE % vs NIfTI':>18}{'seconds':>9}")

    def line(form, r, ref=None):
        m = r["local_mask"]
        p1, p99 = np.percentile(r["chi"][m], [1, 99])
        rim, inner = spreads(r["chi"], m, r["voxel_size"])
        err = "-" if ref is None else f"{metrics.nrmse(r['chi'], ref['chi'], m & ref['local_mask']):.2f}"
        print(f"{form:<16}{qc.mask_volume_ml(r['mask'], r['voxel_size']):>9.0f}"
              f"{qc.mask_volume_ml(m, r['voxel_size']):>11.0f}{p1:>9.3f}{p99:>9.3f}"
              f"{ripple_sd(r['chi'], m):>8.4f}{rim:>11.3f}{inner:>13.3f}{err:>18}{r['seconds']:>9.1f}")

    for setting, (alpha, fence, background) in SETTINGS.items():
        results = {form: run_form(form, alpha, fence, background) for form in FORMS}
        kept[setting] = ref = results["nifti"]
        print(f"\n{setting}\n{header}")
        for form, r in results.items():
            line(form, r, None if form == "nifti" else ref)
    peer = peer_chi(kept["defaults"])
    if peer is None:
        print(f"\nQSM.rs not run: {peers.available()}")
    else:
        print(f"\nQSM.rs V-SHARP + RTS on the defaults' total field and mask (NIfTI form; chi "
              f"relative to the mask's mean, not CSF)\n{header}")
        line("nifti", {**peer, "seconds": float("nan")})
    path = args.figure or os.path.join(args.out, "real_head.png")
    figure(kept["defaults"], kept[OPTIONS], kept[VSHARP], peer, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
