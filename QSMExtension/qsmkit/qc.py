"""Quality-control views of a run: the brain mask's volume, and magnitude with the mask's
outline in three orthogonal planes through the mask's centre (matplotlib, no display needed)."""

from __future__ import annotations

import numpy as np

from . import geometry


def mask_volume_ml(mask, voxel_size) -> float:
    """Volume of a boolean mask in millilitres (voxel size in mm)."""
    return float(np.count_nonzero(mask) * np.prod(np.asarray(voxel_size, float)) / 1000.0)


def _planes(volume, centre):
    i, j, k = centre
    return [volume[:, :, k], volume[:, j, :], volume[i, :, :]]


def _aspects(voxel_size):
    vx, vy, vz = (float(v) for v in voxel_size)
    return [vy / vx, vz / vx, vz / vy]  # imshow of rot90(plane): rows are the second axis


def centre_of(mask):
    idx = np.argwhere(mask)
    return tuple(int(v) for v in np.round(idx.mean(axis=0))) if idx.size else \
        tuple(n // 2 for n in mask.shape)


def plot_planes(axes_row, volume, voxel_size, centre, *, cmap="gray", vmin=None, vmax=None,
                outline=None, title=None):
    """Draw the three planes of ``volume`` into ``axes_row`` (3 axes), optionally with the
    outline of a boolean ``outline`` mask; returns the last image (for a colour bar)."""
    im = None
    outlines = _planes(outline, centre) if outline is not None else [None] * 3
    for ax, plane, edge, aspect, name in zip(axes_row, _planes(volume, centre), outlines,
                                             _aspects(voxel_size), ("axial", "coronal", "sagittal")):
        im = ax.imshow(np.rot90(plane), cmap=cmap, vmin=vmin, vmax=vmax, aspect=aspect,
                       interpolation="nearest")
        if edge is not None and edge.any():
            ax.contour(np.rot90(edge.astype(float)), levels=[0.5], colors="r", linewidths=0.8)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{title} ({name})" if title else name, fontsize=8)
    return im


def write_mask_qc(path, magnitude, mask, affine) -> str | None:
    """PNG of the (echo-combined) magnitude with the mask's outline in three planes; the
    title gives the mask's volume. Returns the path written, or ``None`` without matplotlib
    (Slicer's panels install only what their commands need)."""
    try:
        import matplotlib
    except ImportError:
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io import atomic_write

    mag = np.asarray(magnitude, dtype=np.float32)
    if mag.ndim == 4:
        mag = np.sqrt(np.mean(mag**2, axis=3))
    voxel_size = geometry.voxel_size(affine)
    centre = centre_of(mask)
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6))
    plot_planes(axes, mag, voxel_size, centre, vmin=0, vmax=float(np.percentile(mag, 99.5)),
                outline=mask)
    fig.suptitle(f"brain mask {mask_volume_ml(mask, voxel_size):.0f} ml (voxel axes, "
                 "not reoriented)", fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    plt.close(fig)
    return path
