"""Coil combination (qsmkit.coils) against the simulator's known sensitivities and on real
32-channel data of a spherical phantom.

Simulation: the built-in head on a 128 x 128 x 32 grid of 1.875 x 1.875 x 5 mm (the same head
and field of view as the 256 x 256 x 64 default, half the resolution, to keep the file fast),
32 receive coils and a body coil at the simulator's default SNR (100; body coil 100 / 3).

What the body-coil method can recover: each channel divided by the body coil gives S_c / B, so
the combined image is B rho. The truth for its phase is therefore angle(B rho_noise-free), the
object phase (field phase + the simulator's receiver offset) plus the body coil's own smooth
phase, which no method can separate from the object's; for the sensitivities it is S_c / B.

Residues: at TE = 20 ms the phantom's own field (the -2 ppm skull next to CSF) changes by more
than pi between neighbouring voxels in places, so the true object phase itself has 2-D residues
at this resolution (651 inside the brain mask). A combination must add none: we count the
residues of the phase error wrap(phase - truth), which is zero where a combination is
singularity-free and is angle(sum_c S_c) for the phase of the sum; and where the true phase has
none (TE 5 and 10 ms, the brain mask less its one-voxel rim), the combined phase itself.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from qsmkit import coils
from qsmkit.errors import QSMInputError
from qsmkit.simulate import make_phantom, simulate_acquisition

SHAPE, VOXEL = (128, 128, 32), (1.875, 1.875, 5.0)


def wrap(x):
    return (x + np.pi) % (2 * np.pi) - np.pi


def rms(x):
    return float(np.sqrt(np.mean(np.square(x))))


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(SHAPE, VOXEL)


@pytest.fixture(scope="module")
def single_echo(phantom):
    """32 coils + body coil, TE 20 ms, default SNR; the noise-free coil-free reference."""
    acq = simulate_acquisition(phantom, n_coils=32, body_coil=True)
    ref = simulate_acquisition(phantom, snr=None)
    assert acq.snr == 100.0 and acq.coil_magnitude.shape == SHAPE + (1, 32)
    return acq, ref


@pytest.fixture(scope="module")
def three_echo(phantom):
    """TE 5, 10, 16 ms: TE2 = 2 TE1 (ASPIRE, integer MCPC-3D-S ratio); echoes 2-3 have
    TE1 / (TE2 - TE1) = 5/3 (MCPC-3D-S with an unwrapped echo difference)."""
    te = (0.005, 0.010, 0.016)
    acq = simulate_acquisition(phantom, te=te, n_coils=32, body_coil=True)
    ref = simulate_acquisition(phantom, te=te, snr=None)
    field_only = simulate_acquisition(phantom, te=te, snr=None, phase_offset=False)
    return te, acq, ref, field_only


# --------------------------------------------------------------------- body coil


def test_bodycoil_recovers_phase_and_sensitivities(phantom, single_echo):
    acq, ref = single_echo
    mask = phantom.mask
    body = acq.body_sensitivity
    truth = np.angle(body * np.exp(1j * ref.phase[..., 0]))
    res = coils.combine(acq.coil_magnitude, acq.coil_phase, body=acq.body_magnitude,
                        body_phase=acq.body_phase, voxel_size=VOXEL)  # auto -> bodycoil
    assert res.method == "bodycoil" and res.image.shape == SHAPE + (1,)
    assert res.image.dtype == np.complex64 and res.sensitivities.shape == SHAPE + (32,)
    phase = np.angle(res.image[..., 0])
    err = wrap(phase - truth)
    print(f"bodycoil: phase error RMS {rms(err[mask]):.4f} rad, mean {err[mask].mean():+.4f}")
    assert rms(err[mask]) < 0.05
    assert coils.phase_residues(err, mask) == 0
    assert coils.phase_residues(phase, mask) == coils.phase_residues(truth, mask)

    # magnitude: |B| rho
    true_mag = np.abs(body) * ref.magnitude[..., 0]
    mag_err = np.linalg.norm((np.abs(res.image[..., 0]) - true_mag)[mask]) / np.linalg.norm(true_mag[mask])
    assert mag_err < 0.05

    # sensitivities relative to the body coil, per coil
    s_true = acq.sensitivities[mask] / body[mask][:, None]
    s_est = res.sensitivities[mask]
    a_true, a_est = np.abs(s_true), np.abs(s_est)
    per_coil = np.linalg.norm(a_est - a_true, axis=0) / np.linalg.norm(a_true, axis=0)
    ph_err = wrap(np.angle(s_est) - np.angle(s_true))
    ph_rms = float(np.sqrt(np.average(ph_err**2, weights=a_true**2)))
    print(f"bodycoil: |S| error per coil max {per_coil.max():.4f}, median {np.median(per_coil):.4f}; "
          f"phase of S RMS ({'|S|^2'}-weighted) {ph_rms:.4f} rad")
    assert per_coil.max() < 0.05
    assert ph_rms < 0.02

    # the comparison baseline: the complex sum has singularities inside the object
    total = coils.combine(acq.coil_magnitude, acq.coil_phase, method="phase_of_sum")
    assert total.sensitivities is None
    sum_phase = np.angle(total.image[..., 0])
    sum_res = coils.phase_residues(wrap(sum_phase - truth), mask)
    print(f"phase of sum: {sum_res} residues of the phase error inside the object "
          f"({coils.phase_residues(sum_phase, mask)} in all vs {coils.phase_residues(truth, mask)} true)")
    assert sum_res >= 50
    assert coils.phase_residues(sum_phase, mask) > coils.phase_residues(truth, mask)


def test_bodycoil_magnitude_models(phantom, single_echo):
    """exp(polynomial) follows the loops' fall-off; the original polynomial of |m_c / b| at
    order 2 does not (why ``log`` is the default); order 3 tightens both."""
    acq, _ = single_echo
    mask = phantom.mask
    a_true = np.abs(acq.sensitivities[mask] / acq.body_sensitivity[mask][:, None])
    errors = {}
    for model, order in (("linear", 2), ("log", 3)):
        res = coils.combine_bodycoil(acq.coil_magnitude, acq.coil_phase, body=acq.body_magnitude,
                                     body_phase=acq.body_phase, voxel_size=VOXEL, order=order,
                                     magnitude_model=model, return_sensitivities=True)
        a = np.abs(res.sensitivities[mask])
        per_coil = np.linalg.norm(a - a_true, axis=0) / np.linalg.norm(a_true, axis=0)
        errors[model, order] = float(per_coil.max())
        assert res.info["order"] == order and len(res.info["fit_rms"]) == 32
    print("max per-coil |S| error:", {f"{m} {o}": round(e, 4) for (m, o), e in errors.items()})
    assert errors["linear", 2] > 0.10
    assert errors["log", 3] < 0.035


def test_bodycoil_multi_echo_and_input_forms(phantom, three_echo):
    te, acq, ref, _ = three_echo
    mask = phantom.mask
    body = acq.body_sensitivity
    res = coils.combine(acq.coil_magnitude, acq.coil_phase, body=acq.body_magnitude,
                        body_phase=acq.body_phase, te=te, voxel_size=VOXEL, return_sensitivities=False)
    assert res.image.shape == SHAPE + (3,) and res.sensitivities is None
    assert res.info["body_coil_echoes"] == 3
    for e in range(3):
        err = wrap(np.angle(res.image[..., e]) - np.angle(body * np.exp(1j * ref.phase[..., e])))
        assert rms(err[mask]) < 0.05, (e, rms(err[mask]))
        assert coils.phase_residues(err, mask) == 0
    # at TE 5 and 10 ms the true phase has no residues once the one-voxel rim of extra-cerebral
    # CSF (next to the skull's field) is left out: there, the combined phase has none either
    inner = ndimage.binary_erosion(mask, np.ones((3, 3, 1), bool))
    total = coils.combine(acq.coil_magnitude, acq.coil_phase, method="phase_of_sum")
    for e in range(2):
        assert coils.phase_residues(np.angle(body * np.exp(1j * ref.phase[..., e])), inner) == 0
        assert coils.phase_residues(np.angle(res.image[..., e]), inner) == 0
        assert coils.phase_residues(np.angle(total.image[..., e]), inner) >= 50
    # complex input, body coil of the first echo only: the same combination of echo 1
    cplx = (acq.coil_magnitude[..., :1, :] * np.exp(1j * acq.coil_phase[..., :1, :])).astype(np.complex64)
    b1 = (acq.body_magnitude[..., 0] * np.exp(1j * acq.body_phase[..., 0])).astype(np.complex64)
    one = coils.combine(cplx[..., 0, :], body=b1, voxel_size=VOXEL)
    polar = coils.combine(acq.coil_magnitude[..., 0, :], acq.coil_phase[..., 0, :], body=b1, voxel_size=VOXEL)
    assert one.image.shape == SHAPE
    assert np.max(np.abs(one.image - polar.image)) < 1e-5 * np.abs(polar.image).max()
    err = wrap(np.angle(one.image) - np.angle(body * np.exp(1j * ref.phase[..., 0])))
    assert rms(err[mask]) < 0.05


# ------------------------------------------------------------- without body coil


def test_mcpc3ds_and_aspire_on_simulation(phantom, three_echo):
    """Both remove the echo-independent phase (receiver offset + coil phase): the combined phase
    is the field phase omega TE alone."""
    te, acq, _, field_only = three_echo
    mask = phantom.mask
    true_offset = np.angle(acq.sensitivities) + acq.phase_offset[..., None]
    sum_res = None
    for method, kwargs, echoes in (("auto", {}, slice(None)), ("aspire", {}, slice(None)),
                                   ("mcpc3ds", {}, slice(1, 3))):
        res = coils.combine(acq.coil_magnitude[..., echoes, :], acq.coil_phase[..., echoes, :],
                            te=te[echoes], method=method, voxel_size=VOXEL, **kwargs)
        truth = field_only.phase[..., echoes]
        for e in range(truth.shape[-1]):
            err = wrap(np.angle(res.image[..., e]) - truth[..., e])
            print(f"{res.method} TE {te[echoes]}: echo {e + 1} phase error RMS {rms(err[mask]):.4f}")
            assert rms(err[mask]) < 0.05
            assert coils.phase_residues(err, mask) == 0
        off_err = wrap(np.angle(res.sensitivities[mask]) - true_offset[mask])
        assert rms(off_err) < 0.05
        if method == "auto":
            assert res.method == "mcpc3ds" and not res.info["unwrapped"]
        if echoes == slice(1, 3):
            assert res.info["unwrapped"] and abs(res.info["te_ratio"] - 10 / 6) < 1e-9
    total = coils.combine(acq.coil_magnitude, acq.coil_phase, method="phase_of_sum")
    sum_res = coils.phase_residues(wrap(np.angle(total.image[..., 0]) - field_only.phase[..., 0]), mask)
    assert sum_res >= 50


def test_adaptive_single_echo(phantom, single_echo):
    """Walsh weights are parallel to the sensitivities: |w^H m| reaches the root-sum-of-squares;
    the phase differs from the object's by a smooth, singularity-free reference phase."""
    acq, ref = single_echo
    mask = phantom.mask
    res = coils.combine(acq.coil_magnitude[..., 0, :], acq.coil_phase[..., 0, :], voxel_size=VOXEL)
    assert res.method == "adaptive" and res.image.shape == SHAPE
    weights = res.sensitivities
    assert np.allclose(np.linalg.norm(weights[mask], axis=-1), 1, atol=0.02)
    rss = np.sqrt(np.sum(acq.coil_magnitude[..., 0, :] ** 2, axis=-1))
    ratio = np.abs(res.image)[mask] / rss[mask]
    err = wrap(np.angle(res.image) - ref.phase[..., 0])
    total = coils.combine(acq.coil_magnitude[..., 0, :], acq.coil_phase[..., 0, :], method="phase_of_sum")
    sum_ratio = np.abs(total.image)[mask] / np.sum(acq.coil_magnitude[..., 0, :], axis=-1)[mask]
    print(f"adaptive: |w^H m| / RSS median {np.median(ratio):.3f}; phase of sum coherence median "
          f"{np.median(sum_ratio):.3f}")
    assert np.median(ratio) > 0.95 and np.median(sum_ratio) < 0.6
    assert coils.phase_residues(err, mask) == 0
    step = np.abs(wrap(np.diff(err, axis=0)))[mask[1:] & mask[:-1]]
    assert step.mean() < 0.05  # smooth reference phase (noise included)


