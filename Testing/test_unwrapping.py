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
  (``surface``, 2 mm from the skull: measured 99.995 %). Elsewhere the bars are the measured
  values (3 T: 99.33 % of the brain mask; 7 T: 98.15 % of the surface mask, 95.76 % of the brain
  mask, bound 98.27 %, where the vein and the rim alias), every wrong voxel lies in that outer
  layer at 3 T, and ROMEO beats scikit-image's quality-guided unwrapper (the former default).
"""

import numpy as np
import pytest
from scipy import ndimage, sparse
from scipy.sparse.csgraph import connected_components

from qsmkit import masking, unwrapping
from qsmkit.errors import QSMInputError
from qsmkit.simulate import make_phantom, simulate_acquisition
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
def phantom():
    return make_phantom()


def phantom_data(ph, b0, te):
    acq = simulate_acquisition(ph, te=(te,), b0=b0, snr=100, phase_offset=True, seed=0)
    truth = ppm_to_rad(ph.field_total.astype(np.float64), b0, te) + acq.phase_offset
    mask = masking.mask_surface(acq.magnitude, ph.voxel_size)
    return acq.phase[..., 0], acq.magnitude[..., 0], truth, mask


# (B0, TE, in the surface mask, in the brain mask): bars at the measured values (module docstring)
PHANTOM_BARS = {"3T": (3.0, 0.020, 0.999, 0.990), "7T": (7.0, 0.025, 0.980, 0.955)}


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


# -------------------------------------------------------------------------- head model


@pytest.fixture(scope="module")
def head():
    from conftest import shared
    from qsmkit.headmodel import load_head_model

    return load_head_model(shared("head-model"), block=2)


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
