"""Brain masks from the magnitude image.

``surface`` (the default): a deformable-surface brain extraction after BET (Smith, "Fast robust
automated brain extraction", Hum Brain Mapp 17:143, 2002), restricted to radial motion (the
surface stays star-shaped around its centre, so it cannot fold and converts to a mask by a
table lookup). A tessellated sphere (2562 vertices) starts inside the brain at the intensity
centre of gravity with half the radius of the head's equivalent sphere and moves, for up to 1000
iterations (fewer once it has converged), by BET's three terms (section 2.4 of the paper):

- ``u1 = 0.5 s_t``: the tangential part of ``s``, the vector from the vertex to the mean of its
  neighbours (keeps vertices evenly spaced);
- ``u2 = f2 s_n``, ``f2 = (1 + tanh(F (1/r - E))) / 2`` with the local curvature
  ``1/r = 2 |s_n| / l^2`` (``l`` the mean edge length; ``E``, ``F`` from curvature radii 3.33
  and 10 mm): smoothing that grows with the curvature, so the surface cannot squeeze through a
  narrow gap such as the foramen magnum into the neck;
- ``u3 = 0.05 f3 l n``, ``f3 = 2 (I_min - t_l) / (I_max - t2)``, ``t_l = (I_max - t2) b_t + t2``:
  outward while the intensity just inside (``I_min`` the minimum over 20 mm inward, ``I_max``
  the maximum over 10 mm, both clamped by the robust range ``t2``, ``t98`` and the brain median
  ``t_m``) is above the local threshold, inward where the surface sits on dark bone or air;
  ``b_t`` is BET's fractional intensity threshold (0.5).

Of each update only the radial component is applied. The surface separates brain from scalp
across the dark skull and stops at the skull base, where a threshold and morphology join the
brainstem to the neck. Inside it, a voxel within ``shell_mm`` (5 mm) of the surface is kept
where the magnitude is above Otsu's threshold (dark bone and partial volume at the edge go),
deeper voxels are all kept (dark iron-rich nuclei and vessels stay); a 2 mm opening, the largest
component and hole filling follow. Last, the mask is pulled in by ``margin_mm`` (2 mm) from
the skull: the voxels next to bone have the least reliable phase (partial volume, intravoxel
dephasing, the steepest background fields) and a QSM brain mask ends at the brain's surface,
not the inner surface of the skull (the challenge 2.0 head model's mask excludes the outer
CSF). ``erode`` removes more.

``threshold``: Otsu threshold of the smoothed magnitude, a morphological opening
to cut thin bridges (scalp, skull), the largest connected component and hole
filling, then an optional erosion in millimetres. Enough where the skull and scalp are dark
or stripped; it cannot separate the brain from bright scalp or neck.
FSL BET joins this registry when FSL is present (``qsmkit.fsl``).
"""

from __future__ import annotations

import functools

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu

from . import backend
from .errors import QSMInputError
from .registry import Registry

MASKING = Registry("masking", default="surface")


def ellipsoid_structure(radius_mm, voxel_size):
    """Boolean ball of ``radius_mm`` on an anisotropic voxel grid (an ellipsoid in voxels)."""
    r = [max(int(np.floor(radius_mm / v)), 0) for v in voxel_size]
    grids = np.ogrid[tuple(slice(-n, n + 1) for n in r)]
    dist2 = sum((g * v) ** 2 for g, v in zip(grids, voxel_size))
    return dist2 <= radius_mm**2 + 1e-9


def erode_mm(mask, voxel_size, radius_mm):
    """Erode a mask by a ball of ``radius_mm`` (voxels near the volume border count as outside)."""
    if radius_mm <= 0:
        return mask.astype(bool)
    st = ellipsoid_structure(radius_mm, voxel_size)
    return ndimage.binary_erosion(mask, structure=st, border_value=0)


