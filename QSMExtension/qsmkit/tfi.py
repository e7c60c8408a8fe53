"""Background removal past the harmonic floor: PDF, then total field inversion (TFI) with a
prior on the brain's own sources.

Why. Every method that models the background as a harmonic field (PDF, SHARP, V-SHARP,
RESHARP, LBV) also removes the part of the brain's own field that is harmonic inside the brain,
for instance the interior field of a cortical shell of uniform susceptibility. On the QSM
challenge 2.0 head model that part is 44 % of the local field (28 % in the mask eroded by 3
voxels): PDF applied to the true local field alone changes it by that much. The data cannot
tell the two apart; a prior on the sources can. Susceptibility inside the brain is nearly
piecewise constant with edges where the magnitude has edges, while the background sources
(air, bone) are unconstrained. Given the total field, the field of the sources that best obeys
that prior is attributed to the brain, the rest to the background.

The model (total field inversion, Liu Z et al., MRM 2018;79:2795, eq. 3, with MEDI's
magnitude edge mask, Liu J et al., MRM 2012;67:137, and an isotropic TV penalty):

    chi = argmin 1/2 || W M (f - D chi) ||^2 + lam/2 sum_j E_j |grad chi|_j            (1)

chi on the whole (padded) grid; only its part inside the mask M is penalised: the sum runs over
voxels j whose forward neighbours lie in M, E_j = 0 on the ``edge_fraction`` of mask voxels
with the largest magnitude gradient (edges are free) and 1 elsewhere. Outside M chi stands for
the background sources, with no penalty; the brain's mean chi is free too (the penalty sees
only differences), as it must be (a uniform chi in the brain gives a harmonic field).
Gradients are forward differences per voxel.

Local field = M D (M (chi - mean_M chi)), the same definition as the head model's truth
(``qsmkit.headmodel``).

Solver: ADMM (Boyd et al., Found. Trends Mach. Learn. 2011, section 3.1.1, scaled form) with
the splittings u = D chi and g = grad chi, as in the fast TV-QSM solvers (Bilgic et al., MRM
2014; Milovic et al., FANSI, MRM 2018): the chi step is diagonal in k-space, the u step and the
g step (isotropic shrinkage) are pointwise; 4 real FFTs per iteration (none in the first, whose
chi is zero). On the CPU the work between the FFTs runs as one numba kernel, one pass over the
arrays (``_admm_rows_py``, on blocks of rows in one thread per core; about 60 whole-array
operations before, which took more time than the FFTs); cupy runs the same arithmetic as array
code (``_admm_step_xp``). It starts from PDF's local field, which removes the bulk of the
background first, so the joint fit only has to move the harmonic parts between inside and outside
sources (in the prototype, without the PDF start 200 iterations reached 32 % instead of 17 % on
the head model).

Two settings are registered. ``tfi``: 200 iterations, rho = 0.01, on PDF's padded grid (the
whole field of view). ``tfi-fast``: the same model, solved to about PDF's cost: 30 over-relaxed
iterations (relaxation 1.7, Boyd et al. section 3.4.3) with rho = 0.05, on the brain's bounding
box grown by 8 mm instead of the whole field of view (after PDF, the harmonic part left to move
is reproduced by sources in a thin shell around the brain, the argument of ``default_pdf_pad``),
from a PDF start of a set length (``PDF_START_ITER``: PDF's own stop, where its change levels
off, made two exports of one real scan differ by 21 %) that itself runs on the bounding box
grown by PDF's 12 mm source margin rather than the whole field of view (``_pdf_start``); its
noise weights can be capped at their median (``weight_cap``, opt-in, see ``tfi_fast``). On the
head model at 1.28 mm (``Testing/test_headmodel.py``, 2 cores): ``tfi`` 16.9 / 8.5 %
(mask / eroded), ``tfi-fast`` 19.9 / 9.2 % (with SNR-100 phase noise 22.2 / 12.8 %, as
``tfi``), PDF 42.8 / 27.6 %. Its time against PDF's (``benchmarks/background_time.py``, CPU
seconds): 0.8x on the 256x256x64 phantom, about 2.7x on a 1 mm head cropped to the brain, where
PDF stops after 24 iterations. On the end-to-end benchmark's full simulations
(``benchmarks/e2e.py``) it is within 1 point of ``tfi``'s chi NRMSE. Settings slower than 30
iterations first pass through a transient (ADMM's error grows again between about 40 and 80
iterations at rho = 0.05) before reaching ``tfi``'s figures; a coarse-grid TFI (2.56 mm) as a
correction or as a warm start was tried and gave no gain: at that voxel size the cortex is below
a voxel and the prior fails. ``rho``, the relaxation and the iteration count were chosen on the
head model at 1.28 mm.

Measured (``Testing/test_headmodel.py``, ``Testing/test_background.py``,
``benchmarks/background_removal.py``): head model at 1.28 mm, NRMSE of the local field in the
brain mask / in the mask eroded by 3 voxels, 17 / 8.5 % (PDF 43 / 27 %), with SNR-100 phase
noise 21 / 14 % (PDF 45 / 31 %); built-in phantom, a second geometry with anisotropic voxels,
27 / 8.5 % (PDF 55 / 57 %); analytic scenes 6-10 % (PDF 22-26 %). ``lam``, ``edge_fraction``
and ``rho`` were chosen on the head model (lam from 1e-4 to 1e-3 stays within 5 points);
the phantom was not used for tuning. Both phantoms are piecewise constant with magnitude
edges that coincide with the susceptibility edges, which suits the prior; in vivo the edges
coincide only in part.
"""

