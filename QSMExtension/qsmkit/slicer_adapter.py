"""MRML nodes <-> qsmkit arrays: the one place where 3D Slicer's data model meets qsmkit.

Every function takes MRML nodes and returns numpy arrays and geometry (or the reverse); none
imports Slicer when this module is imported, so ``import qsmkit.slicer_adapter`` works in
plain Python. The functions run inside the Slicer application and, for tests and scripts,
against the MRML library of the PyPI package ``slicer-core``.

Conventions
-----------
- Slicer's ``slicer.util.arrayFromVolume`` gives voxels as ``(K, J, I)`` (slowest axis first);
  qsmkit works in the file's voxel order ``(I, J, K)`` (plus echoes / components last). The
  conversion is a transpose, so values are never resampled.
- The node's IJK-to-RAS matrix *is* qsmkit's affine (``world = A @ [i, j, k, 1]``, RAS mm).
- The B0 direction is scanner z (world superior) expressed in voxel axes, computed from the
  node's own IJK-to-RAS matrix with :func:`qsmkit.geometry.b0_direction`. A parent transform
  of the node (a registration, for instance) is deliberately ignored: it moves the image in the
  scene but does not change how it was acquired.
- Outputs get exactly the input's geometry: origin, spacing and axis directions are copied
  component by component (``CopyOrientation``) and the output is placed under the input's
  parent transform.
- Segmentations become boolean masks (one per segment; segments may overlap) or an integer
  label map on a reference volume's voxel grid (nearest neighbour, parent transforms of
  both nodes taken into account).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import geometry
from .errors import QSMInputError
from .geometry import VoxelGrid

#: node classes whose voxels are one scalar per voxel
SCALAR_CLASSES = ("vtkMRMLScalarVolumeNode", "vtkMRMLLabelMapVolumeNode")
#: node classes with several components per voxel (echoes / channels last in qsmkit order)
VECTOR_CLASSES = ("vtkMRMLVectorVolumeNode", "vtkMRMLMultiVolumeNode",
                  "vtkMRMLDiffusionWeightedVolumeNode")


# ---------------------------------------------------------------- helpers

def _slicer():
    import slicer

    return slicer


def _numpy_support():
    from vtk.util import numpy_support

    return numpy_support


def _node_name(node) -> str:
    try:
        return node.GetName() or node.GetID() or node.GetClassName()
    except AttributeError:
        return repr(node)


def matrix_to_array(vmatrix) -> np.ndarray:
    """A vtkMatrix4x4 as a (4, 4) float64 array (element by element, no rounding)."""
    return np.array([[vmatrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def array_to_matrix(array):
    """A (4, 4) array as a new vtkMatrix4x4."""
    import vtk

    a = np.asarray(array, dtype=np.float64)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)):
        raise QSMInputError(f"an IJK-to-RAS matrix must be a finite 4x4 array, got {a.shape}")
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(a[r, c]))
    return m


def _image_data(node):
    if node is None:
        raise QSMInputError("no volume node given")
    image = node.GetImageData() if hasattr(node, "GetImageData") else None
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        raise QSMInputError(f"volume node {_node_name(node)!r} has no voxel data")
    return image


# ---------------------------------------------------------------- volumes -> arrays

def ijk_to_ras(node) -> np.ndarray:
    """The node's IJK-to-RAS matrix (qsmkit's affine), (4, 4) float64."""
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return matrix_to_array(m)


def array_from_volume(node) -> np.ndarray:
    """Voxels of a volume node in qsmkit order, as a copy: ``(I, J, K)`` for scalar volumes,
    ``(I, J, K, C)`` for vector / multi-volume nodes (components, e.g. echoes, last).

    The copy is Fortran-ordered, the memory layout nibabel gives for NIfTI files, so
    computations see the same array whether it came from a file or from the scene.
    """
    image = _image_data(node)
    dims = image.GetDimensions()
    ncomp = image.GetNumberOfScalarComponents()
    flat = _numpy_support().vtk_to_numpy(image.GetPointData().GetScalars())
    kji = flat.reshape(tuple(reversed(dims)) + ((ncomp,) if ncomp > 1 else ()))
    axes = (2, 1, 0) + ((3,) if ncomp > 1 else ())
    return np.array(kji.transpose(axes), copy=True)  # order "K": F-contiguous for 3-D


def voxel_size(node) -> np.ndarray:
    """Voxel size (mm) along I, J, K."""
    return geometry.voxel_size(ijk_to_ras(node))


def b0_direction(node, b0_world=None) -> np.ndarray:
    """B0 as a unit vector in the node's voxel axes (I, J, K); ``b0_world`` (RAS) overrides
    scanner z. Parent transforms are ignored (see the module docstring)."""
    return geometry.b0_direction(ijk_to_ras(node), b0_world)


@dataclass
class VolumeArrays(VoxelGrid):
    """A volume node's data in qsmkit form (shape3, voxel_size, b0_dir from ``VoxelGrid``)."""

    data: np.ndarray          # (I, J, K) or (I, J, K, E)
    affine: np.ndarray        # IJK-to-RAS, (4, 4)
    name: str = ""
    meta: dict = field(default_factory=dict)


