"""Waiting jobs, taken round-robin over clients (the job registry's fairness, see
:mod:`gradserve.server.jobs`).

One queue per client, first come first served within it; the client whose last job started longest
ago goes next, a new client first. So one client's 100 queued jobs delay another client's single
job by at most one job per client ahead of it. Not thread-safe: the registry calls it under its lock.
"""

from __future__ import annotations

import itertools
from collections import Counter, deque

from gradserve.server.job import Job


class FairQueue:
    """Jobs waiting to start, and how many each client has running."""

    def __init__(self) -> None:
        self._waiting: dict[str, deque[Job]] = {}  # client -> its queued jobs, oldest first
        # client -> when it last had a job started (admission count), kept while it has jobs waiting
        # or running: the client whose turn is longest ago goes next, a new client first.
        self._turn: dict[str, int] = {}
        self._running: Counter[str] = Counter()
        self._admissions = itertools.count()

    def __len__(self) -> int:
        """Jobs waiting."""
        return sum(len(queue) for queue in self._waiting.values())

    def __bool__(self) -> bool:
        return bool(self._waiting)

    def add(self, job: Job) -> None:
        """``job`` waits behind its client's earlier jobs."""
        self._waiting.setdefault(job.client, deque()).append(job)

    def pop(self) -> Job:
        """The next job to start: the oldest of the client whose turn is longest ago (call only
        when there is one). A job no longer waiting (cancelled) comes out too: the caller skips it
        with :meth:`dropped`, or starts it with :meth:`started`."""
        client = min(self._waiting, key=lambda c: (self._turn.get(c, -1), self._waiting[c][0].submitted))
        queue = self._waiting[client]
        job = queue.popleft()
        if not queue:
            del self._waiting[client]
        return job

    def started(self, job: Job) -> None:
        """``job`` runs now: its client's turn moves to the back."""
        self._turn[job.client] = next(self._admissions)
        self._running[job.client] += 1

    def ended(self, job: Job) -> None:
        """A job :meth:`started` has ended."""
        self._running[job.client] -= 1
        self.dropped(job)

    def dropped(self, job: Job) -> None:
        """A popped job will not run: forget its client's turn if it has nothing else here."""
        client = job.client
        if self._running[client] <= 0 and client not in self._waiting:
            self._running.pop(client, None)
            self._turn.pop(client, None)
