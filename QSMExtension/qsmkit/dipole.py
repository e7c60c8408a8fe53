"""The unit dipole kernel and the forward model field = F^-1 D F chi.

D(k) = 1/3 - (k . b)^2 / |k|^2  (Salomir et al., Concepts Magn Reson 2003;
Marques & Bowtell, Concepts Magn Reson 2005), with the Lorentz sphere correction
included (the 1/3), k in cycles/mm along the voxel axes (so anisotropic voxels
are exact) and b the unit B0 direction in voxel axes (see ``geometry.b0_direction``).
D(0) is set to 0: the field's mean is not determined by a finite field of view.

Kernels are built on real-FFT half spectra (chi and fields are real), cached per
shape/voxel/direction/backend, and padded to fast FFT lengths.
"""

from __future__ import annotations

import functools

import numpy as np

from . import backend
from .backend import get_array_module


def padded_shape(shape, pad=None):
    """Shape after zero padding: ``pad`` voxels added to each side of each axis (int or
    per-axis sequence), then rounded up to a fast FFT length. ``None`` or all zeros: the shape
    unchanged; ``"fast"``: only the rounding to fast FFT lengths."""
    shape = tuple(int(n) for n in shape)
    if isinstance(pad, str):
        if pad == "fast":
            return tuple(backend.next_fast_len(n) for n in shape)
        raise ValueError(f"unknown pad {pad!r}")
    if pad is None or not np.any(pad):
        return shape
    p = np.broadcast_to(np.asarray(pad, dtype=int), (len(shape),))
    return tuple(backend.next_fast_len(n + 2 * q) for n, q in zip(shape, p))


