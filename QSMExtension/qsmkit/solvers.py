"""Iterative solvers on matrix-free operators (arrays in, arrays out; numpy or cupy).

The QSM operators (dipole convolution, masks, weights) are applied with FFTs and never formed
as matrices, so the solvers take the operator as a function.
"""

from __future__ import annotations

from dataclasses import dataclass

from .backend import get_array_module


@dataclass
class SolverInfo:
    iterations: int
    residual: float        # final ||b - A x|| / ||b||
    converged: bool

    def as_dict(self):
        return {"iterations": self.iterations, "relative_residual": round(self.residual, 6),
                "converged": self.converged}


def dot(xp, a, b):
    """Real inner product accumulated in float64: float32 sums over millions of voxels (BLAS
    sdot, which vdot uses) lose the digits CG needs."""
    return float(xp.sum(a * b, dtype=xp.float64))


def cg(apply_a, b, x0=None, tol=1e-3, max_iter=100, callback=None):
    """Conjugate gradients for A x = b with A symmetric positive (semi-)definite.

    Stops when ||b - A x|| <= ``tol`` ||b|| or after ``max_iter`` iterations (Hestenes &
    Stiefel 1952). On the ill-posed QSM normal equations early stopping also regularises,
    so ``tol`` is a modelling choice, not only a numerical one.

    Parameters
    ----------
    apply_a : callable x -> A x (same shape as ``b``).
    b : right-hand side.
    x0 : start (default zeros).
    callback : optional callable(iteration, x, relative_residual).

    Returns
    -------
    x, SolverInfo
    """
    xp = get_array_module(b)
    b_norm = dot(xp, b, b) ** 0.5
    if b_norm == 0:
        return xp.zeros_like(b), SolverInfo(0, 0.0, True)
    if x0 is None:
        x = xp.zeros_like(b)
        r = b.copy()
    else:
        x = x0.copy()
        r = b - apply_a(x)
    p = r.copy()
    rr = dot(xp, r, r)
    it = 0
    rel = rr**0.5 / b_norm
    while rel > tol and it < max_iter:
        ap = apply_a(p)
        pap = dot(xp, p, ap)
        if pap <= 0:  # A is only semi-definite: no further progress along p
            break
        alpha = rr / pap
        x += alpha * p
        r -= alpha * ap
        rr_new = dot(xp, r, r)
        p *= rr_new / rr
        p += r
        rr = rr_new
        it += 1
        rel = rr**0.5 / b_norm
        if callback is not None:
            callback(it, x, rel)
    return x, SolverInfo(it, rel, rel <= tol)
