"""How much of TFI's gain over PDF rests on the head model being piecewise constant: the same
head model (1.28 mm) with smooth random texture added inside the brain (Gaussian noise filtered
with sigma = 2 voxels, scaled to an SD of 0.01 and 0.02 ppm, its field added to both the total
and the true local field). TFI's edge prior still comes from the SNR-100 magnitude, which does
not show the texture. Not part of ``make bench`` (about 2 minutes on 2 cores):

    python benchmarks/tfi_texture.py
"""

from pathlib import Path

import numpy as np
from scipy import ndimage

from qsmkit import background, metrics, tfi
from qsmkit.dipole import forward_field
from qsmkit.headmodel import load_head_model, simulate_gre

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def main():
    hm = load_head_model(SHARED / "head-model", block=2)
    mag = simulate_gre(hm, te=(0.020,), b0=3.0, snr=100).magnitude[..., 0]
    eroded = ndimage.binary_erosion(hm.mask, iterations=3)
    rng = np.random.default_rng(1)
    pad = [n // 4 for n in hm.chi.shape]
    print("texture SD ppm   PDF NRMSE % mask / eroded   TFI NRMSE % mask / eroded")
    for sd in (0.0, 0.01, 0.02):
        tex = ndimage.gaussian_filter(rng.standard_normal(hm.chi.shape), 2.0)
        tex = (sd * tex / tex[hm.mask].std() * hm.mask).astype(np.float32)
        centred = np.where(hm.mask, tex - tex[hm.mask].mean(), 0).astype(np.float32)
        local = (hm.field_local + forward_field(centred, hm.voxel_size, hm.b0_dir, pad=pad)) * hm.mask
        total = hm.field_total + forward_field(tex, hm.voxel_size, hm.b0_dir, pad=pad)
        p, _, _ = background.pdf(total, hm.mask, hm.voxel_size, hm.b0_dir)
        t, _, _ = tfi.tfi(total, hm.mask, hm.voxel_size, hm.b0_dir, magnitude=mag)
        print(f"{sd:<16}{metrics.nrmse(p, local, hm.mask):>9.1f} / {metrics.nrmse(p, local, eroded):<14.1f}"
              f"{metrics.nrmse(t, local, hm.mask):>9.1f} / {metrics.nrmse(t, local, eroded):.1f}",
              flush=True)


if __name__ == "__main__":
    main()