def k_frequencies(n, d, half=False, nyquist_zero=False):
    """1-D FFT frequencies (cycles/mm) of an axis of ``n`` samples ``d`` mm apart; the half
    spectrum of a real FFT if ``half``. With ``nyquist_zero`` the Nyquist sample of an even
    axis (index n/2) is set to 0."""
    k = np.fft.rfftfreq(n, d=d) if half else np.fft.fftfreq(n, d=d)
    if nyquist_zero and n % 2 == 0:
        k = k.copy()
        k[n // 2] = 0
    return k


def k_grids(shape, voxel_size, xp=np, real=True, dtype=np.float32, nyquist_zero=False):
    """Open k-space grids (cycles/mm), broadcastable, for a (real-)FFT of ``shape``."""
    grids = []
    nd = len(shape)
    for ax, (n, d) in enumerate(zip(shape, voxel_size)):
        k = k_frequencies(n, d, half=real and ax == nd - 1, nyquist_zero=nyquist_zero)
        view = [1] * nd
        view[ax] = k.size
        grids.append(xp.asarray(k.reshape(view), dtype=dtype))
    return grids


@functools.lru_cache(maxsize=4)
def _kernel_cached(shape, voxel_size, b0_dir, xp_name, real, dtype_name):
    xp = backend.get_xp("gpu" if xp_name == "cupy" else "cpu")
    dtype = np.dtype(dtype_name)
    k = k_grids(shape, voxel_size, xp=xp, real=real, dtype=dtype)
    # On an even axis the Nyquist frequencies +N/2 and -N/2 are one sample. The cross terms
    # 2 b_i b_j k_i k_j of (k.b)^2 are odd in k_i, so the value that keeps D even in k (a real
    # field, consistent for oblique B0) is their average, 0, at Nyquist; squares are unaffected.
    k_sym = k_grids(shape, voxel_size, xp=xp, real=real, dtype=dtype, nyquist_zero=True)
    b = np.asarray(b0_dir, dtype=float)
    b = b / np.linalg.norm(b)
    kb_sym = sum(ks * dtype.type(bi) for ks, bi in zip(k_sym, b))
    kb2 = kb_sym * kb_sym + sum(
        dtype.type(bi * bi) * (ki * ki - ks * ks) for ki, ks, bi in zip(k, k_sym, b))
    k2 = k[0] * k[0] + k[1] * k[1] + k[2] * k[2]
    k2[(0,) * 3] = 1  # D(0) := 0 below; avoid 0/0
    d = dtype.type(1 / 3) - kb2 / k2
    d[(0,) * 3] = 0
    return d


def dipole_kernel(shape, voxel_size, b0_dir=(0, 0, 1), xp=np, real=True, dtype=np.float32):
    """k-space dipole kernel D for an FFT of ``shape`` (half spectrum along the last axis if
    ``real``). Returns an ``xp`` array; treat it as read-only (it is cached)."""
    key_vox = tuple(round(float(v), 9) for v in voxel_size)
    key_b = tuple(round(float(v), 12) for v in b0_dir)
    return _kernel_cached(
        tuple(int(n) for n in shape), key_vox, key_b, xp.__name__, bool(real), np.dtype(dtype).name
    )


def pad_to(x, shape):
    """Zero-pad ``x`` at the end of each axis to ``shape`` (FFT convolution is circular;
    where the padding sits does not matter once we crop back)."""
    xp = get_array_module(x)
    if tuple(x.shape) == tuple(shape):
        return x
    out = xp.zeros(shape, dtype=x.dtype)
    out[tuple(slice(0, n) for n in x.shape)] = x
    return out


def crop_to(x, shape):
    return x[tuple(slice(0, n) for n in shape)]


def apply_kernel(x, kernel_fn, pad_shape=None):
    """F^-1 K F x for a real array ``x``; ``kernel_fn(shape)`` returns the half-spectrum
    kernel for the padded shape. The result has x's shape and dtype."""
    xp = get_array_module(x)
    shape = tuple(x.shape)
    big = tuple(pad_shape) if pad_shape is not None else shape
    xf = backend.rfftn(pad_to(x, big))
    xf *= kernel_fn(big)
    out = backend.irfftn(xf, s=big)
    # A contiguous copy: a view would keep the whole padded array alive.
    return xp.ascontiguousarray(crop_to(out, shape), dtype=x.dtype)


def forward_field(chi, voxel_size, b0_dir=(0, 0, 1), pad=None):
    """Field (ppm, Lorentz-corrected) produced by susceptibility ``chi`` (ppm).

    Parameters
    ----------
    chi : (X, Y, Z) array, numpy or cupy
    voxel_size : 3 floats, mm
    b0_dir : unit B0 direction in voxel axes
    pad : None, int or per-axis ints
        Zero padding (voxels per side) against wrap-around of the circular convolution.
    """
    xp = get_array_module(chi)
    chi = xp.asarray(chi)
    if not np.issubdtype(chi.dtype, np.floating):
        chi = chi.astype(backend.FLOAT)
    big = padded_shape(chi.shape, pad)
    return apply_kernel(
        chi,
        lambda s: dipole_kernel(s, voxel_size, b0_dir, xp=xp, dtype=chi.dtype),
        big,
    )


class MaskGrid:
    """Working grid: the mask's bounding box plus ``pad`` voxels per side, rounded up to fast
    FFT lengths. Sources and data are inside the mask, so the circular convolution on this grid
    differs from the linear one only by the wrap-around through the padding (the dipole field
    decays as r^-3)."""

    def __init__(self, mask, pad, xp):
        idx = [xp.nonzero(xp.any(mask, axis=tuple(a for a in range(3) if a != ax)))[0]
               for ax in range(3)]
        lo = [int(i.min()) for i in idx]
        hi = [int(i.max()) + 1 for i in idx]
        ext = [h - lo_ for lo_, h in zip(lo, hi)]
        self.shape = tuple(backend.next_fast_len(e + 2 * p) for e, p in zip(ext, pad))
        off = [(s - e) // 2 for s, e in zip(self.shape, ext)]
        self.src = tuple(slice(a, b) for a, b in zip(lo, hi))
        self.dst = tuple(slice(o, o + e) for o, e in zip(off, ext))
        self.full = tuple(mask.shape)
        self.xp = xp

    def put(self, a, dtype=None):
        out = self.xp.zeros(self.shape, dtype=backend.FLOAT if dtype is None else dtype)
        out[self.dst] = self.xp.asarray(a)[self.src]
        return out

    def take(self, a):
        out = self.xp.zeros(self.full, dtype=a.dtype)
        out[self.src] = a[self.dst]
        return out
