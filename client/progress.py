"""A one-line progress display on stderr for remote jobs.

Quiet for the first second (most jobs finish before anyone wants a progress bar), then a text bar
redrawn in place on a terminal, or one line per change at most once a second elsewhere (logs).
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressLine:
    """Call :meth:`update` with each job status, :meth:`close` when done."""

    WIDTH = 24

    def __init__(self, stream: TextIO | None = None, delay: float = 1.0) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.delay = delay
        self.start = time.monotonic()
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._shown = False
        self._last_text = ""
        self._last_time = 0.0

    def update(self, status) -> None:
        """Show ``status`` (a :class:`gradserve.client.remote.JobStatus`) if the job is slow enough."""
        now = time.monotonic()
        if now - self.start < self.delay:
            return
        text = self.render(status, now - self.start)
        if text == self._last_text:
            return
        if self.tty:
            self.stream.write("\r" + text.ljust(len(self._last_text)))
        elif now - self._last_time >= 1.0 or status.finished:
            self.stream.write(text + "\n")
        else:
            return
        self.stream.flush()
        self._shown, self._last_text, self._last_time = True, text, now

    def render(self, status, elapsed: float) -> str:
        if status.steps_total > 0:
            done = min(status.steps_done, status.steps_total)
            filled = round(self.WIDTH * done / status.steps_total)
            count = f"[{'#' * filled}{'.' * (self.WIDTH - filled)}] {done}/{status.steps_total}"
        else:  # the total is not known (yet): the engine is still choosing how many steps, say
            count = f"[{status.steps_done} steps]"
        where = ""
        if status.event is not None and status.state == "running":
            e = status.event
            where = (
                f" {e.phase} p{e.partition}"
                + (f" mb{e.micro_batch}" if e.micro_batch else "")
                + (f" r{e.replica}" if e.replica else "")
            )
        return f"{count} {status.state}{where} {elapsed:.1f}s"

    def close(self) -> None:
        """End the line (only if anything was shown)."""
        if self._shown and self.tty:
            self.stream.write("\n")
            self.stream.flush()
