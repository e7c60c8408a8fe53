"""Progress of long work on stderr: a tqdm bar on a terminal, a few plain lines otherwise.

A bar redraws itself with carriage returns, which fill a log file or a pipe (a batch job, the
Slicer panels' background process) with one fragment per redraw. When stderr is not a terminal
each step is one line instead, ``qsmkit run: [2/4] background``: the count of steps done, then
the step now running; the last line, ``[4/4] inversion``, names the last step, as the bar's
final state does. ``--quiet`` silences both.
"""

from __future__ import annotations

import sys


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class Progress:
    """``progress(step, done, total)`` callback over the steps of one command.

    Parameters
    ----------
    total : int
        Number of steps.
    quiet : bool
        Print nothing.
    desc : str
        Prefix of the bar or of each line, e.g. ``"qsmkit run"``.
    unit : str
        What a step is (``"stage"``, ``"echo"``, ``"subject"``), shown by the bar.
    stream : file, optional
        Where to write (default ``sys.stderr``); a bar only when it is a terminal.
    """

    def __init__(self, total, quiet=False, desc="qsmkit", unit="stage", stream=None):
        self.total, self.desc, self.quiet = int(total), desc, quiet
        self.stream = sys.stderr if stream is None else stream
        self.bar = None
        self._last = None
        if not quiet and _is_terminal(self.stream):
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc=desc, unit=unit, file=self.stream, leave=False)

    def __call__(self, step, done, total=None):
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(str(step))
            self.bar.n = done
            self.bar.refresh()
            return
        total = self.total if total is None else total
        # called before and after each step: one line when a step starts, one at the end
        line = (step, done >= total)
        if line == self._last or (step == (self._last or (None,))[0] and done < total):
            return
        print(f"{self.desc}: [{done}/{total}] {step}", file=self.stream, flush=True)
        self._last = line

    def close(self):
        if self.bar is not None:
            self.bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def iterate(items, desc, quiet=False, unit="step", name=str):
    """Yield ``items`` while reporting progress, one step per item (named by ``name(item)``)."""
    items = list(items)
    with Progress(len(items), quiet, desc, unit) as progress:
        for k, item in enumerate(items):
            progress(name(item), k)
            yield item
            progress(name(item), k + 1)
