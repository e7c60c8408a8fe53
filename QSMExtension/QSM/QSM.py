"""QSM: the whole Quantitative Susceptibility Mapping pipeline as a 3D Slicer module.

Magnitude and phase (single echo, a multi-echo sequence or a multi-volume) in; brain mask, total
field, local field and chi (ppm) out, as volume nodes with the input's geometry. The work runs as
the ``qsmkit run`` command in a background process (progress, log, Cancel); the numerics live in
the ``qsmkit`` package and the node <-> array conversion in ``qsmkit.slicer_adapter``.

From the Python console, one call per stage::

    logic = slicer.util.getModuleLogic("QSM")
    nodes = logic.runPipeline(magNode, phaseNode, echoTimes=[0.02], fieldStrength=3.0)
    chiNode = nodes["chi"]
    mask = logic.computeMask(magNode)
    local = logic.removeBackground(fieldNode, mask, method="pdf")
    chi = logic.invertField(local["field_local"], local["local_mask"], magnitude=magNode)
    rows = logic.segmentStatistics(chiNode, segmentationNode, reference="CSF")
"""

import logging
import os
import shutil
import sys
import time
from typing import Annotated, Union

import qt
import slicer
import vtk
from slicer import (
    vtkMRMLLabelMapVolumeNode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSequenceNode,
)
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

try:
    from slicer.i18n import tr as _
except ImportError:  # Slicer before 5.4
    def _(text):
        return text

# Method choices offered in the panel; each is a name qsmkit's registries know
# (Testing/test_slicer_static.py checks it against qsmkit).
MASKING_CHOICES = ["auto", "threshold"]
UNWRAPPING_CHOICES = ["auto", "quality", "laplacian"]
BACKGROUND_CHOICES = ["auto", "pdf", "vsharp", "resharp"]
INVERSION_CHOICES = ["auto", "focuss", "l2", "tkd"]
DEVICE_CHOICES = ["auto", "cpu", "gpu"]


def ensureQsmkitImportable():
    """Put the folder holding the bundled ``qsmkit`` package on sys.path (installed extension:
    beside this file; source tree: one level up). Imports nothing."""
    here = os.path.dirname(os.path.abspath(__file__))
    for folder in (here, os.path.dirname(here)):
        if os.path.isfile(os.path.join(folder, "qsmkit", "__init__.py")):
            if folder not in sys.path:
                sys.path.insert(0, folder)
            return folder
    return None


ensureQsmkitImportable()


#
# QSM
#


class QSM(ScriptedLoadableModule):
    """Uses ScriptedLoadableModule base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("QSM")
        self.parent.categories = [_("Quantification")]
        self.parent.dependencies = []
        self.parent.contributors = ["QSMExtension developers"]
        self.parent.helpText = _("""
Quantitative Susceptibility Mapping: from gradient-echo magnitude and phase (single echo or
multi-echo) to a brain mask, the total and local field (ppm) and the susceptibility map chi (ppm).
The computation runs in a background process; Cancel stops it. Choose a method for each stage
under <i>Methods</i>. See the <a href="https://github.com/QSMExtension/QSMExtension#readme">
documentation</a>.
""")
        self.parent.acknowledgementText = _("""
