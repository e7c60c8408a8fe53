"""Embedded brain masking (``qsmkit.masking``) against the simulations' brain masks, and the GRE
simulation of the head model it is tested on (``qsmkit.headmodel.simulate_gre``).

- Built-in phantom, 3 T TE 20 ms: Dice 0.972 (``surface``, whose 2 mm margin from the skull
  trims the phantom's 2.5 mm extra-cerebral CSF layer) and 1.000 (``threshold``). The phantom's
  skull and scalp are one dark label (proton density 0.1, T2* 10 ms), so its mask is easy; what
  it checks is that no voxel of that noise-only shell enters the mask (the old 1 mm smoothing
  added 15 000 of them, whose random phase sent the demo's chi error to 566 %).
- QSM challenge 2.0 head model (1.28 mm): bright scalp, muscle and neck against a dark skull,
  where Otsu and morphology fail (Dice 0.73 at 3 T): ``surface`` Dice 0.955 at 3 T TE 20 ms and
  0.970 at 7 T TE 25 ms (the issue's bar 0.95). With nearest-voxel sampling of the magnitude in
  the surface update (before trilinear) they were 0.970, 0.956 and 0.968 (seeds 1-4 of the
  noise: 0.9559-0.9561 and 0.9677-0.9680 then, 0.9550-0.9551 and 0.9704-0.9706 with trilinear
  sampling, 0.9551 and 0.9703-0.9704 (seeds 1-2) since the surface stops once converged,
  0.9554-0.9555 and 0.9703-0.9705 (seeds 1-4) since the mask is the mesh's interior).
  Trilinear sampling moves the surface 0.18 mm outward (median), which at 3 T adds a layer of
  the outer CSF and cortex that this head model's true mask leaves out (4130 voxels, 1184 of
  them in the true mask). A larger margin from the skull wins that back at 3 T (2.3 mm: 0.9593)
  but loses it on the phantom, whose true mask includes its CSF layer (0.9660), and at 7 T.
"""

import numpy as np
import pytest

from qsmkit import masking
from qsmkit.errors import QSMInputError
from qsmkit.simulate import LABEL_IDS, simulate_acquisition


def dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


@pytest.fixture(scope="module")
def phantom(default_phantom):
    ph = default_phantom
    acq = simulate_acquisition(ph, te=(0.020,), b0=3.0, snr=100, phase_offset=False, seed=0)
    return ph, acq


def test_masks_of_the_phantom(phantom):
    ph, acq = phantom
    skull = ph.labels == LABEL_IDS["skull_scalp"]
    for method, bar in (("surface", 0.965), ("threshold", 0.99)):
        m = masking.MASKING.get(method).func(acq.magnitude, ph.voxel_size)
        d = dice(m, ph.mask)
        print(f"phantom {method}: Dice {d:.4f}, skull voxels {int((m & skull).sum())}")
        assert d >= bar
        assert not (m & skull).any()
        if method == "surface":  # stopping once converged: the surface of BET's 1000 updates
            centre, radii, dirs = masking.brain_surface(acq.magnitude, ph.voxel_size, converge=False)
            full = masking.brain_surface(acq.magnitude, ph.voxel_size)[1]
            print("surface radius, converged - 1000 updates: max", np.abs(full - radii).max())
            assert np.abs(full - radii).max() < 0.01  # mm, measured 0.003


@pytest.fixture(scope="module")
def head(head_model):
    return head_model


@pytest.mark.parametrize("b0,te", [(3.0, 0.020), (7.0, 0.025)], ids=["3T-TE20", "7T-TE25"])
def test_surface_mask_of_the_head_model(head, b0, te):
    from qsmkit.headmodel import simulate_gre

    gre = simulate_gre(head, te=(te,), b0=b0, snr=100, seed=1)
    mag = gre.magnitude[..., 0]
    # not a trivial mask at 3 T: the scalp and neck (label 15) are about as bright as white
    # matter (at 7 T, TE 25 ms their short T2* and steep fields darken them)
    brain_median = np.median(mag[head.mask])
    scalp_median = np.median(mag[head.labels == 15])
    m = masking.mask_surface(gre.magnitude, head.voxel_size)
    plain = masking.mask_threshold(gre.magnitude, head.voxel_size)
    print(f"head model {b0} T: surface Dice {dice(m, head.mask):.4f}, threshold "
          f"{dice(plain, head.mask):.4f}; scalp / brain magnitude {scalp_median / brain_median:.2f}")
    assert dice(m, head.mask) >= 0.95
    if b0 == 3.0:
        assert scalp_median > 0.6 * brain_median
        assert dice(plain, head.mask) < 0.9  # what thresholding does with a bright scalp