def test_real_32_channel_sphere():
    """ASPIRE sample data: no body coil, TE2 = 2 TE1 with unknown absolute TEs, so TE = (1, 2)
    in arbitrary units (only TE1 / (TE2 - TE1) enters)."""
    nib = pytest.importorskip("nibabel")
    from conftest import shared

    folder = shared("multicoil-sphere")
    mag = np.asarray(nib.load(str(folder / "mag" / "Image.nii")).dataobj, dtype=np.float32)
    raw = np.asarray(nib.load(str(folder / "phase" / "Image.nii")).dataobj, dtype=np.float32)
    assert mag.shape == (80, 80, 2, 2, 32) and raw.min() >= -4096 and raw.max() <= 4095
    phase = raw * np.float32(np.pi / 4096)
    voxel = (3.75, 3.75, 6.0)
    with pytest.raises(QSMInputError, match="radians"):
        coils.combine(mag, raw, te=(1, 2), voxel_size=voxel)

    results = {m: coils.combine(mag, phase, te=(1, 2), method=m, voxel_size=voxel)
               for m in ("auto", "aspire", "phase_of_sum")}
    assert results["auto"].method == "mcpc3ds"
    # the sphere: combined magnitude above 20 % of its 99th percentile, holes filled, eroded by
    # one voxel in-plane (the edge itself carries the field of the container and an air bubble)
    combined = np.abs(results["auto"].image[..., 0])
    sphere = ndimage.binary_fill_holes(combined > 0.2 * np.percentile(combined, 99))
    sphere = ndimage.binary_erosion(sphere, np.ones((3, 3, 1), bool))
    assert 2000 < sphere.sum() < 3000
    counts = {m: [coils.phase_residues(np.angle(r.image[..., e]), sphere) for e in range(2)]
              for m, r in results.items()}
    # channel coherence: 1 where the combined channels are in phase, 0 where they cancel
    inside = np.repeat(sphere[..., None], 2, axis=-1)  # both echoes
    coherence = {
        "mcpc3ds": np.abs(results["auto"].image)[inside] / np.sqrt(np.sum(mag**2, axis=-1))[inside],
        "phase_of_sum": np.abs(results["phase_of_sum"].image)[inside] / np.sum(mag, axis=-1)[inside],
    }
    print("sphere residues per echo:", counts, "; coherence min:",
          {k: round(float(v.min()), 4) for k, v in coherence.items()})
    assert counts["auto"] == [0, 0] and counts["aspire"] == [0, 0]
    assert all(n >= 1 for n in counts["phase_of_sum"])
    assert coherence["mcpc3ds"].min() > 0.9
    assert coherence["phase_of_sum"].min() < 0.05


