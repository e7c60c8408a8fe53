"""qsmkit.slicer_adapter against real MRML (the PyPI package slicer-core): volume round trips
with oblique and flipped IJK-to-RAS, B0 direction, output geometry, segmentations -> masks and
label maps, chi statistics, and the pipeline through the adapter equal to the pipeline on files.
"""

from __future__ import annotations

import numpy as np
import pytest

from qsmkit import geometry, io, metrics, stats, units
from qsmkit import slicer_adapter as sa
from qsmkit.errors import QSMInputError
from qsmkit.pipeline import PipelineConfig, run_pipeline
from qsmkit.ras_order import run_pipeline_in_ras_order

try:
    import slicer
    import vtk
except ImportError as err:  # slicer-core missing or broken: say which, and skip
    pytest.skip(f"needs real MRML from the PyPI package slicer-core (pip install slicer-core): {err}",
                allow_module_level=True)
if not hasattr(slicer, "vtkMRMLScene"):  # pragma: no cover - another package named slicer
    pytest.skip("the installed 'slicer' package has no vtkMRMLScene (install slicer-core)",
                allow_module_level=True)


@pytest.fixture
def scene():
    s = slicer.vtkMRMLScene()
    yield s
    s.Clear(1)


def add_volume(scene, array_ijk, affine, name="vol", class_name="vtkMRMLScalarVolumeNode"):
    """A volume node made with Slicer's own utilities (KJI arrays), independently of the adapter."""
    node = scene.AddNewNodeByClass(class_name, name)
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(np.asarray(affine, float)))
    a = np.asarray(array_ijk)
    kji = a.transpose(2, 1, 0) if a.ndim == 3 else a.transpose(2, 1, 0, 3)
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(kji))
    return node


def ramp(shape, dtype=np.float32):
    return np.arange(int(np.prod(shape)), dtype=dtype).reshape(shape)


OBLIQUE = geometry.rotation_matrix(0, 25.0) @ geometry.rotation_matrix(1, -10.0)
AFFINES = {
    "axial": geometry.make_affine((0.9, 0.9, 2.5), origin=(-10, 20, 5)),
    "oblique": geometry.make_affine((0.9, 0.9, 2.5), rotation=OBLIQUE, origin=(3, -4, 7)),
    "flipped": geometry.make_affine((1.0, 1.2, 2.0), flip=(0, 2), origin=(50, -3, 1)),
    "oblique_flipped": geometry.make_affine((0.7, 0.8, 1.5), rotation=OBLIQUE, flip=(1,)),
    "permuted": np.array([[0, 0, 2.0, 1], [1.5, 0, 0, 2], [0, -1.0, 0, 3], [0, 0, 0, 1]]),
}


# ---------------------------------------------------------------- volumes

def test_voxel_order_is_ijk(scene):
    a = ramp((5, 4, 3))
    node = add_volume(scene, a, np.eye(4))
    kji = slicer.util.arrayFromVolume(node)
    assert kji.shape == (3, 4, 5)
    got = sa.array_from_volume(node)
    assert got.shape == (5, 4, 3) and got.dtype == np.float32
    assert np.array_equal(got, a)
    assert got[4, 1, 2] == kji[2, 1, 4]
    got[0, 0, 0] = -1  # a copy: the node is untouched
    assert slicer.util.arrayFromVolume(node)[0, 0, 0] == 0


@pytest.mark.parametrize("name", sorted(AFFINES))
def test_geometry_and_b0_direction(scene, name):
    affine = AFFINES[name]
    node = add_volume(scene, ramp((6, 5, 4)), affine)
    assert np.allclose(sa.ijk_to_ras(node), affine, atol=1e-12)
    assert np.allclose(sa.voxel_size(node), geometry.voxel_size(affine))
    b0 = sa.b0_direction(node)
    assert np.allclose(b0, geometry.b0_direction(affine), atol=1e-12)
    # physically: B0 in voxel axes, mapped to world through the direction matrix, is world z
    assert np.allclose(geometry.direction_matrix(affine) @ b0, [0, 0, 1], atol=1e-12)
    # Slicer's own world coordinates of a voxel agree with the affine
    ijk = (2, 3, 1)
    ras = [0.0, 0.0, 0.0, 1.0]
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    m.MultiplyPoint((*ijk, 1.0), ras)
    assert np.allclose(ras[:3], (affine @ (*ijk, 1))[:3], atol=1e-9)
    # a world override
    assert np.allclose(sa.b0_direction(node, (1, 0, 0)),
                       geometry.b0_direction(affine, (1, 0, 0)), atol=1e-12)