def test_gre_simulation_of_the_head_model(head):
    from qsmkit.headmodel import GRE_TISSUE_3T, simulate_gre
    from qsmkit.units import ppm_to_rad, wrap_phase

    te = (0.010, 0.030)
    plain = simulate_gre(head, te=te, b0=3.0, snr=None, dephasing=False)
    for e, t in enumerate(te):
        for label in (8, 10, 15):  # white matter, CSF, scalp: M0 exp(-TE / T2*)
            pd, t2s = GRE_TISSUE_3T[label]
            got = plain.magnitude[..., e][head.labels == label]
            np.testing.assert_allclose(got, pd * np.exp(-t / (t2s * 1e-3)), rtol=1e-5)
        np.testing.assert_allclose(plain.true_phase[..., e], ppm_to_rad(
            head.field_total.astype(np.float64), 3.0, t) + plain.phase_offset, atol=1e-4)
        err = wrap_phase(plain.phase[..., e] - plain.true_phase[..., e].astype(np.float32))
        assert np.abs(err[plain.magnitude[..., e] > 0]).max() < 1e-3
    assert np.all(plain.magnitude[head.labels == 14] == 0)  # air
    # 7 T: R2* doubles; intravoxel dephasing darkens voxels whose phase changes fast
    seven = simulate_gre(head, te=(0.025,), b0=7.0, snr=None, dephasing=False)
    dark = simulate_gre(head, te=(0.025,), b0=7.0, snr=None)
    pd, t2s = GRE_TISSUE_3T[8]
    np.testing.assert_allclose(seven.magnitude[head.labels == 8], pd * np.exp(-0.025 * 2e3 / t2s),
                               rtol=1e-5)
    ratio = dark.magnitude[..., 0] / np.maximum(seven.magnitude[..., 0], 1e-12)
    steep = np.zeros(head.mask.shape, bool)
    for g in np.gradient(seven.true_phase[..., 0]):
        steep |= np.abs(g) > np.pi
    assert np.all(ratio <= 1 + 1e-6)
    assert np.median(ratio[head.mask & steep]) < 0.5 < np.median(ratio[head.mask & ~steep])


def test_options_and_bad_input(phantom, monkeypatch):
    from qsmkit import fsl

    monkeypatch.setattr(fsl, "USE_FSL", "never")  # the embedded choice, FSL installed or not
    assert masking.MASKING.resolve("auto") == "surface"
    ph, acq = phantom
    small = acq.magnitude[64:192, 64:192, 16:48, 0]  # a cut of the brain: no skull in view
    base = masking.mask_threshold(small, ph.voxel_size)
    eroded = masking.mask_threshold(small, ph.voxel_size, erode=3.0)
    assert eroded.sum() < base.sum() and not (eroded & ~base).any()
    echoes = np.stack([small, 0.5 * small], axis=3)  # 4-D: root-mean-square of the echoes
    np.testing.assert_array_equal(masking.mask_threshold(echoes, ph.voxel_size),
                                  masking.mask_threshold(np.sqrt(0.625) * small, ph.voxel_size))
    for func in (masking.mask_threshold, masking.mask_surface):
        with pytest.raises(QSMInputError, match="empty"):
            func(np.zeros((20, 20, 20), np.float32), (1, 1, 1))
        with pytest.raises(QSMInputError, match="3-D or 4-D"):
            func(np.ones((20, 20), np.float32), (1, 1))
    with pytest.raises(QSMInputError, match="contrast"):
        masking.mask_surface(np.ones((20, 20, 20), np.float32), (1, 1, 1))


