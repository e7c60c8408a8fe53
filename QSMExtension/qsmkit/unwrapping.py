"""Spatial phase unwrapping.

``quality``: 3-D quality-guided (reliability-sorting) unwrapping of Abdul-Rahman
et al., Appl Opt 2007, as implemented by scikit-image's ``unwrap_phase``; the
result differs from the input by integer multiples of 2 pi (congruent).

``laplacian``: Laplacian unwrapping (Schofield & Zhu, Opt Lett 2003):
phi = lap^-1 [cos(p) lap sin(p) - sin(p) lap cos(p)], solved with FFTs and the
discrete Laplacian. Fast and robust to noise, but not congruent: it removes a
smooth harmonic part and its result near the mask edge is biased, which
background removal mostly absorbs.
"""

from __future__ import annotations

import numpy as np
from skimage.restoration import unwrap_phase

from . import backend
from .backend import get_array_module
from .registry import Registry

UNWRAPPING = Registry("unwrapping", default="quality")


@UNWRAPPING.register("quality", "3-D quality-guided unwrapping (scikit-image)")
def unwrap_quality(phase, mask=None, voxel_size=None, magnitude=None, seed=0):
    """Congruent 3-D unwrapping of a wrapped phase (rad); voxels outside ``mask`` are ignored
    and returned as 0."""
    p = backend.to_numpy(phase).astype(np.float64)
    if mask is not None:
        m = backend.to_numpy(mask).astype(bool)
        if not m.any():
            return np.zeros_like(p, dtype=np.float32)
        out = unwrap_phase(np.ma.masked_array(p, mask=~m), rng=seed)
        out = np.ma.filled(out, 0.0)
    else:
        out = unwrap_phase(p, rng=seed)
    return out.astype(np.float32)


def discrete_laplacian_kernel(shape, voxel_size, xp=np, dtype=np.float32):
    """k-space symbol of the 7-point Laplacian (1/mm^2) for a real FFT of ``shape``."""
    nd = len(shape)
    symbol = None
    for ax, (n, d) in enumerate(zip(shape, voxel_size)):
        f = np.fft.rfftfreq(n) if ax == nd - 1 else np.fft.fftfreq(n)
        term = (2 * np.cos(2 * np.pi * f) - 2) / d**2
        view = [1] * nd
        view[ax] = f.size
        term = xp.asarray(term.reshape(view), dtype=dtype)
        symbol = term if symbol is None else symbol + term
    return symbol


def laplacian(x, voxel_size, pad_shape=None):
    """Periodic 7-point Laplacian of a real array (1/mm^2 units)."""
    from .dipole import apply_kernel

    xp = get_array_module(x)
    return apply_kernel(x, lambda s: discrete_laplacian_kernel(s, voxel_size, xp, x.dtype),
                        pad_shape)


def inverse_laplacian(x, voxel_size, pad_shape=None):
    """Solve lap(u) = x with periodic boundaries; the undetermined mean of u is set to 0."""
    from .dipole import apply_kernel

    xp = get_array_module(x)

    def kernel(s):
        lap = discrete_laplacian_kernel(s, voxel_size, xp, x.dtype)
        lap[(0,) * lap.ndim] = 1
        inv = 1 / lap
        inv[(0,) * lap.ndim] = 0
        return inv

    return apply_kernel(x, kernel, pad_shape)


@UNWRAPPING.register("laplacian", "Laplacian unwrapping (Schofield & Zhu 2003), fast, not congruent")
def unwrap_laplacian(phase, mask=None, voxel_size=(1.0, 1.0, 1.0), magnitude=None):
    """Laplacian-based unwrapping; returns the unwrapped phase inside ``mask`` (0 outside)."""
    from .dipole import padded_shape

    xp = get_array_module(phase)
    p = xp.asarray(phase, dtype=backend.FLOAT)
    big = padded_shape(p.shape, [max(2, n // 8) for n in p.shape])
    s, c = xp.sin(p), xp.cos(p)
    rhs = c * laplacian(s, voxel_size, big) - s * laplacian(c, voxel_size, big)
    out = inverse_laplacian(rhs, voxel_size, big)
    if mask is not None:
        m = xp.asarray(mask).astype(bool)
        out = out - out[m].mean() if m.any() else out
        out = out * m
    return out.astype(backend.FLOAT)
