"""QSM Coil Combination: channel images of a receive array -> one magnitude and phase per echo,
as a 3D Slicer module.

With a body-coil image: the body-coil referenced combination (polynomial sensitivity
magnitudes, smoothed sensitivity phases, least-squares combination). Without one: MCPC-3D-S
(two or more echoes) or the adaptive combination (one echo). Phase-of-sum is there as the
baseline that shows why: it leaves phase singularities. It runs ``qsmkit combine`` in a
background process (progress, log, Cancel).

Channel images are a sequence (or multi-volume) of echoes x channels items, all channels of the
first echo first; the combined outputs hold one component per echo, ready for the QSM module.

From the Python console::

    logic = slicer.util.getModuleLogic("QSMCoilCombination")
    nodes = logic.combineCoils(magSequence, phaseSequence, numberOfEchoes=2,
                               echoTimes=[0.005, 0.010])
    magnitude, phase = nodes["magnitude"], nodes["phase"]
"""

from typing import Annotated, Optional, Union

import slicer
from QSMLib.stagewidget import StageWidgetMixin
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSequenceNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from QSM import QSMLogic

try:
    from slicer.i18n import tr as _
except ImportError:  # Slicer before 5.4
    def _(text):
        return text

# Names qsmkit.coils knows (Testing/test_slicer_static.py checks it).
COMBINATION_CHOICES = ["auto", "bodycoil", "mcpc3ds", "aspire", "adaptive", "phase_of_sum"]