def _data_nodes(node):
    """The volume nodes behind ``node``: itself, or each item of a sequence node."""
    if node is not None and node.IsA("vtkMRMLSequenceNode"):
        items = [node.GetNthDataNode(i) for i in range(node.GetNumberOfDataNodes())]
        if not items:
            raise QSMInputError(f"sequence {_node_name(node)!r} is empty")
        bad = [n for n in items if n is None or not n.IsA("vtkMRMLVolumeNode")]
        if bad:
            raise QSMInputError(f"sequence {_node_name(node)!r} holds items that are not volumes")
        return items
    return [node]


def volume_arrays(nodes) -> VolumeArrays:
    """Data and geometry of one volume node, a sequence node (items stacked as echoes, last
    axis), a vector / multi-volume node (components last) or a list of volume nodes (one per
    echo). Every item must share the first item's voxel grid."""
    if nodes is None:
        raise QSMInputError("no volume node given")
    node_list = list(nodes) if isinstance(nodes, (list, tuple)) else [nodes]
    items = [n for node in node_list for n in _data_nodes(node)]
    if not items:
        raise QSMInputError("no volume node given")
    first_affine = ijk_to_ras(items[0])
    arrays = []
    for n in items:
        a = array_from_volume(n)
        affine = ijk_to_ras(n)
        if not geometry.same_grid(first_affine, arrays[0].shape if arrays else a.shape, affine, a.shape):
            raise QSMInputError(f"volume {_node_name(n)!r} is not on the voxel grid of "
                                f"{_node_name(items[0])!r} (shape {a.shape[:3]})")
        arrays.append(a)
    data = arrays[0] if len(arrays) == 1 else np.stack(arrays, axis=3)
    return VolumeArrays(data=data, affine=first_affine, name=_node_name(node_list[0]),
                        meta={"nodes": [_node_name(n) for n in items]})


# ---------------------------------------------------------------- arrays -> volumes

def _kji_for_vtk(array) -> np.ndarray:
    a = np.asarray(array)
    if a.dtype == np.bool_:
        a = a.astype(np.uint8)
    if a.dtype in (np.int64, np.uint64):  # VTK_LONG_LONG volumes are refused by Slicer
        info = np.iinfo(np.int32)
        if a.size and (a.min() < info.min or a.max() > info.max):
            raise QSMInputError("integer voxel values exceed the 32-bit range")
        a = a.astype(np.int32)
    if a.ndim == 3:
        return np.ascontiguousarray(a.transpose(2, 1, 0))
    if a.ndim == 4:
        return np.ascontiguousarray(a.transpose(2, 1, 0, 3))
    raise QSMInputError(f"a volume must be 3-D or 4-D (components last), got shape {a.shape}")


