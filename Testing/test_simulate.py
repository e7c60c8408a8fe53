"""The numerical phantom and the GRE acquisition simulator (qsmkit.simulate)."""

import numpy as np
import pytest

from qsmkit import geometry, units
from qsmkit import simulate as sim
from qsmkit.dipole import forward_field
from qsmkit.errors import QSMInputError

SMALL = dict(shape=(96, 96, 32), voxel_size=(2.5, 2.5, 5.0))
MEDIUM = dict(shape=(128, 128, 64), voxel_size=(1.875, 1.875, 2.5))
OBLIQUE_B0 = geometry.rotation_matrix(0, 20) @ geometry.rotation_matrix(1, -15) @ [0, 0, 1]


@pytest.fixture(scope="module")
def small():
    return sim.make_phantom(**SMALL)


@pytest.fixture(scope="module")
def default(default_phantom):
    return default_phantom


def vessel_angle_deg(ph):
    """Angle between B0 and the principal axis (PCA) of the vessel voxels, in mm."""
    pts = np.argwhere(ph.vessel_mask) * ph.voxel_size
    pts = pts - pts.mean(axis=0)
    _, vecs = np.linalg.eigh(pts.T @ pts)
    axis = vecs[:, -1]
    b = ph.b0_dir / np.linalg.norm(ph.b0_dir)
    return float(np.degrees(np.arccos(abs(axis @ b))))


def complex_image(mag, phase):
    return mag.astype(np.float64) * np.exp(1j * phase.astype(np.float64))


# ------------------------------------------------------------------ phantom


def test_label_names_and_published_chi():
    for name in sim.DEEP_GRAY + ("csf", "vessel"):
        assert name in sim.LABEL_IDS
    published = {"globus_pallidus": 0.123, "substantia_nigra": 0.105, "dentate": 0.062,
                 "red_nucleus": 0.045, "putamen": 0.032, "caudate": 0.023}
    for name, value in published.items():
        assert sim.CHI_PPM[sim.LABEL_IDS[name]] - sim.CHI_PPM[sim.LABEL_IDS["csf"]] == value
    assert sim.CHI_PPM[sim.LABEL_IDS["csf"]] == 0.0
    assert sim.CHI_PPM[sim.LABEL_IDS["vessel"]] == 0.4
    assert sim.CHI_PPM[sim.LABEL_IDS["background/air"]] == pytest.approx(9.4)
    assert sim.CHI_PPM[sim.LABEL_IDS["air_cavity"]] == pytest.approx(9.4)


def test_chi_map_per_label_relative_to_csf(small):
    ph = small
    csf = ph.chi[ph.labels == sim.LABEL_IDS["csf"]]
    assert csf.size > 0 and np.all(csf == 0)
    for lab, name in ph.label_names.items():
        vals = ph.chi[ph.labels == lab]
        if vals.size:
            assert np.all(vals == np.float32(sim.CHI_PPM[lab])), name
            rel = vals.mean(dtype=np.float64) - csf.mean(dtype=np.float64)
            assert rel == np.float64(np.float32(sim.CHI_PPM[lab])), name
    assert np.array_equal(ph.chi_brain, np.where(ph.mask, ph.chi, 0))


