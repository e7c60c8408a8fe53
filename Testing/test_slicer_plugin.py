"""The chi Segment Statistics plugin inside Slicer's real Segment Statistics logic.

``SegmentStatisticsLogic``, ``SegmentStatisticsPluginBase`` and the core plugins are Slicer's own
(v5.12.3 sources in ../shared/slicer-reference), run on real MRML (slicer-core): the plugin is
registered the way the QSM module registers it at start-up, the logic builds its options and
parameter node, computes every plugin on a real segmentation and volume, and exports the table.
The chi numbers are checked against numpy on the same voxels and against the core Scalar Volume
plugin (vtkImageAccumulate, an independent implementation). Volumes that are not chi maps, a
Slicer whose Python lacks nibabel (or qsmkit altogether), and a failure inside the plugin must
leave Segment Statistics working and add no chi column.
"""

from __future__ import annotations

import importlib.abc
import sys

import numpy as np
import pytest

import slicer_reference

slicer_reference.skip_unless_available()

from qsmkit import geometry  # noqa: E402
from qsmkit import slicer_adapter as sa  # noqa: E402

CHI_KEYS = [f"ChiStatisticsPlugin.{k}" for k in sa.CHI_MEASUREMENTS]


@pytest.fixture
def env(monkeypatch):
    """Slicer's Segment Statistics with the plugin registered as QSM does it at start-up."""
    slicer = slicer_reference.load()
    import SegmentStatistics

    import QSM

    logic_cls = SegmentStatistics.SegmentStatisticsLogic
    monkeypatch.setattr(logic_cls, "registeredPlugins", list(logic_cls.registeredPlugins))
    QSM.registerSegmentStatisticsPlugin()
    assert logic_cls.registeredPlugins[-1].__name__ == "ChiStatisticsPlugin"
    return slicer, logic_cls


def labelmap(slicer, mask, affine):
    import vtk
    from vtk.util import numpy_support

    img = slicer.vtkOrientedImageData()
    img.SetDimensions(*mask.shape)
    img.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(img.GetPointData().GetScalars())[:] = \
        mask.astype(np.uint8).transpose(2, 1, 0).ravel()
    img.SetImageToWorldMatrix(slicer.util.vtkMatrixFromArray(affine))
    return img


@pytest.fixture
def data(env):
    """An oblique chi map (ppm, chi quantity, as the QSM modules write it) and a segmentation
    with a globus pallidus and a CSF segment."""
    slicer, _ = env
    scene = slicer.mrmlScene
    affine = geometry.make_affine((1.0, 1.0, 2.0), rotation=geometry.rotation_matrix(0, 20.0))
    rng = np.random.default_rng(5)
    chi = rng.normal(0.0, 0.03, (14, 12, 8)).astype(np.float32)
    chi_node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "chi")
    sa.update_volume_from_array(chi_node, chi, affine=affine, units="ppm")
    sa.set_voxel_quantity(chi_node, "chi")
    gp = np.zeros(chi.shape, bool)
    gp[2:6, 2:6, 1:4] = True
    csf = np.zeros(chi.shape, bool)
    csf[8:13, 3:10, 2:7] = True
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    seg.CreateDefaultDisplayNodes()
    ids = {"gp": seg.AddSegmentFromBinaryLabelmapRepresentation(labelmap(slicer, gp, affine),
                                                                 "globus pallidus", [1, 0, 0]),
           "csf": seg.AddSegmentFromBinaryLabelmapRepresentation(labelmap(slicer, csf, affine),
                                                                  "CSF", [0, 0, 1])}
    return {"chi": chi, "chi_node": chi_node, "seg": seg, "ids": ids, "gp": gp, "csf": csf,
            "affine": affine}


def run(logic_cls, seg, volume):
    """What the Segment Statistics module's Apply does: a new logic, inputs, compute."""
    logic = logic_cls()
    params = logic.getParameterNode()
    params.SetParameter("Segmentation", seg.GetID())
    params.SetParameter("ScalarVolume", volume.GetID())
    logic.computeStatistics()
    return logic, logic.getStatistics()