def depth_mm(mask, voxel_size):
    """Euclidean distance (mm) of every voxel to the nearest voxel outside ``mask``, with a
    frame of outside voxels around the volume (as ``binary_erosion``'s ``border_value=0``)."""
    pad = np.pad(np.asarray(mask, bool), 1)
    return ndimage.distance_transform_edt(pad, sampling=voxel_size)[1:-1, 1:-1, 1:-1]


def dilate_ball(mask, voxel_size, radius_mm):
    """Dilation by the ball of :func:`ellipsoid_structure` through a distance transform: the
    same voxels as ``binary_dilation`` with that structure, in a fraction of the time for
    balls many voxels wide (each voxel is checked against its nearest mask voxel, not the
    ball's thousands of offsets)."""
    mask = np.asarray(mask, bool)
    if not mask.any():  # no voxel to measure distances to
        return mask.copy()
    return ndimage.distance_transform_edt(~mask, sampling=voxel_size) <= radius_mm + 1e-9


def open_ball(mask, voxel_size, radius_mm):
    """Opening (erosion, then dilation) by the ball of :func:`ellipsoid_structure`, through
    distance transforms; the same voxels as ``binary_opening``."""
    return dilate_ball(depth_mm(mask, voxel_size) > radius_mm + 1e-9, voxel_size, radius_mm)


def largest_component(mask):
    lab, n = ndimage.label(mask)
    if n <= 1:
        return mask.astype(bool)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == np.argmax(sizes)


def _combined(magnitude):
    mag = np.asarray(magnitude, dtype=np.float32)
    if mag.ndim == 4:
        mag = np.sqrt(np.mean(mag**2, axis=3))
    if mag.ndim != 3:
        raise QSMInputError(f"magnitude must be 3-D or 4-D (echoes last), got shape {mag.shape}")
    return np.where(np.isfinite(mag), mag, 0).astype(np.float32)


@MASKING.register("threshold", "Otsu threshold + opening + largest component + hole filling")
def mask_threshold(magnitude, voxel_size, *, threshold=None, opening_mm=3.0, erode=0.0,
                   smooth_mm=0.5):
    """Brain mask from magnitude.

    Parameters
    ----------
    magnitude : (X, Y, Z) or (X, Y, Z, E) array; echoes are combined by root-mean-square.
    voxel_size : 3 floats (mm)
    threshold : float, optional
        Absolute threshold; default Otsu's on the smoothed magnitude.
    opening_mm : radius of the opening ball that detaches scalp and skull.
    erode : extra erosion of the final mask (mm).
    smooth_mm : Gaussian sigma before thresholding (mm). Half a millimetre suppresses noise
        without spreading bright CSF into the dark skull (1 mm added a one-voxel rim of skull,
        pure noise in the phase, to the phantom's mask).
    """
    mag = _combined(magnitude)
    sigma = [smooth_mm / v for v in voxel_size]
    smooth = ndimage.gaussian_filter(mag, sigma) if smooth_mm > 0 else mag
    if threshold is None:
        if not np.any(smooth > 0):
            raise QSMInputError("magnitude is empty (all zero): cannot compute a mask")
        threshold = threshold_otsu(smooth[smooth > 0])
    mask = smooth > threshold
    if opening_mm > 0:
        mask = ndimage.binary_opening(mask, structure=ellipsoid_structure(opening_mm, voxel_size))
    mask = largest_component(mask)
    mask = ndimage.binary_fill_holes(mask)
    mask = erode_mm(mask, voxel_size, erode)
    if not mask.any():
        raise QSMInputError("masking produced an empty mask; give --mask or a lower threshold")
    return mask


# ------------------------------------------------------------------------- surface (BET-like)


