"""Slicer's own Python code (../shared/slicer-reference, v5.12.3, unmodified) on slicer-core MRML.

The PyPI package ``slicer-core`` has MRML (``slicer.vtkMRML*``) and ``slicer.util`` but none of the
application's Python: the parameter node wrapper, ``slicer.packaging``, ``slicer.i18n``, the Segment
Statistics and Sample Data modules. Those come unchanged from ``../shared/slicer-reference`` (loaded
as its README shows). What neither has, because it is C++ or Qt in the application, is stood in for
here, as little as the reference code needs, and named as such:

- ``qt`` and ``ctk``: MagicMock (no Qt); the ``qMRML*`` widget classes that the GUI connectors
  name at import time: empty classes.
- ``slicer.ScriptedLoadableModule`` (not in the reference): the four base classes; the logic's
  ``getParameterNode`` makes one ``vtkMRMLScriptedModuleNode`` per module in ``slicer.mrmlScene``.
- ``slicer.app``: ``testingEnabled()``, ``translate()``, ``connect()`` (records start-up callbacks), and a
  ``coreIOManager()`` that loads volumes and segmentations with slicer-core's MRML storage nodes.
- ``slicer.modules``: a namespace (Sample Data keeps its sources there).
- ``vtkSegmentationCorePython``: slicer-core's ``slicer`` module, which holds those classes.
- ``vtkITK``: only the constant the Label Map plugin reads at construction.

:func:`load` raises ``pytest.skip`` (with the reason) where ../shared/slicer-reference or
slicer-core is missing. It is idempotent and leaves the stand-ins installed for the session.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
REFERENCE = (REPO / ".." / "shared" / "slicer-reference").resolve()
MODULE_DIRS = [REPO / "QSMExtension" / name for name in
               ("QSM", "QSMBackgroundRemoval", "QSMDipoleInversion", "QSMCoilCombination")]
SCRIPTED = REFERENCE / "Modules" / "Scripted"
QMRML_WIDGETS = ("qMRMLNodeComboBox", "qMRMLSubjectHierarchyTreeView", "qMRMLSubjectHierarchyComboBox",
                 "qMRMLCheckableNodeComboBox", "qMRMLSegmentSelectorWidget", "qSlicerWidget",
                 "qMRMLWidget", "qMRMLRangeWidget", "qMRMLSliderWidget", "qMRMLSpinBox",
                 "qMRMLCoordinatesWidget", "qMRMLColorTableComboBox")


def missing_reason() -> str | None:
    """Why the reference code cannot be loaded here, or None."""
    if not (REFERENCE / "Base" / "Python" / "slicer" / "parameterNodeWrapper").is_dir():
        return f"needs Slicer's reference sources in ../shared/slicer-reference ({REFERENCE} absent)"
    try:
        import slicer
    except ImportError as err:
        return f"needs real MRML from the PyPI package slicer-core: {err}"
    if not hasattr(slicer, "vtkMRMLScene"):
        return "the installed 'slicer' package has no vtkMRMLScene (install slicer-core)"
    return None


def skip_unless_available():
    import pytest

    reason = missing_reason()
    if reason:
        pytest.skip(reason, allow_module_level=True)


# ---------------------------------------------------------------- stand-ins

def _scripted_loadable_module():
    """``slicer.ScriptedLoadableModule`` stand-in: the base classes modules derive from."""
    import slicer

    mod = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent
            self.moduleName = type(self).__name__
            parent.defaultDocumentationLink = ""

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent
            self.moduleName = type(self).__name__[:-len("Widget")]

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            name = type(self).__name__
            self.moduleName = name[:-len("Logic")] if name.endswith("Logic") else name
            self.isSingletonParameterNode = True

        def getParameterNode(self):
            scene = slicer.mrmlScene
            for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode")):
                node = scene.GetNthNodeByClass(i, "vtkMRMLScriptedModuleNode")
                if node.GetModuleName() == self.moduleName and self.isSingletonParameterNode:
                    return node
            node = slicer.vtkMRMLScriptedModuleNode()
            node.SetModuleName(self.moduleName)
            node.SetName(self.moduleName)
            return scene.AddNode(node)

    class ScriptedLoadableModuleTest:
        def delayDisplay(self, message, msec=0):
            pass

    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
                ScriptedLoadableModuleTest):
        setattr(mod, cls.__name__, cls)
    mod.__all__ = [c for c in dir(mod) if c.startswith("Scripted")]
    return mod


class CoreIOManager:
    """``slicer.app.coreIOManager()`` stand-in: NIfTI / NRRD volumes and ``.seg.nrrd``
    segmentations read with slicer-core's own MRML storage nodes."""

    @staticmethod
    def fileType(path):
        return "SegmentationFile" if str(path).lower().endswith(".seg.nrrd") else "VolumeFile"

    def loadNodes(self, fileType, properties, loadedNodes):
        import slicer

        scene = slicer.mrmlScene
        path = properties["fileName"]
        if fileType == "SegmentationFile":
            node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
            storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
        else:
            cls = "vtkMRMLLabelMapVolumeNode" if properties.get("labelmap") else "vtkMRMLScalarVolumeNode"
            node = scene.AddNewNodeByClass(cls)
            storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        storage.SetFileName(str(path))
        if not storage.ReadData(node):
            scene.RemoveNode(node)
            scene.RemoveNode(storage)
            return False
        node.SetAndObserveStorageNodeID(storage.GetID())
        if properties.get("name"):
            node.SetName(properties["name"])
        node.CreateDefaultDisplayNodes()
        loadedNodes.AddItem(node)
        return True


