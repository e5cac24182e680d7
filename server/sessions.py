"""The server's open training sessions: who holds which, one call at a time each, closed when idle.

A session (:mod:`gradserve.server.session`) holds a model's weights and optimizer state on the
engine's workers. The registry opens them for clients (at most ``max_per_client`` each), serialises
the calls on each (a step and a weights query of one session never interleave), remembers each
session's last step reply so that a step sent again after a lost reply is answered, not applied
twice, and closes sessions idle past ``idle_ttl`` (a background sweep), returning their memory.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from gradserve.server.errors import LimitExceeded, NotFound
from gradserve.server.result import Result
from gradserve.server.session import Session

log = logging.getLogger("gradserve.server")

IDLE_TTL = 1800.0  # seconds without a call after which the server closes a session
MAX_PER_CLIENT = 8


@dataclass
class OpenSession:
    """One open session as the server keeps it."""

    id: str
    model_id: str
    client: str
    session: Session
    lock: threading.Lock = field(default_factory=threading.Lock)  # one call at a time
    last_used: float = field(default_factory=time.monotonic)
    last_step: tuple[int, Result] | None = None  # the last step's number and reply, for a resent step


class SessionRegistry:
    """Open sessions by id, for every client of the server."""

    def __init__(self, open_session: Callable[..., Session], *, idle_ttl: float = IDLE_TTL,
                 max_per_client: int = MAX_PER_CLIENT) -> None:
        """``open_session(model, optimizer, counts, max_norm=...)``: the engine's session (see
        :meth:`gradserve.server.engines.EngineRunner.session`)."""
        self._open_session = open_session
        self.idle_ttl = idle_ttl
        self.max_per_client = max_per_client
        self.steps = 0  # steps applied by all sessions since the server started
        self._sessions: dict[str, OpenSession] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep_loop, name="gradserve-session-sweep", daemon=True)
        self._sweeper.start()

    def open(self, model_id: str, model: Any, optimizer: Any, counts: tuple, max_norm: float | None,
             client: str) -> OpenSession:
        """A new session of the stored model ``model_id`` for ``client``; RESOURCE_EXHAUSTED
        (LimitExceeded) when the client holds ``max_per_client`` already."""
        with self._lock:
            held = sum(1 for s in self._sessions.values() if s.client == client)
        if held >= self.max_per_client:
            raise LimitExceeded(f"this client has {held} sessions open, the most the server allows "
                                f"(--max-sessions-per-client); close one first")
        session = self._open_session(model, optimizer, counts, max_norm=max_norm)
        entry = OpenSession(uuid.uuid4().hex[:16], model_id, client, session)
        with self._lock:
            self._sessions[entry.id] = entry
        log.info("session %s opened on model %s for %s", entry.id, model_id[:16], client or "a client")
        return entry

    def get(self, session_id: str) -> OpenSession:
        with self._lock:
            entry = self._sessions.get(session_id)
        if entry is None:
            raise NotFound(f"no session '{session_id}' (closed, or idle past {self.idle_ttl:.0f} s)")
        return entry

    def close(self, session_id: str) -> OpenSession:
        """Close a session (waiting for a call in progress on it) and forget it."""
        entry = self.get(session_id)
        with entry.lock:
            with self._lock:
                self._sessions.pop(session_id, None)
            entry.session.close()
        log.info("session %s closed after %d steps", entry.id, entry.session.steps)
        return entry

    def count_step(self) -> None:
        with self._lock:
            self.steps += 1

    def snapshot(self) -> list[dict[str, Any]]:
        """The open sessions, oldest first, as ``gradserve status`` shows them."""
        now = time.monotonic()
        with self._lock:
            entries = list(self._sessions.values())
        out = []
        for e in entries:
            placed = e.session.placement
            out.append({"session_id": e.id, "model_id": e.model_id, "steps": e.session.steps,
                        "idle_seconds": max(0.0, now - e.last_used),
                        "partitions": placed.get("partitions", 0), "replicas": placed.get("replicas", 0)})
        return out

    def open_count(self) -> int:
        with self._lock:
            return len(self._sessions)

    def sweep(self) -> None:
        """Close the sessions idle past the TTL (not one with a call in progress)."""
        now = time.monotonic()
        with self._lock:
            idle = [s for s in self._sessions.values() if now - s.last_used > self.idle_ttl]
        for entry in idle:
            if not entry.lock.acquire(blocking=False):
                continue  # in use after all
            try:
                with self._lock:
                    self._sessions.pop(entry.id, None)
                entry.session.close()
            finally:
                entry.lock.release()
            log.info("session %s closed: idle for more than %.0f s", entry.id, self.idle_ttl)

    def _sweep_loop(self) -> None:
        while not self._stop.wait(max(1.0, self.idle_ttl / 4)):
            try:
                self.sweep()
            except Exception:  # noqa: BLE001 -- a failed close must not end the sweeping
                log.exception("closing idle sessions failed")

    def close_all(self) -> None:
        """Close every session (the server stops)."""
        self._stop.set()
        with self._lock:
            entries = list(self._sessions.values())
            self._sessions.clear()
        for entry in entries:
            try:
                entry.session.close()
            except Exception:  # noqa: BLE001 -- the others are closed all the same
                log.exception("closing session %s failed", entry.id)
