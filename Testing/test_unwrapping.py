"""Embedded spatial unwrapping (``qsmkit.unwrapping``) against simulations whose true phase is
known: ``ppm_to_rad(field_total, B0, TE) + offset``.

A right voxel equals the truth up to one 2 pi multiple common to the whole mask. Where the true
phase itself changes by more than pi between neighbours no spatial unwrapper can follow it; the
share of voxels reachable from the main region through edges where it does not (computed here
from the truth) bounds what any method can get, and is reported beside each bar.

- QSM challenge 2.0 head model (1.28 mm), GRE of ``qsmkit.headmodel.simulate_gre`` with noise:
  the issue's bar, 99.9 % of the brain, at 3 T TE 20 ms and 7 T TE 25 ms (measured 99.997 and
  99.912 %, 99.912-99.919 % over four noise seeds; bound 99.999 and 99.926 %; scikit-image's
  quality-guided unwrapper 99.980 and 99.18 %).
- Built-in phantom: its skull is a voxel-sharp -2 ppm shell next to the 2.5 mm extra-cerebral
  CSF layer, so the true phase aliases in that outermost layer (bound 99.65 % of the brain mask
  at 3 T, 98.3 % at 7 T). The issue's 99.9 % holds at 3 T in the mask the pipeline makes
  (``surface``, 2 mm from the skull: measured 99.992 %). Elsewhere the bars are the measured
  values (3 T: 99.33 % of the brain mask; 7 T: 97.97 % of the surface mask, 95.76 % of the brain
  mask, bound 98.27 %, where the vein and the rim alias; 98.15 % of the surface mask before that
  mask sampled the magnitude trilinearly and took in a little more of the aliased rim), every
  wrong voxel lies in that outer layer at 3 T, and ROMEO beats scikit-image's quality-guided
  unwrapper (the former default).
- Built-in phantom with the voxel-integrated signal (``simulate_acquisition(supersample=...)``:
  the complex signal computed on a finer grid and block averaged, as a scanner integrates over
  the voxel): partial volumes smooth the phase where the point-sampled phase aliases. Truth: the
  unwrapped phase of the noise-free integrated signal (``acq.true_phase``). On 128 x 128 x 32
  voxels of 1.875 x 1.875 x 5 mm, 2 x 2 x 6 sub-voxels (0.94 x 0.94 x 0.83 mm), the issue's
  99.9 % holds in the ``surface`` mask at 3 T and 7 T (measured 100.000 and 99.943 %; seeds 0-3:
  99.932-99.943 % at 7 T) and in the brain mask at 3 T (99.940 %); the 7 T brain mask stays below
  it (99.10 %, bound 99.39 %). On the default 256 x 256 x 64 grid (2 x 2 x 6): surface 100.000 and
  99.988 %, brain 99.990 and 99.658 % (bound 99.807 %). The figures grow with the sub-sampling
  (the block mean is a midpoint rule for the voxel integral): at 7 T on 256 x 256 x 64 the brain
  mask went 98.37, 99.24, 99.66, 99.79 % for 2, 3, 2 x 2 x 6, 3 x 3 x 8 sub-voxels.
"""

import numpy as np
import pytest
from scipy import ndimage, sparse
from scipy.sparse.csgraph import connected_components

from qsmkit import masking, unwrapping
from qsmkit.errors import QSMInputError
from qsmkit.simulate import make_phantom, simulate_acquisition, supersampled_signal
from qsmkit.units import ppm_to_rad, wrap_phase

romeo = unwrapping.unwrap_romeo


def right_fraction(unwrapped, truth, mask):
    """Share of mask voxels equal to the truth up to the most common 2 pi multiple."""
    k = np.round((unwrapped - truth) / (2 * np.pi))[mask]
    _, counts = np.unique(k, return_counts=True)
    return counts.max() / k.size


def wrong_voxels(unwrapped, truth, mask):
    k = np.round((unwrapped - truth) / (2 * np.pi))
    values, counts = np.unique(k[mask], return_counts=True)
    return mask & (k != values[np.argmax(counts)])


