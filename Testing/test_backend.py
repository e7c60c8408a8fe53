"""Backends: float32 on the CPU against float64, and cupy against numpy through the same code
(skipped where cupy or a CUDA GPU is absent)."""

import numpy as np
import pytest

from qsmkit import backend, background, dipole, inversion, metrics
from qsmkit.errors import QSMInputError
from qsmkit.simulate import make_phantom

needs_gpu = pytest.mark.skipif(not backend.gpu_available(),
                               reason="needs cupy and a CUDA GPU (not present on this machine)")


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(shape=(96, 96, 32), voxel_size=(2.5, 2.5, 5.0))


def _method(name):
    if name == "pdf":
        return lambda ph: background.pdf(ph.field_total, ph.mask, ph.voxel_size, ph.b0_dir)[0]
    func = inversion.INVERSION.get(name).func
    return lambda ph: func(ph.field_local, ph.mask, ph.voxel_size, ph.b0_dir,
                           magnitude=ph.magnitude)[0]


@pytest.mark.parametrize("name", ["pdf", "tkd", "l2", "focuss", "lsqr", "tv"])
def test_float32_matches_float64(phantom, name):
    """Each FFT stage in the default float32 changes its NRMSE against the truth (local field
    for PDF, chi for the inversions) by < 0.1 percentage point relative to the same code run in
    float64 (``backend.precision``); the float64 run really is float64."""
    ph = phantom
    truth = ph.field_local if name == "pdf" else ph.chi_brain
    res = {}
    for dt in (np.float32, np.float64):
        with backend.precision(dt):
            out = _method(name)(ph)
        assert out.dtype == dt, (name, out.dtype)
        res[dt] = metrics.nrmse(out, truth, ph.mask)
    print(f"{name}: NRMSE float32 {res[np.float32]:.4f} %, float64 {res[np.float64]:.4f} %")
    assert abs(res[np.float32] - res[np.float64]) < 0.1, res


def test_pipeline_float32_matches_float64():
    """The whole pipeline (mask, unwrapping, field fit, tfi-fast, tv: the defaults) on the phantom
    acquired at SNR 100: chi NRMSE in float32 within 0.1 percentage point of the run with the
    stages in float64 (``PipelineConfig(precision="float64")``: background removal and the
    inversion follow it; the numba unwrapping and masking kernels work in float32 either way)."""
    from qsmkit.pipeline import PipelineConfig, run_pipeline
    from qsmkit.simulate import simulate_acquisition

    ph = make_phantom(shape=(96, 96, 32), voxel_size=(2.5, 2.5, 5.0))
    acq = simulate_acquisition(ph, te=(0.005, 0.01, 0.015), b0=3.0)
    res = {}
    for dt in (np.float32, np.float64):
        out = run_pipeline(acq.magnitude, acq.phase, acq.te, acq.b0, ph.voxel_size, ph.b0_dir,
                           mask=ph.mask, config=PipelineConfig(precision=np.dtype(dt).name))
        assert out.chi.dtype == dt
        res[dt] = metrics.nrmse(out.chi, ph.chi_brain, ph.mask)
    print(f"pipeline: chi NRMSE float32 {res[np.float32]:.4f} %, float64 {res[np.float64]:.4f} %")
    assert abs(res[np.float32] - res[np.float64]) < 0.1, res


def test_precision_rejects_other_types():
    with pytest.raises(QSMInputError, match="float32 or float64"):
        with backend.precision(np.float16):
            pass
    assert backend.FLOAT is np.float32


def test_device_resolution():
    assert backend.resolve_device("cpu") == "cpu"
    assert backend.resolve_device("auto") in ("cpu", "gpu")
    with pytest.raises(QSMInputError):
        backend.resolve_device("tpu")
    if not backend.gpu_available():
        with pytest.raises(QSMInputError, match="cupy"):
            backend.resolve_device("gpu")


