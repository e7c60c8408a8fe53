"""Background removal on the QSM challenge 2.0 head model (Marques et al., MRM 2021) at 1.28 mm:
real air, bone and blood sources around the brain. Truth definitions: ``qsmkit.headmodel``.

Measured (2 cores, ``make bench`` prints the same table), NRMSE of the local field in the brain
mask / in the mask eroded by 3 voxels, and the residual background (the method applied to the
true background alone, relative to the local field):

    PDF      42.7 / 27.4 %   residual 1.5 %   (unweighted, 23 CG iterations)
    V-SHARP  39.7 / 34.5 %   residual 3.6 %   (in its own eroded mask, 90 % of the brain)
    RESHARP  57.6 / 46.5 %   residual 1.9 %

The issue asked for PDF <= 30 / 18 %. That is below what a background projection can reach with
this (physically motivated) truth: PDF applied to the *true local field alone*, with no
background at all, already changes it by 44 / 28 %, because part of the field that the brain's
own sources produce inside the brain is harmonic there and indistinguishable from an external
field. ``test_error_is_the_brains_own_harmonic_field`` pins this down.
"""

import numpy as np
import pytest
from scipy import ndimage

from qsmkit import background, metrics
from qsmkit.headmodel import load_head_model


@pytest.fixture(scope="module")
def head():
    from conftest import shared

    hm = load_head_model(shared("head-model"), block=2)
    eroded = ndimage.binary_erosion(hm.mask, iterations=3)
    return hm, eroded


def test_head_model_truth(head):
    hm, _ = head
    assert hm.chi.shape == (128, 160, 160) and hm.voxel_size == (1.28, 1.28, 1.28)
    # chi relative to air: zero outside the head, the published chiref - chiref(air) inside
    air = hm.chiref[14]
    assert hm.chi[0, 0, 0] == 0
    for label in (2, 8, 13):  # globus pallidus, white matter, bone
        core = ndimage.binary_erosion(hm.labels == label, iterations=1)
        exact = np.abs(hm.chi[core] - (hm.chiref[label] - air)) < 1e-5
        assert exact.mean() > 0.98  # the rest are 2x2x2 blocks that straddle a boundary
    # the background dominates the brain's own field, as in vivo
    rms = lambda v: np.sqrt(np.mean((v - v.mean()) ** 2))  # noqa: E731
    assert rms(hm.field_background[hm.mask]) > 10 * rms(hm.field_local[hm.mask])


# (full-mask NRMSE bar, eroded-mask NRMSE bar, residual-background bar), % — measured values in
# the module docstring.
BARS = {"pdf": (45.0, 29.0, 4.0), "vsharp": (42.0, 37.0, 6.0), "resharp": (61.0, 50.0, 4.0)}


@pytest.mark.parametrize("method", list(BARS))
def test_background_methods_on_head_model(head, method):
    hm, eroded = head
    func = background.BACKGROUND.get(method).func
    local, valid, info = func(hm.field_total, hm.mask, hm.voxel_size, hm.b0_dir)
    full = metrics.nrmse(local, hm.field_local, valid)
    inner = metrics.nrmse(local, hm.field_local, valid & eroded)
    left, _, _ = func(hm.field_background, hm.mask, hm.voxel_size, hm.b0_dir)
    residual = 100 * np.linalg.norm(left[valid]) / np.linalg.norm(hm.field_local[valid])
    print(f"{method}: NRMSE {full:.1f} / {inner:.1f} %, residual background {residual:.1f} %, {info}")
    bar_full, bar_inner, bar_residual = BARS[method]
    assert full <= bar_full and inner <= bar_inner, f"{method}: {full:.1f} / {inner:.1f} %"
    assert residual <= bar_residual, f"{method}: residual background {residual:.1f} %"
    if method != "vsharp":
        assert valid.sum() == hm.mask.sum()  # PDF and RESHARP keep the whole brain, edge included


def test_error_is_the_brains_own_harmonic_field(head):
    """PDF's error on the total field is what it does to the true local field alone: the
    background is removed, and the remaining error is the harmonic part of the brain's own field."""
    hm, eroded = head
    from_total, _, _ = background.pdf(hm.field_total, hm.mask, hm.voxel_size, hm.b0_dir)
    from_local, _, _ = background.pdf(hm.field_local, hm.mask, hm.voxel_size, hm.b0_dir)
    e_total = metrics.nrmse(from_total, hm.field_local, hm.mask)
    e_local = metrics.nrmse(from_local, hm.field_local, hm.mask)
    assert e_local > 35.0  # no background at all, and PDF still removes this much
    assert abs(e_total - e_local) < 5.0