def update_volume_from_array(node, array, affine=None, like=None, units: str | None = None):
    """Set a volume node's voxels from a qsmkit-order array and its geometry from ``like``
    (a volume node: origin, spacing, directions and parent transform copied exactly) or from
    ``affine`` (IJK-to-RAS). Returns the node."""
    slicer = _slicer()
    kji = _kji_for_vtk(array)
    if like is not None:
        if tuple(np.asarray(array).shape[:3]) != tuple(_image_data(like).GetDimensions()):
            raise QSMInputError(f"array shape {np.asarray(array).shape[:3]} does not match "
                                f"{_node_name(like)!r} {tuple(_image_data(like).GetDimensions())}")
        node.CopyOrientation(like)
        node.SetAndObserveTransformNodeID(like.GetTransformNodeID())
    elif affine is not None:
        node.SetIJKToRASMatrix(array_to_matrix(affine))
    slicer.util.updateVolumeFromArray(node, kji)
    if units:
        set_voxel_units(node, units)
    return node


def set_voxel_units(node, units: str) -> None:
    """Record the voxel value units (e.g. ``ppm``) where the MRML version supports it."""
    if not hasattr(node, "SetVoxelValueUnits"):
        return
    slicer = _slicer()
    entry = slicer.vtkCodedEntry()
    codes = {"ppm": ("ppm", "UCUM", "parts per million"), "rad": ("rad", "UCUM", "radian"),
             "hz": ("Hz", "UCUM", "hertz")}
    value, scheme, meaning = codes.get(units.lower(), (units, "UCUM", units))
    entry.SetValueSchemeMeaning(value, scheme, meaning)
    node.SetVoxelValueUnits(entry)


#: what the voxels of a qsmkit output measure (a private "99QSM" coding scheme: DICOM has no
#: code for magnetic susceptibility); recorded as the node's voxel value quantity
QUANTITIES = {"chi": ("chi", "99QSM", "Magnetic susceptibility"),
              "field": ("field", "99QSM", "Magnetic field perturbation")}

#: window/level (ppm) and colour table of chi and of local fields. chi: grey, centred on 0,
#: +-0.15 ppm (the range of deep grey matter and veins at 3 T, and the usual QSM display);
#: local field: a third of that (the dipole kernel takes values in [-2/3, 1/3], so a local
#: field is about chi/3), in a diverging blue-red table where the application has it. A total
#: field (background fields of several ppm) keeps Slicer's automatic window.
DISPLAY_PRESETS = {
    "chi": {"window": 0.30, "level": 0.0, "color": "vtkMRMLColorTableNodeGrey"},
    "local_field": {"window": 0.10, "level": 0.0,
                    "color": "vtkMRMLColorTableNodeFileDivergingBlueRed.txt"},
}


def set_voxel_quantity(node, kind: str) -> None:
    """Record what the voxels measure (a key of :data:`QUANTITIES`)."""
    if not hasattr(node, "SetVoxelValueQuantity"):
        return
    entry = _slicer().vtkCodedEntry()
    entry.SetValueSchemeMeaning(*QUANTITIES[kind])
    node.SetVoxelValueQuantity(entry)


def apply_display_preset(node, preset_name: str) -> None:
    """Window/level and colour table of :data:`DISPLAY_PRESETS` on a scalar volume node (its
    display node is created when missing); the colour table only where the scene has it."""
    preset = DISPLAY_PRESETS[preset_name]
    display = node.GetDisplayNode()
    if display is None and node.GetScene() is not None:
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
    if display is None or not hasattr(display, "SetWindowLevel"):
        return
    display.SetAutoWindowLevel(0)
    display.SetWindowLevel(preset["window"], preset["level"])
    scene = node.GetScene()
    if scene is not None and scene.GetNodeByID(preset["color"]) is not None:
        display.SetAndObserveColorNodeID(preset["color"])