def icosphere(level=4):
    """Unit sphere tessellated by ``level`` subdivisions of an icosahedron: (vertices, faces),
    10 4^level + 2 vertices, faces ordered counter-clockwise seen from outside."""
    g = (1 + 5**0.5) / 2
    v = np.array([[-1, g, 0], [1, g, 0], [-1, -g, 0], [1, -g, 0], [0, -1, g], [0, 1, g],
                  [0, -1, -g], [0, 1, -g], [g, 0, -1], [g, 0, 1], [-g, 0, -1], [-g, 0, 1]], float)
    f = np.array([[0, 11, 5], [0, 5, 1], [0, 1, 7], [0, 7, 10], [0, 10, 11], [1, 5, 9], [5, 11, 4],
                  [11, 10, 2], [10, 7, 6], [7, 1, 8], [3, 9, 4], [3, 4, 2], [3, 2, 6], [3, 6, 8],
                  [3, 8, 9], [4, 9, 5], [2, 4, 11], [6, 2, 10], [8, 6, 7], [9, 8, 1]])
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    for _ in range(level):
        edges = np.sort(np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]), axis=1)
        uniq, inv = np.unique(edges, axis=0, return_inverse=True)
        mid = v[uniq[:, 0]] + v[uniq[:, 1]]
        mid /= np.linalg.norm(mid, axis=1, keepdims=True)
        m = len(v) + inv.reshape(3, -1).T  # the midpoints of edges 01, 12, 20 of each face
        v = np.vstack([v, mid])
        a, b, c = f.T
        f = np.concatenate([np.stack([a, m[:, 0], m[:, 2]], 1), np.stack([b, m[:, 1], m[:, 0]], 1),
                            np.stack([c, m[:, 2], m[:, 1]], 1), m])
    normal = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
    inward = (normal * v[f].mean(axis=1)).sum(axis=1) < 0
    f[inward] = f[inward][:, ::-1]
    return v, f


def _csr(pairs, n):
    """Row pointers and column indices of the sparse rows ``pairs[:, 0] -> pairs[:, 1]``."""
    order = np.lexsort((pairs[:, 1], pairs[:, 0]))
    pairs = pairs[order]
    ptr = np.zeros(n + 1, np.int64)
    np.add.at(ptr, pairs[:, 0] + 1, 1)
    return np.cumsum(ptr), pairs[:, 1].astype(np.int64)


def _trilinear_py(img, px, py, pz):
    """``img`` at the continuous voxel position (px, py, pz) by trilinear interpolation, 0
    outside the volume. The surface then moves continuously with the image: nearest-voxel
    sampling made its 1000 updates amplify rounding-level differences in the magnitude (two
    exports of one series) into 0.7 mm of radius and tens of mask voxels."""
    nx, ny, nz = img.shape
    x0 = int(np.floor(px))
    y0 = int(np.floor(py))
    z0 = int(np.floor(pz))
    fx = px - x0
    fy = py - y0
    fz = pz - z0
    val = 0.0
    for dx in range(2):
        ix = x0 + dx
        if ix < 0 or ix >= nx:
            continue
        wx = fx if dx else 1.0 - fx
        for dy in range(2):
            iy = y0 + dy
            if iy < 0 or iy >= ny:
                continue
            wy = fy if dy else 1.0 - fy
            for dz in range(2):
                iz = z0 + dz
                if iz < 0 or iz >= nz:
                    continue
                wz = fz if dz else 1.0 - fz
                val += wx * wy * wz * img[ix, iy, iz]
    return val


_trilinear = _trilinear_py  # numba-compiled by ``_KERNELS`` before the kernel that calls it