# ------------------------------------------------------------------------ residues


def test_phase_residues_counts_vortices():
    x, y = np.meshgrid(np.arange(40.0), np.arange(30.0), indexing="ij")
    vortex = np.angle((x - 10.5) + 1j * (y - 12.5)) - np.angle((x - 29.5) + 1j * (y - 20.5))
    phase = np.stack([wrap(vortex + 0.4 * x), wrap(0.3 * x - 0.2 * y)], axis=-1)  # 2 poles; a ramp
    n, rmap = coils.phase_residues(phase, return_map=True)
    assert n == 2 and rmap.shape == (39, 29, 2)
    assert rmap[10, 12, 0] == 1 and rmap[29, 20, 0] == -1 and not rmap[..., 1].any()
    mask = np.ones((40, 30, 2), bool)
    mask[28:, :, 0] = False  # the loop of the second pole leaves the mask
    assert coils.phase_residues(phase, mask) == 1
    assert coils.phase_residues(phase[..., 0], mask[..., 0]) == 1


# ----------------------------------------------------------------------- bad input


def _small(n_echoes=2, n_coils=4, seed=0):
    rng = np.random.default_rng(seed)
    shape = (12, 10, 6, n_echoes, n_coils)
    return (rng.uniform(0.5, 1, shape).astype(np.float32),
            rng.uniform(-np.pi, np.pi, shape).astype(np.float32))


