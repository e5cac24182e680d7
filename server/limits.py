"""What one server accepts (no heavy imports: the CLI reads the defaults to build its help)."""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """Every limit breached is answered with RESOURCE_EXHAUSTED and a message naming the limit and
    the offending tensor or job."""

    max_model_bytes: int = 4 << 30  # parameters + constants of one model
    max_store_bytes: int = 16 << 30  # all stored models together (least recently used go first)
    max_feed_bytes: int = 2 << 30  # the feeds of one job
    max_tensor_elements: int = 1 << 30  # elements of any one tensor
    # Jobs computing at once (more wait in the queue). None, "auto": the engine's capacity -- for
    # the Ray engine two per CPU of the cluster's alive nodes, following nodes that join
    # or leave; 2 for the inline engine (see server/jobs.py). A number is the limit itself.
    max_concurrent_jobs: int | None = None
    max_queued_jobs: int = 64  # jobs waiting beyond those
    max_message_bytes: int = 16 << 20  # one gRPC message (chunks are 1 MiB; the graph travels whole)
    max_pending_bytes: int = 8 << 30  # uploads being received + feeds of queued/running jobs, together
    result_ttl: float = 600.0  # seconds an unfetched result (and a finished job's record) is kept
    max_state_bytes: int = 64 << 30  # files in the state directory: models, accepted jobs' feeds, results
    session_idle_ttl: float = 1800.0  # seconds a training session may go without a call before it is closed
    max_sessions_per_client: int = 8  # training sessions one client (connection) may hold open
    # A training session's checkpoint (weights and optimizer state, to the state directory and what a
    # lost worker restarts it from) is taken every this many steps or seconds, whichever comes first.
    session_checkpoint_steps: int = 100
    session_checkpoint_seconds: float = 300.0


class ByteBudget:
    """Bytes that requests in flight may hold at once (uploads being received, feeds of queued and
    running jobs): without it, many requests each under the per-request limits could together
    exhaust the server's memory."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._lock = threading.Lock()

    def reserve(self, nbytes: int, what: str) -> int:
        """Take ``nbytes`` for ``what``; LimitExceeded (RESOURCE_EXHAUSTED) when they do not fit."""
        from gradserve.proto.chunks import LimitExceeded

        with self._lock:
            if self.used + nbytes > self.capacity:
                raise LimitExceeded(
                    f"{what} needs {nbytes} bytes, but requests in flight already hold {self.used} of the server's "
                    f"{self.capacity} bytes for pending data -- retry later"
                )
            self.used += nbytes
        return nbytes

    def release(self, nbytes: int) -> None:
        with self._lock:
            self.used = max(0, self.used - nbytes)