@pytest.mark.shared_data
def test_surface_mask_of_the_real_head():
    """The real Philips head (T1-weighted 3-D GRE, 2 echoes, 3 mm; the data set's README: an
    adult brain is about 1.1-1.6 l): one or both echoes give a brain-sized mask. Without
    ``brain_core`` the surface takes in the neck and skull base (2.0-2.4 l). The constants of
    ``brain_core`` were chosen on this head; the simulated heads above are held out (their Dice
    is unchanged by it)."""
    import nibabel as nib

    from conftest import shared

    folder = shared("philips-invivo-gre", "nifti")
    mag = np.stack([nib.load(str(folder / f"fm_e{e}.nii.gz")).get_fdata(dtype=np.float32)
                    for e in (1, 2)], axis=-1)
    vox = nib.load(str(folder / "fm_e1.nii.gz")).header.get_zooms()[:3]

    def litres(m):
        return m.sum() * np.prod(vox) / 1e6

    volumes = {name: litres(masking.mask_surface(m, vox))
               for name, m in (("both", mag), ("echo 1", mag[..., 0]), ("echo 2", mag[..., 1]))}
    print("real head mask (l):", {k: round(v, 3) for k, v in volumes.items()})
    for name, v in volumes.items():
        assert 1.0 <= v <= 1.7, name  # measured 1.486, 1.453, 1.483
    assert litres(masking.mask_surface(mag, vox, core_mm=0)) > 1.9  # measured 2.35


def test_ball_morphology_equals_scipy():
    """``open_ball`` and ``dilate_ball`` (distance transforms, used by ``brain_core``) give the
    voxels of scipy's ``binary_opening`` / ``binary_dilation`` with ``ellipsoid_structure``,
    on isotropic and anisotropic grids, with the mask touching the volume's border and with an
    opening that removes everything."""
    from scipy import ndimage

    rng = np.random.default_rng(0)
    for vox, r in (((1, 1, 1), 3.0), ((0.9375, 0.9375, 2.5), 7.5), ((1.28,) * 3, 4.5),
                   ((0.7, 1.1, 1.9), 2.0)):
        m = ndimage.gaussian_filter(rng.random((40, 36, 30)), 2) > 0.5
        m[0, 5:20, 5:20] = True
        st = masking.ellipsoid_structure(r, vox)
        np.testing.assert_array_equal(masking.open_ball(m, vox, r),
                                      ndimage.binary_opening(m, structure=st))
        np.testing.assert_array_equal(masking.dilate_ball(m, vox, r),
                                      ndimage.binary_dilation(m, structure=st))
    assert not masking.dilate_ball(np.zeros((5, 5, 5), bool), (1, 1, 1), 2).any()


def test_surface_inside_is_the_mesh_interior():
    """``surface_inside`` rasterises the triangle mesh of the surface: checked against an
    independent point-in-mesh test (a point is inside the star-shaped mesh when, written as
    ``a P0 + b P1 + c P2`` in the vertices of the face whose cone holds it, ``a + b + c <= 1``),
    on a coarse icosphere (162 vertices) with random radii and an anisotropic grid. The (theta,
    phi) table (1 degree) may misplace only voxels within 0.2 mm of the mesh; interpolating the
    vertex radii instead bulges past the facets (up to 1 mm here)."""
    rng = np.random.default_rng(3)
    dirs, faces = masking.icosphere(2)
    radii = 12 + 3 * rng.random(len(dirs))
    vox = (0.9, 0.9, 1.4)
    shape = (36, 36, 24)
    centre = np.array([17.5 * 0.9, 18.2 * 0.9, 11.6 * 1.4])
    got = masking.surface_inside(shape, vox, centre, radii, dirs)
    p = np.stack(np.meshgrid(*(np.arange(n) * v for n, v in zip(shape, vox)), indexing="ij"),
                 -1).reshape(-1, 3) - centre
    corners = radii[faces][..., None] * dirs[faces]  # (faces, 3 vertices, xyz)
    coef = np.einsum("fij,pj->pfi", np.linalg.inv(np.transpose(corners, (0, 2, 1))), p)
    in_cone = (coef >= -1e-9).all(axis=2)
    face = np.argmax(in_cone, axis=1)
    assert in_cone.any(axis=1).all()
    total = coef[np.arange(len(p)), face].sum(axis=1)  # 1 on the mesh, < 1 inside
    truth = (total <= 1).reshape(shape)
    rho = np.linalg.norm(p, axis=1)
    off = np.abs(rho - rho / np.maximum(total, 1e-9)).reshape(shape)  # radial distance to the mesh
    wrong = got != truth
    print("surface_inside: voxels wrong", int(wrong.sum()), "of", int(truth.sum()),
          "max distance to the mesh (mm)", float(off[wrong].max()) if wrong.any() else 0.0)
    assert wrong.sum() < 0.01 * truth.sum()
    assert not wrong.any() or off[wrong].max() < 0.2