def test_phantom_arrays(small):
    ph = small
    shape = SMALL["shape"]
    for name in ("chi", "chi_brain", "magnitude", "t2star_ms", "field_total", "field_local",
                 "field_background"):
        arr = getattr(ph, name)
        assert arr.shape == shape and arr.dtype == np.float32, name
        assert np.all(np.isfinite(arr)), name
    assert ph.mask.dtype == bool and ph.vessel_mask.dtype == bool
    assert ph.labels.dtype == np.uint8
    assert ph.magnitude.min() == 0 and ph.magnitude.max() <= 1
    assert np.all(ph.magnitude[ph.labels == 0] == 0)
    assert np.all(ph.magnitude[ph.labels == sim.LABEL_IDS["air_cavity"]] == 0)
    assert np.all(ph.t2star_ms > 0)
    # iron-rich nuclei darker than plain gray matter, and darker with more iron
    mag = {n: ph.magnitude[ph.labels == sim.LABEL_IDS[n]][0] for n in sim.DEEP_GRAY}
    assert mag["globus_pallidus"] < mag["putamen"] < mag["caudate"] < sim.MAGNITUDE[3]
    # air outside the head and in the cavities, none of it in the brain mask
    assert np.all(ph.chi[ph.labels == 0] == np.float32(sim.CHI_AIR_PPM))
    assert not np.any(ph.mask & np.isin(ph.labels, (0, 11, 12)))
    assert np.count_nonzero(ph.labels == sim.LABEL_IDS["air_cavity"]) > 0
    affine = np.diag(list(SMALL["voxel_size"]) + [1.0])
    affine[:3, 3] = -(np.array(shape) - 1) / 2 * SMALL["voxel_size"]  # FOV centre at 0
    np.testing.assert_allclose(ph.affine, affine, atol=1e-9)
    np.testing.assert_allclose(geometry.b0_direction(ph.affine), ph.b0_dir, atol=1e-12)


