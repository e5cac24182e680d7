"""The server's open training sessions: who holds which, one call at a time each, closed when idle.

A session (:mod:`gradserve.server.session`) holds a model's weights and optimizer state on the
engine's workers. The registry opens them for clients (at most ``max_per_client`` each), serialises
the calls on each (a step and a weights query of one session never interleave), remembers each
session's last step reply so that a step sent again after a lost reply is answered, not applied
twice, and closes sessions idle past ``idle_ttl`` (a background sweep), returning their memory.

With a state directory, every checkpoint a session takes (:meth:`Session.checkpoint`, every
``checkpoint_steps`` steps or ``checkpoint_seconds``) is written there too, and a server restarted
on the same directory opens the sessions again from their checkpoints (:meth:`recover`); the next
step of each reports ``restored_from_step``.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from gradserve.server.errors import LimitExceeded, NotFound
from gradserve.server.result import Result
from gradserve.server.session import Checkpoint, Session
from gradserve.worker.optim import ParamGroups

if TYPE_CHECKING:  # pragma: no cover
    from gradserve.server.state import StateDir

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
    restored_from: int | None = None  # reopened from a checkpoint: the next step goes on from there


class SessionRegistry:
    """Open sessions by id, for every client of the server."""

    def __init__(
        self,
        open_session: Callable[..., Session],
        *,
        idle_ttl: float = IDLE_TTL,
        max_per_client: int = MAX_PER_CLIENT,
        state: "StateDir | None" = None,
        checkpoint_steps: int | None = None,
        checkpoint_seconds: float | None = None,
    ) -> None:
        """``open_session(model, optimizer, counts, **options)``: the engine's session (see
        :meth:`gradserve.server.engines.EngineRunner.session`)."""
        self._open_session = open_session
        self.idle_ttl = idle_ttl
        self.max_per_client = max_per_client
        self.state = state
        self.checkpoints = dict(checkpoint_steps=checkpoint_steps, checkpoint_seconds=checkpoint_seconds)
        self.steps = 0  # steps applied by all sessions since the server started
        self._sessions: dict[str, OpenSession] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep_loop, name="gradserve-session-sweep", daemon=True)
        self._sweeper.start()

    def open(
        self, model_id: str, model: Any, optimizer: ParamGroups, counts: tuple, max_norm: float | None, client: str
    ) -> OpenSession:
        """A new session of the stored model ``model_id`` for ``client``; RESOURCE_EXHAUSTED
        (LimitExceeded) when the client holds ``max_per_client`` already."""
        with self._lock:
            held = sum(1 for s in self._sessions.values() if s.client == client)
        if held >= self.max_per_client:
            raise LimitExceeded(
                f"this client has {held} sessions open, the most the server allows "
                f"(--max-sessions-per-client); close one first"
            )
        entry = self._start(uuid.uuid4().hex[:16], model_id, model, optimizer, counts, max_norm, client, None)
        log.info("session %s opened on model %s for %s", entry.id, model_id[:16], client or "a client")
        return entry

    def _start(
        self,
        session_id: str,
        model_id: str,
        model: Any,
        optimizer: ParamGroups,
        counts: tuple,
        max_norm: float | None,
        client: str,
        start: Checkpoint | None,
    ) -> OpenSession:
        meta = {
            "model_id": model_id,
            "optimizer": optimizer.to_dict(),
            "counts": list(counts),
            "max_norm": max_norm,
            "client": client,
        }
        on_checkpoint = None
        if self.state is not None:
            state = self.state

            def on_checkpoint(checkpoint: Checkpoint) -> None:
                state.save_session(session_id, {**meta, "step": checkpoint.step}, checkpoint.weights, checkpoint.states)

        session = self._open_session(
            model, optimizer, counts, max_norm=max_norm, on_checkpoint=on_checkpoint, start=start, **self.checkpoints
        )
        entry = OpenSession(
            session_id, model_id, client, session, restored_from=start.step if start is not None else None
        )
        with self._lock:
            self._sessions[entry.id] = entry
        return entry

    def recover(self, store: Any) -> int:
        """Open again the sessions whose checkpoints the state directory keeps (a restarted
        server); one whose model is gone is dropped. Returns how many were opened."""
        if self.state is None:
            return 0
        opened = 0
        for session_id, meta, weights, states in list(self.state.sessions()):
            try:
                model = store.get(meta["model_id"])
                self._start(
                    session_id,
                    meta["model_id"],
                    model,
                    ParamGroups.from_dict(meta["optimizer"]),
                    tuple(meta["counts"]),
                    meta["max_norm"],
                    meta.get("client", ""),
                    Checkpoint(int(meta["step"]), weights, states),
                )
                opened += 1
                log.info("session %s reopened from its checkpoint at step %d", session_id, meta["step"])
            except Exception as exc:  # noqa: BLE001 -- one bad checkpoint must not stop the server
                log.warning(
                    "session %s cannot be reopened (%s: %s); its checkpoint is dropped",
                    session_id,
                    type(exc).__name__,
                    exc,
                )
                self.state.drop_session(session_id)
        return opened

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
            self._end(entry)
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
            out.append(
                {
                    "session_id": e.id,
                    "model_id": e.model_id,
                    "steps": e.session.steps,
                    "idle_seconds": max(0.0, now - e.last_used),
                    "partitions": placed.get("partitions", 0),
                    "replicas": placed.get("replicas", 0),
                }
            )
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
                self._end(entry)
            finally:
                entry.lock.release()
            log.info("session %s closed: idle for more than %.0f s", entry.id, self.idle_ttl)

    def _end(self, entry: OpenSession) -> None:
        """A session closed for good: its workers' memory and its checkpoint go."""
        try:
            entry.session.close()
        finally:
            if self.state is not None:
                self.state.drop_session(entry.id)

    def _sweep_loop(self) -> None:
        while not self._stop.wait(max(1.0, self.idle_ttl / 4)):
            try:
                self.sweep()
            except Exception:  # noqa: BLE001 -- a failed close must not end the sweeping
                log.exception("closing idle sessions failed")

    def close_all(self) -> None:
        """Close every session (the server stops); their checkpoints stay for the next start."""
        self._stop.set()
        with self._lock:
            entries = list(self._sessions.values())
            self._sessions.clear()
        for entry in entries:
            try:
                with entry.lock:
                    if self.state is not None and entry.session.steps:  # the next start goes on from here
                        entry.session.checkpoint()
                    entry.session.close()
            except Exception:  # noqa: BLE001 -- the others are closed all the same
                log.exception("closing session %s failed", entry.id)
