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
import pathlib
import shutil
import sys
import time
from typing import Annotated, Optional, Union

import qt
import slicer
import vtk
from QSMLib.stagewidget import StageWidgetMixin
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
MASKING_CHOICES = ["auto", "surface", "threshold", "bet"]
UNWRAPPING_CHOICES = ["auto", "romeo", "quality", "laplacian", "prelude"]
BACKGROUND_CHOICES = ["auto", "tfi-fast", "pdf", "tfi", "vsharp", "resharp"]
INVERSION_CHOICES = ["auto", "focuss", "l2", "tkd", "tv", "lsqr"]
DEVICE_CHOICES = ["auto", "cpu", "gpu"]
FIELD_UNITS_CHOICES = ["ppm", "hz", "rad"]
# The volumes the Sample Data entry and the module tests load from the simulated phantom.
PHANTOM_VOLUMES = ("magnitude", "phase", "chi_true", "labels")
# Where the FSL folder is kept (application settings); passed to the background process as FSLDIR.
FSL_SETTING = "QSM/FSLDirectory"
# The first Slicer whose Python runs this code: Slicer 5.10 ships Python 3.12, 5.8 and earlier
# Python 3.9, and the code needs 3.10 (zip(strict=True), ...). Also in CMakeLists.txt and the
# README; Testing/test_slicer_extension.py checks all three against the code (vermin).
MINIMUM_SLICER_VERSION = "5.10"
MINIMUM_PYTHON = (3, 10)
# Sample Data > QSM: the simulated phantom shipped in Resources/SampleData (written by
# tools/make_sample_data.py): file, node name, SHA256.
SAMPLE_DATA = (
    ("QSMPhantom_magnitude.nii.gz", "QSMPhantom_magnitude",
     "3433c4b8aebe6b9a5ddc9e5fdf764c6c8359602d63c3b44f2e0a4b9e8779c4e6"),
    ("QSMPhantom_phase.nii.gz", "QSMPhantom_phase",
     "78bdbdb5a70a7ad462d51f3847a2799547add923d145ef7b12b2478dbe94914c"),
    ("QSMPhantom_labels.seg.nrrd", "QSMPhantom_labels",
     "8b4a5544ce1daff67d1dfa189b25ae6d174f3128a0fd68c817355bb43ab158a7"),
)


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
The default dipole inversion is TV with the magnitude's edges (MEDI's edge mask, Liu et al.,
MRM 2011), solved as in FANSI (Milovic et al., MRM 2018); FOCUSS-QSM with a magnitude prior is
the project's original method and stays available. Built with the qsmkit package of QSMExtension.
""")
        if sys.version_info < MINIMUM_PYTHON:
            message = _("QSM needs Slicer {version} or later (Python {python}+); this Slicer's "
                        "Python is {found}.").format(
                version=MINIMUM_SLICER_VERSION, python=".".join(map(str, MINIMUM_PYTHON)),
                found=".".join(map(str, sys.version_info[:3])))
            logging.error(message)
            self.parent.helpText = f"<p><b>{message}</b></p>" + self.parent.helpText
        slicer.app.connect("startupCompleted()", registerSampleData)
        slicer.app.connect("startupCompleted()", registerSegmentStatisticsPlugin)


def registerSegmentStatisticsPlugin():
    """Add the chi statistics plugin to the Segment Statistics module (never raises: a failure
    here must not stop the application's start-up)."""
    try:
        from QSMLib.ChiStatisticsPlugin import ChiStatisticsPlugin
        from SegmentStatistics import SegmentStatisticsLogic

        SegmentStatisticsLogic.registerPlugin(ChiStatisticsPlugin())
    except Exception as err:  # noqa: BLE001
        logging.warning(f"QSM: Segment Statistics plugin not registered ({err})")


def registerSampleData():
    """Sample Data > QSM > QSMPhantom: magnitude, phase (TE 20 ms, 3 T: the panel's defaults)
    and the phantom's regions as a segmentation. The files ship with the extension and are
    registered by file URL with their checksums, so the Sample Data button and
    ``SampleData.downloadSample("QSMPhantom")`` both load them through Slicer's own download
    path (copied into the cache, checked, loaded); no network, no Python packages needed."""
    try:
        import SampleData

        folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "Resources")
        files = [os.path.join(folder, "SampleData", name) for name, _node, _sha in SAMPLE_DATA]
        SampleData.SampleDataLogic.registerCustomSampleDataSource(
            category="QSM",
            sampleName="QSMPhantom",
            thumbnailFileName=os.path.join(folder, "Icons", "QSMPhantom.png"),
            uris=[pathlib.Path(f).as_uri() for f in files],
            fileNames=[name for name, _node, _sha in SAMPLE_DATA],
            nodeNames=[node for _name, node, _sha in SAMPLE_DATA],
            checksums=[f"SHA256:{sha}" for _name, _node, sha in SAMPLE_DATA],
            loadFileTypes=["VolumeFile", "VolumeFile", "SegmentationFile"],
        )
    except Exception as err:  # noqa: BLE001 - never stop the application's start-up
        logging.warning(f"QSM: sample data not registered ({err})")


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

    magnitude: Optional[Union[vtkMRMLScalarVolumeNode, vtkMRMLSequenceNode]]
    phase: Optional[Union[vtkMRMLScalarVolumeNode, vtkMRMLSequenceNode]]
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