def test_field_decomposition(small):
    ph = small
    np.testing.assert_allclose(ph.field_total, ph.field_local + ph.field_background,
                               rtol=0, atol=1e-6)
    pad = tuple(n // 2 for n in ph.chi.shape)
    # the local field is that of the brain's own chi relative to its mean (see the docstring)
    chi_local = np.where(ph.mask, ph.chi_brain - ph.chi_brain[ph.mask].mean(), 0)
    local = forward_field(chi_local.astype(np.float32), ph.voxel_size, ph.b0_dir, pad=pad)
    np.testing.assert_allclose(ph.field_local, local, rtol=0, atol=1e-6)
    # the head in infinite air: the total field is that of chi relative to air
    total = forward_field((ph.chi.astype(np.float64) - sim.CHI_AIR_PPM), ph.voxel_size,
                          ph.b0_dir, pad=pad)
    np.testing.assert_allclose(ph.field_total, total, rtol=0, atol=2e-5)


def test_background_dominates_inside_brain(default):
    ph = default
    bg = ph.field_background[ph.mask].astype(np.float64)
    loc = ph.field_local[ph.mask].astype(np.float64)
    rms = lambda v: np.sqrt(np.mean((v - v.mean()) ** 2))  # noqa: E731
    assert rms(bg) > 10 * rms(loc)
    assert 0.003 < rms(loc) < 0.05  # tens of ppb: a plausible tissue field


def test_default_phantom_anatomy(default):
    ph = default
    assert ph.chi.shape == (256, 256, 64)
    np.testing.assert_array_equal(ph.voxel_size, [0.9375, 0.9375, 2.5])
    assert ph.scale == 1.0
    for name in sim.DEEP_GRAY:
        lab = sim.LABEL_IDS[name]
        n = np.count_nonzero(ph.labels == lab)
        assert n >= 20, (name, n)
        assert np.all(ph.mask[ph.labels == lab])
        # bilateral: both hemispheres
        x = np.nonzero(ph.labels == lab)[0]
        assert np.any(x < 127.5) and np.any(x > 127.5)
    assert np.count_nonzero(ph.labels[ph.mask] == sim.LABEL_IDS["csf"]) > 100  # ventricles


def test_vessel_at_magic_angle(default):
    ph = default
    assert np.array_equal(ph.vessel_mask, ph.labels == sim.LABEL_IDS["vessel"])
    assert ph.vessel_mask.sum() > 50
    assert np.all(ph.mask[ph.vessel_mask])
    assert np.all(ph.chi[ph.vessel_mask] == np.float32(0.4))
    assert abs(vessel_angle_deg(ph) - 54.7356) < 2.0
    b = ph.b0_dir
    assert np.degrees(np.arccos(abs(ph.vessel_axis @ b))) == pytest.approx(54.7356, abs=1e-3)


def test_oblique_b0_and_other_grid():
    ph = sim.make_phantom(**MEDIUM, b0_dir=OBLIQUE_B0)
    np.testing.assert_allclose(ph.b0_dir, OBLIQUE_B0 / np.linalg.norm(OBLIQUE_B0))
    np.testing.assert_allclose(geometry.b0_direction(ph.affine), ph.b0_dir, atol=1e-9)
    assert abs(vessel_angle_deg(ph) - 54.7356) < 2.0
    assert np.all(ph.mask[ph.vessel_mask])
    # the local field follows the oblique kernel
    pad = tuple(n // 2 for n in ph.chi.shape)
    chi_local = np.where(ph.mask, ph.chi_brain - ph.chi_brain[ph.mask].mean(), 0)
    np.testing.assert_allclose(
        ph.field_local, forward_field(chi_local.astype(np.float32), ph.voxel_size, OBLIQUE_B0,
                                      pad=pad), rtol=0, atol=1e-6)
    # the anatomy does not depend on B0 except the vessel's direction
    ref = sim.make_phantom(**MEDIUM)
    keep = ~(ph.vessel_mask | ref.vessel_mask)
    assert np.array_equal(ph.labels[keep], ref.labels[keep])


def test_non_default_grid_and_vessel_angle():
    ph = sim.make_phantom(shape=(72, 96, 40), voxel_size=(2.5, 2.0, 3.5), vessel_angle_deg=90)
    assert ph.chi.shape == (72, 96, 40)
    assert ph.scale == pytest.approx(0.95 * 70 / 75)  # 140 mm in z: the head is scaled down
    for name in sim.DEEP_GRAY:
        assert np.count_nonzero(ph.labels == sim.LABEL_IDS[name]) > 0, name
    assert np.degrees(np.arccos(abs(ph.vessel_axis @ ph.b0_dir))) == pytest.approx(90)
    assert ph.vessel_mask.any() and np.all(ph.mask[ph.vessel_mask])


def test_anatomy_independent_of_seed(small):
    ph = sim.make_phantom(**SMALL, seed=5)
    assert np.array_equal(ph.chi, small.chi)
    assert np.array_equal(ph.field_total, small.field_total)


def test_bad_inputs(small):
    with pytest.raises(QSMInputError):
        sim.make_phantom(shape=(4, 96, 32))
    with pytest.raises(QSMInputError):
        sim.make_phantom(shape=(32, 32, 32), voxel_size=(1, 0, 1))
    with pytest.raises(QSMInputError):
        sim.make_phantom(shape=(32, 32, 32), b0_dir=(0, 0, 0))
    with pytest.raises(QSMInputError):
        sim.simulate_acquisition(small, te=(-0.01,))
    with pytest.raises(QSMInputError):
        sim.simulate_acquisition(small, snr=0)


# -------------------------------------------------------------- acquisition


def test_acquisition_deterministic(small):
    a = sim.simulate_acquisition(small, te=(0.01, 0.02), seed=3)
    b = sim.simulate_acquisition(small, te=(0.01, 0.02), seed=3)
    assert np.array_equal(a.phase, b.phase) and np.array_equal(a.magnitude, b.magnitude)
    c = sim.simulate_acquisition(small, te=(0.01, 0.02), seed=4)
    assert not np.array_equal(a.magnitude, c.magnitude)
    assert np.array_equal(a.phase_offset, c.phase_offset)
    assert a.magnitude.shape == SMALL["shape"] + (2,) and a.magnitude.dtype == np.float32
    assert a.phase.dtype == np.float32
    assert a.phase.min() >= -np.pi and a.phase.max() < np.pi
    assert a.te == (0.01, 0.02) and a.b0 == 3.0
    assert a.coil_magnitude is None and a.body_magnitude is None and a.sensitivities is None


def test_phase_model_without_noise(small):
    te = (0.005, 0.020)
    acq = sim.simulate_acquisition(small, te=te, b0=3.0, snr=1e6)
    assert np.ptp(acq.phase_offset) > 2.0  # a few rad across the FOV
    head = (small.magnitude > 0)
    for e, t in enumerate(te):
        expected = (2 * np.pi * units.GAMMA_HZ_PER_T * 3.0 * t * small.field_total * 1e-6
                    + acq.phase_offset)
        diff = units.wrap_phase(acq.phase[..., e].astype(np.float64) - expected)
        assert np.max(np.abs(diff[head])) < 1e-3
        decay = small.magnitude * np.exp(-t / (small.t2star_ms * 1e-3))
        np.testing.assert_allclose(acq.magnitude[..., e], decay, atol=1e-5)
    off = sim.simulate_acquisition(small, te=te, snr=None, phase_offset=False)
    assert np.all(off.phase_offset == 0)
    expected = units.wrap_phase(2 * np.pi * units.larmor_hz(3.0) * te[0] * small.field_total
                                * 1e-6)
    diff = units.wrap_phase(off.phase[..., 0] - expected)
    assert np.max(np.abs(diff[head])) < 1e-4


def test_noise_level_in_air(small):
    snr = 100.0
    acq = sim.simulate_acquisition(small, snr=snr, body_coil=True, seed=1)
    assert acq.noise_sigma == pytest.approx(1 / snr)
    air = small.labels == 0
    z = complex_image(acq.magnitude[..., 0], acq.phase[..., 0])[air]
    assert np.std(z.real) == pytest.approx(1 / snr, rel=0.1)
    assert np.std(z.imag) == pytest.approx(1 / snr, rel=0.1)
    # |noise| is Rayleigh: mean sigma sqrt(pi/2)
    assert np.mean(np.abs(z)) / np.sqrt(np.pi / 2) == pytest.approx(1 / snr, rel=0.1)
    zb = complex_image(acq.body_magnitude[..., 0], acq.body_phase[..., 0])[air]
    assert np.std(zb.real) == pytest.approx(sim.BODY_SNR_FACTOR / snr, rel=0.1)


def test_coils_recover_signal(small):
    acq = sim.simulate_acquisition(small, te=(0.01, 0.02), snr=1e6, n_coils=4, body_coil=True)
    shape = SMALL["shape"]
    assert acq.sensitivities.shape == shape + (4,) and acq.sensitivities.dtype == np.complex64
    assert acq.coil_magnitude.shape == shape + (2, 4) and acq.coil_phase.shape == shape + (2, 4)
    assert acq.body_magnitude.shape == shape + (2,) and acq.body_phase.shape == shape + (2,)
    head = small.magnitude > 0
    s = acq.sensitivities.astype(np.complex128)
    for e in range(2):
        coils = complex_image(acq.coil_magnitude[..., e, :], acq.coil_phase[..., e, :])
        rho = (np.conj(s) * coils).sum(-1) / (np.abs(s) ** 2).sum(-1)
        truth = complex_image(acq.magnitude[..., e], acq.phase[..., e])
        assert np.max(np.abs(rho - truth)[head]) < 1e-4
        body = complex_image(acq.body_magnitude[..., e], acq.body_phase[..., e])
        np.testing.assert_allclose(body[head], (acq.body_sensitivity * truth)[head], atol=1e-4)
    # sensitivities: smooth, positive, vary across the head; body coil near uniform
    mag = np.abs(acq.sensitivities[head])
    assert mag.min() > 0 and mag.max() / mag.min() > 2
    bm = np.abs(acq.body_sensitivity[head])
    assert bm.max() / bm.min() < 1.2
    # more coils: two rings
    acq8 = sim.simulate_acquisition(small, snr=None, n_coils=8)
    assert acq8.coil_magnitude.shape == shape + (1, 8)
    assert acq8.body_magnitude is None