def mark_as(node, kind: str) -> None:
    """Mark a volume node as a chi map (``kind="chi"``) or a local field map (``"field"``), in
    ppm: units, quantity, display preset. For maps loaded from files, whose units Slicer does
    not read."""
    set_voxel_units(node, "ppm")
    set_voxel_quantity(node, kind)
    apply_display_preset(node, "chi" if kind == "chi" else "local_field")


def is_chi_map(node) -> bool:
    """Whether a volume node is a chi map: a one-component scalar volume (not a label map)
    whose voxel value units are ppm and whose recorded quantity, if any, is chi. Field maps
    (also ppm) carry the field quantity; a CT (HU) or an MR image (no units) is not chi."""
    if node is None or not node.IsA("vtkMRMLScalarVolumeNode") or node.IsA("vtkMRMLLabelMapVolumeNode"):
        return False
    image = node.GetImageData()
    if image is None or image.GetNumberOfScalarComponents() != 1:
        return False
    units = node.GetVoxelValueUnits() if hasattr(node, "GetVoxelValueUnits") else None
    if units is None or (units.GetCodeValue() or "").lower() != "ppm":
        return False
    quantity = node.GetVoxelValueQuantity()
    value = (quantity.GetCodeValue() or "") if quantity is not None else ""
    return value in ("", QUANTITIES["chi"][0])


def create_volume_node(scene, array, like, name: str, node=None,
                       class_name: str = "vtkMRMLScalarVolumeNode", units: str | None = None,
                       quantity: str | None = None, preset: str | None = None):
    """An output volume node (``node`` reused when given, else a new one added to ``scene``)
    holding ``array`` with exactly the geometry of the volume node ``like``. ``quantity`` (a
    key of :data:`QUANTITIES`) is recorded; ``preset`` (a key of :data:`DISPLAY_PRESETS`) is
    applied."""
    if node is None:
        if scene is None:
            scene = like.GetScene()
        if scene is None:
            raise QSMInputError("no MRML scene to add the output volume to")
        node = scene.AddNewNodeByClass(class_name, name)
    update_volume_from_array(node, array, like=like, units=units)
    if hasattr(node, "CreateDefaultDisplayNodes") and node.GetScene() is not None:
        node.CreateDefaultDisplayNodes()
    if quantity:
        set_voxel_quantity(node, quantity)
    if preset:
        apply_display_preset(node, preset)
    return node


def same_geometry(a, b, atol: float = 0.0) -> bool:
    """True when two volume nodes have the same dimensions and IJK-to-RAS (within ``atol``)."""
    return (tuple(_image_data(a).GetDimensions()) == tuple(_image_data(b).GetDimensions())
            and np.allclose(ijk_to_ras(a), ijk_to_ras(b), rtol=0, atol=atol))


# ---------------------------------------------------------------- segmentations

def segment_ids(segmentation_node) -> list:
    """Segment IDs in the segmentation's order."""
    seg = segmentation_node.GetSegmentation()
    return [seg.GetNthSegmentID(i) for i in range(seg.GetNumberOfSegments())]


def segment_names(segmentation_node) -> dict:
    """Segment ID -> segment name."""
    seg = segmentation_node.GetSegmentation()
    return {sid: seg.GetSegment(sid).GetName() for sid in segment_ids(segmentation_node)}


def _reference_node(segmentation_node, reference_node):
    if reference_node is not None:
        return reference_node
    slicer = _slicer()
    role = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
    ref = segmentation_node.GetNodeReference(role)
    if ref is None:
        raise QSMInputError(f"segmentation {_node_name(segmentation_node)!r} has no reference "
                            "volume: give the volume whose voxel grid the masks should use")
    return ref


def _ensure_labelmaps(segmentation_node):
    slicer = _slicer()
    name = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
    if segmentation_node.GetSegmentation().ContainsRepresentation(name):
        return
    if not segmentation_node.CreateBinaryLabelmapRepresentation():
        raise QSMInputError(f"segmentation {_node_name(segmentation_node)!r} has no binary "
                            "labelmap and none could be made from its other representations")