class QSMWidget(StageWidgetMixin, ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Uses ScriptedLoadableModuleWidget base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    StageWidgetMixin (first, so its cleanup/enter/exit override the base's) holds the
    parameter-node plumbing and the job runner, shared with the stage modules.
    """

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.initPanel()

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/QSM.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = QSMLogic()
        self.ui.readHeaderButton.connect("clicked(bool)", self.onReadHeaderButton)
        self.ui.fslDirectoryButton.connect("directoryChanged(QString)", self.onFslDirectoryChanged)
        self.ui.fslTestButton.connect("clicked(bool)", self.onFslTestButton)
        self.ui.fslDirectoryButton.directory = self.logic.fslDirectory() or ""
        # The background process is polled from the GUI thread, so the application stays responsive.
        self.startPanel("QSM")

    def initializeParameterNode(self) -> None:
        StageWidgetMixin.initializeParameterNode(self)
        # Preselect magnitude and phase by name, to save a few clicks
        for attr, words in (("magnitude", ("mag",)), ("phase", ("pha",))):
            if getattr(self._parameterNode, attr) is None:
                for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"):
                    if any(w in node.GetName().lower() for w in words):
                        setattr(self._parameterNode, attr, node)
                        break

    def _ready(self) -> bool:
        p = self._parameterNode
        return bool(p and p.magnitude and p.phase and p.echoTimesMs.strip())

    def updateWidgets(self) -> None:
        self.ui.applyButton.toolTip = (_("Compute the brain mask, fields and chi") if self._ready()
                                       else _("Select magnitude and phase and give the echo times"))

    # ------------------------------------------------------------ running

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

    def onFslDirectoryChanged(self, path) -> None:
        self.logic.setFslDirectory(path)

    def onFslTestButton(self) -> None:
        ok, message = self.logic.testFsl(self.ui.fslDirectoryButton.directory)
        self.ui.fslStatusLabel.text = message
        if not ok:
            slicer.util.warningDisplay(message, windowTitle=_("QSM: FSL"))

    def onJobDone(self, job, nodes) -> None:
        self.logic.storeOutputs(self._parameterNode, nodes)
        slicer.util.setSliceViewerLayers(background=nodes["chi"], fit=True)
        self.logic.showColorLegend(nodes["chi"])


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
        """Install the Python packages the panels' commands need (Resources/requirements.txt)
        that are missing; True when all are present. Through ``slicer.packaging.pip_ensure``
        where this Slicer has it (5.12+: asks for consent, installs with progress, offers a
        restart when an already imported package was updated), else ``slicer.util.pip_install``
        after asking."""
        missing = self.missingRequirements()
        if not missing:
            return True
        try:
            from slicer.packaging import pip_ensure
        except ImportError:  # Slicer before 5.12
            pip_ensure = None
        if pip_ensure is not None:
            try:
                pip_ensure(missing, prompt_install=askUser, requester="QSM")
            except RuntimeError:  # the user declined
                return False
            return not self.missingRequirements()
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

    def processEnvironment(self):
        """The background process's environment: Slicer's startup environment (not the
        application's modified one), with FSLDIR from the module setting when it is set."""
        try:
            env = slicer.util.startupEnvironment()
        except Exception:  # noqa: BLE001 - outside the application
            env = dict(os.environ)
        try:
            fslDirectory = self.fslDirectory()
        except Exception:  # noqa: BLE001 - no Qt settings outside the application
            fslDirectory = ""
        if fslDirectory:
            env["FSLDIR"] = fslDirectory
        return env

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

    def startFromParameterNode(self, p, onLine=None, onProgress=None):
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
                         output=None, outputMask=None, wait=True, onLine=None, onProgress=None):
        """Total field -> {"field_local": node (ppm), "local_mask": node}."""
        from QSMLib.jobs import background_job

        job = background_job(totalField, mask, method=method, weights=weights, params=parameters,
                             field_units=fieldUnits, b0=fieldStrength, te=echoTimes, device=device,
                             output=output, output_mask=outputMask, **self._jobKwargs())
        return self._run(job, wait, onLine, onProgress)

    def invertField(self, localField, mask, magnitude=None, method="auto", parameters=None,
                    fieldUnits="ppm", fieldStrength=None, echoTimes=None, device="auto",
                    output=None, reference=None, referenceLabel=None, wait=True, onLine=None,
                    onProgress=None):
        """Local field -> chi node (ppm). ``reference``: None, ``"mask"`` or a label-map node
        (e.g. CSF) whose mean chi is subtracted (``referenceLabel``: one label of it)."""
        from QSMLib.jobs import invert_job

        job = invert_job(localField, mask, magnitude=magnitude, method=method, params=parameters,
                         field_units=fieldUnits, b0=fieldStrength, te=echoTimes, device=device,
                         output=output, reference=reference, reference_label=referenceLabel,
                         **self._jobKwargs())
        result = self._run(job, wait, onLine, onProgress)
        return result["chi"] if wait else result

    @staticmethod
    def markAsChiMap(node, kind="chi") -> None:
        """Mark a volume loaded from a file (whose units Slicer does not read) as a chi map
        (``kind="chi"``) or a field map (``"field"``), in ppm: units, quantity and display
        preset, as the modules' outputs get them; the Segment Statistics plugin then measures
        a chi map."""
        from qsmkit import slicer_adapter

        slicer_adapter.mark_as(node, kind)

    @staticmethod
    def showColorLegend(node) -> None:
        """A colour bar for the node in the views, where this Slicer has colour legends."""
        try:
            slicer.modules.colors.logic().AddDefaultColorLegendDisplayNode(node)
        except Exception as err:  # noqa: BLE001 - a missing colour bar is no error
            logging.info(f"QSM: no colour legend ({err})")

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
        nodes = self.loadPhantomVolumes(shape, voxelSize, name)
        return [nodes["magnitude"], nodes["phase"]]

    def loadPhantomVolumes(self, shape=(128, 128, 32), voxelSize=(1.875, 1.875, 5.0),
                           name="QSMPhantom", stems=PHANTOM_VOLUMES, extraArgs=()):
        """Simulate the built-in phantom and load the volumes named in ``stems`` (files that
        ``qsmkit simulate`` writes: magnitude, phase, chi_true, labels, mask_true,
        field_total_true, field_local_true, ...; masks and labels as label maps); returns
        stem -> node. ``extraArgs``: more ``qsmkit simulate`` options (e.g. coils)."""
        import tempfile

        if not self.installRequirements(askUser=True):
            raise RuntimeError(_("QSM needs its Python packages to simulate the phantom"))
        from qsmkit import cli

        folder = tempfile.mkdtemp(prefix="qsmkit-phantom-")
        try:
            code = cli.main(["simulate", "--out", folder, "--shape", *map(str, shape),
                             "--voxel-size", *map(str, voxelSize), *map(str, extraArgs), "--quiet"])
            if code != 0:
                raise RuntimeError("qsmkit simulate failed")
            nodes = {}
            for stem in stems:
                path = os.path.join(folder, f"{stem}.nii.gz")
                isLabel = stem in ("labels", "mask_true", "vessel_mask")
                node = (slicer.util.loadLabelVolume(path) if isLabel else slicer.util.loadVolume(path))
                node.SetName(f"{name}_{stem}")
                node.SetAndObserveStorageNodeID(None)  # keep the nodes, not the files
                nodes[stem] = node
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return nodes

    def fslDirectory(self) -> str:
        """The FSL folder: the module setting, else $FSLDIR (empty when neither is set)."""
        return str(qt.QSettings().value(FSL_SETTING, "") or os.environ.get("FSLDIR", ""))

    def setFslDirectory(self, path) -> None:
        qt.QSettings().setValue(FSL_SETTING, str(path or ""))

    def testFsl(self, path=None):
        """(ok, message): whether ``path`` (default: the setting) holds a usable FSL."""
        from qsmkit import fsl
        from qsmkit.errors import QSMInputError

        try:
            found = fsl.find_fsldir(path or self.fslDirectory() or None)
        except QSMInputError as err:
            return False, str(err)
        return True, _("FSL found in {path}: bet and prelude will be used by 'auto'").format(path=found)


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
        self.setUp()
        self.test_QSM_sample_data_and_chi_plugin()

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

    def test_QSM_sample_data_and_chi_plugin(self):
        """Sample Data loads the phantom; Segment Statistics, with the QSM chi plugin, measures
        a chi map and adds no chi column for the magnitude."""
        import SampleData
        from SegmentStatistics import SegmentStatisticsLogic

        magnitude, phase, segmentation = SampleData.downloadSamples("QSMPhantom")
        self.assertTrue(segmentation.IsA("vtkMRMLSegmentationNode"))
        nodes = QSMLogic().runPipeline(magnitude, phase, echoTimes=[0.02], fieldStrength=3.0)
        logic = SegmentStatisticsLogic()
        params = logic.getParameterNode()
        params.SetParameter("Segmentation", segmentation.GetID())
        for volume, expectChi in ((nodes["chi"], True), (magnitude, False)):
            params.SetParameter("ScalarVolume", volume.GetID())
            logic.computeStatistics()
            keys = [k for k in logic.getStatistics() if isinstance(k, tuple)]
            self.assertEqual(any(k[1].startswith("ChiStatisticsPlugin.") for k in keys), expectChi)
        self.delayDisplay("Test passed")

