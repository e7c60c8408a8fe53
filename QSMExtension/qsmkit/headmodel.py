"""A realistic head: chi, total field and true local field from the QSM challenge 2.0 head model.

The segmentation (Marques et al., MRM 2021; 256x320x320 at 0.64 mm, labels 1..16 with a
reference susceptibility ``chiref`` per label, air filling the outside) gives a piecewise
constant chi with real air, bone and blood sources around the brain. We use it to measure
background removal where the background is realistic, not analytic.

Definitions (document them, every figure depends on them):

- chi is taken relative to air, so it is 0 outside the head and zero padding of the field of
  view adds no spurious boundary (a constant chi everywhere produces no field with the
  Lorentz-corrected kernel).
- **total field** = D * chi over the whole head (air, bone, fat, muscle, brain).
- **true local field** = D * (M (chi - mean_M chi)) with M the brain mask, both taken at the
  native 0.64 mm and then block averaged: the field of the brain's own sources, with the
  brain's mean susceptibility removed. A uniform chi filling
  the brain produces, inside the brain, a smooth field that no background method can tell
  from an external source (for a sphere it is exactly zero), and QSM determines chi only up
  to a constant; removing the mean makes the truth the part of the tissue field that is
  identifiable, which is also how the challenge reports chi (relative to a reference).
- **true background field** = total - local, which includes the smooth field of the brain's
  mean chi.

Block averaging (``block=2`` gives 1.28 mm, 128x160x160) averages chi, so partial volumes
at tissue boundaries are kept; the mask is the majority of each block. The local field is
evaluated inside that mask (``field_local`` is zero outside it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .dipole import forward_field
from .errors import QSMInputError

B0_DIR = (0.0, 0.0, 1.0)  # the model's third axis is superior


@dataclass
class HeadModel:
    chi: np.ndarray            # ppm, relative to air (0 outside the head)
    labels: np.ndarray         # majority label of each voxel
    mask: np.ndarray           # brain mask
    field_total: np.ndarray    # ppm
    field_local: np.ndarray    # ppm, D * (M (chi - mean_M chi)), see the module docstring
    voxel_size: tuple
    b0_dir: tuple
    label_names: dict
    chiref: dict               # label -> ppm as published (not relative to air)

    @property
    def field_background(self):
        return self.field_total - self.field_local

    @property
    def affine(self):
        return np.diag([*self.voxel_size, 1.0])


def read_chiref(path):
    """Label -> (name, chiref ppm) from ``SusceptibilityValues.mat`` (struct array ``label``)."""
    import scipy.io

    s = scipy.io.loadmat(str(path), squeeze_me=True, struct_as_record=False)
    if "label" not in s:
        raise QSMInputError(f"{path}: no variable 'label'")
    out = {}
    for i, lab in enumerate(np.atleast_1d(s["label"]), start=1):
        out[i] = (str(lab.name), float(lab.chiref))
    return out


def _block_mean(x, block):
    if block == 1:
        return x.astype(np.float32)
    shape = tuple(n // block for n in x.shape)
    x = x[tuple(slice(0, n * block) for n in shape)].astype(np.float32)
    return x.reshape(shape[0], block, shape[1], block, shape[2], block).mean(axis=(1, 3, 5))


def _block_mode(labels, block, n_labels):
    if block == 1:
        return labels.astype(np.int16)
    counts = np.stack([_block_mean(labels == k, block) for k in range(n_labels + 1)])
    return counts.argmax(axis=0).astype(np.int16)


def load_head_model(folder, block=2, crop=None, pad=None) -> HeadModel:
    """Load the head model from ``folder`` (SegmentedModel.nii.gz, BrainMask.nii.gz,
    SusceptibilityValues.mat) and simulate its fields.

    Parameters
    ----------
    block : int
        Block-averaging factor (1: 0.64 mm, 2: 1.28 mm).
    crop : tuple of 3 slices, optional
        Region (in the block-averaged grid) to keep *after* simulating the fields, so the
        sources outside the crop still contribute, as in a scan with a limited field of view.
    pad : zero padding (voxels per side) for the forward simulation; default a quarter of
        each axis, more than enough with chi = 0 at the borders.
    """
    import nibabel as nib

    folder = Path(folder)
    seg_img = nib.load(str(folder / "SegmentedModel.nii.gz"))
    seg = np.asarray(seg_img.dataobj).astype(np.int16)
    brain = np.asarray(nib.load(str(folder / "BrainMask.nii.gz")).dataobj) > 0.5
    vox0 = tuple(round(float(v), 6) for v in seg_img.header.get_zooms()[:3])
    table = read_chiref(folder / "SusceptibilityValues.mat")
    air = next(v for _, (name, v) in table.items() if name.lower() == "air")
    lut = np.zeros(max(table) + 1, dtype=np.float32)
    for k, (_, v) in table.items():
        lut[k] = v - air
    lut[0] = 0.0
    chi_fine = lut[seg]
    chi = _block_mean(chi_fine, block)
    # The brain's own sources at the native 0.64 mm, then averaged: a coarse voxel at the brain
    # edge that is partly bone keeps its bone fraction in the background, where it belongs.
    brain_chi = _block_mean(np.where(brain, chi_fine - chi_fine[brain].mean(), 0), block)
    labels = _block_mode(seg, block, max(table))
    mask = _block_mean(brain, block) > 0.5
    del seg, brain, chi_fine
    vox = tuple(v * block for v in vox0)
    pad = [n // 4 for n in chi.shape] if pad is None else pad
    total = forward_field(chi, vox, B0_DIR, pad=pad)
    local = forward_field(brain_chi, vox, B0_DIR, pad=pad)
    if crop is not None:
        chi, labels, mask, total, local = (a[crop].copy() for a in (chi, labels, mask, total, local))
    return HeadModel(chi=chi, labels=labels, mask=mask, field_total=total.astype(np.float32),
                     field_local=(local * mask).astype(np.float32), voxel_size=vox, b0_dir=B0_DIR,
                     label_names={k: n for k, (n, _) in table.items()},
                     chiref={k: v for k, (_, v) in table.items()})