@needs_gpu
def test_gpu_matches_cpu(phantom):
    ph = phantom
    cpu_local, cpu_mask, _ = background.vsharp(ph.field_total, ph.mask, ph.voxel_size)
    cpu_chi, _ = inversion.l2(cpu_local, cpu_mask, ph.voxel_size, ph.b0_dir)
    f = backend.to_device(ph.field_total, "gpu", np.float32)
    m = backend.to_device(ph.mask, "gpu")
    gpu_local, gpu_mask, _ = background.vsharp(f, m, ph.voxel_size)
    gpu_chi, _ = inversion.l2(gpu_local, gpu_mask, ph.voxel_size, ph.b0_dir)
    assert np.array_equal(backend.to_numpy(gpu_mask), cpu_mask)
    scale = np.abs(cpu_chi).max()
    assert np.abs(backend.to_numpy(gpu_chi) - cpu_chi).max() < 1e-4 * scale
    g = dipole.forward_field(backend.to_device(ph.chi_brain, "gpu"), ph.voxel_size, ph.b0_dir, pad=8)
    c = dipole.forward_field(ph.chi_brain, ph.voxel_size, ph.b0_dir, pad=8)
    assert np.abs(backend.to_numpy(g) - c).max() < 1e-5 * np.abs(c).max()


@needs_gpu
def test_gpu_pipeline_matches_cpu():
    """The whole pipeline (given mask; unwrapping on the CPU, PDF and FOCUSS on the device)
    gives the same chi on the GPU as on the CPU within float32 tolerance of the iterative
    solvers (written for sessions with a GPU; skipped elsewhere)."""
    from qsmkit.pipeline import PipelineConfig, run_pipeline
    from qsmkit.simulate import simulate_acquisition

    ph = make_phantom(shape=(96, 96, 32), voxel_size=(2.5, 2.5, 5.0))
    acq = simulate_acquisition(ph, te=(0.02,), b0=3.0)
    out = {}
    for device in ("cpu", "gpu"):
        res = run_pipeline(acq.magnitude, acq.phase, acq.te, acq.b0, ph.voxel_size, ph.b0_dir,
                           mask=ph.mask, config=PipelineConfig(device=device))
        out[device] = res
    assert np.array_equal(out["gpu"].local_mask, out["cpu"].local_mask)
    assert metrics.nrmse(out["gpu"].field_local, out["cpu"].field_local, out["cpu"].local_mask) < 0.1
    assert metrics.nrmse(out["gpu"].chi, out["cpu"].chi, out["cpu"].local_mask) < 0.5


def test_periodic_diff_matches_roll_and_is_its_adjoints_adjoint():
    """The shared gradient piece of tfi, tv and focuss: numpy's roll is the independent
    reference, and <D x, y> = <x, D^T y> holds to rounding."""
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((2, 5, 6, 7))
    for ax in range(3):
        assert np.array_equal(backend.periodic_diff(x, ax), np.roll(x, -1, ax) - x)
        assert np.array_equal(backend.periodic_diff_adjoint(y, ax), np.roll(y, 1, ax) - y)
        lhs = np.vdot(backend.periodic_diff(x, ax), y)
        rhs = np.vdot(x, backend.periodic_diff_adjoint(y, ax))
        assert abs(lhs - rhs) < 1e-12 * abs(lhs)


def _square_py(x):
    return x * x


def _sum_of_squares_py(a):
    s = 0.0
    for v in a:
        s += _square_py(v)
    return s


def test_numba_kernels_compile_helpers_before_the_kernel_that_calls_them():
    """The kernel calls its helper through the module global: the helper must be rebound to a
    jitted function first, or numba cannot compile the kernel (it rejects a plain Python call
    in nopython mode). The compiled result equals the Python loop's."""
    pytest.importorskip("numba", reason="numba is not installed on this machine")
    kernels = backend.NumbaKernels(globals(), {"sum": _sum_of_squares_py}, helpers=("_square_py",))
    a = np.linspace(-2.0, 3.0, 101)
    try:
        compiled = kernels.get()
        assert compiled["sum"](a) == pytest.approx(float(np.sum(a * a)), rel=1e-12)
        assert kernels.get() is compiled  # compiled once
        assert globals()["_square_py"] is not _square_py_plain
    finally:
        globals()["_square_py"] = _square_py_plain


_square_py_plain = _square_py
