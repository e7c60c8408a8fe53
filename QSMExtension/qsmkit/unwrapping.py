"""Spatial phase unwrapping.

``romeo`` (the default when numba is installed): quality-guided region growing after
ROMEO (Dymerska et al., "Phase unwrapping with a rapid opensource minimum spanning tree
algorithm (ROMEO)", MRM 85:2294, 2021). Every edge between 6-neighbours in the mask gets a
quality in [0, 1], the product of

- phase coherence ``1 - |wrap(p_j - p_i)| / pi`` (small wrapped differences are reliable);
- with a magnitude, the magnitude weight ``min(1, min(M_i, M_j) / M_ref)``, ``M_ref`` half the
  90th percentile of the magnitude in the mask (noise voxels come last), and optionally
  ROMEO's magnitude coherence ``(min(M_i, M_j) / max(M_i, M_j))^2`` (off by default, see
  :func:`unwrap_romeo`);
- second-difference consistency ``1 - max_n |wrap(d - d_n)| / pi`` over the parallel edges
  ``d_n`` around the edge (the reliability of Herraez et al., Appl Opt 41:7437, 2002): an
  aliased or noisy difference disagrees with its neighbours;
- (multi-echo) ROMEO's phase linearity ``1 - |wrap(d2 - d1 TE2/TE1)| / pi``, d1, d2 the wrapped
  differences of two echoes.

The qualities are quantised into 255 bins (a bucket priority queue). Growing starts from the
seed voxel whose neighbourhood has the best edges; the best edge leaving the unwrapped region
is taken next, so the voxels join in the order of a maximum spanning tree of the qualities and
noisy or aliased edges are crossed last. A joining voxel ``t`` gets the 2 pi multiple
``k = round((pred - p_t) / 2 pi)``: ROMEO takes ``pred`` from the voxel it is reached from;
here every unwrapped neighbour votes with its edge quality as weight, and a neighbour ``u``
behind which the unwrapped phase climbs steeply (between pi / 4 and 3 pi per voxel) and
steadily (two steps that differ by less than pi) predicts by linear extrapolation,
``pred = 2 p_u - p_uu``. The extrapolation follows a
steep but smooth phase (near air cavities at 7 T) across more than pi per voxel, where
neighbour differences alias: on the head model at 7 T, TE 25 ms it cut the wrong voxels from
0.34 % to 0.09 % of the brain. The result is congruent (it differs from the input by integer
multiples of 2 pi). The loops are compiled with numba (``cache=True``: the first call on a
machine compiles for about 2 s, a new process loads the cache in about 0.4 s).

Islands, parts of the mask with no edge to the main region, are grown from their own best
seed and then shifted by a multiple of 2 pi: the one that makes the island's voxels closest to
the main region (within ``island_margin_mm``) agree, in the median, with their nearest main
voxels; an island farther away gets the multiple that brings its mean closest to the main
region's mean. An island's offset is not determined by the data; this is the choice that is
right when the phase changes by less than pi across the gap.

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

import importlib.util

import numpy as np
from skimage.restoration import unwrap_phase

from . import backend
from .backend import get_array_module
from .errors import QSMInputError
from .registry import Registry


def _default_method():
    """``romeo`` where numba is installed (a compiled region-growing loop), else ``quality``."""
    return "romeo" if importlib.util.find_spec("numba") is not None else "quality"


UNWRAPPING = Registry("unwrapping", default=_default_method)


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


# --------------------------------------------------------------------------------- ROMEO

NBINS = 255  # quality bins of the bucket queue; edge code 0 means "no edge"
TWO_PI = 2 * np.pi
#: a neighbour's unwrapped gradient between these (rad per voxel) is extrapolated: below the
#: minimum both predictions agree; beyond the maximum (past the first side lobe of the
#: intravoxel dephasing sinc) no signal is left to trust, and in noise an uncapped
#: extrapolation drifts without bound. It must also be steady: where the step before it is
#: unwrapped too, the two differ by less than EXTRAPOLATE_STEADY (a gradient that flips, as in
#: the ringing next to a sharp-edged source, is not continued)
EXTRAPOLATE_MIN = 0.25 * np.pi
EXTRAPOLATE_MAX = 3.0 * np.pi
EXTRAPOLATE_STEADY = np.pi


def _edge_codes_py(phase, mag, phase2, ratio, state, offs, mag_ref, coherence, consistency,
                   codes):
    """Quantised quality of the edge from each voxel to its +x, +y, +z neighbour.

    ``codes[d, i]`` is 0 where there is no edge (either voxel outside the mask), else
    ``1 + round((1 - w) (NBINS - 1))``: 1 for the best edges, NBINS for the worst (w = 0).
    Flat, padded (one voxel of "outside" around the volume) C-order arrays; ``state`` is 0
    for mask voxels, -1 elsewhere. ``mag`` / ``phase2`` have size 0 when absent;
    ``coherence`` is the exponent of the magnitude coherence (0: off), ``consistency`` (0/1)
    switches the second-difference term on. See ``unwrap_romeo`` for the terms.
    """
    n = phase.size
    use_mag = mag.size > 0
    use_lin = phase2.size > 0
    for i in range(n):
        if state[i] != 0:
            continue
        for d in range(3):
            j = i + offs[d]
            if state[j] != 0:
                continue
            dp = phase[j] - phase[i]
            dp -= TWO_PI * np.floor(dp / TWO_PI + 0.5)
            w = 1.0 - abs(dp) / np.pi
            if use_mag:
                lo = min(mag[i], mag[j])
                hi = max(mag[i], mag[j])
                if lo > 0:
                    w *= min(1.0, lo / mag_ref)
                    if coherence > 0:
                        w *= (lo / hi) ** coherence
                else:
                    w = 0.0
            if consistency:
                # the largest wrapped second difference to the parallel edges around this one
                worst = 0.0
                for a in range(3):
                    for side in range(2):
                        if a == d:
                            p0 = i - offs[d] if side == 0 else j
                        else:
                            p0 = i + offs[a] if side == 0 else i - offs[a]
                        p1 = p0 + offs[d]
                        if state[p0] == 0 and state[p1] == 0:
                            e = phase[p1] - phase[p0]
                            e = dp - (e - TWO_PI * np.floor(e / TWO_PI + 0.5))
                            e = abs(e - TWO_PI * np.floor(e / TWO_PI + 0.5))
                            worst = max(worst, e)
                w *= 1.0 - worst / np.pi
            if use_lin:
                d2 = phase2[j] - phase2[i]
                e = d2 - ratio * dp
                e -= TWO_PI * np.floor(e / TWO_PI + 0.5)
                w *= 1.0 - abs(e) / np.pi
            w = min(max(w, 0.0), 1.0)
            codes[d, i] = 1 + int((1.0 - w) * (NBINS - 1) + 0.5)


def _predict_py(phase, codes, state, step, t, dd, extrapolate, gmin, gmax, gtol):
    """The phase the unwrapped neighbour ``u = t + step[dd]`` predicts for voxel ``t``: its own
    value, or, with ``extrapolate``, where the unwrapped gradient behind it is steep (between
    ``gmin`` and ``gmax`` rad per voxel) and steady (the two steps behind ``u``, to ``uu`` and
    ``uuu``, differ by less than ``gtol`` when ``uuu`` is unwrapped), that value continued
    linearly, ``2 p_u - p_uu``."""
    u = t + step[dd]
    pred = phase[u]
    if extrapolate:
        uu = u + step[dd]
        if state[uu] > 0:
            g = phase[u] - phase[uu]
            if gmin < abs(g) < gmax:
                uuu = uu + step[dd]
                if state[uuu] <= 0 or abs(g - (phase[uu] - phase[uuu])) < gtol:
                    pred += g
    return pred


def _grow_py(phase, codes, state, offs, seeds, label0, q_item, q_next, head, vote, extrapolate,
             gmin, gmax, gtol):
    """Region growing from each not yet unwrapped voxel of ``seeds``, in order.

    ``phase`` (flat, padded) is unwrapped in place; ``state`` receives the region number
    (label0, label0 + 1, ...) of every voxel reached. The bucket queue is a linked list per
    bin (``head``, ``q_next``), LIFO within a bin; an item is ``voxel * 8 + direction``, the
    direction (0..5) pointing from the voxel it was reached from. Every edge is queued at
    most once (from whichever end is unwrapped first), so ``q_item`` needs 3 x mask slots.
    ``vote`` / ``extrapolate``: see ``unwrap_romeo``. Returns the number of regions grown.
    """
    nb = head.size
    step = np.empty(6, np.int64)
    for d in range(3):
        step[d] = offs[d]
        step[d + 3] = -offs[d]
    ks = np.zeros(6)
    ws = np.zeros(6)
    top = 0
    label = label0
    for s in range(seeds.size):
        seed = seeds[s]
        if state[seed] != 0:
            continue
        state[seed] = label
        cur = nb
        v = seed
        while True:
            # queue the edges from v to its neighbours that are still to be unwrapped
            for dd in range(6):
                u = v + step[dd]
                if state[u] != 0:
                    continue
                c = codes[dd, v] if dd < 3 else codes[dd - 3, u]
                if c == 0:
                    continue
                b = c - 1
                q_item[top] = u * 8 + dd
                q_next[top] = head[b]
                head[b] = top
                top += 1
                if b < cur:
                    cur = b
            # the best queued edge whose far voxel is still wrapped
            v = -1
            while cur < nb:
                k = head[cur]
                if k < 0:
                    cur += 1
                    continue
                head[cur] = q_next[k]
                t = q_item[k] // 8
                if state[t] != 0:
                    continue
                back = (q_item[k] % 8 + 3) % 6  # direction from t to the voxel it was reached from
                pred = _predict_py(phase, codes, state, step, t, back, extrapolate, gmin, gmax, gtol)
                kk = np.floor((pred - phase[t]) / TWO_PI + 0.5)
                if vote:
                    nk = 0
                    for dd in range(6):
                        u = t + step[dd]
                        if state[u] <= 0:
                            continue
                        c = codes[dd, t] if dd < 3 else codes[dd - 3, u]
                        if c == 0:
                            continue
                        wq = 1.0 - (c - 1) / NBINS
                        pu = _predict_py(phase, codes, state, step, t, dd, extrapolate, gmin, gmax, gtol)
                        ku = np.floor((pu - phase[t]) / TWO_PI + 0.5)
                        found = False
                        for z in range(nk):
                            if ks[z] == ku:
                                ws[z] += wq
                                found = True
                        if not found:
                            ks[nk] = ku
                            ws[nk] = wq
                            nk += 1
                    best = -1.0
                    for z in range(nk):
                        if ws[z] > best:
                            best = ws[z]
                            kk = ks[z]
                phase[t] += TWO_PI * kk
                state[t] = label
                v = t
                break
            if v < 0:
                break
        label += 1
    return label - label0


def _seed_quality_py(codes, state, offs, quality):
    """Per mask voxel: the summed quality (1 - bin / NBINS) of its edges, 0 elsewhere."""
    n = state.size
    for i in range(n):
        if state[i] != 0:
            continue
        acc = 0.0
        for d in range(3):
            c = codes[d, i]
            if c > 0:
                acc += 1.0 - (c - 1) / NBINS
            j = i - offs[d]
            if j >= 0:
                c = codes[d, j]
                if c > 0:
                    acc += 1.0 - (c - 1) / NBINS
        quality[i] = acc


_PY_KERNELS = {"edges": _edge_codes_py, "grow": _grow_py, "quality": _seed_quality_py}
_COMPILED = backend.NumbaKernels(globals(), _PY_KERNELS, helpers=("_predict_py",))


def _kernels():
    """The numba-compiled kernels; the plain Python functions where numba is absent (correct,
    but minutes for a brain: ``auto`` then resolves to ``quality``)."""
    return _COMPILED.get() or _PY_KERNELS


def _padded_flat(a, dtype, fill):
    out = np.full(tuple(n + 2 for n in a.shape), fill, dtype=dtype)
    out[1:-1, 1:-1, 1:-1] = a
    return out.ravel()


def _as_3d(name, a, shape):
    a = backend.to_numpy(a)
    if a.shape != shape:
        raise QSMInputError(f"{name} shape {a.shape} does not match phase shape {shape}")
    return a


def romeo_edge_quality(phase, mask=None, magnitude=None, phase2=None, te_ratio=None,
                       magnitude_coherence=0.0, consistency=True):
    """ROMEO's edge qualities as an (3, X, Y, Z) uint8 array of bin codes: ``[d, x, y, z]`` is
    the edge from (x, y, z) to its neighbour along axis d; 0: no edge, 1: best, 255: worst
    (quality 0). Arguments as for :func:`unwrap_romeo`; exposed for inspection and tests."""
    codes, _, _ = _prepare(phase, mask, magnitude, phase2, te_ratio, magnitude_coherence,
                           consistency)
    shape = tuple(n + 2 for n in np.shape(phase))
    return codes.reshape((3, *shape))[:, 1:-1, 1:-1, 1:-1]


def _prepare(phase, mask, magnitude, phase2, te_ratio, coherence, consistency):
    p = backend.to_numpy(phase).astype(np.float64)
    if p.ndim != 3:
        raise QSMInputError(f"romeo unwraps a 3-D phase image, got shape {p.shape}")
    if p.size >= 2**31 // 8:
        raise QSMInputError(f"phase image of {p.size} voxels is too large for romeo (limit 2^28)")
    m = np.ones(p.shape, bool) if mask is None else _as_3d("mask", mask, p.shape).astype(bool)
    m = m & np.isfinite(p)  # NaN phase: outside the mask (returned as 0)
    state = _padded_flat(np.where(m, 0, -1), np.int32, -1)
    pf = _padded_flat(np.where(m, p, 0.0), np.float64, 0.0)
    mag_ref = 1.0
    if magnitude is not None:
        mag = backend.to_numpy(magnitude).astype(np.float64)
        if mag.ndim == 4:  # echoes: root-mean-square
            mag = np.sqrt(np.mean(mag**2, axis=3))
        mag = _as_3d("magnitude", mag, p.shape)
        mag = np.where(np.isfinite(mag) & (mag > 0), mag, 0.0)
        inside = mag[m]
        ref = 0.5 * float(np.percentile(inside, 90)) if inside.size else 0.0
        mag_ref = ref if ref > 0 else 1.0
        magf = _padded_flat(mag, np.float64, 0.0)
    else:
        magf = np.zeros(0, np.float64)
    if phase2 is not None:
        if te_ratio is None or not np.isfinite(te_ratio) or te_ratio <= 0:
            raise QSMInputError(f"phase linearity needs te_ratio = TE(phase2) / TE(phase) > 0, "
                                f"got {te_ratio}")
        p2 = _as_3d("phase2", phase2, p.shape).astype(np.float64)
        p2f = _padded_flat(np.where(np.isfinite(p2), p2, 0.0), np.float64, 0.0)
    else:
        p2f = np.zeros(0, np.float64)
    shape = tuple(n + 2 for n in p.shape)
    offs = np.array([shape[1] * shape[2], shape[2], 1], dtype=np.int64)
    codes = np.zeros((3, pf.size), np.uint8)
    _kernels()["edges"](pf, magf, p2f, float(te_ratio or 0.0), state, offs, mag_ref,
                        float(coherence), int(bool(consistency)), codes)
    return codes, (pf, state, offs), m


def _align_islands(out, regions, n_regions, voxel_size, margin_mm):
    """Shift regions 2.. by a 2 pi multiple each, against the main region (region 1): the
    island's voxels closest to it (within ``margin_mm``) should agree with their nearest main
    voxels, ``k = round(median(p_main - p_island) / 2 pi)``; an island farther away is brought
    to the mean of the whole main region. Returns the shifts (in 2 pi)."""
    from scipy import ndimage

    if n_regions <= 1:
        return []
    main = regions == 1
    main_mean = float(out[main].mean())
    slices = ndimage.find_objects(regions)
    pad = [int(np.ceil(margin_mm / v)) for v in voxel_size]
    shifts = []
    for r in range(2, n_regions + 1):
        sl = slices[r - 1]
        if sl is None:
            continue
        box = tuple(slice(max(s.start - p, 0), s.stop + p) for s, p in zip(sl, pad))
        own = regions[box] == r
        near = main[box]
        diff = None
        if near.any():
            dist, idx = ndimage.distance_transform_edt(~near, sampling=voxel_size,
                                                       return_indices=True)
            d_own = dist[own]
            closest = own.copy()
            closest[own] = (d_own <= d_own.min() + 1e-6) & (d_own <= margin_mm)
            if closest.any():
                nearest = out[box][tuple(i[closest] for i in idx)]
                diff = float(np.median(nearest - out[box][closest]))
        if diff is None:
            diff = main_mean - float(out[box][own].mean())
        k = np.round(diff / TWO_PI)
        if k:
            out[box][own] += TWO_PI * k
        shifts.append(int(k))
    return shifts


@UNWRAPPING.register("romeo", "ROMEO quality-guided region growing (Dymerska 2021), congruent, numba")
def unwrap_romeo(phase, mask=None, voxel_size=None, magnitude=None, *, te=None, phase2=None,
                 te_ratio=None, template=0, magnitude_coherence=0.0, consistency=True, vote=True,
                 extrapolate=True, island_margin_mm=10.0, return_info=False):
    """Congruent 3-D (or multi-echo) unwrapping by ROMEO-style region growing (module docstring).

    ``magnitude_coherence`` is the exponent of ROMEO's magnitude coherence (ROMEO uses 2; 0
    turns it off, the default): on the simulations it cost accuracy, since an edge across a
    tissue boundary (CSF to cortex) then came later than aliased edges along the boundary
    (phantom at 3 T, TE 20 ms: 98.8 % of the brain right with it, 99.0 % without).
    ``consistency`` switches the second-difference term, ``vote`` the weighted vote of all
    unwrapped neighbours (else the voxel it was reached from decides alone), ``extrapolate``
    the linear extrapolation of steep gradients.

    Parameters
    ----------
    phase : (X, Y, Z) wrapped phase (rad), or (X, Y, Z, E) echoes (then ``te`` is required:
        echo ``template`` is unwrapped spatially, with the phase linearity to the next echo
        in the edge quality, and every other echo temporally against it,
        ``p_e += 2 pi round((p_t TE_e / TE_t - p_e) / 2 pi)``, as in ROMEO; this assumes the
        echo-independent phase offset is removed (e.g. by coil combination) or small: an echo
        goes wrong where ``|offset| |TE_e / TE_t - 1| > pi``).
    mask : voxels to unwrap (default all); outside (and NaN phase) is returned as 0.
    voxel_size : mm, for the island search margin (default 1 mm).
    magnitude : one echo's shape, or (X, Y, Z, E) combined by root-mean-square. Recommended:
        noise voxels are then unwrapped last.
    phase2, te_ratio : a second echo and TE(phase2) / TE(phase) for the phase-linearity
        weight of a 3-D ``phase``.
    island_margin_mm : how far from an island main-region voxels align it (module docstring).
    return_info : also return a dict (``regions``: regions grown, 1 without islands;
        ``island_shifts``: the 2 pi multiples applied to the islands).

    Returns
    -------
    float32 unwrapped phase, the shape of ``phase``; the seed voxel keeps its wrapped value.
    """
    p = backend.to_numpy(phase)
    if p.ndim == 4:
        return _unwrap_romeo_echoes(p, mask, voxel_size, magnitude, te, template, return_info,
                                    magnitude_coherence=magnitude_coherence,
                                    consistency=consistency, vote=vote, extrapolate=extrapolate,
                                    island_margin_mm=island_margin_mm)
    vox = (1.0, 1.0, 1.0) if voxel_size is None else tuple(float(v) for v in voxel_size)
    codes, (pf, state, offs), m = _prepare(p, mask, magnitude, phase2, te_ratio,
                                           magnitude_coherence, consistency)
    k = _kernels()
    n_mask = int(m.sum())
    info = {"regions": 0, "island_shifts": []}
    if n_mask == 0:
        out = np.zeros(p.shape, np.float32)
        return (out, info) if return_info else out
    quality = np.zeros(pf.size, np.float64)
    k["quality"](codes, state, offs, quality)
    # the main seed: the voxel whose 3x3x3 neighbourhood has the best edges (ROMEO starts
    # where the phase is most reliable, so the first, greedy steps are safe)
    shape = tuple(n + 2 for n in p.shape)
    from scipy import ndimage

    smooth = ndimage.uniform_filter(quality.reshape(shape), size=3, mode="constant").ravel()
    smooth[state != 0] = -1
    seeds = np.array([int(np.argmax(smooth))], np.int64)
    q_item = np.empty(3 * n_mask + 6, np.int64)
    q_next = np.empty(3 * n_mask + 6, np.int32)
    head = np.full(NBINS, -1, np.int32)
    n_regions = k["grow"](pf, codes, state, offs, seeds, 1, q_item, q_next, head, bool(vote),
                          bool(extrapolate), EXTRAPOLATE_MIN, EXTRAPOLATE_MAX,
                          EXTRAPOLATE_STEADY)
    if np.any(state == 0):  # islands: each from its best voxel, best first
        rest = np.flatnonzero(state == 0)
        rest = rest[np.argsort(-quality[rest], kind="stable")]
        n_regions += k["grow"](pf, codes, state, offs, rest, 1 + n_regions, q_item, q_next, head,
                               bool(vote), bool(extrapolate), EXTRAPOLATE_MIN,
                               EXTRAPOLATE_MAX, EXTRAPOLATE_STEADY)
    out = pf.reshape(shape)[1:-1, 1:-1, 1:-1].copy()
    regions = np.maximum(state.reshape(shape)[1:-1, 1:-1, 1:-1], 0)
    info["regions"] = int(n_regions)
    info["island_shifts"] = _align_islands(out, regions, n_regions, vox, island_margin_mm)
    out[~m] = 0
    out = out.astype(np.float32)
    return (out, info) if return_info else out


def _unwrap_romeo_echoes(p, mask, voxel_size, magnitude, te, template, return_info, **kw):
    """Multi-echo ROMEO: the template echo spatially, the others temporally against it."""
    n_e = p.shape[3]
    if te is None or np.size(te) != n_e:
        raise QSMInputError(f"multi-echo romeo needs one echo time per echo ({n_e}), got {te}")
    te = np.asarray(te, float)
    if np.any(~np.isfinite(te)) or np.any(te <= 0):
        raise QSMInputError(f"echo times must be positive, got {list(te)}")
    t = int(template)
    if not 0 <= t < n_e:
        raise QSMInputError(f"template echo {t} out of range for {n_e} echoes")
    mag = None if magnitude is None else backend.to_numpy(magnitude)
    if mag is not None and mag.ndim == 4:
        mag = mag[..., t]
    second = None if n_e == 1 else (t + 1 if t + 1 < n_e else t - 1)
    ref, info = unwrap_romeo(p[..., t], mask, voxel_size, mag,
                             phase2=None if second is None else p[..., second],
                             te_ratio=None if second is None else te[second] / te[t],
                             return_info=True, **kw)
    inside = np.isfinite(p[..., t])
    if mask is not None:
        inside &= _as_3d("mask", mask, ref.shape).astype(bool)
    out = np.zeros(p.shape, np.float32)
    for e in range(n_e):
        expect = ref.astype(np.float64) * (te[e] / te[t])
        pe = np.where(np.isfinite(p[..., e]), p[..., e], 0.0)
        out[..., e] = np.where(inside, pe + TWO_PI * np.round((expect - pe) / TWO_PI), 0.0)
    out[..., t] = ref
    return (out, info) if return_info else out