def segment_mask(segmentation_node, segment_id, reference_node=None) -> np.ndarray:
    """One segment as a boolean ``(I, J, K)`` mask on the reference volume's voxel grid
    (nearest neighbour; parent transforms of both nodes applied; outside the segment's own
    extent is False)."""
    import vtk

    slicer = _slicer()
    ref = _reference_node(segmentation_node, reference_node)
    ref_image = _image_data(ref)
    _ensure_labelmaps(segmentation_node)
    if segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
        raise QSMInputError(f"segmentation {_node_name(segmentation_node)!r} has no segment "
                            f"{segment_id!r}")
    geometry_ref = slicer.vtkOrientedImageData()
    geometry_ref.SetExtent(ref_image.GetExtent())
    m = vtk.vtkMatrix4x4()
    ref.GetIJKToRASMatrix(m)
    geometry_ref.SetImageToWorldMatrix(m)
    labelmap = slicer.vtkOrientedImageData()
    segmentation_node.GetBinaryLabelmapRepresentation(segment_id, labelmap)
    dims = ref_image.GetDimensions()
    if labelmap.GetPointData() is None or labelmap.GetPointData().GetScalars() is None:
        return np.zeros(dims, dtype=bool)  # an empty segment
    seg_to_ref = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(
        segmentation_node.GetParentTransformNode(), ref.GetParentTransformNode(), seg_to_ref)
    resampled = slicer.vtkOrientedImageData()
    slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
        labelmap, geometry_ref, resampled, False, False, seg_to_ref)
    if tuple(resampled.GetDimensions()) != tuple(dims):
        raise QSMInputError(f"segment {segment_id!r} could not be resampled onto "
                            f"{_node_name(ref)!r}")
    flat = _numpy_support().vtk_to_numpy(resampled.GetPointData().GetScalars())
    return np.array(flat.reshape(tuple(reversed(dims))).transpose(2, 1, 0) > 0)


def segment_masks(segmentation_node, reference_node=None, segments=None) -> dict:
    """Segment name -> boolean ``(I, J, K)`` mask on the reference volume's grid, in the
    segmentation's order. ``segments`` restricts to these IDs or names."""
    names = segment_names(segmentation_node)
    wanted = None if segments is None else {str(s) for s in segments}
    out = {}
    for sid, name in names.items():
        if wanted is not None and sid not in wanted and name not in wanted:
            continue
        if name in out:
            raise QSMInputError(f"segmentation {_node_name(segmentation_node)!r} has two "
                                f"segments named {name!r}")
        out[name] = segment_mask(segmentation_node, sid, reference_node)
    return out


def regions_from_segmentation(segmentation_node, reference_node=None) -> list:
    """The segments as :class:`qsmkit.stats.Region` (label = order from 1, name = segment
    name); overlapping segments keep all their voxels."""
    from .stats import Region

    masks = segment_masks(segmentation_node, reference_node)
    return [Region(i, name, mask) for i, (name, mask) in enumerate(masks.items(), start=1)]


def label_map_from_segmentation(segmentation_node, reference_node=None):
    """An integer label map on the reference grid (segment order from 1; where segments
    overlap the later one wins) and label -> name. Returns (labels, names, overlap_voxels)."""
    regions = regions_from_segmentation(segmentation_node, reference_node)
    ref = _reference_node(segmentation_node, reference_node)
    labels = np.zeros(_image_data(ref).GetDimensions(), dtype=np.int32)
    covered = np.zeros(labels.shape, dtype=np.int32)
    for r in regions:
        labels[r.mask] = r.label
        covered += r.mask
    return labels, {r.label: r.name for r in regions}, int(np.count_nonzero(covered > 1))


# ---------------------------------------------------------------- statistics