The method follows FOCUSS-QSM with a magnitude prior and projection onto dipole fields
(Liu et al., NMR Biomed 2011). Built with the qsmkit package of QSMExtension.
""")
        slicer.app.connect("startupCompleted()", registerSampleData)
        slicer.app.connect("startupCompleted()", registerSegmentStatisticsPlugin)


def registerSegmentStatisticsPlugin():
    """Add the chi statistics plugin to the Segment Statistics module."""
    try:
        from QSMLib.ChiStatisticsPlugin import ChiStatisticsPlugin
        from SegmentStatistics import SegmentStatisticsLogic
    except ImportError as err:
        logging.warning(f"QSM: Segment Statistics plugin not registered ({err})")
        return
    SegmentStatisticsLogic.registerPlugin(ChiStatisticsPlugin())


def registerSampleData():
    """The built-in QSM phantom in the Sample Data module, simulated on demand (no download)."""
    try:
        import SampleData
    except ImportError:
        return
    iconsPath = os.path.join(os.path.dirname(__file__), "Resources", "Icons")
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="QSM",
        sampleName="QSMPhantom",
        thumbnailFileName=os.path.join(iconsPath, "QSMPhantom.png"),
        # nothing to download: the button calls customDownloader, which simulates the phantom
        uris=[],
        fileNames=[],
        customDownloader=lambda source=None: QSMLogic().loadPhantom(),
    )


#
# QSMParameterNode
#


@parameterNodeWrapper
class QSMParameterNode:
    """The QSM module's parameters (saved with the scene).

    magnitude, phase - gradient-echo magnitude and phase (a volume, a multi-volume or a
        sequence of echoes; phase in rad or raw integer vendor phase).
    brainMask - optional brain mask; computed with the masking method when empty.
    echoTimesMs - echo times in ms, one per echo ("20" or "5, 10, 15").
    fieldStrengthT - B0 in tesla.
    masking, unwrapping, background, inversion - the method of each stage.
    backgroundParameters, inversionParameters - method parameters, "key=value key=value".
    device - auto, cpu or gpu.
    chiVolume, maskVolume, totalFieldVolume, localFieldVolume - outputs (new nodes when empty;
        chi is always produced).
    """

    magnitude: Union[vtkMRMLScalarVolumeNode, vtkMRMLSequenceNode]
    phase: Union[vtkMRMLScalarVolumeNode, vtkMRMLSequenceNode]
    brainMask: vtkMRMLScalarVolumeNode
    echoTimesMs: str = "20"
    fieldStrengthT: Annotated[float, WithinRange(0.1, 21.1)] = 3.0
    masking: Annotated[str, Choice(MASKING_CHOICES)] = "auto"
    unwrapping: Annotated[str, Choice(UNWRAPPING_CHOICES)] = "auto"
    background: Annotated[str, Choice(BACKGROUND_CHOICES)] = "auto"
    inversion: Annotated[str, Choice(INVERSION_CHOICES)] = "auto"
    backgroundParameters: str = ""
    inversionParameters: str = ""
    device: Annotated[str, Choice(DEVICE_CHOICES)] = "auto"
    chiVolume: vtkMRMLScalarVolumeNode
    maskVolume: vtkMRMLLabelMapVolumeNode
    totalFieldVolume: vtkMRMLScalarVolumeNode
    localFieldVolume: vtkMRMLScalarVolumeNode


#
# QSMWidget
#


class QSMWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Uses ScriptedLoadableModuleWidget base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._timer = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/QSM.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = QSMLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.readHeaderButton.connect("clicked(bool)", self.onReadHeaderButton)

        # The background process is polled from the GUI thread, so the application stays responsive.
        self._timer = qt.QTimer()
        self._timer.setInterval(100)
        self._timer.connect("timeout()", self.onTimer)

        self._setRunning(False)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self._job is not None:
            self.logic.cancelJob(self._job)
            self._job = None
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        # Preselect magnitude and phase by name, to save a few clicks
        for attr, words in (("magnitude", ("mag",)), ("phase", ("pha",))):
            if getattr(self._parameterNode, attr) is None:
                for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"):
                    if any(w in node.GetName().lower() for w in words):
                        setattr(self._parameterNode, attr, node)
                        break

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._checkCanApply()

    def _checkCanApply(self, caller=None, event=None) -> None:
        p = self._parameterNode
        ready = bool(p and p.magnitude and p.phase and p.echoTimesMs.strip())
        self.ui.applyButton.enabled = ready and self._job is None
        self.ui.applyButton.toolTip = (_("Compute the brain mask, fields and chi") if ready
                                       else _("Select magnitude and phase and give the echo times"))

    # ------------------------------------------------------------ running

    def _setRunning(self, running: bool) -> None:
        self.ui.cancelButton.enabled = running
        self.ui.applyButton.enabled = not running
        self.ui.progressBar.visible = running
        if running:
            self.ui.progressBar.setRange(0, 0)  # busy until the first progress line

    def _log(self, text: str) -> None:
        self.ui.logTextEdit.appendPlainText(text)

    def _progress(self, fraction, stage) -> None:
        self.ui.progressBar.setRange(0, 100)
        self.ui.progressBar.value = int(round(100 * (fraction or 0)))
        if stage:
            self.ui.statusLabel.text = _("Running: {stage}").format(stage=stage)

    def onReadHeaderButton(self) -> None:
        p = self._parameterNode
        message = _("Could not read the acquisition parameters.")
        with slicer.util.tryWithErrorDisplay(message, waitCursor=True):
            found = self.logic.acquisitionParameters(p.phase or p.magnitude)
            if found["te"]:
                p.echoTimesMs = ", ".join(f"{1000 * t:g}" for t in found["te"])
            if found["b0"]:
                p.fieldStrengthT = found["b0"]
            self.ui.statusLabel.text = (_("Read from {source}").format(source=found["source"])
                                        if found["source"] else _("No echo time or field strength recorded"))

    def onApplyButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to start QSM."), waitCursor=True):
            if not self.logic.installRequirements(askUser=True):
                self.ui.statusLabel.text = _("Missing Python packages were not installed")
                return
            self.ui.logTextEdit.clear()
            self._job = self.logic.startPipelineFromParameterNode(
                self._parameterNode, onLine=self._log, onProgress=self._progress)
            self._log(" ".join(self._job.argv))
            self.ui.statusLabel.text = _("Running...")
            self._setRunning(True)
            self._timer.start()

    def onTimer(self) -> None:
        job = self._job
        if job is None or job.process is None:
            self._timer.stop()
            return
        if job.process.poll():
            return
        self._timer.stop()
        self._job = None
        self._setRunning(False)
        try:
            nodes = self.logic.finishJob(job)
        except Exception as err:
            self.ui.statusLabel.text = _("Failed: {reason}").format(reason=err)
            if not job.process.cancelled:
                slicer.util.errorDisplay(_("QSM failed: {reason}").format(reason=err))
            self._checkCanApply()
            return
        self.logic.storeOutputs(self._parameterNode, nodes)
        slicer.util.setSliceViewerLayers(background=nodes["chi"], fit=True)
        self.ui.statusLabel.text = _("Done in {seconds:.1f} s").format(seconds=job.process.seconds or 0)
        self._checkCanApply()

    def onCancelButton(self) -> None:
        if self._job is not None:
            self.logic.cancelJob(self._job)
            self._log(_("Cancelled."))
        # onTimer reports the end of the process and re-enables Apply


#
# QSMLogic
#


class QSMLogic(ScriptedLoadableModuleLogic):
    """Computation without GUI: each method is one call from the Python console. The methods
    build a qsmkit command on the given nodes (QSMLib.jobs), run it in a background process and
    return the output nodes; with ``wait=False`` they return the started job instead (poll
    ``job.process.poll()``, then call :meth:`finishJob`)."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return QSMParameterNode(super().getParameterNode())

    # ------------------------------------------------------------ environment

    @staticmethod
    def missingRequirements():
        from QSMLib.jobs import missing_requirements

        return missing_requirements()

    def installRequirements(self, askUser=True) -> bool:
        """Install qsmkit's missing Python packages (asking first); True when all are present."""
        missing = self.missingRequirements()
        if not missing:
            return True
        if askUser and not slicer.util.confirmOkCancelDisplay(
                _("QSM needs these Python packages, which are not installed yet:\n\n{packages}\n\n"
                  "Install them now? (This downloads them and can take a few minutes.)").format(
                    packages="\n".join(missing)),
                windowTitle=_("QSM: install Python packages")):
            return False
        slicer.util.pip_install(missing)
        return not self.missingRequirements()

    @staticmethod
    def pythonExecutable():
        """Slicer's Python launcher (PythonSlicer), for the background process."""
        return shutil.which("PythonSlicer") or sys.executable

    @staticmethod
    def processEnvironment():
        try:
            return slicer.util.startupEnvironment()
        except Exception:  # noqa: BLE001 - outside the application
            return dict(os.environ)

    def _jobKwargs(self):
        return {"python": self.pythonExecutable(), "env": self.processEnvironment()}

    # ------------------------------------------------------------ jobs

    def startJob(self, job, onLine=None, onProgress=None):
        job.start(on_line=onLine or (lambda line: logging.info(line)), on_progress=onProgress)
        return job

    def finishJob(self, job) -> dict:
        """The output nodes of a finished job; the temporary files are removed in any case."""
        try:
            return job.finish(slicer.mrmlScene)
        finally:
            job.cleanup()

    def cancelJob(self, job) -> None:
        job.cancel()

    def _run(self, job, wait, onLine=None, onProgress=None):
        if not wait:
            return self.startJob(job, onLine, onProgress)
        try:
            job.start(on_line=onLine or (lambda line: logging.info(line)), on_progress=onProgress)
            while job.process.poll():
                slicer.app.processEvents()  # the application stays responsive
                time.sleep(0.05)
            return job.finish(slicer.mrmlScene)
        finally:
            job.cleanup()

    # ------------------------------------------------------------ one call per stage

    def runPipeline(self, magnitude, phase, echoTimes, fieldStrength, mask=None, masking="auto",
                    unwrapping="auto", background="auto", inversion="auto", parameters=None,
                    device="auto", outputs=None, wait=True, onLine=None, onProgress=None):
        """magnitude + phase -> {"chi": node, ...}. ``echoTimes`` in seconds (one per echo),
        ``fieldStrength`` in tesla; ``outputs``: name -> node or None among chi, mask,
        field_total, field_local, local_mask (default: all)."""
        from QSMLib.jobs import PIPELINE_OUTPUTS, pipeline_job

        job = pipeline_job(magnitude, phase, echoTimes, fieldStrength, mask=mask, masking=masking,
                           unwrapping=unwrapping, background=background, inversion=inversion,
                           params=parameters, device=device,
                           outputs=outputs or dict.fromkeys(PIPELINE_OUTPUTS), **self._jobKwargs())
        return self._run(job, wait, onLine, onProgress)

    def startPipelineFromParameterNode(self, p, onLine=None, onProgress=None):
        from QSMLib.jobs import parse_echo_times_ms

        if not p.magnitude or not p.phase:
            raise ValueError(_("Select the magnitude and phase volumes"))
        outputs = {"chi": p.chiVolume, "mask": p.maskVolume, "field_total": p.totalFieldVolume,
                   "field_local": p.localFieldVolume}
        return self.runPipeline(
            p.magnitude, p.phase, parse_echo_times_ms(p.echoTimesMs), p.fieldStrengthT,
            mask=p.brainMask, masking=p.masking, unwrapping=p.unwrapping, background=p.background,
            inversion=p.inversion,
            parameters={"background": p.backgroundParameters, "inversion": p.inversionParameters},
            device=p.device, outputs=outputs, wait=False, onLine=onLine, onProgress=onProgress)

    @staticmethod
    def storeOutputs(p, nodes) -> None:
        p.chiVolume = nodes.get("chi", p.chiVolume)
        p.maskVolume = nodes.get("mask", p.maskVolume)
        p.totalFieldVolume = nodes.get("field_total", p.totalFieldVolume)
        p.localFieldVolume = nodes.get("field_local", p.localFieldVolume)

    def computeMask(self, magnitude, output=None, method="auto", erodeMm=0.0, wait=True):
        """Brain mask (label map node) from the magnitude."""
        from QSMLib.jobs import mask_job

        job = mask_job(magnitude, method=method, erode_mm=erodeMm, output=output, **self._jobKwargs())
        result = self._run(job, wait)
        return result["mask"] if wait else result

    def unwrapPhase(self, phase, magnitude=None, mask=None, output=None, method="auto", wait=True):
        """Spatially unwrapped phase (rad)."""
        from QSMLib.jobs import unwrap_job

        job = unwrap_job(phase, magnitude=magnitude, mask=mask, method=method, output=output,
                         **self._jobKwargs())
        result = self._run(job, wait)
        return result["unwrapped"] if wait else result

    def removeBackground(self, totalField, mask, method="auto", weights=None, parameters=None,
                         fieldUnits="ppm", fieldStrength=None, echoTimes=None, device="auto",
                         output=None, outputMask=None, wait=True):
        """Total field -> {"field_local": node (ppm), "local_mask": node}."""
        from QSMLib.jobs import background_job

        job = background_job(totalField, mask, method=method, weights=weights, params=parameters,
                             field_units=fieldUnits, b0=fieldStrength, te=echoTimes, device=device,
                             output=output, output_mask=outputMask, **self._jobKwargs())
        return self._run(job, wait)

    def invertField(self, localField, mask, magnitude=None, method="auto", parameters=None,
                    fieldUnits="ppm", fieldStrength=None, echoTimes=None, device="auto",
                    output=None, wait=True):
        """Local field -> chi node (ppm)."""
        from QSMLib.jobs import invert_job

        job = invert_job(localField, mask, magnitude=magnitude, method=method, params=parameters,
                         field_units=fieldUnits, b0=fieldStrength, te=echoTimes, device=device,
                         output=output, **self._jobKwargs())
        result = self._run(job, wait)
        return result["chi"] if wait else result

    def segmentStatistics(self, chi, segmentation, reference=None, erodeMm=0.0, tableNode=None):
        """The ``qsmkit stats`` rows for a chi node and a segmentation (one per segment), also
        written to a table node when ``tableNode`` is given."""
        from qsmkit import slicer_adapter

        rows = slicer_adapter.segment_statistics(chi, segmentation, reference=reference,
                                                 erode_mm=erodeMm)
        if tableNode is not None:
            self.rowsToTable(rows, tableNode)
        return rows

    @staticmethod
    def rowsToTable(rows, tableNode) -> None:
        from qsmkit.stats import COLUMNS

        table = tableNode.GetTable()
        table.Initialize()
        for name in COLUMNS:
            column = vtk.vtkStringArray() if name == "name" else vtk.vtkDoubleArray()
            column.SetName(name)
            for r in rows:
                column.InsertNextValue(str(r[name]) if name == "name" else float(r[name]))
            table.AddColumn(column)
        tableNode.Modified()

    def acquisitionParameters(self, node) -> dict:
        """Echo times (s) and B0 (T) from the node's JSON sidecar or DICOM header."""
        from QSMLib.jobs import acquisition_parameters

        database = getattr(slicer, "dicomDatabase", None)

        def dicomValue(uid, tag):
            if database is None:
                return None
            path = database.fileForInstance(uid)
            return database.fileValue(path, tag) if path else None

        return acquisition_parameters(node, dicomValue)

    def loadPhantom(self, shape=(128, 128, 32), voxelSize=(1.875, 1.875, 5.0), name="QSMPhantom"):
        """Simulate the built-in phantom (qsmkit simulate) and load magnitude, phase, labels and
        the true chi; returns the magnitude and phase nodes."""
        import tempfile

        if not self.installRequirements(askUser=True):
            raise RuntimeError(_("QSM needs its Python packages to simulate the phantom"))
        from qsmkit import cli

        folder = tempfile.mkdtemp(prefix="qsmkit-phantom-")
        try:
            code = cli.main(["simulate", "--out", folder, "--shape", *map(str, shape),
                             "--voxel-size", *map(str, voxelSize), "--quiet"])
            if code != 0:
                raise RuntimeError("qsmkit simulate failed")
            nodes = {}
            for stem in ("magnitude", "phase", "chi_true"):
                node = slicer.util.loadVolume(os.path.join(folder, f"{stem}.nii.gz"))
                node.SetName(f"{name}_{stem}")
                nodes[stem] = node
            labels = slicer.util.loadLabelVolume(os.path.join(folder, "labels.nii.gz"))
            labels.SetName(f"{name}_labels")
            nodes["labels"] = labels
            for node in nodes.values():  # keep the nodes, not the files
                node.SetAndObserveStorageNodeID(None)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return [nodes["magnitude"], nodes["phase"]]


