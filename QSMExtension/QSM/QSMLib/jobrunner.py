"""Run a ``qsmkit`` job from a module panel: Apply starts it, a QTimer polls it, the progress
bar, status line and log follow it, Cancel kills it; the panel stays responsive meanwhile.

Shared by the QSM module and the stage modules (Background Removal, Dipole Inversion, Coil
Combination), so that they all behave alike. Needs Qt (the Slicer application); the process
handling it drives (:mod:`QSMLib.jobs`, :mod:`QSMLib.process`) does not and is tested
without Slicer.
"""

import qt
import slicer

try:
    from slicer.i18n import tr as _
except ImportError:  # Slicer before 5.4
    def _(text):
        return text


class JobRunner:
    """Owns at most one running job for a panel.

    ``widgets``: the panel's ``applyButton``, ``cancelButton``, ``progressBar``, ``statusLabel``
    and ``logTextEdit``. ``onDone(job, nodes)`` is called with the output nodes of a job that
    succeeded; ``canApply()`` says whether Apply may be enabled when nothing runs.
    """

    def __init__(self, logic, applyButton, cancelButton, progressBar, statusLabel, logTextEdit,
                 onDone, canApply=lambda: True, title="QSM"):
        self.logic = logic
        self.applyButton = applyButton
        self.cancelButton = cancelButton
        self.progressBar = progressBar
        self.statusLabel = statusLabel
        self.logTextEdit = logTextEdit
        self.onDone = onDone
        self.canApply = canApply
        self.title = title
        self.job = None
        self.timer = qt.QTimer()
        self.timer.setInterval(100)
        self.timer.connect("timeout()", self.onTimer)
        self.setRunning(False)

    @property
    def running(self) -> bool:
        return self.job is not None

    def setRunning(self, running: bool) -> None:
        self.cancelButton.enabled = running
        self.applyButton.enabled = (not running) and bool(self.canApply())
        self.progressBar.visible = running
        if running:
            self.progressBar.setRange(0, 0)  # busy until the first progress line

    def refresh(self) -> None:
        """Re-evaluate whether Apply is enabled (call when the parameters change)."""
        self.applyButton.enabled = (not self.running) and bool(self.canApply())

    def log(self, text: str) -> None:
        self.logTextEdit.appendPlainText(text)

    def progress(self, fraction, stage) -> None:
        self.progressBar.setRange(0, 100)
        self.progressBar.value = int(round(100 * (fraction or 0)))
        if stage:
            self.statusLabel.text = _("Running: {stage}").format(stage=stage)

    def start(self, startJob) -> None:
        """``startJob(onLine, onProgress)`` builds and starts the job (``wait=False``)."""
        with slicer.util.tryWithErrorDisplay(_("Failed to start {title}.").format(title=self.title),
                                             waitCursor=True):
            if not self.logic.installRequirements(askUser=True):
                self.statusLabel.text = _("Missing Python packages were not installed")
                return
            self.logTextEdit.clear()
            self.job = startJob(self.log, self.progress)
            self.log(" ".join(self.job.argv))
            self.statusLabel.text = _("Running...")
            self.setRunning(True)
            self.timer.start()

    def onTimer(self) -> None:
        job = self.job
        if job is None or job.process is None:
            self.timer.stop()
            return
        if job.process.poll():
            return
        self.timer.stop()
        self.job = None
        self.setRunning(False)
        try:
            nodes = self.logic.finishJob(job)
        except Exception as err:
            self.statusLabel.text = _("Failed: {reason}").format(reason=err)
            if not job.process.cancelled:
                slicer.util.errorDisplay(_("{title} failed: {reason}").format(title=self.title,
                                                                             reason=err))
            return
        self.onDone(job, nodes)
        self.statusLabel.text = _("Done in {seconds:.1f} s").format(seconds=job.process.seconds or 0)

    def cancel(self) -> None:
        if self.job is not None:
            self.logic.cancelJob(self.job)
            self.log(_("Cancelled."))
        # onTimer reports the end of the process and re-enables Apply

    def cleanup(self) -> None:
        """The panel is going away: stop the job and the timer."""
        self.timer.stop()
        if self.job is not None:
            self.logic.cancelJob(self.job)
            self.job = None
