"""A real head from a real scanner (../shared/data/philips-invivo-gre: Philips 3 T, 2-echo 3-D
GRE, TE 2.3 / 4.6 ms, 3 mm): the default pipeline from its three forms (classic DICOM, enhanced
DICOM, dcm2niix NIfTI), the plausibility checks of the data set's README, and the README figure
(magnitude with the mask outline, total field, local field, chi; three planes). About 40 s on
2 cores:

    python benchmarks/real_head.py [--out bench-output/real_head] [--figure PATH]

Maps are compared in the closest canonical (RAS) voxel order: dcm2niix stores this series
with the first voxel axis reversed against the DICOM row order our reader keeps.
"""

import argparse
import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from qsmkit import metrics, qc, scanner
from qsmkit.pipeline import PipelineConfig, run_pipeline

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "philips-invivo-gre"
FORMS = ("dicom-classic", "dicom-enhanced", "nifti")


def canonical(data, affine):
    img = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(data), affine))
    return np.asarray(img.dataobj), img.affine


def run_form(form):
    mag, pha, te, b0 = scanner.load_gre_scanner(DATA / form)
    t0 = time.perf_counter()
    res = run_pipeline(mag.data, pha.data, te, b0, pha.voxel_size, pha.b0_dir(), config=PipelineConfig())
    seconds = time.perf_counter() - t0
    out = {name: canonical(getattr(res, name).astype(np.float32), pha.affine)[0]
           for name in ("mask", "field_total", "field_local", "chi")}
    out["mask"] = out["mask"] > 0.5
    out["magnitude"] = canonical(np.sqrt(np.mean(mag.data.astype(np.float32) ** 2, axis=3)), pha.affine)[0]
    out["voxel_size"] = nib.affines.voxel_sizes(canonical(res.chi, pha.affine)[1])
    out["seconds"] = seconds
    out["rule"] = pha.meta.get("phase_convention", {}).get("name")
    return out


def figure(r, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vox, m = r["voxel_size"], r["mask"]
    centre = qc.centre_of(m)
    rows = [("magnitude + mask", r["magnitude"], "gray", 0, float(np.percentile(r["magnitude"], 99.5)), m),
            ("total field (ppm)", np.where(m, r["field_total"], np.nan), "RdBu_r", -1.0, 1.0, None),
            ("local field (ppm)", np.where(m, r["field_local"], np.nan), "RdBu_r", -0.05, 0.05, None),
            ("chi (ppm)", np.where(m, r["chi"], np.nan), "gray", -0.15, 0.15, None)]
    fig, axes = plt.subplots(len(rows), 3, figsize=(9.5, 11))
    for ax_row, (title, vol, cmap, lo, hi, outline) in zip(axes, rows):
        im = qc.plot_planes(ax_row, vol, vox, centre, cmap=cmap, vmin=lo, vmax=hi, outline=outline,
                            title=title)
        fig.colorbar(im, ax=ax_row.tolist(), shrink=0.8, pad=0.01)
    fig.suptitle("Philips 3 T, 2 echoes TE 2.3 / 4.6 ms, 3 mm: qsmkit run defaults "
                 f"(mask {qc.mask_volume_ml(m, vox):.0f} ml)", fontsize=10)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench-output/real_head")
    ap.add_argument("--figure", default=None, help="figure path (default OUT/real_head.png)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    results = {form: run_form(form) for form in FORMS}
    ref = results["nifti"]
    print(f"{'form':<16}{'rule':<10}{'mask ml':>9}{'chi p1':>9}{'chi p99':>9}{'NRMSE % vs NIfTI':>18}"
          f"{'seconds':>9}")
    for form, r in results.items():
        m = r["mask"]
        p1, p99 = np.percentile(r["chi"][m], [1, 99])
        both = m & ref["mask"]
        err = metrics.nrmse(r["chi"], ref["chi"], both)
        print(f"{form:<16}{r['rule']:<10}{qc.mask_volume_ml(m, r['voxel_size']):>9.0f}{p1:>9.3f}{p99:>9.3f}"
              f"{err:>18.2f}{r['seconds']:>9.1f}")
    m = ref["mask"]
    lf = ref["field_local"][m]
    print(f"NIfTI form: local field p1..p99 {np.percentile(lf, 1):.4f}..{np.percentile(lf, 99):.4f} ppm, "
          f"chi SD {ref['chi'][m].std():.3f} ppm")
    path = args.figure or os.path.join(args.out, "real_head.png")
    figure(ref, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
