"""One code path for CPU (numpy + scipy.fft on all cores) and GPU (cupy + cuFFT).

Stage functions never import numpy or cupy directly for array work: they call
``xp = get_array_module(x)`` and use ``xp`` plus the FFT helpers below, so the
same lines run on either device. Data move to the device once, at the start
of a pipeline, and back once, when results are written.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import scipy.fft

try:  # cupy is optional (extra "gpu"); absent or without a visible GPU means CPU only
    import cupy as _cupy
except Exception:  # pragma: no cover - depends on the machine
    _cupy = None

#: working precision, read by every stage at call time (the accuracy cost is checked against
#: float64 in Testing/test_backend.py); change it only through ``precision``
FLOAT = np.float32
COMPLEX = np.complex64


@contextlib.contextmanager
def precision(dtype):
    """Run the stages inside the ``with`` block in ``float32`` (the default) or ``float64``.

    For accuracy checks and for users who want a double-precision reference; float32 halves
    memory and FFT time. Not thread-safe: it changes the module-wide working precision."""
    global FLOAT, COMPLEX
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        from .errors import QSMInputError
        raise QSMInputError(f"precision must be float32 or float64, got {dtype}")
    old = FLOAT, COMPLEX
    FLOAT = dtype.type
    COMPLEX = np.complex64 if dtype == np.float32 else np.complex128
    try:
        yield
    finally:
        FLOAT, COMPLEX = old


def gpu_available() -> bool:
    """True when cupy imports and sees at least one CUDA device."""
    if _cupy is None:
        return False
    try:
        return _cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # pragma: no cover - depends on the machine
        return False


def resolve_device(device: str = "auto") -> str:
    """Map ``cpu|gpu|auto`` to ``cpu`` or ``gpu``; asking for a missing GPU is an error."""
    from .errors import QSMInputError

    device = (device or "auto").lower()
    if device not in ("cpu", "gpu", "auto"):
        raise QSMInputError(f"unknown device {device!r}; choose cpu, gpu or auto")
    if device == "auto":
        return "gpu" if gpu_available() else "cpu"
    if device == "gpu" and not gpu_available():
        raise QSMInputError(
            "--device gpu needs cupy and a CUDA GPU; install cupy with `pip install -e '.[gpu]'` "
            "in the qsmkit checkout, or use --device cpu"
        )
    return device


def get_xp(device: str):
    """The array module for a resolved device name."""
    return _cupy if device == "gpu" else np


def get_array_module(*arrays):
    """numpy or cupy, whichever holds the arrays (numpy for plain Python/numpy input)."""
    if _cupy is not None:
        return _cupy.get_array_module(*arrays)
    return np


def to_device(array, device: str, dtype=None):
    """Copy an array to ``device`` (``cpu`` or ``gpu``), optionally casting."""
    xp = get_xp(device)
    out = xp.asarray(array)
    if dtype is not None:
        out = out.astype(dtype, copy=False)
    return out


def to_numpy(array) -> np.ndarray:
    """Bring an array back to host memory as numpy."""
    if _cupy is not None and isinstance(array, _cupy.ndarray):
        return _cupy.asnumpy(array)
    return np.asarray(array)


def device_name(device: str) -> str:
    """Human-readable description of a resolved device for sidecars."""
    if device == "gpu":
        props = _cupy.cuda.runtime.getDeviceProperties(_cupy.cuda.Device().id)
        name = props["name"]
        return f"gpu:{name.decode() if isinstance(name, bytes) else name}"
    return f"cpu:{os.cpu_count()} cores"


def _along(ndim, axis, sel):
    return (slice(None),) * axis + (sel,) + (slice(None),) * (ndim - axis - 1)


def periodic_diff(x, axis, out=None):
    """Periodic forward difference x[j + 1] - x[j] along ``axis`` (numpy or cupy), into ``out``
    if given. By slices: the copy that ``roll`` makes is spared. The shared piece of the
    gradients of ``tfi``, ``tv`` and ``focuss``."""
    xp = get_array_module(x)
    out = xp.empty_like(x) if out is None else out
    n = x.ndim
    xp.subtract(x[_along(n, axis, slice(1, None))], x[_along(n, axis, slice(None, -1))],
                out=out[_along(n, axis, slice(None, -1))])
    xp.subtract(x[_along(n, axis, slice(0, 1))], x[_along(n, axis, slice(-1, None))],
                out=out[_along(n, axis, slice(-1, None))])
    return out


def periodic_diff_adjoint(y, axis, out=None):
    """Adjoint of :func:`periodic_diff`: y[j - 1] - y[j] along ``axis``, into ``out`` if given."""
    xp = get_array_module(y)
    out = xp.empty_like(y) if out is None else out
    n = y.ndim
    xp.subtract(y[_along(n, axis, slice(None, -1))], y[_along(n, axis, slice(1, None))],
                out=out[_along(n, axis, slice(1, None))])
    xp.subtract(y[_along(n, axis, slice(-1, None))], y[_along(n, axis, slice(0, 1))],
                out=out[_along(n, axis, slice(0, 1))])
    return out


def cpu_count() -> int:
    """Cores this process may run on: its affinity mask where the system has one (a batch job's
    share of a node), else every core."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


def _fft_module(x):
    xp = get_array_module(x)
    return (xp.fft, {}) if xp is not np else (scipy.fft, {"workers": -1})


def fftn(x, s=None, axes=None):
    """n-D FFT on numpy (scipy.fft, all cores) or cupy (cuFFT). Keeps complex64 for float32 input."""
    mod, kw = _fft_module(x)
    return mod.fftn(x, s=s, axes=axes, **kw)


def ifftn(x, s=None, axes=None):
    mod, kw = _fft_module(x)
    return mod.ifftn(x, s=s, axes=axes, **kw)


def rfftn(x, s=None, axes=None):
    mod, kw = _fft_module(x)
    return mod.rfftn(x, s=s, axes=axes, **kw)


def irfftn(x, s=None, axes=None):
    mod, kw = _fft_module(x)
    return mod.irfftn(x, s=s, axes=axes, **kw)


def next_fast_len(n: int) -> int:
    """Smallest length >= n whose FFT is fast (products of 2, 3, 5)."""
    return scipy.fft.next_fast_len(int(n), real=True)


class NumbaKernels:
    """A stage's CPU loops, compiled with numba on first use (``cache=True``: kept on disk after
    the first run; ``nogil=True``). ``kernels``: {name: Python function}. ``helpers``: names, in
    ``namespace`` (the stage module's ``globals()``), of functions the kernels call: numba
    resolves a called function through the module global when the caller compiles, so each is
    rebound there to its jitted, inlined version first. The shared piece of the romeo unwrapper,
    the BET surface and tfi-fast's ADMM, whose loops over voxels numpy cannot vectorise."""

    def __init__(self, namespace, kernels, helpers=()):
        self._namespace, self._kernels, self._helpers = namespace, dict(kernels), tuple(helpers)
        self._compiled = None

    def get(self):
        """{name: compiled function}, or None where numba is absent (each stage has its own
        fallback: the Python loops, or whole-array code)."""
        if self._compiled is None:
            try:
                import numba
            except ImportError:  # pragma: no cover - numba is a dependency
                self._compiled = {}
            else:
                for name in self._helpers:
                    self._namespace[name] = numba.njit(cache=True, nogil=True, inline="always")(
                        self._namespace[name])
                self._compiled = {k: numba.njit(cache=True, nogil=True)(f)
                                  for k, f in self._kernels.items()}
        return self._compiled or None
