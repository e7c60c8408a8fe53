"""Background removal on the QSM challenge 2.0 head model (Marques et al., MRM 2021) at 1.28 mm:
real air, bone and blood sources around the brain. Truth definitions: ``qsmkit.headmodel``.

Measured (2 cores, ``make bench`` prints the same table), NRMSE of the local field in the brain
mask / in the mask eroded by 3 voxels, and the residual background (the method applied to the
true background alone, relative to the local field):

    PDF      42.7 / 27.4 %   residual 1.5 %   (unweighted, 23 CG iterations)
    V-SHARP  39.7 / 34.5 %   residual 3.6 %   (in its own eroded mask, 90 % of the brain)
    RESHARP  57.6 / 46.5 %   residual 1.9 %

    TFI      17.0 / 8.5 %    residual 1.0 %   (PDF, then 200 ADMM iterations; noisy: 20 / 13 %)

The issue asked for PDF <= 30 / 18 %. That is below what a background projection can reach with
this (physically motivated) truth: PDF applied to the *true local field alone*, with no
background at all, already changes it by 44 / 28 %, because part of the field that the brain's
own sources produce inside the brain is harmonic there and indistinguishable from an external
field. ``test_error_is_the_brains_own_harmonic_field`` pins this down. ``tfi`` (PDF followed by
total field inversion with a TV prior on the brain's own sources, ``qsmkit.tfi``) gets past
that floor and meets the bar; its parameters were chosen on this model, and it was then checked
on the built-in phantom and the analytic scenes of ``test_background.py``, which were not.
"""

import numpy as np
import pytest
from scipy import ndimage

from qsmkit import background, metrics


@pytest.fixture(scope="module")
def head(head_model):
    hm = head_model
    eroded = ndimage.binary_erosion(hm.mask, iterations=3)
    return hm, eroded


@pytest.fixture(scope="module")
def pdf_of_total(head):
    """PDF (unweighted, defaults) of the noise-free total field, computed once for the three
    tests that compare against it."""
    hm, _ = head
    local, valid, info = background.pdf(hm.field_total, hm.mask, hm.voxel_size, hm.b0_dir)
    local.setflags(write=False)
    valid.setflags(write=False)
    return local, valid, info


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
def test_background_methods_on_head_model(head, pdf_of_total, method):
    hm, eroded = head
    func = background.BACKGROUND.get(method).func
    local, valid, info = pdf_of_total if method == "pdf" else func(hm.field_total, hm.mask,
                                                                   hm.voxel_size, hm.b0_dir)
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


def test_error_is_the_brains_own_harmonic_field(head, pdf_of_total):
    """PDF's error on the total field is what it does to the true local field alone: the
    background is removed, and the remaining error is the harmonic part of the brain's own field."""
    hm, eroded = head
    from_total = pdf_of_total[0]
    from_local, _, _ = background.pdf(hm.field_local, hm.mask, hm.voxel_size, hm.b0_dir)
    e_total = metrics.nrmse(from_total, hm.field_local, hm.mask)
    e_local = metrics.nrmse(from_local, hm.field_local, hm.mask)
    assert e_local > 35.0  # no background at all, and PDF still removes this much
    assert abs(e_total - e_local) < 5.0


@pytest.fixture(scope="module")
def gre(head):
    """A single-echo acquisition of the head model (3 T, TE 20 ms, SNR 100): the magnitude for
    TFI's edge mask, and the field noise of that acquisition (phase noise in ppm)."""
    from qsmkit import units
    from qsmkit.headmodel import simulate_gre

    hm, _ = head
    g = simulate_gre(hm, te=(0.020,), b0=3.0, snr=100)
    dphi = np.angle(np.exp(1j * (g.phase[..., 0].astype(np.float64) - g.true_phase[..., 0])))
    noise = (dphi / units.ppm_to_rad(1.0, 3.0, 0.020)).astype(np.float32)
    return g.magnitude[..., 0], noise