class QSMCoilCombination(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("QSM Coil Combination")
        self.parent.categories = [_("Quantification.QSM stages")]
        self.parent.dependencies = ["QSM"]
        self.parent.contributors = ["QSMExtension developers"]
        self.parent.helpText = _("""
Coil combination: from the images of each receive channel to one magnitude and phase per echo,
without the open-ended fringe lines and phase singularities of a naive combination. auto uses
the body-coil referenced method when a body-coil image is given, MCPC-3D-S (Eckstein et al.
MRM 2018) for two or more echoes, otherwise the adaptive combination (Walsh et al. MRM 2000).
See the <a href="https://github.com/QSMExtension/QSMExtension#readme">documentation</a>.
""")
        self.parent.acknowledgementText = _("Part of QSMExtension; the numerics are qsmkit's.")


@parameterNodeWrapper
class QSMCoilCombinationParameterNode:
    """channelMagnitude, channelPhase - echoes x channels items (echo-major); bodyMagnitude,
    bodyPhase - optional body-coil image (one item per echo); numberOfEchoes; echoTimesMs
    ("5, 10"); method, parameters ("key=value ..."); combinedMagnitude, combinedPhase - outputs."""

    channelMagnitude: Optional[Union[vtkMRMLScalarVolumeNode, vtkMRMLSequenceNode]]
    channelPhase: Optional[Union[vtkMRMLScalarVolumeNode, vtkMRMLSequenceNode]]
    bodyMagnitude: Optional[Union[vtkMRMLScalarVolumeNode, vtkMRMLSequenceNode]]
    bodyPhase: Optional[Union[vtkMRMLScalarVolumeNode, vtkMRMLSequenceNode]]
    numberOfEchoes: Annotated[int, WithinRange(1, 64)] = 1
    echoTimesMs: str = ""
    method: Annotated[str, Choice(COMBINATION_CHOICES)] = "auto"
    parameters: str = ""
    combinedMagnitude: vtkMRMLScalarVolumeNode
    combinedPhase: vtkMRMLScalarVolumeNode


class QSMCoilCombinationWidget(StageWidgetMixin, ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel; StageWidgetMixin (first, so its cleanup/enter/exit override the base's) holds
    the parameter-node plumbing and the job runner."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.initPanel()

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/QSMCoilCombination.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = QSMCoilCombinationLogic()
        self.startPanel("QSM Coil Combination")

    def _ready(self) -> bool:
        p = self._parameterNode
        return bool(p and p.channelMagnitude and p.channelPhase
                    and (p.bodyMagnitude is None) == (p.bodyPhase is None))

    def onJobDone(self, job, nodes) -> None:
        self._parameterNode.combinedMagnitude = nodes["magnitude"]
        self._parameterNode.combinedPhase = nodes["phase"]
        slicer.util.setSliceViewerLayers(background=nodes["phase"], fit=True)


class QSMCoilCombinationLogic(QSMLogic, ScriptedLoadableModuleLogic):
    """Coil combination as one call (:meth:`combineCoils`); every QSMLogic call is here too."""

    def getParameterNode(self):
        return QSMCoilCombinationParameterNode(ScriptedLoadableModuleLogic.getParameterNode(self))

    def combineCoils(self, magnitude, phase, bodyMagnitude=None, bodyPhase=None, numberOfEchoes=1,
                     echoTimes=None, method="auto", parameters=None, outputMagnitude=None,
                     outputPhase=None, wait=True, onLine=None, onProgress=None):
        """Channel images -> {"magnitude": node, "phase": node (rad)}. ``echoTimes`` in
        seconds (needed by MCPC-3D-S and ASPIRE)."""
        from QSMLib.jobs import combine_job

        job = combine_job(magnitude, phase, bodyMagnitude, bodyPhase, n_echoes=numberOfEchoes,
                          te=echoTimes, method=method, params=parameters,
                          output_magnitude=outputMagnitude, output_phase=outputPhase,
                          **self._jobKwargs())
        return self._run(job, wait, onLine, onProgress)

    def startFromParameterNode(self, p, onLine=None, onProgress=None):
        from QSMLib.jobs import parse_echo_times_ms

        te = parse_echo_times_ms(p.echoTimesMs) if p.echoTimesMs.strip() else None
        return self.combineCoils(p.channelMagnitude, p.channelPhase, p.bodyMagnitude, p.bodyPhase,
                                 numberOfEchoes=p.numberOfEchoes, echoTimes=te, method=p.method,
                                 parameters=p.parameters, outputMagnitude=p.combinedMagnitude,
                                 outputPhase=p.combinedPhase, wait=False, onLine=onLine,
                                 onProgress=onProgress)


class QSMCoilCombinationTest(ScriptedLoadableModuleTest):
    """Inside Slicer (Developer mode: Reload and Test): the body-coil combination of a simulated
    8-channel phantom, through the module's background process, equals qsmkit in-process."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_QSMCoilCombination_matches_qsmkit()

    def test_QSMCoilCombination_matches_qsmkit(self):
        import numpy as np

        from qsmkit import coils, slicer_adapter

        logic = QSMCoilCombinationLogic()
        self.delayDisplay("Simulating 8 channels and a body coil")
        stems = ("coils_magnitude", "coils_phase", "body_coil_magnitude", "body_coil_phase")
        nodes = logic.loadPhantomVolumes(shape=(64, 64, 32), voxelSize=(3.75, 3.75, 5.0), stems=stems,
                                         extraArgs=("--coils", "8", "--body-coil"))
        self.delayDisplay("Combining")
        out = logic.combineCoils(nodes["coils_magnitude"], nodes["coils_phase"],
                                 nodes["body_coil_magnitude"], nodes["body_coil_phase"],
                                 echoTimes=[0.02], method="bodycoil")
        arrays = {k: slicer_adapter.array_from_volume(v) for k, v in nodes.items()}
        expected = coils.combine(np.ascontiguousarray(arrays["coils_magnitude"], dtype=np.float32),
                                 np.ascontiguousarray(arrays["coils_phase"], dtype=np.float32),
                                 body=arrays["body_coil_magnitude"],
                                 body_phase=arrays["body_coil_phase"], te=[0.02], method="bodycoil",
                                 voxel_size=slicer_adapter.voxel_size(nodes["coils_magnitude"]))
        image = (slicer_adapter.array_from_volume(out["magnitude"])
                 * np.exp(1j * slicer_adapter.array_from_volume(out["phase"])))
        self.assertTrue(np.abs(image - expected.image).max() < 1e-5 * np.abs(expected.image).max())
        self.delayDisplay("Test passed")