def test_chi_statistics_in_slicers_segment_statistics(env, data):
    slicer, logic_cls = env
    logic, stats = run(logic_cls, data["seg"], data["chi_node"])
    params = logic.getParameterNode()
    assert params.GetParameter("ChiStatisticsPlugin.enabled") == "True"  # enabled by default
    assert params.GetParameter("ChiStatisticsPlugin.referenceSegment") == "CSF"
    gp, csf = data["ids"]["gp"], data["ids"]["csf"]
    values = data["chi"][data["gp"]].astype(np.float64)
    ref = data["chi"][data["csf"]].astype(np.float64)
    assert stats[gp, "ChiStatisticsPlugin.chi_mean"] == pytest.approx(values.mean(), abs=1e-9)
    assert stats[gp, "ChiStatisticsPlugin.chi_sd"] == pytest.approx(values.std(ddof=1), abs=1e-9)
    assert stats[gp, "ChiStatisticsPlugin.chi_median"] == pytest.approx(np.median(values), abs=1e-9)
    assert stats[gp, "ChiStatisticsPlugin.chi_mean_ref"] == pytest.approx(values.mean() - ref.mean(),
                                                                          abs=1e-9)
    assert stats[csf, "ChiStatisticsPlugin.chi_mean_ref"] == pytest.approx(0.0, abs=1e-12)
    # the core Scalar Volume plugin (vtkImageAccumulate) on the same voxels agrees
    for sid, mask in ((gp, data["gp"]), (csf, data["csf"])):
        assert stats[sid, "ScalarVolumeSegmentStatisticsPlugin.voxel_count"] == mask.sum()
        assert stats[sid, "ChiStatisticsPlugin.chi_mean"] == pytest.approx(
            stats[sid, "ScalarVolumeSegmentStatisticsPlugin.mean"], abs=1e-7)

    # the measurement info Slicer builds its columns from: name, translated title, units
    for key in CHI_KEYS:
        info = logic.getMeasurementInfo(key)
        assert info["name"] and info["title"] and info["units"] == "ppm", key
        assert "DICOM.UnitsCode" in info
    assert "CSF" in logic.getMeasurementInfo("ChiStatisticsPlugin.chi_mean_ref")["title"]
    assert logic.getMeasurementInfo("ChiStatisticsPlugin.nope") is None
    table = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode")
    logic.exportToTable(table)
    names, titles = logic.getColumnNamesTitles()
    assert [names[k] for k in CHI_KEYS] == ["chi mean", "chi SD", "chi median",
                                            "chi mean relative to reference"]
    column = table.GetTable().GetColumnByName("chi mean")
    assert column is not None and table.GetColumnUnitLabel("chi mean") == "ppm"
    row = stats["SegmentIDs"].index(gp)
    assert column.GetValue(row) == pytest.approx(values.mean(), abs=1e-9)

    # reference matched case-insensitively; an unknown one leaves chi_mean_ref out
    params.SetParameter("ChiStatisticsPlugin.referenceSegment", "csf")
    logic.computeStatistics()
    assert (gp, "ChiStatisticsPlugin.chi_mean_ref") in logic.getStatistics()
    params.SetParameter("ChiStatisticsPlugin.referenceSegment", "white matter")
    logic.computeStatistics()
    stats = logic.getStatistics()
    assert (gp, "ChiStatisticsPlugin.chi_mean_ref") not in stats
    assert stats[gp, "ChiStatisticsPlugin.chi_mean"] == pytest.approx(values.mean(), abs=1e-9)
    # only the requested measurements
    params.SetParameter("ChiStatisticsPlugin.chi_sd.enabled", "False")
    logic.computeStatistics()
    assert (gp, "ChiStatisticsPlugin.chi_sd") not in logic.getStatistics()