def recoverable_fraction(truth, mask):
    """Largest share of the mask connected through edges whose true phase step is below pi:
    an upper bound for any unwrapper that follows wrapped differences between neighbours."""
    index = -np.ones(mask.shape, np.int64)
    index[mask] = np.arange(mask.sum())
    rows, cols = [], []
    for ax in range(3):
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[ax], hi[ax] = slice(0, -1), slice(1, None)
        a, b = index[tuple(lo)], index[tuple(hi)]
        ok = (a >= 0) & (b >= 0) & (np.abs(truth[tuple(hi)] - truth[tuple(lo)]) < np.pi)
        rows.append(a[ok])
        cols.append(b[ok])
    r, c = np.concatenate(rows), np.concatenate(cols)
    n = int(mask.sum())
    graph = sparse.coo_matrix((np.ones(r.size), (r, c)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    return np.bincount(labels).max() / n


# ----------------------------------------------------------------------------- phantom


@pytest.fixture(scope="module")
def phantom(default_phantom):
    return default_phantom


def phantom_data(ph, b0, te):
    acq = simulate_acquisition(ph, te=(te,), b0=b0, snr=100, phase_offset=True, seed=0)
    truth = ppm_to_rad(ph.field_total.astype(np.float64), b0, te) + acq.phase_offset
    mask = masking.mask_surface(acq.magnitude, ph.voxel_size)
    return acq.phase[..., 0], acq.magnitude[..., 0], truth, mask


# (B0, TE, in the surface mask, in the brain mask): bars at the measured values (module docstring)
PHANTOM_BARS = {"3T": (3.0, 0.020, 0.999, 0.990), "7T": (7.0, 0.025, 0.979, 0.955)}


@pytest.mark.parametrize("case", list(PHANTOM_BARS))
def test_romeo_on_the_phantom(phantom, case):
    b0, te, bar_surface, bar_brain = PHANTOM_BARS[case]
    phase, mag, truth, surface = phantom_data(phantom, b0, te)
    brain, vs = phantom.mask, phantom.voxel_size
    u_surface = romeo(phase, mask=surface, voxel_size=vs, magnitude=mag)
    u_brain = romeo(phase, mask=brain, voxel_size=vs, magnitude=mag)
    q_brain = unwrapping.unwrap_quality(phase, mask=brain)
    got_surface = right_fraction(u_surface, truth, surface)
    got_brain = right_fraction(u_brain, truth, brain)
    got_quality = right_fraction(q_brain, truth, brain)
    bound = recoverable_fraction(truth, brain)
    print(f"phantom {case}: right {100 * got_surface:.3f} % of the surface mask, "
          f"{100 * got_brain:.3f} % of the brain (bound {100 * bound:.3f} %, skimage "
          f"{100 * got_quality:.3f} %)")
    assert got_surface >= bar_surface
    assert got_brain >= bar_brain
    assert got_brain > got_quality
    assert bound < 0.999  # the 99.9 % of the whole brain mask is out of reach here
    if case == "3T":
        # every wrong voxel is in the outer CSF layer next to the skull (2.5 mm)
        wrong = wrong_voxels(u_brain, truth, brain)
        depth = ndimage.distance_transform_edt(np.pad(brain, 1), sampling=vs)[1:-1, 1:-1, 1:-1]
        assert depth[wrong].max() <= 3.0
        assert np.all(np.isin(phantom.labels[wrong], [3, 13]))  # cortex, extra-cerebral CSF


def test_romeo_is_congruent_over_the_whole_field_of_view(phantom):
    """No mask: noise outside the head included; the result differs from the input by
    integer multiples of 2 pi everywhere, stays finite and bounded."""
    phase, mag, _, _ = phantom_data(phantom, 7.0, 0.025)
    u = romeo(phase, magnitude=mag)
    assert u.dtype == np.float32 and u.shape == phase.shape
    cycles = (u.astype(np.float64) - phase) / (2 * np.pi)
    assert np.abs(cycles - np.round(cycles)).max() * 2 * np.pi < 1e-3
    assert np.all(np.isfinite(u)) and np.abs(u).max() < 1e4


def test_multi_echo_romeo_recovers_every_echo(phantom):
    """Echoes (X, Y, Z, E): the first spatially with the phase linearity to the second, the
    rest temporally against it (no phase offset, as ROMEO assumes)."""
    te = (0.004, 0.008, 0.012)
    acq = simulate_acquisition(phantom, te=te, b0=3.0, snr=100, phase_offset=False, seed=1)
    u = romeo(acq.phase, mask=phantom.mask, voxel_size=phantom.voxel_size,
              magnitude=acq.magnitude, te=te)
    assert u.shape == acq.phase.shape
    for e, t in enumerate(te):
        truth = ppm_to_rad(phantom.field_total.astype(np.float64), 3.0, t)
        assert right_fraction(u[..., e], truth, phantom.mask) >= 0.9999
        np.testing.assert_allclose(u[..., e][phantom.mask], truth[phantom.mask], atol=0.5)


# ------------------------------------------------------ phantom, voxel-integrated signal


def block_mean(x, f):
    """Mean of each f[0] x f[1] x f[2] block (the coarse voxel of a grid f times finer)."""
    n = [s // k for s, k in zip(x.shape, f)]
    return x.reshape(n[0], f[0], n[1], f[1], n[2], f[2]).mean(axis=(1, 3, 5))


def test_supersampled_signal_is_the_block_mean_of_the_fine_phantom():
    """Against an independent fine phantom (make_phantom at twice the resolution, same field of
    view; 2.5 mm keeps both grids' vein radius at 1.75 mm): the fine voxel centres nest in the
    coarse voxels, the field lives in the same periodic box, and each coarse signal is the complex
    mean of its 8 fine voxels."""
    coarse = make_phantom((64, 80, 64), (2.5, 2.5, 2.5))
    fine = make_phantom((128, 160, 128), (1.25, 1.25, 1.25))
    assert coarse.scale == fine.scale == 1.0
    f = (2, 2, 2)
    # labels: every block of identical fine labels has that label on the coarse grid
    blocks = fine.labels.reshape(64, 2, 80, 2, 64, 2)
    lo, hi = blocks.min(axis=(1, 3, 5)), blocks.max(axis=(1, 3, 5))
    uniform = lo == hi
    assert uniform.mean() > 0.9
    assert np.array_equal(lo[uniform], coarse.labels[uniform])
    # field: the same box (D(0) = 0 fixes the mean over it): block means agree inside tissue
    inner = ndimage.binary_erosion(uniform, iterations=2) & coarse.mask
    diff = np.abs(block_mean(fine.field_total.astype(np.float64), f) - coarse.field_total)[inner]
    assert np.median(diff) < 0.003 and diff.max() < 0.06  # ppm; partial volumes near the vein
    # signal: the complex mean of the fine point-sampled acquisition
    b0, te = 7.0, 0.025
    signal, truth = supersampled_signal(coarse, (te,), b0, factor=2)
    acq = simulate_acquisition(fine, te=(te,), b0=b0, snr=None, phase_offset=False)
    z = acq.magnitude[..., 0].astype(np.float64) * np.exp(1j * acq.phase[..., 0])
    np.testing.assert_allclose(signal[..., 0], block_mean(z, f), atol=2e-4)
    # the truth is the signal's phase, unwrapped near the field's own phase where it is smooth
    bright = np.abs(signal[..., 0]) > 0.02
    assert np.abs(wrap_phase(truth[..., 0] - np.angle(signal[..., 0])))[bright].max() < 1e-6
    point = ppm_to_rad(coarse.field_total.astype(np.float64), b0, te)
    assert np.median(np.abs(truth[..., 0] - point)[inner]) < 0.15


def test_supersampled_acquisition_adds_offset_and_noise_on_the_coarse_grid():
    ph = make_phantom((64, 64, 16), (3.75, 3.75, 10.0))
    te, b0 = (0.005, 0.015), 3.0
    clean = simulate_acquisition(ph, te=te, b0=b0, snr=None, supersample=(1, 2, 3))
    signal, truth = supersampled_signal(ph, te, b0, factor=(1, 2, 3))
    rotated = signal * np.exp(1j * clean.phase_offset.astype(np.float64))[..., None]
    np.testing.assert_allclose(clean.magnitude, np.abs(signal), atol=1e-6)
    bright = clean.magnitude > 0.02
    assert np.abs(wrap_phase(clean.phase - np.angle(rotated)))[bright].max() < 1e-5
    np.testing.assert_allclose(clean.true_phase, truth + clean.phase_offset[..., None], atol=1e-4)
    noisy = simulate_acquisition(ph, te=te, b0=b0, snr=50, supersample=(1, 2, 3), seed=4)
    residual = noisy.magnitude * np.exp(1j * noisy.phase) - rotated
    assert abs(residual.real.std() / (1 / 50) - 1) < 0.02  # SD 1/snr per channel
    point = simulate_acquisition(ph, te=te, b0=b0, snr=None)  # default: true phase at centres
    np.testing.assert_allclose(point.true_phase[..., 1], ppm_to_rad(
        ph.field_total.astype(np.float64), b0, te[1]) + point.phase_offset, atol=1e-4)
    for bad in (0, 1.5, (2, 2), True, "2"):
        with pytest.raises(QSMInputError, match="supersampl"):
            simulate_acquisition(ph, supersample=bad)


#: 2 x 2 x 6 sub-voxels of 0.94 x 0.94 x 0.83 mm (the figures in the module docstring)
SUPERSAMPLE = (2, 2, 6)


@pytest.fixture(scope="module")
def small_phantom():
    return make_phantom((128, 128, 32), (1.875, 1.875, 5.0))


@pytest.mark.parametrize("case", list(PHANTOM_BARS))
def test_romeo_on_the_voxel_integrated_phantom(small_phantom, case):
    """The issue's bar, 99.9 %, in the surface mask at 3 T and 7 T and in the brain mask at 3 T,
    where voxel-centre sampling of the same phantom misses it."""
    ph = small_phantom
    b0, te = PHANTOM_BARS[case][:2]
    acq = simulate_acquisition(ph, te=(te,), b0=b0, snr=100, seed=0, supersample=SUPERSAMPLE)
    phase, mag, truth = acq.phase[..., 0], acq.magnitude[..., 0], acq.true_phase[..., 0]
    surface = masking.mask_surface(mag, ph.voxel_size)
    vs = ph.voxel_size
    got_surface = right_fraction(romeo(phase, mask=surface, voxel_size=vs, magnitude=mag),
                                 truth, surface)
    got_brain = right_fraction(romeo(phase, mask=ph.mask, voxel_size=vs, magnitude=mag),
                               truth, ph.mask)
    bound = recoverable_fraction(truth, ph.mask)
    p_phase, p_mag, p_truth, p_surface = phantom_data(ph, b0, te)
    point = right_fraction(romeo(p_phase, mask=p_surface, voxel_size=vs, magnitude=p_mag),
                           p_truth, p_surface)
    print(f"voxel-integrated phantom {case}: right {100 * got_surface:.3f} % of the surface mask "
          f"(point-sampled {100 * point:.3f} %), {100 * got_brain:.3f} % of the brain "
          f"(bound {100 * bound:.3f} %)")
    assert got_surface >= 0.999 > point
    if case == "3T":
        assert got_brain >= 0.999
    else:  # measured 99.10 % (bound 99.39 %): the brain mask's outer CSF layer still aliases
        assert got_brain >= 0.99


# -------------------------------------------------------------------------- head model


@pytest.fixture(scope="module")
def head(head_model):
    return head_model


# (B0, TE): the bar, 99.9 % of the brain mask
@pytest.mark.parametrize("b0,te", [(3.0, 0.020), (7.0, 0.025)], ids=["3T-TE20", "7T-TE25"])
def test_romeo_on_the_head_model(head, b0, te):
    from qsmkit.headmodel import simulate_gre

    gre = simulate_gre(head, te=(te,), b0=b0, snr=100, seed=0)
    phase, mag, truth = gre.phase[..., 0], gre.magnitude[..., 0], gre.true_phase[..., 0]
    np.testing.assert_allclose(truth, ppm_to_rad(head.field_total.astype(np.float64), b0, te)
                               + gre.phase_offset, atol=1e-4)
    u = romeo(phase, mask=head.mask, voxel_size=head.voxel_size, magnitude=mag)
    got = right_fraction(u, truth, head.mask)
    bound = recoverable_fraction(truth, head.mask)
    skimage = right_fraction(unwrapping.unwrap_quality(phase, mask=head.mask), truth, head.mask)
    print(f"head model {b0} T TE {1e3 * te:.0f} ms: right {100 * got:.4f} % (bound "
          f"{100 * bound:.4f} %, skimage {100 * skimage:.4f} %)")
    assert got >= 0.999
    assert got > skimage


# ------------------------------------------------------------------------- small cases


def test_congruent_zero_outside_and_nan_as_outside():
    rng = np.random.default_rng(3)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in (24, 20, 16)], indexing="ij")
    truth = 9 * x**2 - 6 * y * z + 4 * z + 0.1 * rng.standard_normal(x.shape)
    phase = wrap_phase(truth).astype(np.float32)
    mask = x**2 + y**2 + z**2 < 0.8
    phase[3, 10, 8] = np.nan  # inside the mask
    u = romeo(phase, mask=mask)
    inside = mask & np.isfinite(phase)
    assert u.dtype == np.float32
    assert np.all(u[~inside] == 0)
    cycles = (u[inside] - phase[inside]) / (2 * np.pi)
    assert np.abs(cycles - np.round(cycles)).max() < 1e-5
    assert right_fraction(u, truth, inside) == 1.0


def test_islands_are_aligned_to_the_main_region():
    """Two blobs without an edge between them: each grown from its own seed, the small one
    shifted by the 2 pi multiple that brings its mean nearest the main region's mean nearby;
    the island's edge voxels agree with their nearest main voxels, which is the truth for a
    phase that changes by less than pi across the gap (here 1.5 rad); matching the means
    instead (5 rad apart) would shift it by 2 pi."""
    x = np.arange(40)[:, None, None] * np.ones((1, 12, 12))
    truth = 0.5 * x  # 20 rad across, 0.5 rad per voxel
    mask = np.zeros(x.shape, bool)
    mask[2:28, 2:10, 2:10] = True
    mask[30:38, 3:9, 3:9] = True  # an island 3 voxels beyond the main block
    u, info = romeo(wrap_phase(truth), mask=mask, voxel_size=(1, 1, 1), return_info=True)
    assert info["regions"] == 2
    k = np.round((u - truth) / (2 * np.pi))[mask]
    assert np.all(k == k[0])  # one global multiple for both regions
    assert len(info["island_shifts"]) == 1


def test_magnitude_makes_noise_voxels_last():
    """Zero-magnitude voxels have quality 0 (worst bin) but keep their edges."""
    phase = np.zeros((6, 6, 6), np.float32)
    mag = np.ones_like(phase)
    mag[2, 2, 2] = 0
    codes = unwrapping.romeo_edge_quality(phase, magnitude=mag)
    assert codes.shape == (3, 6, 6, 6)
    assert codes[0, 2, 2, 2] == 255 and codes[0, 1, 2, 2] == 255  # edges of the dark voxel
    assert codes[0, 3, 3, 3] == 1  # a flat, bright edge is the best
    assert codes[0, 5, 3, 3] == 0  # no neighbour beyond the border


def test_auto_is_romeo_and_bad_input_raises(monkeypatch):
    from qsmkit import fsl

    monkeypatch.setattr(fsl, "USE_FSL", "never")  # the embedded choice, FSL installed or not
    assert unwrapping.UNWRAPPING.resolve("auto") == "romeo"
    assert {"romeo", "quality", "laplacian"} <= set(unwrapping.UNWRAPPING.names())
    with pytest.raises(QSMInputError, match="3-D"):
        romeo(np.zeros((4, 4)))
    with pytest.raises(QSMInputError, match="mask shape"):
        romeo(np.zeros((4, 4, 4)), mask=np.ones((4, 4, 5), bool))
    with pytest.raises(QSMInputError, match="magnitude shape"):
        romeo(np.zeros((4, 4, 4)), magnitude=np.ones((4, 5, 4)))
    with pytest.raises(QSMInputError, match="echo time"):
        romeo(np.zeros((4, 4, 4, 2)))
    assert np.all(romeo(np.ones((4, 4, 4)), mask=np.zeros((4, 4, 4), bool)) == 0)
