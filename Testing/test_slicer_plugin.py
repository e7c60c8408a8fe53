"""The chi Segment Statistics plugin's computation on real MRML (slicer-core).

The plugin subclasses Slicer's SegmentStatisticsPluginBase, which needs the Slicer application
(Qt). Here a minimal stand-in for that base class (the same parameter-node conventions: plugin
keys ``<Class>.<key>.enabled``, inputs in the "Segmentation" and "ScalarVolume" parameters) lets
the plugin's own code run against a real scene, segmentation and chi volume.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from qsmkit import geometry
from qsmkit import slicer_adapter as sa

REPO = Path(__file__).resolve().parents[1]
try:
    import slicer
    import vtk
except ImportError as err:  # slicer-core missing or broken: say which, and skip
    pytest.skip(f"needs real MRML from the PyPI package slicer-core (pip install slicer-core): {err}",
                allow_module_level=True)


class FakePluginBase:
    """What ChiStatisticsPlugin uses of SegmentStatisticsPluginBase, without Qt."""

    def __init__(self):
        self.name, self.keys, self.defaultKeys = "", [], []
        self.parameterNode = None

    @staticmethod
    def createCodedEntry(codeValue, codingScheme, codeMeaning, returnAsString=False):
        return f"{codeValue}|{codingScheme}|{codeMeaning}"

    @staticmethod
    def createMeasurementInfo(name, description, units, **codes):
        return {"name": name, "description": description, "units": units, **codes}

    def toLongKey(self, key):
        return f"{self.__class__.__name__}.{key}"

    def setDefaultParameters(self, parameterNode, overwriteExisting=False):
        for key in self.keys:
            if overwriteExisting or not parameterNode.GetParameter(self.toLongKey(key) + ".enabled"):
                parameterNode.SetParameter(self.toLongKey(key) + ".enabled",
                                           str(key in self.defaultKeys))

    def getParameterNode(self):
        return self.parameterNode

    def getRequestedKeys(self):
        return [k for k in self.keys
                if self.parameterNode.GetParameter(self.toLongKey(k) + ".enabled") == "True"]


@pytest.fixture
def plugin_env(monkeypatch):
    scene = slicer.vtkMRMLScene()
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    monkeypatch.setitem(sys.modules, "qt", mock.MagicMock())
    monkeypatch.setitem(sys.modules, "SegmentStatisticsPlugins",
                        types.SimpleNamespace(SegmentStatisticsPluginBase=FakePluginBase))
    monkeypatch.syspath_prepend(str(REPO / "QSMExtension" / "QSM"))
    sys.modules.pop("QSMLib.ChiStatisticsPlugin", None)
    from QSMLib.ChiStatisticsPlugin import ChiStatisticsPlugin

    yield scene, ChiStatisticsPlugin
    sys.modules.pop("QSMLib.ChiStatisticsPlugin", None)
    scene.Clear(1)


def labelmap(mask, affine):
    img = slicer.vtkOrientedImageData()
    img.SetDimensions(*mask.shape)
    img.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    vtk.util.numpy_support.vtk_to_numpy(img.GetPointData().GetScalars())[:] = \
        mask.astype(np.uint8).transpose(2, 1, 0).ravel()
    img.SetImageToWorldMatrix(slicer.util.vtkMatrixFromArray(affine))
    return img


def test_plugin_computes_referenced_chi_statistics(plugin_env):
    scene, ChiStatisticsPlugin = plugin_env
    affine = geometry.make_affine((1.0, 1.0, 2.0), rotation=geometry.rotation_matrix(0, 20.0))
    rng = np.random.default_rng(5)
    chi = rng.normal(0.0, 0.03, (14, 12, 8)).astype(np.float32)
    chi_node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "chi")
    sa.update_volume_from_array(chi_node, chi, affine=affine)
    gp = np.zeros(chi.shape, bool)
    gp[2:6, 2:6, 1:4] = True
    csf = np.zeros(chi.shape, bool)
    csf[8:13, 3:10, 2:7] = True
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    gp_id = seg.AddSegmentFromBinaryLabelmapRepresentation(labelmap(gp, affine), "globus pallidus",
                                                           [1, 0, 0])
    csf_id = seg.AddSegmentFromBinaryLabelmapRepresentation(labelmap(csf, affine), "CSF", [0, 0, 1])

    plugin = ChiStatisticsPlugin()
    assert plugin.keys == list(sa.CHI_MEASUREMENTS)
    params = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "SegmentStatistics")
    params.SetParameter("Segmentation", seg.GetID())
    params.SetParameter("ScalarVolume", chi_node.GetID())
    plugin.parameterNode = params
    plugin.setDefaultParameters(params)
    assert params.GetParameter("ChiStatisticsPlugin.referenceSegment") == "CSF"

    got = plugin.computeStatistics(gp_id)
    values, ref = chi[gp].astype(np.float64), chi[csf].astype(np.float64)
    assert got["chi_mean"] == pytest.approx(values.mean())
    assert got["chi_sd"] == pytest.approx(values.std(ddof=1))
    assert got["chi_median"] == pytest.approx(np.median(values))
    assert got["chi_mean_ref"] == pytest.approx(values.mean() - ref.mean())
    assert plugin.computeStatistics(csf_id)["chi_mean_ref"] == pytest.approx(0.0, abs=1e-12)

    # the reference is matched case-insensitively; an unknown one leaves chi_mean_ref out
    params.SetParameter("ChiStatisticsPlugin.referenceSegment", "csf")
    assert "chi_mean_ref" in plugin.computeStatistics(gp_id)
    params.SetParameter("ChiStatisticsPlugin.referenceSegment", "white matter")
    got = plugin.computeStatistics(gp_id)
    assert "chi_mean_ref" not in got and got["chi_mean"] == pytest.approx(values.mean())

    # only the requested measurements
    params.SetParameter("ChiStatisticsPlugin.chi_sd.enabled", "False")
    assert "chi_sd" not in plugin.computeStatistics(gp_id)
    info = plugin.getMeasurementInfo("chi_mean_ref")
    assert info["units"] == "ppm" and "white matter" in info["name"]
    assert plugin.getMeasurementInfo("nope") is None