def _evolve_py(r, dirs, faces, vf_ptr, vf_idx, nb_ptr, nb_idx, cog, vox, img, params, iters):
    """BET's surface update (module docstring), radial part only; ``r`` (mm) is updated in place.

    ``img`` is the (X, Y, Z) intensity, sampled trilinearly (0 outside the volume);
    ``params`` = (t2, t98, t, tm, bt, d1, d2, rmin, rmax, r_max_allowed, tol): the updates stop
    early once, over the last 10, all but 1 % of the vertices moved by less than 10 ``tol`` mm
    (``tol`` 0: never). Returns the number of updates made.
    """
    t2, t98, t, tm, bt, d1, d2, rmin, rmax, r_cap, tol = params
    nv = r.size
    e_mid = 0.5 * (1.0 / rmin + 1.0 / rmax)
    f_slope = 6.0 / (1.0 / rmin - 1.0 / rmax)
    n1 = int(d1) + 1
    n2 = int(d2) + 1
    pos = np.empty((nv, 3))
    nrm = np.empty((nv, 3))
    fn = np.empty((faces.shape[0], 3))
    window = 10
    snap = r.copy()
    done = 0
    for _ in range(iters):
        done += 1
        for k in range(nv):
            for a in range(3):
                pos[k, a] = cog[a] + r[k] * dirs[k, a]
        for f in range(faces.shape[0]):
            p0 = faces[f, 0]
            p1 = faces[f, 1]
            p2 = faces[f, 2]
            ax = pos[p1, 0] - pos[p0, 0]
            ay = pos[p1, 1] - pos[p0, 1]
            az = pos[p1, 2] - pos[p0, 2]
            bx = pos[p2, 0] - pos[p0, 0]
            by = pos[p2, 1] - pos[p0, 1]
            bz = pos[p2, 2] - pos[p0, 2]
            fn[f, 0] = ay * bz - az * by
            fn[f, 1] = az * bx - ax * bz
            fn[f, 2] = ax * by - ay * bx
        length = 0.0
        n_edges = 0
        for k in range(nv):
            sx = 0.0
            sy = 0.0
            sz = 0.0
            for q in range(vf_ptr[k], vf_ptr[k + 1]):
                sx += fn[vf_idx[q], 0]
                sy += fn[vf_idx[q], 1]
                sz += fn[vf_idx[q], 2]
            norm = np.sqrt(sx * sx + sy * sy + sz * sz) + 1e-12
            nrm[k, 0] = sx / norm
            nrm[k, 1] = sy / norm
            nrm[k, 2] = sz / norm
            for q in range(nb_ptr[k], nb_ptr[k + 1]):
                j = nb_idx[q]
                dx = pos[j, 0] - pos[k, 0]
                dy = pos[j, 1] - pos[k, 1]
                dz = pos[j, 2] - pos[k, 2]
                length += np.sqrt(dx * dx + dy * dy + dz * dz)
                n_edges += 1
        length /= max(n_edges, 1)
        for k in range(nv):
            mx = 0.0
            my = 0.0
            mz = 0.0
            cnt = nb_ptr[k + 1] - nb_ptr[k]
            for q in range(nb_ptr[k], nb_ptr[k + 1]):
                j = nb_idx[q]
                mx += pos[j, 0]
                my += pos[j, 1]
                mz += pos[j, 2]
            sx = mx / cnt - pos[k, 0]
            sy = my / cnt - pos[k, 1]
            sz = mz / cnt - pos[k, 2]
            sn = sx * nrm[k, 0] + sy * nrm[k, 1] + sz * nrm[k, 2]
            tx = sx - sn * nrm[k, 0]
            ty = sy - sn * nrm[k, 1]
            tz = sz - sn * nrm[k, 2]
            inv_r = 2.0 * abs(sn) / (length * length)
            f2 = 0.5 * (1.0 + np.tanh(f_slope * (inv_r - e_mid)))
            i_min = tm
            i_max = t
            for step in range(n1):
                val = _trilinear(img, (pos[k, 0] - step * nrm[k, 0]) / vox[0],
                                 (pos[k, 1] - step * nrm[k, 1]) / vox[1],
                                 (pos[k, 2] - step * nrm[k, 2]) / vox[2])
                if val < i_min:
                    i_min = val
                if step < n2 and val > i_max:
                    i_max = val
            i_min = max(t2, i_min)
            i_max = min(tm, i_max)
            tl = (i_max - t2) * bt + t2
            f3 = 2.0 * (i_min - tl) / max(i_max - t2, 1e-12)
            u3 = 0.05 * f3 * length
            ux = 0.5 * tx + f2 * sn * nrm[k, 0] + u3 * nrm[k, 0]
            uy = 0.5 * ty + f2 * sn * nrm[k, 1] + u3 * nrm[k, 1]
            uz = 0.5 * tz + f2 * sn * nrm[k, 2] + u3 * nrm[k, 2]
            r[k] = min(max(r[k] + ux * dirs[k, 0] + uy * dirs[k, 1] + uz * dirs[k, 2], 1.0), r_cap)
        if done % window == 0:
            moving = 0
            for k in range(nv):
                if abs(r[k] - snap[k]) >= window * tol:
                    moving += 1
                snap[k] = r[k]
            if moving <= nv // 100:
                break
    return done


