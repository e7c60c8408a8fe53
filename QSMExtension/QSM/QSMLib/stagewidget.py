"""The panel plumbing the QSM stage modules share: the Extension Wizard template's parameter-node
handling (connect the GUI, follow scene close, re-check Apply on every change) and a
:class:`QSMLib.jobrunner.JobRunner` wired to Apply and Cancel.

A stage widget derives from ``ScriptedLoadableModuleWidget``, ``VTKObservationMixin`` and
:class:`StageWidgetMixin`; in ``setup()`` it loads its ``.ui`` into ``self.ui``, sets
``self.logic`` and calls :meth:`startPanel`. It provides ``_ready()`` (may Apply run?) and
``onJobDone(job, nodes)``; its logic provides ``getParameterNode()`` and
``startFromParameterNode(p, onLine, onProgress)``.
"""

import slicer
import vtk


class StageWidgetMixin:
    def initPanel(self) -> None:
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self.runner = None

    def startPanel(self, title: str) -> None:
        """After ``self.ui`` and ``self.logic`` exist: the runner, the buttons, the parameters."""
        from QSMLib.jobrunner import JobRunner

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.runner = JobRunner(self.logic, self.ui.applyButton, self.ui.cancelButton,
                                self.ui.progressBar, self.ui.statusLabel, self.ui.logTextEdit,
                                onDone=self.onJobDone, canApply=self._ready, title=title)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.cancelButton.connect("clicked(bool)", self.runner.cancel)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self.runner is not None:
            self.runner.cleanup()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

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
        self.runner.refresh()
        self.updateWidgets()

    def updateWidgets(self) -> None:
        """Enable or disable widgets after a parameter change (nothing by default)."""

    def onApplyButton(self) -> None:
        self.runner.start(lambda onLine, onProgress: self.logic.startFromParameterNode(
            self._parameterNode, onLine=onLine, onProgress=onProgress))