from __future__ import annotations

import math
import time

import numpy as np

from . import backend
from .background_base import BACKGROUND, PDF_MARGIN_MM, cap_weights, check_inputs, default_pdf_pad, pdf
from .dipole import crop_to, dipole_kernel, k_grids, pad_to, padded_shape
from .errors import QSMInputError


def _slices(axis, sel):
    out = [slice(None)] * 3
    out[axis] = sel
    return tuple(out)


def forward_diff(x, out=None):
    """Circular forward differences of a 3-D array along each axis, into ``out`` (3, ...)."""
    xp = backend.get_array_module(x)
    out = xp.empty((3,) + x.shape, x.dtype) if out is None else out
    for a in range(3):
        backend.periodic_diff(x, a, out=out[a])
    return out


def forward_diff_adj(g):
    """Adjoint of ``forward_diff``: sum_a (g_a shifted forward by one voxel along a) - g_a."""
    out = -(g[0] + g[1] + g[2])
    for a in range(3):
        out[_slices(a, slice(1, None))] += g[a][_slices(a, slice(0, -1))]
        out[_slices(a, slice(0, 1))] += g[a][_slices(a, slice(-1, None))]
    return out


def edge_free_mask(magnitude, mask, edge_fraction, inside_only=False):
    """MEDI's gradient mask: 0 on the ``edge_fraction`` of mask voxels with the largest
    magnitude gradient (edges, where chi may jump freely), 1 elsewhere. Voxels where the
    magnitude does not change are never edges: a noise-free, piecewise-constant magnitude has
    fewer edge voxels than ``edge_fraction``, and its percentile is then 0.

    ``inside_only``: count only differences between two mask voxels, so that the mask's own
    boundary (bright tissue against the zeros outside) is no edge. Counted, it frees 96 % of the
    outermost voxels of the built-in phantom's mask, and chi there is left free to take up
    residual background; not counting it lowers chi NRMSE there (50.0 to 47.1 %) and on the
    head model, but moves the phantom's caudate from 4.6 to 5.1 ppb low (README, "Background
    removal")."""
    xp = backend.get_array_module(magnitude)
    if edge_fraction <= 0:
        return xp.ones(magnitude.shape, backend.FLOAT)
    mask = xp.asarray(mask, dtype=bool)
    d = forward_diff((magnitude * mask).astype(backend.FLOAT))
    if inside_only:
        for a in range(3):
            d[a] *= xp.roll(mask, -1, axis=a) & mask
    g = xp.sqrt((d ** 2).sum(axis=0))
    thr = float(xp.percentile(g[mask], 100 * (1 - edge_fraction)))
    return ~((g >= thr) & (g > 0)) * backend.FLOAT(1)