#: the Segment Statistics plugin's measurements, in the order it reports them
CHI_MEASUREMENTS = ("chi_mean", "chi_sd", "chi_median", "chi_mean_ref")


def chi_segment_measurements(chi, mask, reference_mask=None) -> dict:
    """chi statistics of one segment (ppm): mean, sample SD, median, voxel count and the mean
    relative to a reference region's mean (``chi_mean_ref``; NaN without a reference).

    Pure numpy: the Segment Statistics plugin calls it with the chi volume's array and masks
    from :func:`segment_mask`. An empty segment gives NaN statistics and 0 voxels; an empty
    reference is an error, since every referenced value would be meaningless.
    """
    from .stats import region_row

    chi = np.asarray(chi, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != chi.shape[:3]:
        raise QSMInputError(f"segment mask {mask.shape} does not match chi {chi.shape}")
    ref_mean = float("nan")
    if reference_mask is not None:
        reference_mask = np.asarray(reference_mask, dtype=bool)
        if reference_mask.shape != chi.shape[:3]:
            raise QSMInputError(f"reference mask {reference_mask.shape} does not match chi "
                                f"{chi.shape}")
        if not reference_mask.any():
            raise QSMInputError("the reference segment has no voxels on the chi map's grid")
        ref_mean = float(chi[reference_mask].mean())
    values = chi[mask]
    if values.size == 0:
        return {"voxels": 0, "chi_mean": float("nan"), "chi_sd": float("nan"),
                "chi_median": float("nan"), "chi_mean_ref": float("nan")}
    row = region_row(values, 1.0)
    return {"voxels": row["voxels"], "chi_mean": row["mean"], "chi_sd": row["sd"],
            "chi_median": row["median"], "chi_mean_ref": row["mean"] - ref_mean}


def segment_statistics(chi_node, segmentation_node, reference=None, erode_mm: float = 0.0) -> list:
    """The ``qsmkit stats`` table for a chi volume node and a segmentation node: one row per
    segment (columns :data:`qsmkit.stats.COLUMNS`), referenced to the segment named (or
    numbered) ``reference``."""
    from .stats import roi_table

    chi = volume_arrays(chi_node)
    if chi.data.ndim != 3:
        raise QSMInputError(f"chi map must be 3-D, got shape {chi.data.shape}")
    regions = regions_from_segmentation(segmentation_node, chi_node)
    return roi_table(chi.data, regions, chi.voxel_size, reference=reference, erode_mm=erode_mm)


# ---------------------------------------------------------------- the pipeline on nodes

def run_pipeline_on_nodes(magnitude, phase, te, b0, mask=None, config=None, b0_world=None,
                          progress=None):
    """:func:`qsmkit.ras_order.run_pipeline_in_ras_order` on volume nodes, in this process (the Slicer
    modules run the same computation as ``qsmkit run`` in a background process). ``magnitude``
    and ``phase``: a volume node, a sequence node or a list of nodes (one per echo); ``mask``:
    an optional volume node. Returns (PipelineResult, VolumeArrays of the phase)."""
    from . import units
    from .ras_order import run_pipeline_in_ras_order

    mag = volume_arrays(magnitude)
    pha = volume_arrays(phase)
    if not geometry.same_grid(mag.affine, mag.shape3, pha.affine, pha.shape3):
        raise QSMInputError("magnitude and phase are not on the same voxel grid")
    mask_data = None
    if mask is not None:
        m = volume_arrays(mask)
        if not geometry.same_grid(m.affine, m.shape3, pha.affine, pha.shape3):
            raise QSMInputError("the mask is not on the phase's voxel grid")
        mask_data = m.data > 0
    te_list = [float(t) for t in np.atleast_1d(te)]
    result = run_pipeline_in_ras_order(mag.data, units.rescale_phase(pha.data), te_list, float(b0),
                                       pha.affine, b0_world=b0_world, mask=mask_data,
                                       config=config, progress=progress)[0]
    return result, pha
