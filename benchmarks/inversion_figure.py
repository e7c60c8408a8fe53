"""The dipole inversion comparison figure of the README: every method on the built-in phantom
(an axial slice through the deep gray nuclei, and the slice through the vessel at the magic
angle) and on the 2016 QSM challenge (axial slice; chi_33 and COSMOS as references), each panel
titled with its NRMSE against the truth.

    python benchmarks/inversion_figure.py [--out Resources/Screenshots/inversion-comparison.png]

The phantom field is the true local field plus noise as in ``inversion_methods.py`` (SNR 100 at
TE 20 ms, 3 T); the challenge row is skipped when ../shared/data is absent.
"""

from __future__ import annotations

import argparse

import numpy as np
from inversion_methods import datasets

from qsmkit import metrics
from qsmkit.inversion import INVERSION

METHODS = [("TKD", "tkd", {}), ("L2", "l2", {}), ("LSQR", "lsqr", {}), ("TV-ADMM", "tv", {}),
           ("FOCUSS, no prior", "focuss", {"prior": "none"}), ("FOCUSS + magnitude", "focuss", {})]


def main():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="Resources/Screenshots/inversion-comparison.png")
    a = p.parse_args()

    rows = []  # (row title, truth image, [(method, image, nrmse)], window)
    for name, field, mask, vox, b0, mag, truths, vessel, _rois in datasets():
        ref_name, ref = next(iter(truths.items()))
        results = []
        for label, method, params in METHODS:
            chi, _ = INVERSION.get(method).func(field, mask, vox, b0, magnitude=mag, **params)
            chi = np.asarray(chi)
            results.append((label, chi, metrics.nrmse(chi, ref, mask)))
            print(f"{name}: {label}: NRMSE vs {ref_name} {results[-1][2]:.1f} %")
        window = float(np.percentile(np.abs(ref[mask]), 99))
        if vessel is not None:
            z_vessel = int(np.argmax(vessel.sum(axis=(0, 1))))
            z_deep = int(np.argmax(mask.sum(axis=(0, 1))))
            for z, what in ((z_deep, "axial"), (z_vessel, "vessel slice")):
                rows.append((f"phantom, {what}", ref, results, window, z, mask))
        else:
            z = int(np.argmax(mask.sum(axis=(0, 1)))) - 10
            rows.append((f"2016 challenge vs {ref_name}", ref, results, window, z, mask))
            if "cosmos" in truths:
                rows[-1] = rows[-1] + (truths["cosmos"],)

    ncol = 1 + len(METHODS)
    fig, axes = plt.subplots(len(rows), ncol, figsize=(2.1 * ncol, 2.3 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        title, ref, results, window, z, mask = row[:6]
        panels = [("truth" if "phantom" in title else "chi_33", ref, None)] + results
        for c, (label, img, err) in enumerate(panels):
            ax = axes[r, c]
            # relative to the mean in the mask, as the NRMSE compares them (chi is defined up
            # to a constant)
            shown = (img[:, :, z] - float(img[mask].mean())) * mask[:, :, z]
            ax.imshow(shown.T, origin="lower", cmap="gray",
                      vmin=-window, vmax=window)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(label if err is None else f"{label}\n{err:.1f} %", fontsize=8)
            if c == 0:
                ax.set_ylabel(title, fontsize=8)
    fig.suptitle("Dipole inversion: NRMSE vs the truth (phantom) or chi_33 (2016 challenge); each "
                 "map minus its mean in the mask; "
                 f"gray scale +-{'/'.join(f'{r[3]:.2f}' for r in rows)} ppm", fontsize=9)
    fig.tight_layout()
    fig.savefig(a.out, dpi=90)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