def test_b0_ignores_parent_transform_and_outputs_keep_it(scene):
    """A registration transform moves the image in the scene, not the scanner's B0."""
    affine = AFFINES["oblique"]
    node = add_volume(scene, ramp((6, 5, 4)), affine)
    before = sa.b0_direction(node)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    t = np.eye(4)
    t[:3, :3] = geometry.rotation_matrix(2, 40.0)
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(t))
    node.SetAndObserveTransformNodeID(transform.GetID())
    assert np.array_equal(sa.b0_direction(node), before)
    out = sa.create_volume_node(scene, sa.array_from_volume(node) * 2, node, "out")
    assert out.GetTransformNodeID() == transform.GetID()


@pytest.mark.parametrize("name", sorted(AFFINES))
def test_output_geometry_identical_to_input(scene, name):
    node = add_volume(scene, ramp((7, 6, 5)), AFFINES[name], "phase")
    data = np.random.default_rng(1).standard_normal((7, 6, 5)).astype(np.float32)
    out = sa.create_volume_node(scene, data, node, "chi", units="ppm")
    assert out.GetScene() is scene and out.GetName() == "chi"
    assert out.GetImageData().GetDimensions() == node.GetImageData().GetDimensions()
    assert out.GetSpacing() == node.GetSpacing()
    assert out.GetOrigin() == node.GetOrigin()
    d_out, d_in = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    out.GetIJKToRASDirectionMatrix(d_out)
    node.GetIJKToRASDirectionMatrix(d_in)
    assert np.array_equal(sa.matrix_to_array(d_out), sa.matrix_to_array(d_in))
    assert np.array_equal(sa.ijk_to_ras(out), sa.ijk_to_ras(node))  # bit for bit
    assert sa.same_geometry(out, node)
    back = sa.array_from_volume(out)
    assert back.dtype == np.float32 and np.array_equal(back, data)
    # reusing a node replaces its voxels and geometry
    other = add_volume(scene, np.zeros((2, 2, 2), np.float32), np.eye(4), "old")
    again = sa.create_volume_node(scene, data, node, "ignored", node=other)
    assert again is other and np.array_equal(sa.ijk_to_ras(other), sa.ijk_to_ras(node))
    assert np.array_equal(sa.array_from_volume(other), data)


def test_update_from_affine_and_types(scene):
    affine = AFFINES["oblique_flipped"]
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "mask")
    mask = np.zeros((4, 5, 6), bool)
    mask[1:3, 2:4, 3:5] = True
    sa.update_volume_from_array(node, mask, affine=affine)
    assert np.allclose(sa.ijk_to_ras(node), affine, atol=1e-12)
    got = sa.array_from_volume(node)
    assert got.dtype == np.uint8 and np.array_equal(got > 0, mask)
    big = np.zeros((2, 2, 2), np.int64)
    sa.update_volume_from_array(node, big, affine=affine)
    assert sa.array_from_volume(node).dtype == np.int32
    with pytest.raises(QSMInputError, match="3-D or 4-D"):
        sa.update_volume_from_array(node, np.zeros((2, 2)), affine=affine)
    with pytest.raises(QSMInputError, match="does not match"):
        sa.update_volume_from_array(node, np.zeros((3, 3, 3)), like=add_volume(
            scene, np.zeros((2, 2, 2)), np.eye(4)))