class App:
    """``slicer.app`` stand-in."""

    def __init__(self):
        self.connections = []
        self._io = CoreIOManager()

    def testingEnabled(self):
        return False

    def connect(self, signal, slot):
        self.connections.append((signal, slot))

    def coreIOManager(self):
        return self._io

    def processEvents(self):
        pass

    def translate(self, context, text):
        return text


# ---------------------------------------------------------------- loading

_LOADED = False


def load():
    """Install the stand-ins, put the reference code on the import path and give a fresh
    ``slicer.mrmlScene``; returns the ``slicer`` module. Skips (pytest) where it cannot."""
    global _LOADED
    skip_unless_available()
    import slicer

    if not _LOADED:
        sys.modules.setdefault("qt", mock.MagicMock())
        sys.modules.setdefault("ctk", mock.MagicMock())
        for name in QMRML_WIDGETS:
            if not hasattr(slicer, name):
                setattr(slicer, name, type(name, (), {}))
        ref_slicer = str(REFERENCE / "Base" / "Python" / "slicer")
        if ref_slicer not in slicer.__path__:
            slicer.__path__.append(ref_slicer)
        import slicer.i18n  # noqa: F401 - the reference's
        import slicer.packaging  # noqa: F401
        import slicer.parameterNodeWrapper  # noqa: F401
        slicer.ScriptedLoadableModule = sys.modules["slicer.ScriptedLoadableModule"] = \
            _scripted_loadable_module()
        slicer.app = App()
        slicer.modules = types.SimpleNamespace()
        sys.modules.setdefault("vtkSegmentationCorePython", slicer)
        label_stats = types.SimpleNamespace(GetShapeStatisticAsString=lambda code: str(code))
        for stat in ("Centroid", "FeretDiameter", "Perimeter", "Roundness", "Flatness", "Elongation",
                     "OrientedBoundingBox", "PrincipalMoments", "PrincipalAxes"):
            setattr(label_stats, stat, stat)
        sys.modules.setdefault("vtkITK", types.SimpleNamespace(vtkITKLabelShapeStatistics=label_stats))
        for folder in [*MODULE_DIRS, SCRIPTED / "SegmentStatistics", SCRIPTED / "SampleData"]:
            if str(folder) not in sys.path:
                sys.path.insert(0, str(folder))
        _LOADED = True
    slicer.mrmlScene = slicer.vtkMRMLScene()
    slicer.app.connections = []
    return slicer


def module_parent():
    """What Slicer passes to a ScriptedLoadableModule's constructor (the module's metadata)."""
    return types.SimpleNamespace(defaultDocumentationLink="")