#
# QSMTest
#


class QSMTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer (Developer mode: Reload and Test). The same checks run without the
    application in Testing/test_slicer_*.py against slicer-core."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_QSM_pipeline_matches_qsmkit()
        self.setUp()
        self.test_QSM_segment_statistics()

    def _phantom(self):
        logic = QSMLogic()
        magnitude, phase = logic.loadPhantom(shape=(64, 64, 32), voxelSize=(3.75, 3.75, 5.0))
        return logic, magnitude, phase

    def test_QSM_pipeline_matches_qsmkit(self):
        """The module's background-process pipeline equals qsmkit's pipeline run in-process."""
        import numpy as np

        from qsmkit import slicer_adapter

        self.delayDisplay("Simulating the phantom")
        logic, magnitude, phase = self._phantom()
        self.delayDisplay("Running the pipeline")
        nodes = logic.runPipeline(magnitude, phase, echoTimes=[0.02], fieldStrength=3.0)
        expected, _phase = slicer_adapter.run_pipeline_on_nodes(magnitude, phase, [0.02], 3.0)
        chi = slicer_adapter.array_from_volume(nodes["chi"])
        self.assertTrue(slicer_adapter.same_geometry(nodes["chi"], phase))
        self.assertTrue(np.array_equal(chi, expected.chi))
        self.delayDisplay("Test passed")

    def test_QSM_segment_statistics(self):
        """Statistics of the true chi in the phantom's labels, referenced to CSF."""
        import numpy as np

        logic, magnitude, phase = self._phantom()
        chi = slicer.util.getNode("QSMPhantom_chi_true")
        labels = slicer.util.getNode("QSMPhantom_labels")
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(labels, segmentation)
        rows = logic.segmentStatistics(chi, segmentation)
        self.assertTrue(len(rows) > 0)
        self.assertTrue(all(np.isfinite(r["mean"]) for r in rows if r["voxels"]))
        self.delayDisplay("Test passed")