def test_bad_input():
    mag, phase = _small()
    body = np.ones((12, 10, 6, 2), np.complex64)
    cases = [
        (dict(body=np.ones((12, 10, 5), np.complex64)), "body-coil image shape"),
        (dict(body=np.ones((12, 10, 6, 3), np.complex64)), "body-coil image shape"),
        (dict(te=(0.01, 0.01), method="mcpc3ds"), "must increase"),
        (dict(te=(0.02, 0.01), body=body), "must increase"),
        (dict(te=(0.01,), method="mcpc3ds"), "fewer TEs than echoes"),
        (dict(method="mcpc3ds"), "needs the echo times"),
        (dict(te=(0.01, 0.03), method="aspire"), "TE2 = 2 TE1"),
        (dict(method="nonsense"), "unknown coil combination method"),
        (dict(method="bodycoil"), "needs a body-coil image"),
    ]
    for kwargs, message in cases:
        with pytest.raises(QSMInputError, match=message):
            coils.combine(mag, phase, **kwargs)
    zero = mag.copy()
    zero[..., 2] = 0
    for method in ("mcpc3ds", "aspire", "adaptive", "phase_of_sum"):
        with pytest.raises(QSMInputError, match="channel 3 of 4 is zero everywhere"):
            coils.combine(zero, phase, te=(0.01, 0.02), method=method)
    with pytest.raises(QSMInputError, match="channel 3 of 4 is zero everywhere"):
        coils.combine(zero, phase, body=body)
    one_mag, one_phase = _small(n_echoes=1)
    for method in ("mcpc3ds", "aspire"):
        with pytest.raises(QSMInputError, match="needs at least two echoes"):
            coils.combine(one_mag[..., 0, :], one_phase[..., 0, :], te=(0.01,), method=method)
    with pytest.raises(QSMInputError, match="shape"):
        coils.combine(mag, phase[..., :3])
    with pytest.raises(QSMInputError, match="complex"):
        coils.combine(mag)
    with pytest.raises(QSMInputError, match=r"\(X, Y, Z, C\)"):
        coils.combine(mag[..., 0, 0], phase[..., 0, 0])