_KERNELS = backend.NumbaKernels(globals(), {"evolve": _evolve_py}, helpers=("_trilinear",))


def brain_surface(magnitude, voxel_size, *, bt=0.5, iterations=1000, level=4, smooth_mm=0.5,
                  converge=True):
    """Fit the radial BET surface (module docstring) to a magnitude image: at most
    ``iterations`` updates, fewer once the surface has converged: over the last 10 updates, all
    but 1 % of the vertices moved by less than 1/100 of the smallest voxel (``converge=False``
    runs them all, as BET does). A few vertices on an intensity threshold wander by 0.3-0.8 mm
    for ever (phantom at 1 mm: up to 9 of 2562); the rest of the surface is still by about 250
    updates on the phantom and 600 on the head model. The masks are those of 1000 updates on
    the phantom (both grids) and the real head; 60 and 37 voxels of 610 000-670 000 differ on
    the head model at 3 / 7 T (Dice the same to 1e-4).

    Returns ``(centre_mm, radii_mm, directions)``: the surface point of vertex k is
    ``centre + radii[k] * directions[k]``, in mm from the centre of voxel (0, 0, 0).
    """
    vox = np.asarray(voxel_size, float)
    mag = _combined(magnitude)
    img = ndimage.gaussian_filter(mag, [smooth_mm / v for v in vox]) if smooth_mm > 0 else mag
    sample = img[::2, ::2, ::2]
    t2, t98 = (float(v) for v in np.percentile(sample, [2, 98]))
    if not t98 > t2:
        raise QSMInputError("magnitude has no contrast (2nd and 98th percentiles equal): cannot mask")
    t = t2 + 0.1 * (t98 - t2)
    fg = img > t
    idx = np.nonzero(fg)
    w = np.minimum(img[idx], t98) - t2
    cog = np.array([float((i * w).sum() / w.sum()) for i in idx]) * vox
    r_eq = (3 * fg.sum() * vox.prod() / (4 * np.pi)) ** (1 / 3)
    # t_m: the median inside the sphere of the head's volume, between the robust limits
    lo = np.maximum(np.floor((cog - r_eq) / vox).astype(int), 0)
    hi = np.minimum(np.ceil((cog + r_eq) / vox).astype(int) + 1, img.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    grids = np.ogrid[box]
    dist2 = sum((g * v - c) ** 2 for g, v, c in zip(grids, vox, cog))
    sub = img[box]
    sel = sub[(dist2 < r_eq**2) & (sub > t2) & (sub < t98)]
    tm = float(np.median(sel)) if sel.size else 0.5 * (t + t98)
    dirs, faces = icosphere(level)
    nv = len(dirs)
    vf = np.stack([faces.ravel(), np.repeat(np.arange(len(faces)), 3)], axis=1)
    vf_ptr, vf_idx = _csr(vf, nv)
    e = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    e = np.unique(np.concatenate([e, e[:, ::-1]]), axis=0)
    nb_ptr, nb_idx = _csr(e, nv)
    r = np.full(nv, 0.5 * r_eq)
    r_cap = float(np.linalg.norm(np.asarray(img.shape) * vox))
    # converged: 99 % of the vertices moved under 1/100 voxel in the last 10 updates
    tol = 1e-3 * float(vox.min()) if converge else 0.0
    params = (t2, t98, t, tm, float(bt), 20.0, 10.0, 3.33, 10.0, r_cap, tol)
    evolve = (_KERNELS.get() or {"evolve": _evolve_py})["evolve"]
    evolve(r, dirs, faces.astype(np.int64), vf_ptr, vf_idx, nb_ptr, nb_idx, cog, vox,
           np.ascontiguousarray(img, dtype=np.float64), params, int(iterations))
    return cog, r, dirs


def _table_directions(n_theta, n_phi):
    """Unit vectors at the centres of a (theta, phi) grid, theta-major."""
    th = (np.arange(n_theta) + 0.5) * np.pi / n_theta
    ph = (np.arange(n_phi) + 0.5) * 2 * np.pi / n_phi
    tt, pp = np.meshgrid(th, ph, indexing="ij")
    return np.stack([np.sin(tt) * np.cos(pp), np.sin(tt) * np.sin(pp), np.cos(tt)], -1).reshape(-1, 3)


@functools.lru_cache(maxsize=4)
def _table_faces(n_vertices, n_theta, n_phi):
    """For each direction of the (theta, phi) table, the face of the icosphere of ``n_vertices``
    vertices whose cone from the centre holds it: ``u . (d_i x d_j) >= 0`` for its three edges
    (faces are counter-clockwise seen from outside). It is searched among the faces of the three
    nearest vertices, which hold it on the icosphere (checked)."""
    from scipy.spatial import cKDTree

    level = int(round(np.log((n_vertices - 2) / 10) / np.log(4)))
    dirs, faces = icosphere(level)
    if len(dirs) != n_vertices:
        raise ValueError(f"{n_vertices} vertices is not an icosphere (10 4^level + 2)")
    u = _table_directions(n_theta, n_phi)
    incident = np.zeros((n_vertices, 6), np.int64)  # each vertex has 5 or 6 faces
    count = np.zeros(n_vertices, np.int64)
    for f_idx, tri in enumerate(faces):
        for v in tri:
            incident[v, count[v]] = f_idx
            count[v] += 1
    incident[count == 5, 5] = incident[count == 5, 0]
    near = cKDTree(dirs).query(u, 3)[1]
    found = np.full(len(u), -1, np.int64)
    for cand in incident[near].reshape(len(u), -1).T:
        d0, d1, d2 = (dirs[faces[cand, i]] for i in range(3))
        holds = np.ones(len(u), bool)
        for a, b in ((d0, d1), (d1, d2), (d2, d0)):
            holds &= (np.cross(a, b) * u).sum(1) >= -1e-12
        new = holds & (found < 0)
        found[new] = cand[new]
    if (found < 0).any():  # pragma: no cover - the icosphere is a fine Delaunay mesh
        raise RuntimeError("a table direction lies in no face of the icosphere")
    return u, faces[found]


def surface_inside(shape, voxel_size, centre, radii, directions, depth=0.0, n_theta=180, n_phi=360):
    """Voxels whose centre lies inside a radial surface, or more than ``depth`` mm (measured
    along the ray from the centre) inside it. The surface is the triangle mesh whose vertices
    BET moves (its faces those of :func:`icosphere`; BET's mask is likewise the mesh's
    interior): the radius towards each voxel is read from a (theta, phi) table of the rays'
    intersections with the mesh's faces. (Interpolating the vertex radii instead, inversely to
    the angular distance, bulged the surface 0.07 mm outward between the vertices on the head
    model and 3 T head-model Dice was 0.0002-0.0004 lower.)"""
    u, tri = _table_faces(len(directions), n_theta, n_phi)
    p = np.asarray(radii, float)[:, None] * np.asarray(directions, float)
    p0, p1, p2 = p[tri[:, 0]], p[tri[:, 1]], p[tri[:, 2]]
    normal = np.cross(p1 - p0, p2 - p0)  # the plane n . x = n . p0, met by the ray t u at t:
    table = ((normal * p0).sum(1) / (normal * u).sum(1)).reshape(n_theta, n_phi)
    vox = np.asarray(voxel_size, float)
    lo = np.maximum(np.floor((centre - radii.max()) / vox).astype(int), 0)
    hi = np.minimum(np.ceil((centre + radii.max()) / vox).astype(int) + 1, shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    x, y, z = ((g * v - c).astype(np.float32) for g, v, c in zip(np.ogrid[box], vox, centre))
    rho = np.sqrt(x * x + y * y + z * z)
    cos_t = np.clip(z / np.maximum(rho, 1e-6), -1, 1)
    it = np.minimum((np.arccos(cos_t) * (n_theta / np.pi)).astype(np.int32), n_theta - 1)
    ip = ((np.arctan2(y, x) % (2 * np.pi)) * (n_phi / (2 * np.pi))).astype(np.int32) % n_phi
    out = np.zeros(shape, bool)
    out[box] = rho <= table[it, ip] - depth
    return out


@MASKING.register("surface", "BET-like deformable surface (Smith 2002), threshold near the edge")
def mask_surface(magnitude, voxel_size, *, bt=0.5, iterations=1000, shell_mm=5.0, opening_mm=2.0,
                 margin_mm=2.0, erode=0.0, smooth_mm=0.5, threshold=None, core_mm=7.5, regrow_mm=4.5):
    """Brain mask by a radial BET-like surface refined by a threshold (module docstring).

    Parameters
    ----------
    magnitude : (X, Y, Z) or (X, Y, Z, E); echoes are combined by root-mean-square.
    voxel_size : 3 floats (mm).
    bt : fractional intensity threshold (BET's ``-f``): smaller gives a larger mask.
    iterations : the most surface updates (BET makes 1000); fewer once the surface has converged.
    shell_mm : depth below the surface (along the ray from its centre) within which dark
        voxels are removed.
    opening_mm : radius of the opening that detaches what the threshold leaves attached.
    margin_mm : how far the mask is pulled in from the skull (mm).
    erode : extra erosion (mm), as for ``threshold``.
    smooth_mm : Gaussian sigma (mm) of the magnitude before the surface fit and threshold.
    threshold : absolute threshold near the surface (default Otsu's).
    core_mm, regrow_mm : opening radius and regrowth of :func:`brain_core`, which cuts the neck
        and skull base off the brain (``core_mm=0`` skips it).
    """
    vox = tuple(float(v) for v in voxel_size)
    mag = _combined(magnitude)
    if not np.any(mag > 0):
        raise QSMInputError("magnitude is empty (all zero): cannot compute a mask")
    centre, radii, dirs = brain_surface(mag, vox, bt=bt, iterations=iterations, smooth_mm=smooth_mm)
    inside = surface_inside(mag.shape, vox, centre, radii, dirs)
    deep = surface_inside(mag.shape, vox, centre, radii, dirs, depth=shell_mm)
    smooth = ndimage.gaussian_filter(mag, [smooth_mm / v for v in vox]) if smooth_mm > 0 else mag
    if threshold is None:
        threshold = threshold_otsu(smooth[smooth > 0])
    keep = inside & ((smooth > threshold) | deep)
    if opening_mm > 0:
        keep = ndimage.binary_opening(keep, structure=ellipsoid_structure(opening_mm, vox))
    keep = ndimage.binary_fill_holes(largest_component(keep))
    if margin_mm > 0:
        keep = largest_component(erode_mm(keep, vox, margin_mm))
    if core_mm > 0 and keep.any():
        keep = brain_core(keep, smooth, vox, threshold, core_mm=core_mm, regrow_mm=regrow_mm)
    keep = erode_mm(keep, vox, erode)
    if not keep.any():
        raise QSMInputError("masking produced an empty mask; give a mask (--mask), or a lower intensity "
                            "threshold (--param bt=0.3, BET's -f; default 0.5)")
    return keep


def brain_core(mask, smooth, voxel_size, low_threshold, *, core_mm=7.5, regrow_mm=4.5):
    """Cut what a surface mask took in below the skull base (neck, skull-base marrow, muscle):
    the parenchyma inside the mask is brighter than Otsu's threshold *of the mask's own voxels*
    (which splits brain from the CSF, bone and partial volume inside it); an opening by
    ``core_mm`` breaks the thin bridges (brainstem to cord, marrow, vessels) between the
    brain and the tissue below it, whose largest component, holes filled (ventricles, dark
    iron-rich nuclei), is the brain core. It is grown back by ``regrow_mm`` inside the mask
    where the magnitude is above ``low_threshold`` (the head's Otsu threshold), which returns
    the darker cortex at the brain's edge, and holes are filled again."""
    vox = tuple(float(v) for v in voxel_size)
    # every step stays inside the mask: work on its bounding box with a margin wider than the
    # opening (the same result, the morphology on a fraction of the volume)
    pad = [int(np.ceil(max(core_mm, regrow_mm) / v)) + 1 for v in vox]
    idx = np.nonzero(mask)
    box = tuple(slice(max(int(i.min()) - p, 0), int(i.max()) + p + 1) for i, p in zip(idx, pad))
    out = np.zeros_like(mask, dtype=bool)
    out[box] = _brain_core_box(mask[box], smooth[box], vox, low_threshold, core_mm, regrow_mm)
    return out


def _brain_core_box(mask, smooth, vox, low_threshold, core_mm, regrow_mm):
    """:func:`brain_core` on a box around the mask."""
    inner = threshold_otsu(smooth[mask])
    core = open_ball(mask & (smooth > inner), vox, core_mm)
    if not core.any():
        return mask
    core = ndimage.binary_fill_holes(largest_component(core))
    grown = dilate_ball(core, vox, regrow_mm)
    grown &= mask & ((smooth > low_threshold) | core)
    return ndimage.binary_fill_holes(largest_component(grown))


def exclude_steep_field(mask, field, voxel_size, *, fence=3.0, dilate_mm=3.0):
    """The mask without the voxels whose total field is steepest: a phase-quality criterion
    (the field gradient, as in ROMEO's phase-gradient quality, Dymerska et al., MRM 85:2294,
    2021) for the tissue next to sinuses, ear canals and the skull base, where the phase is
    least reliable and background removal leaves residuals. A voxel goes when ``|grad f|``
    (ppm/mm) lies beyond Tukey's outer fence ``Q3 + fence x IQR`` of the mask's own gradients,
    together with its neighbours within ``dilate_mm``; the largest component stays. Returns
    ``(mask, info)``; the removed voxels become holes that background removal treats as
    outside (PDF fits sources there)."""
    vox = np.asarray(voxel_size, float)
    mask = np.asarray(mask, bool)
    f = np.asarray(field, dtype=np.float64)
    grad = np.sqrt(sum((np.gradient(f, axis=a) / vox[a]) ** 2 for a in range(3)))
    q1, q3 = np.percentile(grad[mask], [25, 75])
    limit = q3 + fence * max(q3 - q1, 0.01 * q3)  # an IQR floor: a uniform gradient loses nothing
    steep = mask & (grad > limit)
    if dilate_mm > 0 and steep.any():
        steep = ndimage.binary_dilation(steep, structure=ellipsoid_structure(dilate_mm, vox)) & mask
    kept = largest_component(mask & ~steep)
    info = {"fence": fence, "limit_ppm_per_mm": round(float(limit), 5),
            "removed_ml": round(float((mask & ~kept).sum() * vox.prod() / 1000), 1)}
    return kept, info
