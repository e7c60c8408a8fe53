"""QSM Dipole Inversion: local field -> susceptibility (chi, ppm), as a 3D Slicer module.

The inversion stage of the QSM module on its own: TV with the magnitude's edges (the default),
FOCUSS-QSM with the magnitude prior, closed-form L2 (with an L-curve lambda) or TKD, on a local
field map inside a mask, optionally referenced to the whole mask or to a region such as CSF. It
runs ``qsmkit invert`` in a background process (progress, log, Cancel).

From the Python console::

    logic = slicer.util.getModuleLogic("QSMDipoleInversion")
    chi = logic.invertField(localFieldNode, maskNode, magnitude=magnitudeNode, reference="mask")
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

from QSM import DEVICE_CHOICES, FIELD_UNITS_CHOICES, INVERSION_CHOICES, QSMLogic

try:
    from slicer.i18n import tr as _
except ImportError:  # Slicer before 5.4
    def _(text):
        return text

# none: chi as the method returns it; mask: minus its mean over the mask; region: minus its
# mean over the reference label map (e.g. CSF).
REFERENCE_CHOICES = ["none", "mask", "region"]


class QSMDipoleInversion(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("QSM Dipole Inversion")
        self.parent.categories = [_("Quantification.QSM stages")]
        self.parent.dependencies = ["QSM"]
        self.parent.contributors = ["QSMExtension developers"]
        self.parent.helpText = _("""
Dipole inversion: from the local (tissue) field to the susceptibility map chi in ppm.
TV with the magnitude's edges (MEDI edge mask, weight from the field's noise) is the default;
FOCUSS-QSM with the magnitude prior, closed-form L2 (lambda=lcurve picks lambda at the L-curve
corner) and TKD are the alternatives. chi can be referenced to the mask mean or
to a region (e.g. CSF). See the
<a href="https://github.com/QSMExtension/QSMExtension#readme">documentation</a>.
""")
        self.parent.acknowledgementText = _("Part of QSMExtension; the numerics are qsmkit's.")


@parameterNodeWrapper
class QSMDipoleInversionParameterNode:
    """localField - tissue field (units in fieldUnits); brainMask - where it is valid;
    magnitude - the edge prior's image (recommended); fieldUnits, fieldStrengthT,
    echoTimeMs - to convert Hz or rad to ppm; method, parameters ("key=value ..."), device;
    reference, referenceRegion, referenceLabel - chi referencing; chiVolume - output."""

    localField: vtkMRMLScalarVolumeNode
    brainMask: vtkMRMLScalarVolumeNode
    magnitude: vtkMRMLScalarVolumeNode
    fieldUnits: Annotated[str, Choice(FIELD_UNITS_CHOICES)] = "ppm"
    fieldStrengthT: Annotated[float, WithinRange(0.1, 21.1)] = 3.0
    echoTimeMs: Annotated[float, WithinRange(0.01, 1000.0)] = 20.0
    method: Annotated[str, Choice(INVERSION_CHOICES)] = "auto"
    parameters: str = ""
    device: Annotated[str, Choice(DEVICE_CHOICES)] = "auto"
    reference: Annotated[str, Choice(REFERENCE_CHOICES)] = "none"
    referenceRegion: vtkMRMLLabelMapVolumeNode
    referenceLabel: Annotated[int, WithinRange(0, 100000)] = 0
    chiVolume: vtkMRMLScalarVolumeNode


class QSMDipoleInversionWidget(StageWidgetMixin, ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel; StageWidgetMixin (first, so its cleanup/enter/exit override the base's) holds
    the parameter-node plumbing and the job runner."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.initPanel()

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/QSMDipoleInversion.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = QSMDipoleInversionLogic()
        self.startPanel("QSM Dipole Inversion")

    def _ready(self) -> bool:
        p = self._parameterNode
        if not (p and p.localField and p.brainMask):
            return False
        return p.reference != "region" or p.referenceRegion is not None

    def updateWidgets(self) -> None:
        p = self._parameterNode
        self.ui.referenceRegionSelector.enabled = bool(p and p.reference == "region")
        self.ui.referenceLabelSpinBox.enabled = bool(p and p.reference == "region")

    def onJobDone(self, job, nodes) -> None:
        self._parameterNode.chiVolume = nodes["chi"]
        slicer.util.setSliceViewerLayers(background=nodes["chi"], fit=True)
        self.logic.showColorLegend(nodes["chi"])


class QSMDipoleInversionLogic(QSMLogic, ScriptedLoadableModuleLogic):
    """QSMLogic's inversion call (:meth:`QSMLogic.invertField`) driven by this module's
    parameters; every other QSMLogic call is available too."""

    def getParameterNode(self):
        return QSMDipoleInversionParameterNode(ScriptedLoadableModuleLogic.getParameterNode(self))

    @staticmethod
    def referenceArguments(p) -> dict:
        """invertField's reference keywords for the panel's choice (label 0: every label > 0)."""
        if p.reference == "mask":
            return {"reference": "mask"}
        if p.reference == "region":
            return {"reference": p.referenceRegion,
                    "referenceLabel": p.referenceLabel if p.referenceLabel > 0 else None}
        return {}

    def startFromParameterNode(self, p, onLine=None, onProgress=None):
        return self.invertField(
            p.localField, p.brainMask, magnitude=p.magnitude, method=p.method,
            parameters=p.parameters, fieldUnits=p.fieldUnits, fieldStrength=p.fieldStrengthT,
            echoTimes=[p.echoTimeMs / 1000.0] if p.fieldUnits == "rad" else None,
            device=p.device, output=p.chiVolume, wait=False, onLine=onLine, onProgress=onProgress,
            **self.referenceArguments(p))


class QSMDipoleInversionTest(ScriptedLoadableModuleTest):
    """Inside Slicer (Developer mode: Reload and Test): the default inversion of the phantom's true
    local field, through the module's background process, equals qsmkit run in-process on the
    same arrays."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_QSMDipoleInversion_matches_qsmkit()

    def test_QSMDipoleInversion_matches_qsmkit(self):
        import numpy as np

        from qsmkit import slicer_adapter
        from qsmkit.inversion import INVERSION

        logic = QSMDipoleInversionLogic()
        self.delayDisplay("Simulating the phantom")
        nodes = logic.loadPhantomVolumes(shape=(64, 64, 32), voxelSize=(3.75, 3.75, 5.0),
                                         stems=("field_local_true", "mask_true", "magnitude"))
        self.delayDisplay("Inverting the local field")
        chiNode = logic.invertField(nodes["field_local_true"], nodes["mask_true"],
                                    magnitude=nodes["magnitude"])
        field = slicer_adapter.array_from_volume(nodes["field_local_true"]).astype(np.float32)
        mask = slicer_adapter.array_from_volume(nodes["mask_true"]) > 0
        magnitude = slicer_adapter.array_from_volume(nodes["magnitude"]).astype(np.float32)
        vox = slicer_adapter.voxel_size(nodes["field_local_true"])
        b0 = slicer_adapter.b0_direction(nodes["field_local_true"])
        expected, _info = INVERSION.get("auto").func(field * mask, mask, vox, b0, magnitude=magnitude)
        chi = slicer_adapter.array_from_volume(chiNode)
        self.assertTrue(slicer_adapter.same_geometry(chiNode, nodes["field_local_true"]))
        self.assertTrue(np.allclose(chi, np.asarray(expected), atol=1e-5))
        self.delayDisplay("Test passed")
