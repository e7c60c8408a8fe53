"""Coil combination: one complex image per echo from the images of a receive array.

Every method takes the channel images with the channels in the last axis, ``(X, Y, Z, C)`` for
one echo or ``(X, Y, Z, E, C)`` for E echoes, either complex or as magnitude plus phase (rad),
and returns a ``Combined``: the complex combined image, ``(X, Y, Z)`` or ``(X, Y, Z, E)``,
complex64, and per-channel maps. The volume is walked in slabs of rows of axis 0 with all
channels at once (contiguous in a C-ordered channels-last array), two or three passes per method,
so the working memory beyond the input and the output is a few slabs of ~32 MB plus block maps
(one value per block of a few mm per channel) whatever the number of channels; the per-channel
maps returned (``return_sensitivities=True``, the default) take C complex64 volumes.
Arithmetic is complex64/float32.

``bodycoil`` (the project's method, used by the original FOCUSS-QSM work): with a body-coil image
b = B rho of the same object, each channel m_c = S_c rho divided by b gives S_c / B, free of the
object. Per channel,

- the ratio is estimated per block of voxels (blocks of about ``block_mm``) as the least-squares
  ratio r_c = sum m_c conj(b) / sum |b|^2 over the block's voxels inside the signal mask (over
  all echoes when the body coil has them: the object's phase cancels in m_c conj(b));
- the sensitivity magnitude is a 3-D polynomial of total degree ``order`` (default 2) fitted to
  |r_c| by weighted least squares over the blocks with signal (weights = inverse variance of
  the block ratio, sum |b|^2). ``magnitude_model="log"`` (default) fits the polynomial to
  log |r_c|, i.e. |S_c / B| = exp(poly), with weights |r_c|^2 sum |b|^2: receive loops fall off
  by more than an order of magnitude across a head, which a low-order polynomial of the
  magnitude itself does not follow (on the built-in 32-coil simulation the 2nd-order polynomial
  of |r_c| misses |S_c / B| by up to 14 % RMS per coil, exp of a 2nd-order polynomial by up to
  4.8 %, of a 3rd-order one by 2.8 %);
  ``magnitude_model="linear"`` is the polynomial of |r_c| itself, as in the original method
  (clipped below at 1 % of its maximum);
- the sensitivity phase is the phase of the block ratios smoothed by a Gaussian of SD
  ``smooth_mm`` (default 6 mm) applied to the complex block sums sum m_c conj(b) (a normalised
  convolution: no unwrapping is needed, voxels are weighted by |b|^2 |S_c|, i.e. by their SNR,
  and the low SNR of the body coil, a third of a channel's in the simulation, averages out
  over the ~10^3-10^4 voxels of the kernel). Each channel's mean linear phase is taken out
  before smoothing and put back after, so that near the edge of the object, where the kernel
  sees one side only, a phase ramp is not shifted; blocks outside the object take the value of
  the nearest block with signal (the ramp extrapolates). The block maps are brought back to the
  voxel grid by trilinear interpolation, the polynomial is evaluated on the voxel grid;
- the channels are combined by least squares, rho = sum_c conj(S_c) m_c / sum_c |S_c|^2.

The result is B rho: the body coil's own magnitude and phase (smooth) stay in the combined
image, since nothing in the data separates them from the object.

Without a body coil:

``mcpc3ds``: MCPC-3D-S (Eckstein et al., "Computationally efficient combination of multi-channel
phase data from multi-echo acquisitions (ASPIRE)", Magn Reson Med 2018;79:2996). The Hermitian
product of
the first two echoes summed over channels, h = sum_c m_c2 conj(m_c1), has the phase
dPhi = omega (TE2 - TE1) free of the channels' phase offsets. Each channel's offset is
phi0_c = phi_c1 - TE1 dPhi / (TE2 - TE1); dPhi is unwrapped spatially
(``unwrapping``) only when TE1 / (TE2 - TE1) is not an integer, since an integer multiple of a
wrapped phase gives the same phasor. The offsets, weighted by |m_c1| and smoothed as complex
values (Gaussian, ``smooth_mm``, default 10 mm, on blocks of a third of that, linear phase
taken out as above), are removed from every echo, and the channels
are summed weighted by their magnitudes, rho_e = sum_c |m_ce| m_ce exp(-i phi0_c) /
sqrt(sum_c |m_ce|^2) (the root-sum-of-squares magnitude where the phases agree).

``aspire``: ASPIRE (the same paper), for TE2 = 2 TE1: the offset is taken per channel,
phi0_c = 2 phi_c1 - phi_c2, without unwrapping or a combined echo difference; then as
``mcpc3ds``.

``adaptive``: adaptive combination (Walsh et al., Magn Reson Med 2000;43:682), for one echo (or
with weights from the first echo for several). The weights at a voxel are the principal
eigenvector of the signal covariance of its neighbourhood. Here the channel images are summed
over blocks of about ``block_mm`` and the covariance at a block is that of the block sums of
its 3 x 3 x 3 block neighbourhood, R = sum_n v_n v_n^H (the signal covariance is rank one,
|rho|^2 S S^H, and the sensitivities are constant over a block, so the block sums have the same
principal direction at a fraction of the cost of voxel-wise covariances); the eigenvector is
found by power iteration, and its phase, arbitrary per voxel, is fixed so that its projection on
the principal eigenvector of the whole image's covariance (a "virtual reference coil") is real
and positive. Channel noise is assumed white and uncorrelated (prewhiten the data otherwise).
The combined image is w^H m with |w| = 1.

``phase_of_sum``: the plain complex sum of the channels, kept as a baseline: the channels'
phases differ, so they cancel in places, leaving phase singularities and open fringe lines.

``auto`` (``resolve_method``): ``bodycoil`` with a body coil, else ``mcpc3ds`` for two or more
echoes, else ``adaptive``.

``phase_residues`` counts the 2-D phase residues (poles) of a phase image, the measure of
singularities used by the tests.

**Bad input** (``QSMInputError``): channels that are neither complex nor given with a phase,
magnitude and phase or channels and body coil of different shapes, phase not in radians, a
channel that is zero everywhere, echo times not increasing or not one per echo, MCPC-3D-S or
ASPIRE with one echo, ASPIRE with TE2 != 2 TE1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from . import backend
from .backend import get_array_module
from .errors import QSMInputError
from .registry import Registry

#: ``auto`` through the registry alone means the project's method; ``resolve_method`` and
#: ``combine`` pick one from the inputs (body coil given, number of echoes)
COMBINATION = Registry("coil combination", default="bodycoil")


# ----------------------------------------------------------------------------- results


@dataclass(eq=False)
class Combined:
    """Result of a coil combination.

    ``image``: complex64, (X, Y, Z) for (X, Y, Z, C) input, (X, Y, Z, E) for (X, Y, Z, E, C).
    ``sensitivities``: complex64 (X, Y, Z, C) or None; ``bodycoil``: S_c relative to the body
    coil (S_c / B); ``adaptive``: the unit-norm combination weights w (relative sensitivities);
    ``mcpc3ds``/``aspire``: exp(i phi0_c), the channels' phase offsets; ``phase_of_sum``: None.
    ``info``: parameters and diagnostics for the sidecar.
    """

    image: np.ndarray
    sensitivities: np.ndarray | None
    method: str
    info: dict = field(default_factory=dict)

    @property
    def magnitude(self):
        return np.abs(self.image)

    @property
    def phase(self):
        return np.angle(self.image).astype(np.float32)


# ------------------------------------------------------------------------------ inputs

#: channel values per slab (32 MB of complex64): methods walk the volume in slabs of whole rows of
#: axis 0, all channels at once, so memory stays bounded and each step's operands stay near the
#: cache, whatever the number of channels; a slab of a C-ordered channels-last array is contiguous
_SLAB_ELEMENTS = 1 << 22


def _polar(mag, ph, xp):
    """mag exp(i ph) as complex64 (float32 trigonometry)."""
    mag = mag.astype(backend.FLOAT, copy=False)
    ph = ph.astype(backend.FLOAT, copy=False)
    out = xp.empty(mag.shape, dtype=backend.COMPLEX)
    out.real = mag * xp.cos(ph)
    out.imag = mag * xp.sin(ph)
    return out


class _Channels:
    """Channel images (channels last), complex or magnitude + phase (rad), read in slabs of rows
    of axis 0 as complex64 (rows, Y, Z, E, C)."""

    def __init__(self, channels, phase=None):
        xp = get_array_module(channels)
        self.xp = xp
        data = xp.asarray(channels)
        if phase is None:
            if not xp.iscomplexobj(data):
                raise QSMInputError("channel images must be complex, or magnitude with a phase array")
            ph = None
        else:
            if xp.iscomplexobj(data):
                raise QSMInputError("give complex channel images without a phase, or magnitude + phase")
            ph = xp.asarray(phase)
            if ph.shape != data.shape:
                raise QSMInputError(f"channel magnitude shape {data.shape} and phase shape {ph.shape} differ")
        if data.ndim not in (4, 5):
            raise QSMInputError(
                f"channel images must be (X, Y, Z, C) or (X, Y, Z, E, C) with channels last, "
                f"got shape {data.shape}")
        if min(data.shape) < 1:
            raise QSMInputError(f"channel images are empty, shape {data.shape}")
        self.single_echo = data.ndim == 4
        if self.single_echo:
            data = data[..., None, :]
            ph = None if ph is None else ph[..., None, :]
        self.data, self.ph = data, ph
        self.shape3 = tuple(int(n) for n in data.shape[:3])
        self.n_echoes = int(data.shape[3])
        self.n_channels = int(data.shape[4])
        self._checked_phase = ph is None

    def _check_phase_range(self, ph):
        # vendor integer phase (Siemens -4096..4095) must be rescaled before: checked on the
        # first slab only, which catches a wrong scaling at almost no cost
        xp = self.xp
        finite = ph[xp.isfinite(ph)]
        if finite.size and float(xp.max(xp.abs(finite))) > 2 * np.pi + 1e-3:
            raise QSMInputError(
                "channel phase must be in radians; rescale vendor phase first (qsmkit.units."
                f"rescale_phase; largest |phase| is {float(xp.max(xp.abs(finite))):.4g})")
        self._checked_phase = True

    def rows(self, multiple=1, n_echoes=None):
        """Slab thickness: about ``_SLAB_ELEMENTS`` values, a multiple of ``multiple`` rows."""
        ne = self.n_echoes if n_echoes is None else n_echoes
        per_row = self.shape3[1] * self.shape3[2] * ne * self.n_channels
        rows = max(1, _SLAB_ELEMENTS // per_row) // multiple * multiple
        return max(multiple, rows)

    def slabs(self, rows, echoes=slice(None), track=False):
        """Yield ``(x0, x1, m)``, m complex64 (x1 - x0, Y, Z, E', C) for rows x0:x1 (possibly a
        view of complex64 input: never modified). NaN/Inf become 0 (no signal). ``track``:
        raise, after the last slab, for a channel that is zero everywhere."""
        xp = self.xp
        energy = xp.zeros(self.n_channels, dtype=np.float64) if track else None
        n_read = len(range(*echoes.indices(self.n_echoes)))
        for x0 in range(0, self.shape3[0], rows):
            x1 = min(self.shape3[0], x0 + rows)
            d = self.data[x0:x1, :, :, echoes]
            if self.ph is None:
                m = d.astype(backend.COMPLEX, copy=False)
            else:
                p = self.ph[x0:x1, :, :, echoes]
                if not self._checked_phase:
                    self._check_phase_range(p)
                m = _polar(d, p, xp)
            if not np.isfinite(complex(m.sum())):
                m = xp.nan_to_num(m, nan=0.0, posinf=0.0, neginf=0.0)
            if track:
                f = xp.ascontiguousarray(m).view(backend.FLOAT).reshape(-1, 2 * self.n_channels)
                f = xp.ones(f.shape[0], dtype=f.dtype) @ (f * f)  # (re, im) power per channel
                energy += f[0::2] + f[1::2]
            yield x0, x1, m
        if track:
            zero = np.nonzero(backend.to_numpy(energy) == 0)[0]
            if zero.size:
                where = "" if n_read == self.n_echoes else f" in the first {n_read} echo(es)"
                raise QSMInputError(
                    f"channel {int(zero[0]) + 1} of {self.n_channels} is zero everywhere{where}"
                    + (f" ({zero.size} channels are)" if zero.size > 1 else ""))


def _sum_last(a):
    """Sum over the last axis as a matrix-vector product (BLAS; numpy's reduction over a short
    contiguous axis is several times slower)."""
    xp = get_array_module(a)
    n = a.shape[-1]
    flat = xp.ascontiguousarray(a).reshape(-1, n)
    return (flat @ xp.ones(n, dtype=a.dtype)).reshape(a.shape[:-1])


def _abs2_sum_last(a):
    """sum over the last axis of |a|^2 for complex64 ``a`` (on its float32 view: contiguous)."""
    xp = get_array_module(a)
    f = xp.ascontiguousarray(a).view(backend.FLOAT)
    f = f * f
    return _sum_last(f)


def _as_body(body, body_phase, ch: _Channels):
    """Body-coil image as complex64 (X, Y, Z, Eb), Eb = E or 1 (then it goes with echo 1)."""
    xp = ch.xp
    b = xp.asarray(body)
    if body_phase is not None:
        if xp.iscomplexobj(b):
            raise QSMInputError("give a complex body-coil image without a phase, or magnitude + phase")
        p = xp.asarray(body_phase)
        if p.shape != b.shape:
            raise QSMInputError(f"body-coil magnitude shape {b.shape} and phase shape {p.shape} differ")
        finite = p[xp.isfinite(p)]
        if finite.size and float(xp.max(xp.abs(finite))) > 2 * np.pi + 1e-3:
            raise QSMInputError("body-coil phase must be in radians; rescale vendor phase first "
                                "(qsmkit.units.rescale_phase)")
        b = _polar(b, p, xp)
    elif not xp.iscomplexobj(b):
        raise QSMInputError("body-coil image must be complex, or magnitude with body_phase")
    b = b.astype(backend.COMPLEX, copy=False)
    if b.ndim == 3:
        b = b[..., None]
    if not (b.ndim == 4 and tuple(b.shape[:3]) == ch.shape3 and b.shape[3] in (1, ch.n_echoes)):
        want = ch.shape3 + ((ch.n_echoes,) if ch.n_echoes > 1 else ())
        raise QSMInputError(
            f"body-coil image shape {tuple(xp.asarray(body).shape)} does not match the channel "
            f"images' {want} (channels {ch.shape3 + (ch.n_echoes, ch.n_channels)})")
    b = xp.nan_to_num(b, nan=0.0, posinf=0.0, neginf=0.0)
    if not bool(xp.any(b != 0)):
        raise QSMInputError("body-coil image is zero everywhere")
    return xp.ascontiguousarray(b)


def check_echo_times(te, n_echoes, required=False, method=""):
    """Validated echo times (float64 array) or None: one per echo, positive, increasing."""
    if te is None:
        if required:
            raise QSMInputError(f"{method} needs the echo times (te)")
        return None
    t = np.atleast_1d(np.asarray(te, dtype=float)).ravel()
    if t.size < n_echoes:
        raise QSMInputError(f"{t.size} echo time(s) given for {n_echoes} echoes: fewer TEs than echoes")
    if t.size != n_echoes:
        raise QSMInputError(f"{t.size} echo times given for {n_echoes} echo(es)")
    if not np.all(np.isfinite(t)) or np.any(t <= 0):
        raise QSMInputError(f"echo times must be positive, got {[float(x) for x in t]}")
    if np.any(np.diff(t) <= 0):
        raise QSMInputError(f"echo times must increase, got {[float(x) for x in t]}")
    return t


def _check_mask(mask, shape3, xp):
    if mask is None:
        return None
    m = xp.asarray(mask).astype(bool)
    if tuple(m.shape) != shape3:
        raise QSMInputError(f"mask shape {tuple(m.shape)} does not match the channel images' {shape3}")
    if not bool(m.any()):
        raise QSMInputError("mask is empty")
    return m


def _voxel_size(voxel_size):
    v = np.asarray((1.0, 1.0, 1.0) if voxel_size is None else voxel_size, dtype=float).ravel()
    if v.size != 3 or not np.all(np.isfinite(v)) or np.any(v <= 0):
        raise QSMInputError(f"voxel size must be 3 positive numbers (mm), got {voxel_size}")
    return v


# ----------------------------------------------------------------------- coarse grid


def _block_sum(a, axis, b):
    """Sums of ``b`` consecutive entries along ``axis`` (the last block may be shorter), by b
    strided slices (several times faster than ``add.reduceat``)."""
    if b == 1:
        return a

    def part(j, stop=None):
        idx = [slice(None)] * a.ndim
        idx[axis] = slice(j, stop, b if stop is None else None)
        return tuple(idx)

    out = a[part(0)].copy()
    for j in range(1, b):
        piece = a[part(j)]
        n = piece.shape[axis]
        if n == out.shape[axis]:
            out += piece
        elif n:
            out[part(0, n)] += piece
    return out


def _interp_axis(a, axis, it):
    """Linear interpolation along ``axis`` with (i0, i1, w): out = a[i0] + w (a[i1] - a[i0])."""
    if it is None:
        return a
    xp = get_array_module(a)
    i0, i1, w = it
    shape = [1] * a.ndim
    shape[axis] = -1
    lo = xp.take(a, xp.asarray(i0), axis=axis)
    hi = xp.take(a, xp.asarray(i1), axis=axis)
    hi -= lo
    hi *= xp.asarray(w).reshape(shape)
    lo += hi
    return lo


class _CoarseGrid:
    """Blocks of about ``block_mm`` (whole voxels per axis): block sums of voxel maps, and
    trilinear interpolation of block maps (values at the block centres) back to voxels. Maps may
    carry trailing axes (channels)."""

    def __init__(self, shape3, voxel_size, block_mm):
        self.shape = tuple(shape3)
        self.block = tuple(int(min(n, max(1, round(block_mm / v)))) for n, v in zip(shape3, voxel_size))
        self.cshape = tuple(-(-n // b) for n, b in zip(self.shape, self.block))
        self.centres = []  # block centres, in voxel indices
        self.interp = []
        for n, b, nc in zip(self.shape, self.block, self.cshape):
            st = np.arange(nc) * b
            cen = (st + np.minimum(st + b, n) - 1) / 2.0
            self.centres.append(cen)
            if b == 1:
                self.interp.append(None)
                continue
            u = np.interp(np.arange(n), cen, np.arange(nc))  # constant beyond the outer centres
            i0 = np.minimum(np.floor(u).astype(np.intp), max(nc - 2, 0))
            i1 = np.minimum(i0 + 1, nc - 1)
            self.interp.append((i0, i1, (u - i0).astype(np.float32)))

    def reduce(self, a):
        """Block sums over the first three axes (axis 0 may be a slab starting on a block)."""
        for ax, b in enumerate(self.block):
            a = _block_sum(a, ax, b)
        return a

    def expand_yz(self, c):
        """Block map rows interpolated over axes 1 and 2 (a new array)."""
        out = _interp_axis(_interp_axis(c, 2, self.interp[2]), 1, self.interp[1])
        return out.copy() if out is c else out

    def expander(self, c):
        """Function (x0, x1) -> rows x0:x1 of the block map ``c`` interpolated to the voxels (a new
        array); called with increasing rows, it interpolates each block row over axes 1 and 2 once."""
        return _RowExpander(self, c)

    def normalised_axes(self):
        """Voxel coordinates per axis scaled to [-1, 1] (0 for a single slice)."""
        return [_normalise(np.arange(n, dtype=float), n) for n in self.shape]

    def normalised_centres(self):
        return [_normalise(cen, n) for cen, n in zip(self.centres, self.shape)]


class _RowExpander:
    def __init__(self, grid, c):
        self.grid, self.c = grid, c
        self.rows = {}  # block row -> (row interpolated over axes 1, 2; difference to the next)

    def _row(self, r):
        if r not in self.rows:
            nxt = self.grid.expand_yz(self.c[r + 1:r + 2])[0] if r + 1 < self.c.shape[0] else None
            cur = self.rows[r - 1][2] if r - 1 in self.rows else self.grid.expand_yz(self.c[r:r + 1])[0]
            self.rows[r] = (cur, None if nxt is None else nxt - cur, nxt)
        return self.rows[r]

    def __call__(self, x0, x1):
        it0 = self.grid.interp[0]
        if it0 is None:
            return self.grid.expand_yz(self.c[x0:x1])
        i0, _i1, w = (v[x0:x1] for v in it0)
        for r in [r for r in self.rows if r < int(i0.min())]:
            del self.rows[r]
        first = self._row(int(i0[0]))[0]
        xp = get_array_module(first)
        out = xp.empty((x1 - x0,) + first.shape, dtype=first.dtype)
        for j, (r, wj) in enumerate(zip(i0, w)):
            cur, diff, _ = self._row(int(r))
            if wj == 0 or diff is None:
                out[j] = cur
            else:  # cur + w (next - cur)
                xp.multiply(diff, wj, out=out[j])
                out[j] += cur
        return out


def _normalise(idx, n):
    half = (n - 1) / 2.0
    return (idx - half) / half if half > 0 else np.zeros(len(idx))


def _linear_phase(a, valid):
    """Per channel, the phasor of the mean phase step between neighbouring blocks along each axis
    (angle of sum a[i+1] conj(a[i]) over valid pairs) made into a ramp exp(i sum_ax s_ax i_ax),
    (Xc, Yc, Zc, C)."""
    ramp = np.ones(a.shape, dtype=np.complex64)
    for ax in range(3):
        n = a.shape[ax]
        if n < 2:
            continue
        lo = [slice(None)] * 4
        hi = [slice(None)] * 4
        lo[ax], hi[ax] = slice(0, n - 1), slice(1, n)
        pair = a[tuple(hi)] * np.conj(a[tuple(lo)])
        if valid is not None:
            pair = pair * (valid[tuple(hi[:3])] & valid[tuple(lo[:3])])[..., None]
        step = np.angle(pair.reshape(-1, a.shape[3]).sum(axis=0))
        shape = [1, 1, 1, a.shape[3]]
        shape[ax] = n
        ramp = ramp * np.exp(1j * np.multiply.outer(np.arange(n), step)).astype(np.complex64).reshape(shape)
    return ramp


def _smooth_unit_phasor(blocks, sigma_blocks, valid=None):
    """Unit phasor of complex block maps (Xc, Yc, Zc, C) smoothed by a Gaussian of SD
    ``sigma_blocks`` (blocks per axis) over the ``valid`` blocks (a normalised convolution: zero
    elsewhere), every channel alike.

    Each channel's mean linear phase (``_linear_phase``) is removed before smoothing and restored
    after: near the edge of the object the kernel sees one side only, which would shift the phase
    of a ramp by (gradient x the kernel's off-centre mean position); only the smaller, curved part
    of the phase is smoothed that way. Blocks where the smoothed value vanishes (far outside the
    object) take the demodulated value of the nearest block where it does not, so the ramp
    extrapolates the phase there."""
    a = blocks if valid is None else np.where(valid[..., None], blocks, 0)
    ramp = _linear_phase(a, valid)
    a = a * np.conj(ramp)
    sigma = tuple(float(s) for s in sigma_blocks) + (0.0,)
    sm = np.empty(a.shape, dtype=np.complex64)
    if any(s > 0 for s in sigma):
        for part, src in ((sm.real, a.real), (sm.imag, a.imag)):
            part[...] = ndimage.gaussian_filter(np.ascontiguousarray(src, dtype=np.float32), sigma,
                                                mode="constant")
    else:
        sm[...] = a
    mag = np.abs(sm)
    strength = np.sqrt(np.sum(mag**2, axis=-1))
    ok = strength > 1e-6 * float(strength.max()) if strength.max() > 0 else np.ones(strength.shape, bool)
    if valid is not None:
        ok &= valid
    if ok.any() and not ok.all():
        idx = ndimage.distance_transform_edt(~ok, return_distances=False, return_indices=True)
        sm, mag = sm[tuple(idx)], mag[tuple(idx)]
    out = np.ones(sm.shape, dtype=np.complex64)
    nz = mag > 0
    out[nz] = sm[nz] / mag[nz]
    return out * ramp


# ------------------------------------------------------------------------ polynomials


def polynomial_terms(order):
    """Exponents (i, j, k) of the 3-D monomials x^i y^j z^k of total degree <= ``order``."""
    if isinstance(order, bool) or int(order) != order or order < 0:
        raise QSMInputError(f"polynomial order must be a non-negative integer, got {order}")
    order = int(order)
    return [(i, j, k) for i in range(order + 1) for j in range(order + 1 - i)
            for k in range(order + 1 - i - j)]


def _design(axes, idx, terms):
    """Design matrix of ``terms`` at the points ``idx`` (tuple of index arrays) of the grid ``axes``."""
    x, y, z = (a[i] for a, i in zip(axes, idx))
    return np.stack([x**i * y**j * z**k for i, j, k in terms], axis=1)


def _weighted_lstsq(a, y, w):
    """argmin_c sum w (a c - y)^2 by the normal equations (a few monomials on [-1, 1]: well
    conditioned in float64, and far faster than an SVD of the tall matrix)."""
    aw = a * w[:, None]
    return np.linalg.lstsq(aw.T @ a, aw.T @ y, rcond=None)[0]


def _poly_planes(coef, terms, axes):
    """Per power i of x, the (Y, Z, C) float32 maps sum_jk coef_ijk y^j z^k (C: channels)."""
    y, z = axes[1], axes[2]
    order = max(t[0] for t in terms)
    q = [np.zeros((y.size, z.size, coef.shape[1])) for _ in range(order + 1)]
    for (i, j, k), c in zip(terms, coef):
        q[i] += np.multiply.outer(np.outer(y**j, z**k), c)
    return [p.astype(np.float32) for p in q]


def _poly_rows(planes, x, xp):
    """The polynomial on rows with coordinates ``x`` (Horner in x): (len(x), Y, Z, C) float32."""
    acc = xp.empty((len(x),) + planes[0].shape, dtype=backend.FLOAT)
    acc[...] = xp.asarray(planes[-1])
    xs = xp.asarray(np.asarray(x, dtype=np.float32))[:, None, None, None]
    for q in planes[-2::-1]:
        acc *= xs
        acc += xp.asarray(q)
    return acc


# ---------------------------------------------------------------------------- methods


def _result(out, ch):
    """(X, Y, Z, E) -> (X, Y, Z) for single-echo input."""
    return out[..., 0] if ch.single_echo else out


def _weighted_channel_sum(m, wc):
    """sum_c wc_c m_ec per echo: m (..., E, C), wc (..., C) -> (..., E) (batched matmul)."""
    return (m @ wc[..., :, None])[..., 0]


@COMBINATION.register("bodycoil", "body-coil referenced: polynomial sensitivity magnitude, smoothed "
                                  "phase, least-squares combination")
def combine_bodycoil(channels, phase=None, *, body=None, body_phase=None, te=None, voxel_size=None,
                     mask=None, order=2, magnitude_model="log", threshold=0.15, block_mm=4.0,
                     smooth_mm=6.0, return_sensitivities=True, **_ignored):
    """Body-coil referenced least-squares combination (see the module docstring).

    Parameters
    ----------
    channels, phase : (X, Y, Z, C) or (X, Y, Z, E, C) complex, or magnitude + phase (rad).
    body, body_phase : body-coil image, complex or magnitude + phase, (X, Y, Z) or (X, Y, Z, E);
        a single-echo body coil with multi-echo channels is taken to match the first echo.
    te : echo times (s), optional (checked when given).
    voxel_size : mm, 3 floats (block size and smoothing are in mm); default 1 mm.
    mask : voxels with signal used for the fit; default |b| > ``threshold`` x its 99.5th percentile.
    order : total degree of the magnitude polynomial.
    magnitude_model : ``"log"`` (exp of a polynomial, default) or ``"linear"`` (polynomial).
    block_mm, smooth_mm : block size and Gaussian SD of the phase smoothing (mm).
    return_sensitivities : keep the (X, Y, Z, C) complex64 sensitivity maps (C volumes of memory).

    Returns
    -------
    Combined, image = B rho (body-coil magnitude and phase included), sensitivities = S_c / B.
    """
    if body is None:
        raise QSMInputError("the bodycoil method needs a body-coil image (--body-coil)")
    if magnitude_model not in ("log", "linear"):
        raise QSMInputError(f"magnitude_model must be 'log' or 'linear', got {magnitude_model!r}")
    terms = polynomial_terms(order)
    ch = _Channels(channels, phase)
    xp = ch.xp
    check_echo_times(te, ch.n_echoes)
    vox = _voxel_size(voxel_size)
    b = _as_body(body, body_phase, ch)
    n_b = b.shape[3]
    m = _check_mask(mask, ch.shape3, xp)
    b_pow = _sum_last(b.real**2 + b.imag**2)
    if m is None:
        rss = xp.sqrt(b_pow)
        m = rss > threshold * float(xp.percentile(rss[rss > 0], 99.5))
        del rss
    grid = _CoarseGrid(ch.shape3, vox, block_mm)
    # inverse variance of a block's ratio: sum over its masked voxels of |b|^2
    w_blk = backend.to_numpy(grid.reduce(xp.where(m, b_pow, 0).astype(backend.FLOAT)))
    n_blk = backend.to_numpy(grid.reduce(m.astype(backend.FLOAT)))
    del b_pow
    fit_blk = (n_blk >= 0.5 * np.prod(grid.block)) & (w_blk > 0)  # blocks at least half inside
    if fit_blk.sum() < len(terms):
        raise QSMInputError(f"too few voxels with signal ({int(m.sum())}) to fit a polynomial of "
                            f"order {order}; give a mask or a lower threshold")
    bw = xp.conj(b) * m[..., None]  # conj(b) inside the mask
    del b
    rows = ch.rows(grid.block[0])

    # pass 1: block sums of m_c conj(b) (summed over the body coil's echoes)
    blk = np.empty(grid.cshape + (ch.n_channels,), dtype=np.complex64)
    for x0, x1, mc in ch.slabs(rows, echoes=slice(0, n_b), track=True):
        p = mc[..., 0, :] * bw[x0:x1, :, :, 0, None]
        for e in range(1, n_b):
            p += mc[..., e, :] * bw[x0:x1, :, :, e, None]
        c0 = x0 // grid.block[0]
        red = backend.to_numpy(grid.reduce(p))
        blk[c0:c0 + red.shape[0]] = red
    del bw

    # sensitivity magnitude: weighted polynomial fit per channel
    idx = np.nonzero(fit_blk)
    design = _design(grid.normalised_centres(), idx, terms)
    ratio = np.abs(blk[idx]).astype(np.float64) / w_blk[idx][:, None]
    coef = np.zeros((len(terms), ch.n_channels))
    fit_rms, bounds = [], []
    for c in range(ch.n_channels):
        r = ratio[:, c]
        if magnitude_model == "log":
            good = r > 0
            if good.sum() < len(terms):
                raise QSMInputError(f"channel {c + 1} has no signal inside the body-coil mask")
            w = r[good] ** 2 * w_blk[idx][good]  # inverse variance of log|r|
            coef[:, c] = _weighted_lstsq(design[good], np.log(r[good]), w)
            res = design[good] @ coef[:, c] - np.log(r[good])
        else:
            w = w_blk[idx]
            coef[:, c] = _weighted_lstsq(design, r, w)
            res = design @ coef[:, c] - r
        fit_rms.append(float(np.sqrt(np.average(res**2, weights=w))))
        # bounds of the extrapolation outside the object (the fit holds inside): a polynomial may
        # go negative there, exp of one may overflow
        lo, hi = (0.001 if magnitude_model == "log" else 0.01) * r.max(), 10 * r.max()
        bounds.append((np.log(lo), np.log(hi)) if magnitude_model == "log" else (lo, hi))
    planes = _poly_planes(coef, terms, grid.normalised_axes())
    lower, upper = (xp.asarray(np.asarray(v, dtype=np.float32)) for v in zip(*bounds))
    # sensitivity phase: smoothed complex ratio
    sigma = [smooth_mm / (v * bb) for v, bb in zip(vox, grid.block)]
    phasor_conj = grid.expander(xp.asarray(_smooth_unit_phasor(blk, sigma, fit_blk).conj()))
    del blk

    # pass 2: least-squares combination, rho = sum_c conj(S_c) m_c / sum_c |S_c|^2
    xaxis = grid.normalised_axes()[0]
    out = xp.empty(ch.shape3 + (ch.n_echoes,), dtype=backend.COMPLEX)
    sens = xp.empty(ch.shape3 + (ch.n_channels,), dtype=backend.COMPLEX) if return_sensitivities else None
    for x0, x1, mc in ch.slabs(rows):
        mag = _poly_rows(planes, xaxis[x0:x1], xp)
        xp.clip(mag, lower, upper, out=mag)
        if magnitude_model == "log":
            xp.exp(mag, out=mag)
        sc = phasor_conj(x0, x1)  # conj(S_c)
        sc *= mag
        del mag
        den = _abs2_sum_last(sc)
        out[x0:x1] = _weighted_channel_sum(mc, sc) / den[..., None]
        if sens is not None:
            xp.conj(sc, out=sens[x0:x1])
        del sc
    info = {"method": "bodycoil", "order": int(order), "magnitude_model": magnitude_model,
            "block_voxels": list(grid.block), "smooth_mm": float(smooth_mm),
            "mask_voxels": int(m.sum()), "fit_blocks": int(fit_blk.sum()),
            "fit_rms": fit_rms, "body_coil_echoes": int(n_b)}
    return Combined(_result(out, ch), sens, "bodycoil", info)


def _offset_removed_sum(ch, rows, grid, phasor, keep):
    """Remove each channel's phase offset (block map of unit phasors) from every echo and sum
    weighted by magnitude: rho_e = sum_c |m_ce| m_ce conj(p_c) / sqrt(sum_c |m_ce|^2)."""
    xp = ch.xp
    out = xp.empty(ch.shape3 + (ch.n_echoes,), dtype=backend.COMPLEX)
    store = xp.empty(ch.shape3 + (ch.n_channels,), dtype=backend.COMPLEX) if keep else None
    phasor = grid.expander(phasor)
    for x0, x1, mc in ch.slabs(rows):
        p = phasor(x0, x1)
        a = xp.abs(mc)
        den = xp.sqrt(_sum_last(a * a))
        den[den == 0] = 1
        out[x0:x1] = _weighted_channel_sum(a * mc, xp.conj(p)) / den
        if store is not None:
            store[x0:x1] = p
        del p, a
    return out, store


def _two_echo_setup(ch, te, method, voxel_size):
    if ch.n_echoes < 2:
        raise QSMInputError(f"{method} needs at least two echoes, got {ch.n_echoes}")
    t = check_echo_times(te, ch.n_echoes, required=True, method=method)
    return t, _voxel_size(voxel_size)


def _offset_blocks(ch, grid, rows, offset_of, echoes, track):
    """Block sums (Xc, Yc, Zc, C) of the per-channel offset maps ``offset_of(m)``."""
    blk = np.empty(grid.cshape + (ch.n_channels,), dtype=np.complex64)
    for x0, _x1, mc in ch.slabs(rows, echoes=echoes, track=track):
        red = backend.to_numpy(grid.reduce(offset_of(mc, x0, _x1)))
        c0 = x0 // grid.block[0]
        blk[c0:c0 + red.shape[0]] = red
    return blk


@COMBINATION.register("mcpc3ds", "MCPC-3D-S (Eckstein et al. 2018): channel phase offsets from the first "
                                 "two echoes, smoothed and removed; needs >= 2 echoes")
def combine_mcpc3ds(channels, phase=None, *, te=None, voxel_size=None, mask=None, smooth_mm=10.0,
                    block_mm=None, unwrapping="auto", return_sensitivities=True, **_ignored):
    """MCPC-3D-S (see the module docstring).

    Parameters
    ----------
    channels, phase : (X, Y, Z, E, C) complex, or magnitude + phase (rad), E >= 2.
    te : echo times (any unit: only TE1 / (TE2 - TE1) is used).
    voxel_size : mm; default 1 mm.
    mask : where to unwrap the echo difference when TE1 / (TE2 - TE1) is not an integer;
        default: root-sum-of-squares magnitude of echo 1 above 10 % of its 99.5th percentile.
    smooth_mm : Gaussian SD (mm) of the complex phase-offset smoothing.
    block_mm : offsets are smoothed on blocks of this size (default smooth_mm / 3).
    unwrapping : method of ``qsmkit.unwrapping`` for dPhi (``auto``: its default); it must be
        congruent (``romeo``, ``quality``): a smooth error in dPhi would pass into every echo.

    Returns
    -------
    Combined, sensitivities = exp(i phi0_c) (unit phasors).
    """
    ch = _Channels(channels, phase)
    xp = ch.xp
    t, vox = _two_echo_setup(ch, te, "MCPC-3D-S", voxel_size)
    m = _check_mask(mask, ch.shape3, xp)
    ratio = t[0] / (t[1] - t[0])
    grid = _CoarseGrid(ch.shape3, vox, smooth_mm / 3.0 if block_mm is None else block_mm)
    # pass 1: Hermitian product of echoes 1 and 2 summed over channels (the offsets cancel)
    h = xp.empty(ch.shape3, dtype=backend.COMPLEX)
    rss = xp.empty(ch.shape3, dtype=backend.FLOAT)
    for x0, x1, mc in ch.slabs(ch.rows(1, 2), echoes=slice(0, 2), track=True):
        h[x0:x1] = (mc[..., 1:2, :] @ xp.conj(mc[..., 0, :, None]))[..., 0, 0]
        rss[x0:x1] = _abs2_sum_last(mc[..., 0, :])
    dphi = xp.angle(h).astype(backend.FLOAT)
    del h
    integer = abs(ratio - round(ratio)) < 1e-6
    if not integer:  # a fractional multiple of a wrapped phase needs the unwrapped one
        from .unwrapping import UNWRAPPING

        xp.sqrt(rss, out=rss)
        if m is None:
            m = rss > 0.1 * float(xp.percentile(rss[rss > 0], 99.5))
        unwrapped = xp.asarray(UNWRAPPING.get(unwrapping).func(dphi, mask=m, voxel_size=vox, magnitude=rss))
        dphi = xp.where(m, unwrapped, dphi)
    del rss
    k = np.float32(ratio)
    q = _polar(xp.ones(ch.shape3, dtype=backend.FLOAT), -k * dphi, xp)  # exp(-i TE1 dPhi / dTE)
    del dphi

    # pass 2: |m_c1| exp(i phi0_c) = m_c1 exp(-i TE1 dPhi / dTE), block sums
    def offset_of(mc, x0, x1):
        return mc[..., 0, :] * q[x0:x1, :, :, None]

    rows = ch.rows(grid.block[0])
    blk = _offset_blocks(ch, grid, rows, offset_of, slice(0, 1), False)
    q = None  # free it (the closure is done)
    phasor = xp.asarray(_smooth_unit_phasor(blk, [smooth_mm / (v * b) for v, b in zip(vox, grid.block)]))
    # pass 3: remove the offsets from every echo, magnitude-weighted sum
    out, store = _offset_removed_sum(ch, rows, grid, phasor, return_sensitivities)
    info = {"method": "mcpc3ds", "te_ratio": float(ratio), "unwrapped": not integer,
            "smooth_mm": float(smooth_mm), "block_voxels": list(grid.block)}
    return Combined(_result(out, ch), store, "mcpc3ds", info)


@COMBINATION.register("aspire", "ASPIRE (Eckstein et al. 2018): per-channel offsets 2 phi1 - phi2, for "
                                "TE2 = 2 TE1")
def combine_aspire(channels, phase=None, *, te=None, voxel_size=None, smooth_mm=10.0, block_mm=None,
                   return_sensitivities=True, **_ignored):
    """ASPIRE for TE2 = 2 TE1: phi0_c = 2 phi_c1 - phi_c2 per channel (weighted by |m_c1|,
    smoothed like ``mcpc3ds``), removed from every echo, magnitude-weighted sum."""
    ch = _Channels(channels, phase)
    xp = ch.xp
    t, vox = _two_echo_setup(ch, te, "ASPIRE", voxel_size)
    if abs(t[1] - 2 * t[0]) > 1e-3 * t[1]:
        raise QSMInputError(f"ASPIRE needs TE2 = 2 TE1, got {t[0]:g} and {t[1]:g}; use mcpc3ds")
    grid = _CoarseGrid(ch.shape3, vox, smooth_mm / 3.0 if block_mm is None else block_mm)

    def offset_of(mc, x0, x1):
        m1 = mc[..., 0, :]
        d = m1 * xp.conj(mc[..., 1, :])  # phase phi1 - phi2
        ad = xp.abs(d)
        ad[ad == 0] = 1
        return m1 * (d / ad)  # |m_c1| exp(i (2 phi1 - phi2))

    rows = ch.rows(grid.block[0], 2)
    blk = _offset_blocks(ch, grid, rows, offset_of, slice(0, 2), True)
    phasor = xp.asarray(_smooth_unit_phasor(blk, [smooth_mm / (v * b) for v, b in zip(vox, grid.block)]))
    out, store = _offset_removed_sum(ch, ch.rows(grid.block[0]), grid, phasor, return_sensitivities)
    info = {"method": "aspire", "smooth_mm": float(smooth_mm), "block_voxels": list(grid.block)}
    return Combined(_result(out, ch), store, "aspire", info)


@COMBINATION.register("adaptive", "adaptive combination (Walsh 2000) on blocks; single echo (weights "
                                  "from echo 1 otherwise)")
def combine_adaptive(channels, phase=None, *, voxel_size=None, block_mm=8.0, radius=1, iterations=6,
                     return_sensitivities=True, **_ignored):
    """Adaptive combination (see the module docstring).

    Parameters
    ----------
    block_mm : block size (mm) of the covariance estimate.
    radius : the covariance of a block sums the (2 radius + 1)^3 neighbouring blocks.
    iterations : power iterations for the principal eigenvector (from the reference coil).

    Returns
    -------
    Combined, image = w^H m, sensitivities = the unit-norm weights w.
    """
    ch = _Channels(channels, phase)
    xp = ch.xp
    vox = _voxel_size(voxel_size)
    grid = _CoarseGrid(ch.shape3, vox, block_mm)
    v = _offset_blocks(ch, grid, ch.rows(grid.block[0], 1), lambda mc, x0, x1: mc[..., 0, :],
                       slice(0, 1), True)
    n_c = ch.n_channels
    flat = v.reshape(-1, n_c)
    # virtual reference coil: principal eigenvector of the whole image's covariance
    _, vecs = np.linalg.eigh(flat.T @ flat.conj())
    ref = vecs[:, -1].astype(np.complex64)
    r = int(radius)
    pad = np.pad(v, ((r, r), (r, r), (r, r), (0, 0)))
    nx, ny, nz = grid.cshape
    offsets = [(dx, dy, dz) for dx in range(2 * r + 1) for dy in range(2 * r + 1) for dz in range(2 * r + 1)]
    u = np.empty(v.shape, dtype=np.complex64)
    # blocks are independent: power iteration on slabs of block rows, with the neighbour vectors
    # stacked, V (rows, Yc, Zc, n, C): R u = V^T (V^* u), two batched products per iteration
    per_row = ny * nz * len(offsets) * n_c
    step = max(1, _SLAB_ELEMENTS // per_row)
    for x0 in range(0, nx, step):
        x1 = min(nx, x0 + step)
        nb = np.stack([pad[x0 + dx:x1 + dx, dy:dy + ny, dz:dz + nz] for dx, dy, dz in offsets], axis=-2)
        nbt = np.ascontiguousarray(np.swapaxes(nb, -1, -2))
        nbh = nb.conj()
        del nb
        w = np.broadcast_to(ref, (x1 - x0, ny, nz, n_c))[..., None]
        for _ in range(int(iterations)):  # u <- R u / |R u|, R = sum_n v_n v_n^H
            w = nbt @ (nbh @ w)
            norm = np.sqrt(_abs2_sum_last(w[..., 0]))
            norm[norm == 0] = 1
            w = w / norm[..., None, None]
        u[x0:x1] = w[..., 0]
    proj = _sum_last(ref.conj() * u)  # fix the phase: projection on the reference real, positive
    pa = np.abs(proj)
    u *= np.where(pa > 0, proj.conj() / np.where(pa > 0, pa, 1), 1)[..., None]
    u = xp.asarray(u.astype(np.complex64))
    out = xp.empty(ch.shape3 + (ch.n_echoes,), dtype=backend.COMPLEX)
    store = xp.empty(ch.shape3 + (n_c,), dtype=backend.COMPLEX) if return_sensitivities else None
    expand = grid.expander(u)
    for x0, x1, mc in ch.slabs(ch.rows(grid.block[0])):
        w = expand(x0, x1)
        out[x0:x1] = _weighted_channel_sum(mc, xp.conj(w))
        if store is not None:
            store[x0:x1] = w
        del w
    info = {"method": "adaptive", "block_voxels": list(grid.block), "radius": r,
            "iterations": int(iterations)}
    return Combined(_result(out, ch), store, "adaptive", info)


@COMBINATION.register("phase_of_sum", "complex sum of the channels (baseline): phase singularities "
                                      "where the channels cancel")
def combine_sum(channels, phase=None, **_ignored):
    """The complex sum of the channels (comparison baseline, no sensitivities)."""
    ch = _Channels(channels, phase)
    out = ch.xp.empty(ch.shape3 + (ch.n_echoes,), dtype=backend.COMPLEX)
    for x0, x1, mc in ch.slabs(ch.rows(), track=True):
        out[x0:x1] = _sum_last(mc)
    return Combined(_result(out, ch), None, "phase_of_sum", {"method": "phase_of_sum"})


# ------------------------------------------------------------------------ front door


def resolve_method(name, has_body_coil, n_echoes):
    """The method ``name`` stands for: ``auto`` is ``bodycoil`` with a body coil, else
    ``mcpc3ds`` for >= 2 echoes, else ``adaptive``; other names are checked."""
    if (name or "auto").lower() == "auto":
        if has_body_coil:
            return "bodycoil"
        return "mcpc3ds" if n_echoes >= 2 else "adaptive"
    return COMBINATION.resolve(name)


def combine(channels, phase=None, *, body=None, body_phase=None, te=None, method="auto",
            voxel_size=None, mask=None, **params) -> Combined:
    """Combine channel images (channels last) with ``method`` (see the module docstring).

    ``channels`` is complex, or magnitude with ``phase`` (rad), shaped (X, Y, Z, C) or
    (X, Y, Z, E, C); ``body`` (with ``body_phase``) the body-coil image, (X, Y, Z) or
    (X, Y, Z, E); ``te`` echo times (s); ``params`` go to the method.
    """
    shape = np.shape(channels)
    n_echoes = shape[3] if len(shape) == 5 else 1
    check_echo_times(te, n_echoes)
    name = resolve_method(method, body is not None, n_echoes)
    func = COMBINATION.get(name).func
    return func(channels, phase, body=body, body_phase=body_phase, te=te, voxel_size=voxel_size,
                mask=mask, **params)


# ----------------------------------------------------------------------- diagnostics


def phase_residues(phase, mask=None, return_map=False):
    """Count the 2-D phase residues (poles) in every plane of axes 0 and 1 (axial planes).

    The residue of the 2 x 2 loop (i, j) -> (i+1, j) -> (i+1, j+1) -> (i, j+1) -> (i, j) is the sum
    of the four wrapped phase differences divided by 2 pi: 0 for a continuous phase, +-1 at a
    singularity (Goldstein et al., Radio Sci 1988). Only loops with all four corners inside
    ``mask`` count.

    Parameters
    ----------
    phase : (X, Y[, Z, ...]) phase, rad.
    mask : boolean array of phase's shape (or of its first dimensions), optional.
    return_map : also return the residue map, int8 (X - 1, Y - 1, ...).

    Returns
    -------
    int (number of residues), or (int, map).
    """
    xp = get_array_module(phase)
    p = xp.asarray(phase, dtype=xp.float32)
    if p.ndim < 2:
        raise QSMInputError(f"phase_residues needs a 2-D or 3-D phase, got shape {p.shape}")

    def wrap(d):
        return (d + np.float32(np.pi)) % np.float32(2 * np.pi) - np.float32(np.pi)

    a, b_, c, d = p[:-1, :-1], p[1:, :-1], p[1:, 1:], p[:-1, 1:]
    total = wrap(b_ - a) + wrap(c - b_) + wrap(d - c) + wrap(a - d)
    res = xp.rint(total / np.float32(2 * np.pi)).astype(xp.int8)
    if mask is not None:
        mk = xp.asarray(mask).astype(bool)
        if mk.shape != p.shape[:mk.ndim]:
            raise QSMInputError(f"mask shape {mk.shape} does not match phase shape {p.shape}")
        inside = mk[:-1, :-1] & mk[1:, :-1] & mk[1:, 1:] & mk[:-1, 1:]
        inside = inside.reshape(inside.shape + (1,) * (res.ndim - inside.ndim))
        res = res * inside
    count = int(xp.count_nonzero(res))
    return (count, res) if return_map else count
