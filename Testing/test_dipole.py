"""The dipole kernel and forward model against closed-form fields.

Uniform sphere (radius a, Lorentz-corrected): 0 inside; chi/3 (a/r)^3 (3 cos^2 t - 1) outside.
Uniform infinite cylinder (angle t to B0): chi/6 (3 cos^2 t - 1) inside;
chi/2 sin^2 t (a/rho)^2 cos(2 phi) outside, phi measured in the cross-section from the
projection of B0 (Marques & Bowtell, Concepts Magn Reson B 2005).

A hard-edged object is not band-limited, so sampling it on a grid aliases and the
error near its edge says more about the rasterisation than the kernel. We therefore use
objects with a smooth radial edge, chi(s) = chi0 erfc((s - a) / (sqrt 2 w)) / 2, and the
closed forms obtained by superposing uniform spheres (cylinders), which hold everywhere:
  sphere:   f(r)   = (3 cos^2 t - 1) [ r^-3 int_0^r chi(s) s^2 ds - chi(r) / 3 ]
  cylinder: f(rho) = sin^2 t cos 2phi [ rho^-2 int_0^rho chi(s) s ds - chi(rho) / 2 ]
                     + chi(rho) (3 cos^2 t - 1) / 6
For a uniform object these reduce to the formulas above. The field's mean is not
determined by the kernel (D(0) = 0); it is removed before comparing. Errors are
relative to the largest field magnitude.
"""

import numpy as np
import pytest
from scipy.special import erfc

from qsmkit import dipole

CHI = 0.5


def profile(s, a, w):
    return CHI * 0.5 * erfc((s - a) / (w * np.sqrt(2)))


def cumulative(a, w, power, rmax=200.0):
    """s and int_0^s chi(u) u^power du on a fine grid (trapezoid rule)."""
    s = np.linspace(0, rmax, 400001)
    v = profile(s, a, w) * s**power
    return s, np.concatenate([[0], np.cumsum((v[1:] + v[:-1]) / 2 * np.diff(s))])


def centred_grid(shape, voxel):
    axes = [(np.arange(n) - (n - 1) / 2) * v for n, v in zip(shape, voxel)]
    return np.stack(np.meshgrid(*axes, indexing="ij"))


def b_at(angle_deg):
    t = np.radians(angle_deg)
    return np.array([np.sin(t), 0.0, np.cos(t)])


def relative_error(computed, analytic, region, peak):
    diff = computed - analytic
    diff = diff - diff[region].mean()
    return np.abs(diff[region]).max() / peak


