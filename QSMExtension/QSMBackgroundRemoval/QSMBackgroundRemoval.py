"""QSM Background Removal: total field -> local (tissue) field, as a 3D Slicer module.

The background-removal stage of the QSM module on its own: PDF (projection onto dipole fields,
the default), V-SHARP or RESHARP on a total field map (ppm, Hz or rad) inside a brain mask.
It runs ``qsmkit background`` in a background process (progress, log, Cancel).

From the Python console::

    logic = slicer.util.getModuleLogic("QSMBackgroundRemoval")
    nodes = logic.removeBackground(fieldNode, maskNode, method="pdf", weights=magnitudeNode)
    localField, localMask = nodes["field_local"], nodes["local_mask"]
"""

from typing import Annotated

import slicer
from QSMLib.stagewidget import StageWidgetMixin
from slicer import vtkMRMLLabelMapVolumeNode, vtkMRMLScalarVolumeNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from QSM import BACKGROUND_CHOICES, DEVICE_CHOICES, FIELD_UNITS_CHOICES, QSMLogic

try:
    from slicer.i18n import tr as _
except ImportError:  # Slicer before 5.4
    def _(text):
        return text


class QSMBackgroundRemoval(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("QSM Background Removal")
        self.parent.categories = [_("Quantification.QSM stages")]
        self.parent.dependencies = ["QSM"]
        self.parent.contributors = ["QSMExtension developers"]
        self.parent.helpText = _("""
Background field removal: from the total field map inside a brain mask to the local field of
the tissue. PDF (projection onto dipole fields, Liu et al. NMR Biomed 2011) is the default;
V-SHARP and RESHARP are the alternatives. A magnitude or weight map makes PDF noise-weighted.
See the <a href="https://github.com/QSMExtension/QSMExtension#readme">documentation</a>.
""")
        self.parent.acknowledgementText = _("Part of QSMExtension; the numerics are qsmkit's.")


@parameterNodeWrapper
class QSMBackgroundRemovalParameterNode:
    """totalField - field map (units in fieldUnits); brainMask - where it is known;
    weights - optional magnitude or weight map (larger = more reliable);
    fieldUnits, fieldStrengthT, echoTimeMs - to convert Hz or rad to ppm;
    method, parameters ("key=value ..."), device; localField, localMask - outputs."""

    totalField: vtkMRMLScalarVolumeNode
    brainMask: vtkMRMLScalarVolumeNode
    weights: vtkMRMLScalarVolumeNode
    fieldUnits: Annotated[str, Choice(FIELD_UNITS_CHOICES)] = "ppm"
    fieldStrengthT: Annotated[float, WithinRange(0.1, 21.1)] = 3.0
    echoTimeMs: Annotated[float, WithinRange(0.01, 1000.0)] = 20.0
    method: Annotated[str, Choice(BACKGROUND_CHOICES)] = "auto"
    parameters: str = ""
    device: Annotated[str, Choice(DEVICE_CHOICES)] = "auto"
    localField: vtkMRMLScalarVolumeNode
    localMask: vtkMRMLLabelMapVolumeNode


class QSMBackgroundRemovalWidget(StageWidgetMixin, ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel; StageWidgetMixin (first, so its cleanup/enter/exit override the base's) holds
    the parameter-node plumbing and the job runner."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.initPanel()

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/QSMBackgroundRemoval.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = QSMBackgroundRemovalLogic()
        self.startPanel("QSM Background Removal")

    def _ready(self) -> bool:
        p = self._parameterNode
        return bool(p and p.totalField and p.brainMask)

    def onJobDone(self, job, nodes) -> None:
        self._parameterNode.localField = nodes["field_local"]
        self._parameterNode.localMask = nodes["local_mask"]
        slicer.util.setSliceViewerLayers(background=nodes["field_local"], fit=True)
        self.logic.showColorLegend(nodes["field_local"])


class QSMBackgroundRemovalLogic(QSMLogic, ScriptedLoadableModuleLogic):
    """QSMLogic's background-removal call (:meth:`QSMLogic.removeBackground`) driven by this
    module's parameters; every other QSMLogic call is available too."""

    def getParameterNode(self):
        return QSMBackgroundRemovalParameterNode(ScriptedLoadableModuleLogic.getParameterNode(self))

    def startFromParameterNode(self, p, onLine=None, onProgress=None):
        return self.removeBackground(
            p.totalField, p.brainMask, method=p.method, weights=p.weights, parameters=p.parameters,
            fieldUnits=p.fieldUnits, fieldStrength=p.fieldStrengthT,
            echoTimes=[p.echoTimeMs / 1000.0] if p.fieldUnits == "rad" else None,
            device=p.device, output=p.localField, outputMask=p.localMask, wait=False,
            onLine=onLine, onProgress=onProgress)


class QSMBackgroundRemovalTest(ScriptedLoadableModuleTest):
    """Inside Slicer (Developer mode: Reload and Test): PDF on the phantom's true total field,
    through the module's background process, equals qsmkit run in-process on the same arrays."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_QSMBackgroundRemoval_matches_qsmkit()

    def test_QSMBackgroundRemoval_matches_qsmkit(self):
        import numpy as np

        from qsmkit import slicer_adapter
        from qsmkit.background import BACKGROUND

        logic = QSMBackgroundRemovalLogic()
        self.delayDisplay("Simulating the phantom")
        nodes = logic.loadPhantomVolumes(shape=(64, 64, 32), voxelSize=(3.75, 3.75, 5.0),
                                         stems=("field_total_true", "mask_true", "field_local_true"))
        self.delayDisplay("Removing the background field")
        out = logic.removeBackground(nodes["field_total_true"], nodes["mask_true"], method="pdf")
        field = slicer_adapter.array_from_volume(nodes["field_total_true"])
        mask = slicer_adapter.array_from_volume(nodes["mask_true"]) > 0
        vox = slicer_adapter.voxel_size(nodes["field_total_true"])
        b0 = slicer_adapter.b0_direction(nodes["field_total_true"])
        expected, valid, _info = BACKGROUND.get("pdf").func(field.astype(np.float32), mask, vox, b0)
        local = slicer_adapter.array_from_volume(out["field_local"])
        self.assertTrue(slicer_adapter.same_geometry(out["field_local"], nodes["field_total_true"]))
        self.assertTrue(np.allclose(local, np.asarray(expected), atol=1e-6))
        self.delayDisplay("Test passed")