@pytest.mark.parametrize("noisy, bars", [(False, (22.0, 12.0)), (True, (26.0, 17.0))])
def test_tfi_beats_the_harmonic_floor(head, gre, pdf_of_total, noisy, bars):
    """TFI meets the issue's 30 % / 18 % on the head model, noise-free (measured 17.0 / 8.5 %)
    and with the SNR-100 phase noise of a real acquisition (measured about 20 / 13 %); the
    asserted bars are tighter than the issue's. PDF on the same input: 43 / 27 % and 45 / 31 %."""
    from qsmkit import tfi

    hm, eroded = head
    mag, noise = gre
    field = hm.field_total + noise if noisy else hm.field_total
    local, valid, info = tfi.tfi(field, hm.mask, hm.voxel_size, hm.b0_dir, magnitude=mag)
    full = metrics.nrmse(local, hm.field_local, hm.mask)
    inner = metrics.nrmse(local, hm.field_local, hm.mask & eroded)
    print(f"tfi ({'noisy' if noisy else 'noise-free'}): NRMSE {full:.1f} / {inner:.1f} %, "
          f"{info['seconds']:.1f} s")
    assert valid.sum() == hm.mask.sum() and info["fallback"] is None
    assert full <= 30.0 and inner <= 18.0  # the bars
    assert full <= bars[0] and inner <= bars[1], (full, inner)
    if not noisy:  # PDF of the same (noise-free) field
        assert metrics.nrmse(pdf_of_total[0], hm.field_local, hm.mask) > full + 15


def test_tfi_fast_close_to_tfi_at_pdf_cost(head, gre):
    """tfi-fast (30 over-relaxed iterations on the brain's bounding box) on the noisy head
    model: measured 22.2 / 12.8 %, as tfi's about 20 / 13 % (noise-free 19.9 / 9.2 % against
    tfi's 16.9 / 8.5 %; PDF 45 / 31 % noisy). Its ADMM does 1.5x the FFT work of the PDF it
    starts from (voxel-FFTs: PDF 2 per iteration on its grid, ADMM 4 per iteration, none in the
    first, on the box's grid; measured 1.48, 2.2x were the start stopped by PDF's own rule,
    after 24); tfi's 200 iterations on the whole grid do 17x."""
    from qsmkit import tfi

    hm, eroded = head
    mag, noise = gre
    local, valid, info = tfi.tfi_fast(hm.field_total + noise, hm.mask, hm.voxel_size, hm.b0_dir,
                                      magnitude=mag)
    full = metrics.nrmse(local, hm.field_local, hm.mask)
    inner = metrics.nrmse(local, hm.field_local, hm.mask & eroded)
    pdf_work = 2 * info["pdf"]["iterations"] * np.prod(info["pdf"]["padded_shape"])
    admm_work = info["ffts"] * np.prod(info["padded_shape"])
    print(f"tfi-fast (noisy): NRMSE {full:.1f} / {inner:.1f} %, {info['seconds']:.1f} s, "
          f"PDF start {info['pdf']['iterations']} iterations, ADMM / PDF FFT work {admm_work / pdf_work:.2f}")
    assert valid.sum() == hm.mask.sum()
    assert full <= 25.0 and inner <= 15.0, (full, inner)
    assert admm_work <= 2.0 * pdf_work


def test_tfi_removes_the_background(head, gre):
    """Given the true background alone, TFI leaves 1.0 % of the local field's norm (PDF 1.5 %):
    the prior moves the brain's harmonic part back without letting background in."""
    from qsmkit import tfi

    hm, _ = head
    mag, _ = gre
    left, _, _ = tfi.tfi(hm.field_background, hm.mask, hm.voxel_size, hm.b0_dir, magnitude=mag)
    residual = 100 * np.linalg.norm(left[hm.mask]) / np.linalg.norm(hm.field_local[hm.mask])
    print(f"tfi residual background {residual:.2f} %")
    assert residual < 2.0