@pytest.mark.parametrize(
    "voxel, angle",
    [((1.0, 1.0, 1.0), 0.0), ((1.0, 1.0, 1.0), 30.0), ((0.9, 0.9, 2.5), 0.0),
     ((0.9, 0.9, 2.5), 30.0), ((0.9, 0.9, 2.5), 90.0)],
)
def test_sphere_matches_closed_form(voxel, angle):
    a, w = 16.0, max(voxel)
    shape = tuple(int(round(128 / v)) for v in voxel)
    pos = centred_grid(shape, voxel)
    r = np.sqrt((pos**2).sum(0))
    chi = profile(r, a, w).astype(np.float32)
    b = b_at(angle)
    field = dipole.forward_field(chi, voxel, b, pad=[n // 2 for n in shape])
    s, integral = cumulative(a, w, 2)
    rr = np.maximum(r, 1e-6)
    cos_t = np.tensordot(b, pos, axes=(0, 0)) / rr
    analytic = (3 * cos_t**2 - 1) * (np.interp(r, s, integral) / rr**3 - profile(r, a, w) / 3)
    region = (r > 2) & (r < 45)  # the whole sphere, its edge and the near field
    assert relative_error(field, analytic, region, 2 * CHI / 3) < 0.005
    # inside, well away from the edge, the field of a uniform sphere vanishes
    inside = r < a - 3 * w
    assert np.abs(field[inside]).max() < 0.005 * 2 * CHI / 3


@pytest.mark.parametrize(
    "voxel, axis, angle",
    [((1.0, 1.0, 1.0), 2, 0.0), ((1.0, 1.0, 1.0), 2, 30.0), ((1.0, 1.0, 1.0), 2, 54.7356),
     ((1.0, 1.0, 1.0), 2, 90.0), ((0.9, 0.9, 2.5), 2, 30.0), ((0.9, 0.9, 2.5), 0, 30.0),
     ((0.9, 0.9, 2.5), 1, 90.0)],
)
def test_cylinder_matches_closed_form(voxel, axis, angle):
    """Infinite cylinder along a voxel axis (periodic along it), B0 at ``angle`` to the third
    axis; includes 0.9 x 0.9 x 2.5 mm voxels with a 30 deg oblique B0."""
    a = 10.0
    w = max(v for i, v in enumerate(voxel) if i != axis)
    shape = [int(round(128 / v)) for v in voxel]
    shape[axis] = 4
    pos = centred_grid(shape, voxel)
    u = np.eye(3)[axis]
    perp = pos - np.tensordot(u, pos, axes=(0, 0)) * u[:, None, None, None]
    rho = np.sqrt((perp**2).sum(0))
    chi = profile(rho, a, w).astype(np.float32)
    b = b_at(angle)
    pad = [n // 2 if i != axis else 0 for i, n in enumerate(shape)]
    field = dipole.forward_field(chi, voxel, b, pad=pad)
    cos_t = float(b @ u)
    sin2 = 1 - cos_t**2
    b_perp = b - cos_t * u
    rr = np.maximum(rho, 1e-6)
    if sin2 > 1e-12:
        cos_phi = np.tensordot(b_perp / np.linalg.norm(b_perp), perp, axes=(0, 0)) / rr
    else:
        cos_phi = np.zeros_like(rho)
    s, integral = cumulative(a, w, 1)
    analytic = (sin2 * (2 * cos_phi**2 - 1) * (np.interp(rho, s, integral) / rr**2
                                                 - profile(rho, a, w) / 2)
                + profile(rho, a, w) * (3 * cos_t**2 - 1) / 6)
    peak = max(CHI / 2 * sin2, abs(CHI / 6 * (3 * cos_t**2 - 1)))
    region = (rho > 2) & (rho < 45)
    assert relative_error(field, analytic, region, peak) < 0.005
    inside = rho < a - 3 * w
    np.testing.assert_allclose(field[inside] - field[region].mean() + analytic[region].mean(),
                               CHI / 6 * (3 * cos_t**2 - 1), atol=0.005 * peak)


def test_kernel_values_and_symmetry():
    d = dipole.dipole_kernel((16, 16, 16), (1, 1, 1), (0, 0, 1), real=False)
    assert d[0, 0, 0] == 0
    assert np.isclose(d[0, 0, 1], 1 / 3 - 1)  # k along B0: -2/3
    assert np.isclose(d[1, 0, 0], 1 / 3)  # k perpendicular to B0
    half = dipole.dipole_kernel((16, 16, 16), (1, 1, 1), (0, 0, 1), real=True)
    np.testing.assert_allclose(half, d[:, :, :9], atol=1e-7)


def test_kernel_respects_voxel_size():
    """k is in cycles/mm: D on a 1x1x2 mm grid equals D computed from physical k by hand
    (odd sizes: no Nyquist sample, see the symmetry test for even sizes)."""
    shape, vox = (9, 7, 9), (1.0, 1.0, 2.0)
    b = np.array([0.3, 0.0, 0.9])
    b /= np.linalg.norm(b)
    d = dipole.dipole_kernel(shape, vox, b, real=False, dtype=np.float64)
    kx, ky, kz = np.meshgrid(*[np.fft.fftfreq(n, v) for n, v in zip(shape, vox)], indexing="ij")
    k2 = kx**2 + ky**2 + kz**2
    with np.errstate(invalid="ignore", divide="ignore"):
        ref = 1 / 3 - (kx * b[0] + ky * b[1] + kz * b[2]) ** 2 / k2
    ref[0, 0, 0] = 0
    np.testing.assert_allclose(d, ref, atol=1e-12)


def test_forward_field_float32_matches_float64():
    rng = np.random.default_rng(0)
    chi = rng.normal(size=(24, 20, 16))
    f64 = dipole.forward_field(chi, (1, 1, 2), (0.2, 0.1, 0.97), pad=4)
    f32 = dipole.forward_field(chi.astype(np.float32), (1, 1, 2), (0.2, 0.1, 0.97), pad=4)
    assert f32.dtype == np.float32 and f64.dtype == np.float64
    assert np.abs(f32 - f64).max() < 1e-5 * np.abs(f64).max()


def test_kernel_even_in_k_for_even_sizes():
    """D(k) = D(-k) on every sample, Nyquist planes included, so a real chi gives a real field
    for an oblique B0 (the full FFT of the forward model has no imaginary part)."""
    shape = (8, 6, 10)
    b = np.array([0.5, 0.3, 0.81])
    d = dipole.dipole_kernel(shape, (1.0, 1.2, 2.0), b, real=False, dtype=np.float64)
    neg = np.roll(np.flip(d, axis=(0, 1, 2)), shift=1, axis=(0, 1, 2))  # index -k mod N
    np.testing.assert_allclose(d, neg, atol=1e-12)
    chi = np.random.default_rng(1).normal(size=shape)
    assert np.abs(np.fft.ifftn(np.fft.fftn(chi) * d).imag).max() < 1e-12