def test_multi_echo_inputs(scene):
    affine = AFFINES["oblique"]
    echoes = [ramp((4, 3, 2)) + 100 * e for e in range(3)]
    # a vector volume: components last
    vec = add_volume(scene, np.stack(echoes, axis=3), affine, "vec", "vtkMRMLVectorVolumeNode")
    got = sa.volume_arrays(vec)
    assert got.data.shape == (4, 3, 2, 3) and np.array_equal(got.data, np.stack(echoes, 3))
    # a list of nodes, one per echo
    nodes = [add_volume(scene, e, affine, f"echo{i}") for i, e in enumerate(echoes)]
    got = sa.volume_arrays(nodes)
    assert np.array_equal(got.data, np.stack(echoes, 3))
    assert np.allclose(got.affine, affine) and got.meta["nodes"] == ["echo0", "echo1", "echo2"]
    # a sequence node
    seq = scene.AddNewNodeByClass("vtkMRMLSequenceNode", "seq")
    for i, n in enumerate(nodes):
        seq.SetDataNodeAtValue(n, str(i))
    got = sa.volume_arrays(seq)
    assert np.array_equal(got.data, np.stack(echoes, 3))
    assert np.allclose(got.b0_dir(), geometry.b0_direction(affine))
    # a single node stays 3-D
    assert sa.volume_arrays(nodes[0]).data.shape == (4, 3, 2)
    # echoes on different grids are refused
    odd = add_volume(scene, echoes[0], AFFINES["axial"], "odd")
    with pytest.raises(QSMInputError, match="not on the voxel grid"):
        sa.volume_arrays([nodes[0], odd])
    with pytest.raises(QSMInputError, match="no voxel data"):
        sa.volume_arrays(scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty"))


# ---------------------------------------------------------------- files read by Slicer itself

@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """The small built-in phantom written by ``qsmkit simulate``."""
    from qsmkit import cli

    out = tmp_path_factory.mktemp("phantom")
    assert cli.main(["simulate", "--out", str(out), "--shape", "64", "64", "32",
                     "--voxel-size", "3.75", "3.75", "5", "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def oblique_phantom(tmp_path_factory):
    """The phantom acquired obliquely: B0 tilted in voxel axes, the affine rotated to match."""
    from qsmkit import cli

    out = tmp_path_factory.mktemp("phantom_oblique")
    assert cli.main(["simulate", "--out", str(out), "--shape", "48", "48", "24",
                     "--voxel-size", "4", "4", "6", "--b0-dir", "0.25", "-0.2", "1",
                     "--quiet"]) == 0
    return out


def read_with_slicer(scene, path, name):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    return node


@pytest.mark.parametrize("which", ["phantom", "oblique_phantom"])
def test_nifti_read_by_slicer_matches_qsmkit_io(scene, request, which):
    folder = request.getfixturevalue(which)
    vol = io.load_volume(folder / "phase.nii.gz")
    node = read_with_slicer(scene, folder / "phase.nii.gz", "phase")
    arrays = sa.volume_arrays(node)
    assert np.array_equal(arrays.data, vol.data)
    assert np.allclose(arrays.affine, vol.affine, atol=1e-5)
    assert np.allclose(sa.b0_direction(node), vol.b0_dir(), atol=1e-6)


# ---------------------------------------------------------------- the pipeline through the adapter

@pytest.mark.parametrize("which", ["phantom", "oblique_phantom"])
def test_pipeline_on_nodes_equals_pipeline_on_files(scene, request, which):
    folder = request.getfixturevalue(which)
    mag = io.load_volume(folder / "magnitude.nii.gz")
    pha = io.load_volume(folder / "phase.nii.gz")
    mag_node = add_volume(scene, mag.data, mag.affine, "magnitude")
    pha_node = add_volume(scene, pha.data, pha.affine, "phase")
    result, arrays = sa.run_pipeline_on_nodes(mag_node, pha_node, [0.02], 3.0)
    # what `qsmkit run` does with the files' arrays
    expected = run_pipeline_in_ras_order(mag.data, units.rescale_phase(pha.data), [0.02], 3.0,
                                         pha.affine)[0]
    assert np.array_equal(arrays.b0_dir(), pha.b0_dir())
    for name in ("mask", "field_total", "field_local", "local_mask", "chi"):
        assert np.array_equal(getattr(result, name), getattr(expected, name)), name
    chi_node = sa.create_volume_node(scene, result.chi, pha_node, "chi", units="ppm")
    assert sa.same_geometry(chi_node, pha_node)
    assert np.array_equal(sa.array_from_volume(chi_node), expected.chi)


def test_reordered_nodes_give_the_same_chi(scene, phantom):
    """Like ``qsmkit run``, the adapter runs the stages in the voxel order closest to RAS: the
    phantom stored with its first axis reversed and two axes swapped (the same voxels at the
    same world positions) gives the same chi, voxel for voxel; in the nodes' own order the
    stages give a different one (``tfi-fast`` stops early). The threshold mask keeps it fast."""
    mag = io.load_volume(phantom / "magnitude.nii.gz")
    pha = io.load_volume(phantom / "phase.nii.gz")
    n = mag.data.shape[0]
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1, n - 1          # i = n - 1 - i'
    affine = pha.affine @ flip @ np.eye(4)[[1, 0, 2, 3]]  # then (i, j) = (j', i')

    def moved(a):
        return np.ascontiguousarray(np.swapaxes(a[::-1], 0, 1))

    def back(a):
        return np.swapaxes(a, 0, 1)[::-1]

    cfg = PipelineConfig(masking="threshold")
    a, _ = sa.run_pipeline_on_nodes(add_volume(scene, mag.data, mag.affine, "m"),
                                    add_volume(scene, pha.data, pha.affine, "p"), [0.02], 3.0,
                                    config=cfg)
    b, arrays = sa.run_pipeline_on_nodes(add_volume(scene, moved(mag.data), affine, "m2"),
                                         add_volume(scene, moved(pha.data), affine, "p2"),
                                         [0.02], 3.0, config=cfg)
    assert np.allclose(arrays.affine, affine)
    for name in ("mask", "local_mask", "chi"):
        assert np.array_equal(back(getattr(b, name)), getattr(a, name)), name
    own = run_pipeline(moved(mag.data), units.rescale_phase(moved(pha.data)), [0.02], 3.0,
                       arrays.voxel_size, arrays.b0_dir(), config=cfg)
    assert metrics.nrmse(back(own.chi), a.chi, a.local_mask) > 5  # %: the order matters


def test_pipeline_on_nodes_checks_grids(scene, phantom):
    mag = io.load_volume(phantom / "magnitude.nii.gz")
    mag_node = add_volume(scene, mag.data, mag.affine, "magnitude")
    moved = add_volume(scene, mag.data, AFFINES["oblique"], "elsewhere")
    with pytest.raises(QSMInputError, match="same voxel grid"):
        sa.run_pipeline_on_nodes(mag_node, moved, [0.02], 3.0)
    with pytest.raises(QSMInputError, match="mask"):
        sa.run_pipeline_on_nodes(mag_node, mag_node, [0.02], 3.0, mask=moved)


# ---------------------------------------------------------------- segmentations

def oriented_labelmap(mask_ijk, affine):
    """A vtkOrientedImageData holding a 0/1 mask with geometry ``affine``."""
    img = slicer.vtkOrientedImageData()
    img.SetDimensions(*mask_ijk.shape)
    img.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    flat = vtk.util.numpy_support.vtk_to_numpy(img.GetPointData().GetScalars())
    flat[:] = np.asarray(mask_ijk, np.uint8).transpose(2, 1, 0).ravel()
    img.SetImageToWorldMatrix(slicer.util.vtkMatrixFromArray(np.asarray(affine, float)))
    return img


def box(shape, lo, hi):
    m = np.zeros(shape, bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return m


@pytest.mark.parametrize("name", ["axial", "oblique_flipped"])
def test_segments_to_masks_on_reference_grid(scene, name):
    affine = AFFINES[name]
    shape = (12, 10, 8)
    ref = add_volume(scene, ramp(shape), affine, "chi")
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    a, b = box(shape, (1, 1, 1), (5, 6, 4)), box(shape, (3, 4, 2), (9, 9, 7))  # they overlap
    seg.AddSegmentFromBinaryLabelmapRepresentation(oriented_labelmap(a, affine), "caudate", [1, 0, 0])
    seg.AddSegmentFromBinaryLabelmapRepresentation(oriented_labelmap(b, affine), "CSF", [0, 0, 1])
    masks = sa.segment_masks(seg, ref)
    assert list(masks) == ["caudate", "CSF"]
    assert np.array_equal(masks["caudate"], a) and np.array_equal(masks["CSF"], b)
    assert list(sa.segment_masks(seg, ref, segments=["CSF"])) == ["CSF"]
    regions = sa.regions_from_segmentation(seg, ref)
    assert [(r.label, r.name) for r in regions] == [(1, "caudate"), (2, "CSF")]
    labels, names, overlap = sa.label_map_from_segmentation(seg, ref)
    assert names == {1: "caudate", 2: "CSF"} and overlap == int((a & b).sum())
    assert np.array_equal(labels == 2, b) and np.array_equal(labels == 1, a & ~b)


def test_shared_labelmap_layers_and_reference_from_segmentation(scene):
    """Segments imported from one label map share a layer; each still gives its own mask."""
    shape = (10, 8, 6)
    affine = AFFINES["flipped"]
    lab = np.zeros(shape, np.uint8)
    lab[1:4, 1:4, 1:3] = 1
    lab[5:8, 2:6, 2:5] = 2
    label_node = add_volume(scene, lab, affine, "labels", "vtkMRMLLabelMapVolumeNode")
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(label_node, seg)
    assert seg.GetSegmentation().GetNumberOfLayers() == 1
    with pytest.raises(QSMInputError, match="no reference volume"):
        sa.segment_masks(seg)
    seg.SetReferenceImageGeometryParameterFromVolumeNode(label_node)
    seg.SetNodeReferenceID(slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole(),
                           label_node.GetID())
    masks = sa.segment_masks(seg)  # the segmentation's own reference volume
    assert [int(m.sum()) for m in masks.values()] == [int((lab == 1).sum()), int((lab == 2).sum())]
    for value, mask in zip((1, 2), masks.values()):
        assert np.array_equal(mask, lab == value)


def test_segment_on_another_grid_and_under_a_transform(scene):
    """Nearest-neighbour resampling onto the chi grid, with the nodes' transforms applied."""
    ref_affine = np.diag([1.0, 1.0, 1.0, 1.0])
    ref = add_volume(scene, ramp((16, 12, 10)), ref_affine, "chi")
    # a coarser segment grid (2 mm), offset by 0.25 mm: no voxel centre falls on a tie
    seg_affine = np.diag([2.0, 2.0, 2.0, 1.0])
    seg_affine[:3, 3] = 0.25
    coarse = box((8, 6, 5), (2, 1, 1), (5, 4, 3))
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    sid = seg.AddSegmentFromBinaryLabelmapRepresentation(oriented_labelmap(coarse, seg_affine), "GP",
                                                         [1, 1, 0])
    expected, _ = stats.resample_nearest(coarse.astype(np.uint8), seg_affine, (16, 12, 10), ref_affine)
    got = sa.segment_mask(seg, sid, ref)
    assert got.shape == (16, 12, 10) and np.array_equal(got, expected > 0)
    # moving the segmentation 3 mm along R moves the mask by 3 voxels on the 1 mm grid
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = np.eye(4)
    shift[0, 3] = 3.0
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(shift))
    seg.SetAndObserveTransformNodeID(transform.GetID())
    moved = sa.segment_mask(seg, sid, ref)
    assert np.array_equal(moved[3:], got[:-3]) and not moved[:3].any()
    # an unknown segment is a clear error
    with pytest.raises(QSMInputError, match="no segment"):
        sa.segment_mask(seg, "nope", ref)


# ---------------------------------------------------------------- statistics

def test_chi_segment_measurements_pure():
    rng = np.random.default_rng(0)
    chi = rng.normal(0.05, 0.02, (10, 9, 8))
    seg, ref = box(chi.shape, (1, 1, 1), (4, 5, 6)), box(chi.shape, (6, 5, 1), (9, 9, 7))
    m = sa.chi_segment_measurements(chi, seg, ref)
    values = chi[seg]
    assert m["voxels"] == values.size
    assert m["chi_mean"] == pytest.approx(values.mean())
    assert m["chi_sd"] == pytest.approx(values.std(ddof=1))
    assert m["chi_median"] == pytest.approx(np.median(values))
    assert m["chi_mean_ref"] == pytest.approx(values.mean() - chi[ref].mean())
    assert np.isnan(sa.chi_segment_measurements(chi, seg)["chi_mean_ref"])
    empty = sa.chi_segment_measurements(chi, np.zeros(chi.shape, bool), ref)
    assert empty["voxels"] == 0 and np.isnan(empty["chi_mean"])
    with pytest.raises(QSMInputError, match="reference segment has no voxels"):
        sa.chi_segment_measurements(chi, seg, np.zeros(chi.shape, bool))
    with pytest.raises(QSMInputError, match="does not match"):
        sa.chi_segment_measurements(chi, seg[:-1])
    assert set(sa.CHI_MEASUREMENTS) <= set(m)


def test_segment_statistics_equals_qsmkit_stats(scene):
    affine = AFFINES["oblique"]
    rng = np.random.default_rng(3)
    chi = rng.normal(0.0, 0.05, (12, 10, 8)).astype(np.float32)
    chi_node = add_volume(scene, chi, affine, "chi")
    a, b = box(chi.shape, (1, 1, 1), (6, 6, 4)), box(chi.shape, (6, 2, 3), (11, 9, 8))
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    seg.AddSegmentFromBinaryLabelmapRepresentation(oriented_labelmap(a, affine), "putamen", [1, 0, 0])
    seg.AddSegmentFromBinaryLabelmapRepresentation(oriented_labelmap(b, affine), "CSF", [0, 0, 1])
    rows = sa.segment_statistics(chi_node, seg, reference="csf")
    labels = np.zeros(chi.shape, np.int32)
    labels[a], labels[b] = 1, 2
    expected = stats.roi_table(chi, labels, geometry.voxel_size(affine),
                               label_names={1: "putamen", 2: "CSF"}, reference="csf")
    assert [r["name"] for r in rows] == ["putamen", "CSF"]
    for r, e in zip(rows, expected):
        for col in stats.COLUMNS:
            assert r[col] == pytest.approx(e[col], nan_ok=True), col
    assert rows[1]["mean_ref"] == pytest.approx(0.0, abs=1e-12)
    plugin_view = sa.chi_segment_measurements(chi, a, b)
    assert plugin_view["chi_mean_ref"] == pytest.approx(rows[0]["mean_ref"])