@pytest.mark.parametrize("kind", ["ct_hu", "mr_no_units", "field_ppm", "label_map"])
def test_volumes_that_are_not_chi_add_nothing(env, data, kind):
    slicer, logic_cls = env
    scene = slicer.mrmlScene
    cls = "vtkMRMLLabelMapVolumeNode" if kind == "label_map" else "vtkMRMLScalarVolumeNode"
    node = scene.AddNewNodeByClass(cls, kind)
    values = (data["chi"] * 1000 + 40).astype(np.int16) if kind == "ct_hu" else data["chi"]
    sa.update_volume_from_array(node, values, affine=data["affine"],
                                units={"ct_hu": "[hnsu]", "field_ppm": "ppm",
                                       "label_map": "ppm"}.get(kind))
    if kind == "field_ppm":
        sa.set_voxel_quantity(node, "field")
    assert not sa.is_chi_map(node)
    logic, stats = run(logic_cls, data["seg"], node)
    gp = data["ids"]["gp"]
    assert not [k for k in stats if isinstance(k, tuple) and k[1].startswith("ChiStatistics")]
    if kind != "label_map":  # Segment Statistics itself still works
        assert stats[gp, "ScalarVolumeSegmentStatisticsPlugin.mean"] == pytest.approx(
            float(values[data["gp"]].astype(np.float64).mean()), abs=1e-5)
    names, _titles = logic.getColumnNamesTitles()
    assert not any(k.startswith("ChiStatistics") for k in names)


class _Blocker(importlib.abc.MetaPathFinder):
    """Makes the named top-level packages unimportable, as in a Slicer without them."""

    def __init__(self, names):
        self.names = set(names)

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.names:
            raise ImportError(f"No module named {fullname!r} (blocked by the test)")
        return None


def block(monkeypatch, *names):
    monkeypatch.setattr(sys, "meta_path", [_Blocker(names), *sys.meta_path])
    for mod in list(sys.modules):
        if mod.split(".")[0] in {*names, "qsmkit"}:  # qsmkit re-imported without them
            monkeypatch.delitem(sys.modules, mod)


def test_without_nibabel_scipy_numba_the_plugin_still_measures(env, data, monkeypatch):
    """Before qsmkit's dependencies are installed: the plugin needs only numpy."""
    _slicer, logic_cls = env
    block(monkeypatch, "nibabel", "scipy", "numba", "skimage", "matplotlib")
    with pytest.raises(ImportError):
        import nibabel  # noqa: F401
    _logic, stats = run(logic_cls, data["seg"], data["chi_node"])
    assert "nibabel" not in sys.modules and "qsmkit.io" not in sys.modules
    gp = data["ids"]["gp"]
    values = data["chi"][data["gp"]].astype(np.float64)
    assert stats[gp, "ChiStatisticsPlugin.chi_mean"] == pytest.approx(values.mean(), abs=1e-9)


def test_without_qsmkit_or_with_a_failure_segment_statistics_still_works(env, data, monkeypatch,
                                                                        caplog):
    _slicer, logic_cls = env
    gp = data["ids"]["gp"]
    with monkeypatch.context() as m:
        block(m, "qsmkit")
        _logic, stats = run(logic_cls, data["seg"], data["chi_node"])
    assert (gp, "ChiStatisticsPlugin.chi_mean") not in stats
    assert (gp, "ScalarVolumeSegmentStatisticsPlugin.mean") in stats

    def broken(*args, **kwargs):
        raise RuntimeError("resampling failed")

    monkeypatch.setattr(sa, "segment_mask", broken)
    with caplog.at_level("WARNING"):
        _logic, stats = run(logic_cls, data["seg"], data["chi_node"])
    assert (gp, "ChiStatisticsPlugin.chi_mean") not in stats
    assert (gp, "ScalarVolumeSegmentStatisticsPlugin.mean") in stats
    assert "resampling failed" in caplog.text


def test_a_chi_map_from_a_file_is_measured_once_marked(env, data):
    """Slicer reads no units from NIfTI: a chi map loaded from a qsmkit output file is not
    measured until ``QSMLogic.markAsChiMap`` records them (and applies the chi preset)."""
    slicer, logic_cls = env
    import QSM

    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "chi from file")
    sa.update_volume_from_array(node, data["chi"], affine=data["affine"])
    gp = data["ids"]["gp"]
    _logic, stats = run(logic_cls, data["seg"], node)
    assert (gp, "ChiStatisticsPlugin.chi_mean") not in stats
    QSM.QSMLogic.markAsChiMap(node)
    display = node.GetDisplayNode()
    assert display.GetWindow() == pytest.approx(0.30) and display.GetLevel() == 0
    _logic, stats = run(logic_cls, data["seg"], node)
    values = data["chi"][data["gp"]].astype(np.float64)
    assert stats[gp, "ChiStatisticsPlugin.chi_mean"] == pytest.approx(values.mean(), abs=1e-9)
