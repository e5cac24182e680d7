"""Resumable model uploads: what a broken ``UploadModel`` stream delivered is kept for a while, its
bytes still reserved in the server's pending budget, so that a resume sends only the rest (see
``ModelInfo.received_bytes`` in ``proto/v1/service.proto``).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from gradserve.proto import chunks
from gradserve.proto.v1 import service_pb2

if TYPE_CHECKING:
    from gradserve.server.limits import ByteBudget
    from gradserve.server.models import ModelStore

log = logging.getLogger("gradserve.server")

UPLOAD_TTL = 600.0  # seconds a broken upload's data is kept for a resume (PartialUploads.ttl)


@dataclass
class PartialUpload:
    """What a broken UploadModel stream delivered, kept for a resume (see ModelInfo.received_bytes)."""

    asm: chunks.Assembler
    manifest_key: bytes  # SHA-256 of the deterministic manifest: a resume must send the same one
    held: int  # bytes reserved in the pending budget, released when dropped or completed
    expires: float  # on the PartialUploads' clock (time.monotonic)


class PartialUploads:
    """Broken uploads kept for a resume, by model id (at most one each); their bytes stay reserved
    in ``pending`` until completed, dropped or expired (``ttl`` seconds after the stream broke).
    ``store``: the models stored, whose broken uploads need not be kept. ``clock``: seconds, for the
    expiry (tests pass their own to expire an upload without waiting)."""

    def __init__(
        self,
        pending: ByteBudget,
        store: ModelStore,
        ttl: float = UPLOAD_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pending, self.store, self.ttl, self.clock = pending, store, ttl, clock
        self._kept: dict[str, PartialUpload] = {}
        self._lock = threading.Lock()

    def sweep(self) -> None:
        """Drop the kept partial uploads that expired, releasing their pending bytes."""
        now = self.clock()
        with self._lock:
            expired = [(mid, p) for mid, p in self._kept.items() if p.expires <= now]
            for mid, _ in expired:
                del self._kept[mid]
        for mid, p in expired:
            self.pending.release(p.held)
            log.info(
                "partial upload of model %s expired: %d of %d bytes dropped",
                mid[:16],
                p.asm.received_bytes,
                p.asm.total_bytes,
            )

    def received(self, model_id: str) -> dict[str, int]:
        """Bytes kept of each tensor of ``model_id``'s partial upload (none kept: empty)."""
        with self._lock:
            partial = self._kept.get(model_id)
            return partial.asm.received() if partial is not None else {}

    def begin(
        self, manifest: service_pb2.ModelManifest, new_assembler: Callable[[], chunks.Assembler]
    ) -> tuple[PartialUpload, bool]:
        """The upload a stream sending ``manifest`` continues, and whether it is resumed: the one
        kept for its model, taken out of the kept ones (the caller now owns its bytes), else a new
        one from ``new_assembler()``, its bytes reserved in the pending budget."""
        model_id = manifest.model_id
        # A broken upload of this model kept here is resumed when the manifest is the same one;
        # a different manifest (hence a wrong one, the id being the content hash) starts afresh.
        key = hashlib.sha256(manifest.SerializeToString(deterministic=True)).digest()
        partial = self._take(model_id)
        if partial is not None and partial.manifest_key != key:
            log.info(
                "upload of model %s: the manifest differs from the partial upload kept, which is dropped", model_id[:16]
            )
            self.pending.release(partial.held)
            partial = None
        if partial is None:
            asm = new_assembler()
            asm.declare(manifest.parameters, "parameter")
            asm.declare(manifest.constants, "constant")
            held = self.pending.reserve(asm.total_bytes, f"the upload of model {model_id[:16]}")
            return PartialUpload(asm, key, held, 0.0), False
        partial.asm.resume()
        log.info(
            "upload of model %s resumed at %d of %d bytes",
            model_id[:16],
            partial.asm.received_bytes,
            partial.asm.total_bytes,
        )
        return partial, True

    def _take(self, model_id: str) -> PartialUpload | None:
        """Remove and return the partial upload kept for ``model_id`` (the caller owns its bytes)."""
        with self._lock:
            return self._kept.pop(model_id, None)

    def drop(self, model_id: str) -> None:
        """Forget the partial upload kept for ``model_id``, if any, releasing its bytes."""
        partial = self._take(model_id)
        if partial is not None:
            self.pending.release(partial.held)

    def keep(self, model_id: str, partial: PartialUpload) -> None:
        """Keep what a broken stream delivered (when it delivered anything and the model is not
        stored meanwhile); of two broken streams of one model the one further along is kept."""
        if partial.asm.received_bytes == 0 or self.store.has(model_id):
            self.pending.release(partial.held)
            return
        partial.expires = self.clock() + self.ttl
        with self._lock:
            other = self._kept.get(model_id)
            if other is not None and other.asm.received_bytes >= partial.asm.received_bytes:
                drop: PartialUpload | None = partial
            else:
                self._kept[model_id], drop = partial, other
        if drop is not None:
            self.pending.release(drop.held)
        if drop is not partial:
            log.info(
                "upload of model %s broke after %d of %d bytes: kept for %.0fs for a resume",
                model_id[:16],
                partial.asm.received_bytes,
                partial.asm.total_bytes,
                self.ttl,
            )