def test_resolve_method_and_registry():
    assert coils.resolve_method("auto", True, 1) == "bodycoil"
    assert coils.resolve_method("auto", False, 3) == "mcpc3ds"
    assert coils.resolve_method(None, False, 1) == "adaptive"
    assert coils.resolve_method("ASPIRE", False, 2) == "aspire"
    assert set(coils.COMBINATION.names()) == {"bodycoil", "mcpc3ds", "aspire", "adaptive", "phase_of_sum"}
    assert "singularit" in coils.COMBINATION.get("phase_of_sum").summary


def test_partial_blocks_and_nan(phantom):
    """An odd grid (blocks cut at the far edges) and NaN voxels: an exact model is recovered."""
    shape, voxel = (37, 29, 11), (2.0, 2.0, 3.0)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    inside = x**2 + y**2 + z**2 < 0.8
    rho = inside * np.exp(1j * (1.5 * x * y + 0.8 * z))
    sens = np.stack([np.exp(-0.6 * (x - cx) ** 2 - 0.5 * (y - cy) ** 2 + 1j * (0.7 * x - 0.4 * y + k))
                     for k, (cx, cy) in enumerate([(-1, 0), (1, 0), (0, -1), (0, 1), (0.7, 0.7)])], -1)
    body = 0.9 * np.exp(1j * (0.3 + 0.2 * z))
    chans = (sens * rho[..., None]).astype(np.complex64)
    chans[0, 0, 0, :] = np.nan  # outside the object: ignored
    res = coils.combine(chans, body=(body * rho).astype(np.complex64), voxel_size=voxel, block_mm=4.0)
    assert res.info["block_voxels"] == [2, 2, 1]
    err = wrap(np.angle(res.image) - np.angle(body * rho))[inside]
    s_true = sens[inside] / body[inside][:, None]
    s_err = np.abs(res.sensitivities[inside] - s_true) / np.abs(s_true)
    print(f"odd grid: phase error max {np.abs(err).max():.2e}, |S| relative error max {s_err.max():.3f}")
    assert np.abs(err).max() < 0.01
    assert np.median(s_err) < 0.01 and s_err.max() < 0.05
