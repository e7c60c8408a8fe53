"""Run one ``qsmkit`` command in a background process: output lines, progress, cancel.

Qt-free on purpose, so that it runs (and is tested) outside Slicer: a reader thread moves the
process's output into a queue, and :meth:`QsmkitProcess.poll` - called by a QTimer in the
Slicer widget, or in a loop by :meth:`QsmkitProcess.wait` in scripts - drains it, parses the
progress bar and reports whether the process is still running. The application never blocks
on the process, and :meth:`QsmkitProcess.cancel` ends it (and anything it started) at once.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

#: a tqdm line: "qsmkit run:  50%|#####     | 2/4 [00:01<00:01,  1.9stage/s, background]"
_TQDM = re.compile(r"(?P<pct>\d+)%\|[^|]*\|\s*(?P<n>\d+)/(?P<total>\d+)\s*\[(?P<info>[^\]]*)\]")
#: the plain line qsmkit prints instead when its stderr is not a terminal (qsmkit/progress.py):
#: "qsmkit run: [2/4] background" (steps done, then the step now running)
_PLAIN = re.compile(r"^qsmkit[^:]*: \[(?P<n>\d+)/(?P<total>\d+)\] (?P<stage>\S.*)$")


def parse_progress(line: str):
    """(fraction done, stage or None) from a progress line (tqdm or plain), or None for other
    lines."""
    m = _PLAIN.match(line.strip())
    if m:
        total = int(m.group("total"))
        return min(max(int(m.group("n")) / total if total else 0.0, 0.0), 1.0), m.group("stage")
    m = _TQDM.search(line)
    if not m:
        return None
    total = int(m.group("total"))
    fraction = int(m.group("n")) / total if total else 0.0
    parts = [p.strip() for p in m.group("info").split(",")]
    stage = parts[-1] if len(parts) > 2 else None  # "elapsed<left", "rate", then the postfix
    if stage is not None and (not stage or "/s" in stage or "?" in stage):
        stage = None
    return min(max(fraction, 0.0), 1.0), stage


def qsmkit_command(args, python: str | None = None) -> list:
    """The argument list running ``qsmkit ARGS`` with the given Python (default: this one)."""
    return [python or sys.executable, "-m", "qsmkit.cli", *[str(a) for a in args]]


def qsmkit_environment(qsmkit_parent: str | None, base: dict | None = None) -> dict:
    """``base`` (default: this process's environment) with ``qsmkit_parent`` first on
    PYTHONPATH, so that the child imports the same qsmkit as this process, and UTF-8 output."""
    env = dict(os.environ if base is None else base)
    if qsmkit_parent:
        parts = [qsmkit_parent] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
    env["PYTHONIOENCODING"] = "utf-8"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def kill_process_tree(proc: subprocess.Popen, grace: float = 2.0) -> None:
    """End a started process and every process under it, on every platform: terminate them
    all, then kill what is still alive after ``grace`` seconds.

    The descendants are found with psutil (which Slicer ships), so a child that left the
    process group (or Windows, which has none) is reached too. On POSIX the group is also sent
    SIGTERM, for a descendant started after the list was taken. The process itself is waited
    for (and reaped) through ``proc``. Without psutil: the group (POSIX) or ``taskkill /T``."""
    try:
        import psutil
    except ImportError:
        psutil = None
    posix = os.name != "nt"
    descendants = []
    if psutil is not None:
        try:
            descendants = psutil.Process(proc.pid).children(recursive=True)
        except psutil.Error:
            descendants = []
    elif not posix:  # before the launcher ends, while its children still name it as parent
        subprocess.run(["taskkill", "/T", "/F", "/PID", str(proc.pid)], capture_output=True,
                       check=False)
    if posix:
        _signal_group(proc.pid, signal.SIGTERM)
    try:
        proc.terminate()
    except OSError:
        pass
    for p in descendants:
        try:
            p.terminate()
        except psutil.Error:
            pass
    deadline = time.monotonic() + grace
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        if posix:  # not reaped yet, so the group is still this process's
            _signal_group(proc.pid, signal.SIGKILL)
        proc.kill()
        proc.wait()
    if descendants:
        _gone, alive = psutil.wait_procs(descendants, timeout=max(0.0, deadline - time.monotonic()))
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=grace)


def _signal_group(pgid: int, sig) -> None:
    try:
        os.killpg(pgid, sig)
    except (OSError, ValueError):
        pass


class QsmkitProcess:
    """A command running in the background (normally ``qsmkit ...``).

    ``on_line(text)`` receives each finished output line that is not a progress update;
    ``on_progress(fraction, stage)`` each progress change. Both are called from :meth:`poll`,
    that is on the caller's thread (the Qt main thread in Slicer), never from the reader thread.
    """

    def __init__(self, argv, env=None, cwd=None, on_line=None, on_progress=None):
        self.argv = [str(a) for a in argv]
        self.env = env
        self.cwd = cwd
        self.on_line = on_line
        self.on_progress = on_progress
        self.log: list[str] = []
        self.progress: float | None = None
        self.stage: str | None = None
        self.returncode: int | None = None
        self.cancelled = False
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self._proc = None
        self._queue: queue.Queue = queue.Queue()
        self._reader = None

    # -------------------------------------------------------------- life cycle

    def start(self):
        if self._proc is not None:
            raise RuntimeError("process already started")
        kwargs = {}
        if os.name == "nt":  # no console window
            kwargs["creationflags"] = getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:  # a process group of its own, so that cancel reaches anything it starts
            kwargs["start_new_session"] = True
        self.started_at = time.monotonic()
        self._proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd,
                                      **kwargs)
        self._reader = threading.Thread(target=self._read, name="qsmkit-output", daemon=True)
        self._reader.start()
        return self

    def _read(self):
        """Reader thread: split the output on newlines and carriage returns (progress bars)."""
        stream = self._proc.stdout
        pending = b""
        while True:
            chunk = stream.read1(4096) if hasattr(stream, "read1") else stream.read(1)
            if not chunk:
                break
            pending += chunk
            parts = re.split(rb"[\r\n]", pending)
            pending = parts.pop()
            for p in parts:
                self._queue.put(p.decode("utf-8", errors="replace"))
        if pending:
            self._queue.put(pending.decode("utf-8", errors="replace"))
        self._queue.put(None)  # end of output

    @property
    def running(self) -> bool:
        return self._proc is not None and self.returncode is None

    def poll(self) -> bool:
        """Handle the output received so far; True while the process runs (or output remains)."""
        if self._proc is None:
            return False
        done_reading = False
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                done_reading = True
                break
            self._handle(item)
        if done_reading or (self._reader is not None and not self._reader.is_alive()
                            and self._queue.empty()):
            code = self._proc.wait()
            if self.returncode is None:
                self.returncode = code
                self.finished_at = time.monotonic()
            return False
        return True

    def _handle(self, text: str):
        parsed = parse_progress(text)
        if parsed is not None:
            fraction, stage = parsed
            if (fraction, stage) != (self.progress, self.stage):
                self.progress, self.stage = fraction, stage or self.stage
                if self.on_progress:
                    self.on_progress(self.progress, self.stage)
            return
        text = text.rstrip()
        if not text.strip():
            return
        self.log.append(text)
        if self.on_line:
            self.on_line(text)

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> int:
        """Poll until the process ends (scripts, tests, the Python console); returns its exit
        status. On timeout the process is cancelled and TimeoutError raised."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll():
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                raise TimeoutError(f"{' '.join(self.argv[:4])} ... did not finish in {timeout} s")
            time.sleep(interval)
        return self.returncode

    def cancel(self, grace: float = 2.0):
        """End the process and every process under it: terminate, then kill after ``grace``
        seconds. In Slicer the command runs under the ``PythonSlicer`` launcher, which starts
        the real Python as its child, so ending the launcher alone would leave the computation
        running (on Windows, where there are no process groups, it did)."""
        if self._proc is None or self._proc.poll() is not None:
            return
        self.cancelled = True
        kill_process_tree(self._proc, grace)
        while self.poll():  # drain what the process wrote before it ended
            time.sleep(0.01)

    # -------------------------------------------------------------- reporting

    @property
    def seconds(self) -> float | None:
        if self.started_at is None:
            return None
        end = self.finished_at if self.finished_at is not None else time.monotonic()
        return end - self.started_at

    def error_message(self) -> str:
        """The reason a failed command gave (its ``qsmkit: error:`` line, else its last line)."""
        for line in reversed(self.log):
            if "error:" in line:
                return line.split("error:", 1)[1].strip()
        if self.cancelled:
            return "cancelled"
        return self.log[-1] if self.log else f"exit status {self.returncode}"