def brain_box(mask, voxel_size, margin_mm):
    """Slices of the mask's bounding box grown by ``margin_mm`` on each side, within the array."""
    m = backend.to_numpy(mask).astype(bool)
    box = []
    for ax, v in enumerate(voxel_size):
        hits = np.flatnonzero(m.any(axis=tuple(a for a in range(3) if a != ax)))
        grow = int(np.ceil(margin_mm / v))
        box.append(slice(max(int(hits[0]) - grow, 0), min(int(hits[-1]) + 1 + grow, m.shape[ax])))
    return tuple(box)


def _check(lam, rho, edge_fraction, max_iter, relax):
    for name, v in (("lam", lam), ("rho", rho)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise QSMInputError(f"TFI {name} must be a positive number, got {v!r}")
    if not (isinstance(edge_fraction, (int, float)) and 0 <= edge_fraction < 1):
        raise QSMInputError(f"TFI edge_fraction must be in [0, 1), got {edge_fraction!r}")
    if int(max_iter) < 1:
        raise QSMInputError(f"TFI max_iter must be at least 1, got {max_iter}")
    if not (isinstance(relax, (int, float)) and 0 < relax < 2):
        raise QSMInputError(f"TFI relax must be in (0, 2), got {relax!r}")


def _magnitude(magnitude, f, m, xp):
    mag = xp.asarray(magnitude, dtype=backend.FLOAT)
    if mag.shape != f.shape:
        raise QSMInputError(f"magnitude shape {tuple(mag.shape)} does not match field shape "
                            f"{tuple(f.shape)}")
    mag = xp.where(xp.isfinite(mag), mag, 0).astype(backend.FLOAT)
    if not bool(xp.any(mag[m] != 0)):
        raise QSMInputError("magnitude is all zeros inside the mask")
    return mag


def _admm_voxel_py(chi, dchi, u, eta, g, nu, pen, w2f, u_den, rho, a_rel, b_rel, thr, buf, r,
                   i, j, k, ip, jp, kp, carry, one, tiny):
    """``_admm_rows_py``'s work at voxel (i, j, k), whose forward neighbours are ip, jp, kp.
    Returns components 0 and 2 of g + nu, which grad^T adds at the next voxel along the first
    axis (the caller: row ip may belong to another block) and the last (the next call's
    ``carry``). ``one`` and ``tiny`` (1e-24) in the arrays' type keep the arithmetic in it."""
    dr = a_rel * dchi[i, j, k] + b_rel * u[i, j, k]
    un = (w2f[i, j, k] + rho * (dr - eta[i, j, k])) * u_den[i, j, k]
    en = eta[i, j, k] + un - dr
    u[i, j, k] = un
    eta[i, j, k] = en
    buf[i, j, k] = un + en
    c = chi[i, j, k]
    g0 = a_rel * (chi[ip, j, k] - c) + b_rel * g[0, i, j, k]
    g1 = a_rel * (chi[i, jp, k] - c) + b_rel * g[1, i, j, k]
    g2 = a_rel * (chi[i, j, kp] - c) + b_rel * g[2, i, j, k]
    q0 = g0 - nu[0, i, j, k]
    q1 = g1 - nu[1, i, j, k]
    q2 = g2 - nu[2, i, j, k]
    p0 = pen[0, i, j, k]
    p1 = pen[1, i, j, k]
    p2 = pen[2, i, j, k]
    n2 = p0 * q0 * q0 + p1 * q1 * q1 + p2 * q2 * q2
    s = max(-thr / math.sqrt(max(n2, tiny)), -one)  # shrink - 1, at least -1
    h0 = q0 * (one + p0 * s)
    h1 = q1 * (one + p1 * s)
    h2 = q2 * (one + p2 * s)
    g[0, i, j, k] = h0
    g[1, i, j, k] = h1
    g[2, i, j, k] = h2
    n0 = nu[0, i, j, k] + h0 - g0
    n1 = nu[1, i, j, k] + h1 - g1
    n2 = nu[2, i, j, k] + h2 - g2
    nu[0, i, j, k] = n0
    nu[1, i, j, k] = n1
    nu[2, i, j, k] = n2
    # grad^T (g + nu): minus the sum here, component a added at the next voxel along a
    r[i, j, k] += carry - ((h0 + n0) + (h1 + n1) + (h2 + n2))
    r[i, jp, k] += h1 + n1
    return h0 + n0, h2 + n2


def _admm_rows_py(chi, dchi, u, eta, g, nu, pen, w2f, u_den, rho, a_rel, b_rel, thr, buf, r,
                  seam, i0, i1):
    """One ADMM iteration's work between the FFTs on rows ``i0:i1`` of the first axis, fused
    voxel by voxel: ``_admm_step_xp``'s u, eta, g and nu steps and the next chi step's inputs
    (``buf`` = u + eta, ``r`` = grad^T (g + nu)) in one pass over the arrays instead of about 60
    whole-array operations. The rows' own part of ``r`` is overwritten; what grad^T sends on to
    row i1 (row 0 after the last) goes to ``seam`` (Y, Z) instead, for the caller to add once
    every block is done, so that blocks of rows can run in parallel threads
    (``_FusedAdmmStep``). Compiled with numba (``_admm_kernel``); the same arithmetic as
    ``_admm_step_xp``."""
    nx, ny, nz = chi.shape
    one, tiny = chi.dtype.type(1), chi.dtype.type(1e-24)
    r[i0:i1] = 0
    for i in range(i0, i1):
        ip = i + 1 if i + 1 < nx else 0
        for j in range(ny):
            jp = j + 1 if j + 1 < ny else 0
            carry = one - one
            for k in range(nz):
                sx, carry = _admm_voxel(chi, dchi, u, eta, g, nu, pen, w2f, u_den, rho, a_rel,
                                        b_rel, thr, buf, r, i, j, k, ip, jp,
                                        k + 1 if k + 1 < nz else 0, carry, one, tiny)
                if i + 1 < i1:
                    r[ip, j, k] += sx
                else:
                    seam[j, k] = sx
            r[i, j, 0] += carry


_admm_voxel = _admm_voxel_py  # numba-compiled by ``_KERNELS`` before the kernel that calls it
_KERNELS = backend.NumbaKernels(globals(), {"admm": _admm_rows_py}, helpers=("_admm_voxel",))

#: blocks of rows that ``_FusedAdmmStep`` hands to threads: a fixed number, so that the result
#: (where the blocks' seams are summed) does not depend on how many cores there are
ADMM_ROW_BLOCKS = 8
#: threads for those blocks; None: one per core (``backend.cpu_count``)
ADMM_THREADS = None


def _admm_kernel():
    """numba-compiled ``_admm_rows_py`` (cached on disk), or None without numba."""
    compiled = _KERNELS.get()
    return compiled["admm"] if compiled else None


class _FusedAdmmStep:
    """``_admm_step_xp``'s signature, run by the numba kernel on ``ADMM_ROW_BLOCKS`` blocks of
    rows in a pool of ``ADMM_THREADS`` threads (the kernel releases the GIL): on 2 cores
    ``tfi-fast`` takes 5-28 % less wall time (``benchmarks/background_time.py``)."""

    def __init__(self, shape, dtype):
        nx = shape[0]
        edges = np.linspace(0, nx, min(ADMM_ROW_BLOCKS, nx) + 1).round().astype(int)
        self.blocks = [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]
        self.seams = np.zeros((len(self.blocks),) + tuple(shape[1:]), dtype)
        self.kernel = _admm_kernel()
        self.pool = None
        threads = min(ADMM_THREADS or backend.cpu_count(), len(self.blocks))
        if threads > 1:
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(threads)

    def __call__(self, chi, dchi, u, eta, g, nu, pen, w2f, u_den, rho, a_rel, b_rel, thr, buf,
                 r):
        args = (chi, dchi, u, eta, g, nu, pen, w2f, u_den, rho, a_rel, b_rel, thr, buf, r)

        def run(n):
            self.kernel(*args, self.seams[n], *self.blocks[n])

        if self.pool is None:
            for n in range(len(self.blocks)):
                run(n)
        else:
            list(self.pool.map(run, range(len(self.blocks))))
        nx = chi.shape[0]
        for n, (_, i1) in enumerate(self.blocks):  # in a fixed order: the same sums every run
            r[i1 % nx] += self.seams[n]

    def close(self):
        if self.pool is not None:
            self.pool.shutdown()


def _admm_step_xp(chi, dchi, u, eta, g, nu, pen, w2f, u_den, rho, a_rel, b_rel, thr, buf, r):
    """``_admm_rows_py``'s arithmetic as whole-array operations (cupy; numpy without numba),
    in place on the same buffers; ``r`` is overwritten with grad^T (g + nu)."""
    xp = backend.get_array_module(chi)
    F = chi.dtype.type
    # u step (over-relaxed: relax D chi + (1 - relax) u); the data term is pointwise
    dchi *= a_rel
    xp.multiply(u, b_rel, out=buf)
    dchi += buf
    xp.subtract(dchi, eta, out=u)
    u *= rho
    u += w2f
    u *= u_den
    eta += u
    eta -= dchi
    # g step: isotropic shrinkage where the prior applies, identity elsewhere
    gc = forward_diff(chi)
    gc *= a_rel
    q = xp.multiply(g, b_rel)
    gc += q
    xp.subtract(gc, nu, out=q)
    xp.multiply(q, q, out=g)
    g *= pen
    n2 = g[0] + g[1]
    n2 += g[2]
    xp.maximum(n2, F(1e-24), out=n2)
    xp.sqrt(n2, out=n2)
    xp.divide(F(-thr), n2, out=n2)  # shrink - 1 = -thr / |q|, at least -1
    xp.maximum(n2, F(-1), out=n2)
    for a in range(3):  # g_a = q_a (1 + pen_a (shrink - 1))
        xp.multiply(pen[a], n2, out=buf)
        buf += F(1)
        xp.multiply(q[a], buf, out=g[a])
    nu += g
    nu -= gc
    xp.add(u, eta, out=buf)
    xp.add(g, nu, out=q)
    r[...] = forward_diff_adj(q)


def _admm(f, m, w, edges, voxel_size, b0_dir, big, lam, rho, relax, n_iter, fused=None):
    """Solve eq. 1 for the local field given PDF's local field ``f`` on the grid ``big`` (f, m,
    w, edges already cut to the region solved; ``big`` pads them). Returns the local field
    cropped back to ``f.shape``. ``fused``: the numba kernel for the work between the FFTs
    (default: where the arrays are numpy and numba is installed); else whole-array code."""
    xp = backend.get_array_module(f)
    F = backend.FLOAT
    d = dipole_kernel(big, voxel_size, b0_dir, xp=xp, dtype=F)
    # symbol of grad^T grad for circular forward differences on a unit grid
    k = k_grids(big, (1.0,) * len(big), xp=xp, real=True, dtype=F)
    lap = sum(F(4) * xp.sin(F(math.pi) * ki) ** 2 for ki in k)
    rho_g = 10.0 * lam  # the TV splitting's penalty
    den = F(rho) * d * d + F(rho_g) * lap
    inv = xp.where(den > 0, 1 / xp.where(den > 0, den, 1), 0).astype(F)  # chi(k=0) is free
    # chi step: (rho D^2 + rho_g L) chi = rho D (u + eta) + rho_g grad^T (g + nu)
    data_k = (F(rho) * d * inv).astype(F)
    tv_k = (F(rho_g) * inv).astype(F)
    m_big = pad_to(m, big)
    mf = m_big.astype(F)
    w2 = pad_to(m.astype(F) if w is None else w * w, big)
    w2f = w2 * pad_to(f, big)
    u_den = (1 / (w2 + F(rho))).astype(F)
    pen = xp.stack([xp.roll(m_big, -1, axis=a) & m_big for a in range(3)])
    pen &= (pad_to(edges, big) > 0)[None]
    pen = pen.astype(F)  # 1 where the TV prior applies, as a factor (cheaper than where)
    if fused is None:
        fused = xp is np and _admm_kernel() is not None
    step = _FusedAdmmStep(big, F) if fused else _admm_step_xp
    args = (F(rho), F(relax), F(1 - relax), F(lam / 2 / rho_g))
    u = xp.zeros(big, F)
    eta = xp.zeros(big, F)
    g = xp.zeros((3,) + tuple(big), F)
    nu = xp.zeros_like(g)
    buf = xp.zeros(big, F)  # u + eta
    r = xp.zeros(big, F)  # grad^T (g + nu)
    chi = xp.zeros(big, F)
    try:
        for it in range(int(n_iter)):
            if it == 0:  # all variables start at zero, so does the first chi
                dchi = xp.zeros(big, F)
            else:
                rk = backend.rfftn(buf)
                rk *= data_k
                rr = backend.rfftn(r)
                rr *= tv_k
                rk += rr
                chi = backend.irfftn(rk, s=big)
                rk *= d
                dchi = backend.irfftn(rk, s=big)
            step(chi, dchi, u, eta, g, nu, pen, w2f, u_den, *args, buf, r)
    finally:
        if fused:
            step.close()
    x = chi * mf
    x -= F(float(x[m_big].mean())) * mf
    return crop_to(backend.irfftn(backend.rfftn(x) * d, s=big) * mf, f.shape)


#: ``tfi-fast``'s PDF start: ``PDF_START_ITER`` CG iterations, the most that PDF's own rule (5 %
#: change of the local field per iteration) takes on the simulated heads (built-in phantom 35,
#: head model 23-24, analytic scenes 17-20), and beyond that only while an iteration still
#: changes the local field by more than ``PDF_START_STEEP`` (the background still dominates it:
#: given the background alone, 25-140 iterations). PDF's rule itself stops where the change
#: levels off, and there it moves with rounding: on a real head
#: (../shared/data/philips-invivo-gre) the change per iteration hovers at 4-10 % from 30 to 80
#: iterations, and two exports of one scan (classic DICOM and dcm2niix NIfTI: the same arrays
#: up to float rounding) stopped after 30 and 41 iterations with local fields 21 % apart; with
#: the set count they are 0.3 % apart. Against PDF's rule: head model 19.9 / 9.2 % (was
#: 19.8 / 9.1), noisy 22.2 / 12.8 % (22.1 / 12.7), phantom local field 44.8 % (44.8, it also
#: stopped at 35), analytic scenes 5.8-7.9 % (7.4-13.5); about 13 % more time on the head model.
#: A windowed change with interpolation between iterates was tried: at 5 % it stopped the
#: phantom after 18 iterations (58 %), at 2 % the real head moved with rounding again.
PDF_START_ITER = 35
PDF_START_STEEP = 0.15


def _pdf_start(f, m, w, voxel_size, b0_dir, pad, on_box, **stop):
    """PDF's local field, the start of the joint fit. ``on_box`` (``tfi-fast``): PDF runs on the
    mask's bounding box grown by PDF's own source margin (``default_pdf_pad``: a shell of
    sources that thick reproduces the exterior field as well as a thicker one), padded only where
    that box meets the field of view, instead of on the whole field of view. On the 256 x 256 x
    64 phantom that is half the voxels; heads cropped to the brain, as most acquisitions are,
    lose nothing."""
    if not on_box:
        local, _, info = pdf(f, m, voxel_size, b0_dir, weights=w, pad=pad, **stop)
        return local, info
    box = brain_box(m, voxel_size, PDF_MARGIN_MM)
    local = backend.get_array_module(f).zeros(f.shape, backend.FLOAT)
    local[box], _, info = pdf(f[box], m[box], voxel_size, b0_dir,
                              weights=None if w is None else w[box], **stop)
    info["box"] = [[s.start, s.stop] for s in box]
    return local, info


def _tfi(field, mask, voxel_size, b0_dir, weights, magnitude, lam, edge_fraction, rho,
         max_iter, pad, relax, box_mm, pdf_tol=0.05, pdf_iter=200, pdf_min_iter=0,
         weight_cap=0.0, inside_edges=False):
    t0 = time.perf_counter()
    xp, f, m, w = check_inputs(field, mask, weights)
    _check(lam, rho, edge_fraction, max_iter, relax)
    if not (isinstance(weight_cap, (int, float)) and math.isfinite(weight_cap) and weight_cap >= 0):
        raise QSMInputError(f"TFI weight_cap must be a number >= 0, got {weight_cap!r}")
    w, capped = cap_weights(w, m, weight_cap)
    fallback = None
    if magnitude is None:
        fallback, edge_fraction = "no magnitude given: plain TV prior (no edge mask)", 0.0
        edges = xp.ones(f.shape, backend.FLOAT)
    else:
        edges = edge_free_mask(_magnitude(magnitude, f, m, xp), m, edge_fraction, inside_edges)

    # PDF removes the bulk of the background; the joint fit starts from its local field
    f, pdf_info = _pdf_start(f, m, w, voxel_size, b0_dir, pad, box_mm is not None and pad is None,
                             tol=pdf_tol, max_iter=pdf_iter, min_iter=pdf_min_iter)

    box = (slice(None),) * 3 if box_mm is None else brain_box(m, voxel_size, box_mm)
    fb, mb, eb = f[box], m[box], edges[box]
    wb = None if w is None else w[box]
    if box_mm is not None:
        pad = default_pdf_pad(mb, voxel_size, margin_mm=box_mm)
    elif pad is None:
        pad = default_pdf_pad(mb, voxel_size)
    big = padded_shape(fb.shape, pad) if np.any(pad) else padded_shape(fb.shape, "fast")
    local_box = _admm(fb, mb, wb, eb, voxel_size, b0_dir, big, lam, rho, relax, max_iter)
    local = xp.zeros(f.shape, backend.FLOAT)
    local[box] = local_box
    return local, m, {
        "pdf": pdf_info, "iterations": int(max_iter), "ffts": 4 * (int(max_iter) - 1) + 2,
        "lam": lam, "edge_fraction": edge_fraction, "rho": rho, "relax": relax,
        "box_margin_mm": box_mm, "box": [[s.start or 0, s.stop if s.stop is not None else n]
                                         for s, n in zip(box, f.shape)],
        "fallback": fallback, "padded_shape": [int(n) for n in big], "weighted": w is not None,
        "weight_cap": weight_cap, "weights_capped_share": round(capped, 4),
        "inside_edges": bool(inside_edges),
        "seconds": round(time.perf_counter() - t0, 3)}


_PARAMS_DOC = """
    Parameters
    ----------
    field : (X, Y, Z) total field (ppm), numpy or cupy; NaN allowed outside the mask.
    mask : brain mask. voxel_size : mm. b0_dir : unit B0 direction in voxel axes.
    weights : optional noise weights (e.g. 1 / noise SD), normalised to mean 1 in the mask;
        used by the PDF start and in (1). Default uniform.
    magnitude : magnitude image for the edge mask; without it the prior is plain TV
        (``info["fallback"]``).
    lam : TV weight (ppm of field per ppm of chi gradient per voxel; 3e-4 chosen on the head
        model, 1e-4 to 1e-3 stay within 5 points of it).
    edge_fraction : share of mask voxels treated as edges (0.3, MEDI's default).
    rho : ADMM penalty of the data splitting (the TV splitting uses 10 lam); it sets the speed
        of convergence, and with few iterations where the solver stops.
    max_iter : ADMM iterations.
    relax : ADMM over-relaxation in (0, 2) (1: none).
    pad : voxels per side for sources beyond the field of view (default as PDF).
    box_mm (tfi-fast) : margin around the mask's bounding box of the grid solved (mm).
    pdf_iter, pdf_tol (tfi-fast) : the PDF start runs at least ``pdf_iter`` CG iterations (35),
        more while one changes the local field by over 15 % (``PDF_START_ITER``); with
        ``pdf_tol`` given, it stops instead once the change is below ``pdf_tol`` (at most 200;
        0.05 is ``pdf``'s rule, 0.1 and 0.2 cost 4 and 14 points of local-field NRMSE on the head
        model).
    weight_cap (tfi-fast) : noise weights above this multiple of their median in the mask are
        lowered to it (0, the default, keeps the raw weights; 1 caps at the median): brighter
        voxels are less noisy but their background misfit is not smaller
        (``background_base.cap_weights``).
    inside_edges (tfi-fast) : the magnitude-edge mask counts only differences between two mask
        voxels, so the mask's boundary is no edge (``edge_free_mask``; default False).

    Returns
    -------
    local, mask, info (PDF's info, iterations, FFT count, parameters, region solved, seconds).
"""


@BACKGROUND.register("tfi", "PDF, then total field inversion with a TV prior on the brain's "
                            "sources (Liu 2018; beats the harmonic floor, about 10x PDF's time)")
def tfi(field, mask, voxel_size, b0_dir, weights=None, magnitude=None, lam=3e-4,
        edge_fraction=0.3, rho=0.01, max_iter=200, pad=None, relax=1.0):
    """Local field by PDF followed by total field inversion with a source prior (module
    docstring, eq. 1), solved to convergence: 200 ADMM iterations (more only improve slowly,
    fewer risk a transient bump that ADMM goes through around 60-100 iterations) on PDF's
    padded grid.
    """
    return _tfi(field, mask, voxel_size, b0_dir, weights, magnitude, lam, edge_fraction, rho,
                max_iter, pad, relax, None)


@BACKGROUND.register("tfi-fast", "tfi's model at a fraction of its time (0.8-2.7x PDF's): 30 "
                                 "over-relaxed ADMM iterations on the brain's bounding box")
def tfi_fast(field, mask, voxel_size, b0_dir, weights=None, magnitude=None, lam=3e-4,
             edge_fraction=0.3, rho=0.05, max_iter=30, pad=None, relax=1.7, box_mm=8.0,
             pdf_iter=PDF_START_ITER, pdf_tol=None, weight_cap=0.0, inside_edges=False):
    """``tfi``'s model (module docstring, eq. 1) solved to about PDF's cost: a PDF start of
    ``pdf_iter`` CG iterations (more while the background dominates, ``PDF_START_ITER``), then
    30 over-relaxed ADMM iterations with rho = 0.05 on the mask's bounding box grown by
    ``box_mm`` (padded where the box meets the field of view). ``pad`` applies to the PDF
    start only. With ``weight_cap`` > 0, noise weights above ``weight_cap`` times their median
    in the mask are lowered to it (``background_base.cap_weights``). Not the default: on the
    built-in phantom it takes chi NRMSE from 50.0 to 34.9 % (32.1 % with ``inside_edges``),
    lowers it on four of five end-to-end heads and moves the phantom's caudate 0.5 ppb lower,
    but the 35-iteration PDF start it feeds is then rounding-sensitive (float32 against float64:
    chi 0.6-0.8 points apart on three phantom grids, against 0.0001 with the raw weights), and a
    float64 start cost 2.3 s of the 256 x 256 x 64 pipeline's 15 s budget.
    """
    if not (isinstance(box_mm, (int, float)) and math.isfinite(box_mm) and box_mm > 0):
        raise QSMInputError(f"TFI box_mm must be a positive number, got {box_mm!r}")
    if pdf_tol is None:
        if int(pdf_iter) < 1:
            raise QSMInputError(f"TFI pdf_iter must be at least 1, got {pdf_iter}")
        pdf_tol, n_min = PDF_START_STEEP, int(pdf_iter)
    else:
        n_min = 0
    return _tfi(field, mask, voxel_size, b0_dir, weights, magnitude, lam, edge_fraction, rho,
                max_iter, pad, relax, box_mm, pdf_tol, 200, n_min, weight_cap, inside_edges)


tfi.__doc__ += _PARAMS_DOC
tfi_fast.__doc__ += _PARAMS_DOC
