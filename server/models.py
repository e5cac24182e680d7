"""The server's model store: models keyed by their content hash, bounded in bytes.

The key is :meth:`Model.fingerprint` (SHA-256 of graph and parameter values), so a model is stored
once however often it is uploaded, and an id names exactly one model. When the store would exceed
its byte budget the least recently used models are dropped; a job that already holds a model keeps
it alive until the job ends, so eviction never breaks a running job.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from gradserve.server.errors import LimitExceeded, NotFound
from gradserve.worker.graph import Model

if TYPE_CHECKING:
    from gradserve.server.state import StateDir


def model_bytes(model: Model) -> int:
    """Bytes of a model's parameters and constants: what it costs to keep it."""
    return sum(int(np.asarray(a).nbytes) for a in (*model.params.values(), *model.constants.values()))


@dataclass(frozen=True)
class StoredModel:
    model_id: str
    model: Model
    nbytes: int
    structure: str  # Model.structure_fingerprint, computed once: every job's preparation is keyed by it


class ModelStore:
    """Thread-safe LRU store of models; ``max_bytes`` bounds the sum of their sizes.

    With a ``state`` directory every stored model is also kept on disk (and dropped from it when
    evicted), and the models kept there are loaded back at start: a restart needs no new upload.
    """

    def __init__(self, max_bytes: int, state: "StateDir | None" = None) -> None:
        self.max_bytes = max_bytes
        self._models: "OrderedDict[str, StoredModel]" = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._state = state
        if state is not None:
            for model_id, model in state.models():
                if self._bytes + model_bytes(model) > max_bytes:
                    state.drop_model(model_id)  # the store got smaller since: keep what fits
                    continue
                self._add(model_id, model)

    def has(self, model_id: str) -> bool:
        """Whether the model is stored (does not count as a use for LRU)."""
        with self._lock:
            return model_id in self._models

    def info(self, model_id: str) -> StoredModel | None:
        """The stored entry, or None."""
        with self._lock:
            return self._models.get(model_id)

    def get(self, model_id: str) -> Model:
        """The model with this id; :class:`NotFound` if the server does not have it."""
        return self.entry(model_id).model

    def entry(self, model_id: str) -> StoredModel:
        """The stored entry of this id, used now (LRU); :class:`NotFound` if the server does not have it."""
        with self._lock:
            stored = self._models.get(model_id)
            if stored is None:
                raise NotFound(f"model '{model_id}' is not on this server (upload it first)")
            self._models.move_to_end(model_id)
            return stored

    def put(self, model_id: str, model: Model) -> StoredModel:
        """Store ``model`` under ``model_id``, evicting least recently used models to make room
        (on disk too, with a state directory: written before the model counts as stored)."""
        nbytes = model_bytes(model)
        if nbytes > self.max_bytes:
            raise LimitExceeded(f"model of {nbytes} bytes does not fit the model store ({self.max_bytes} bytes)")
        with self._lock:
            existing = self._models.get(model_id)
            if existing is not None:
                self._models.move_to_end(model_id)
                return existing
        if self._state is not None:
            self._state.save_model(model_id, model)  # LimitExceeded (--max-state-bytes) stores nothing
        evicted = []
        with self._lock:
            existing = self._models.get(model_id)  # another upload of the same model meanwhile
            if existing is not None:
                return existing
            while self._models and self._bytes + nbytes > self.max_bytes:
                _, old = self._models.popitem(last=False)
                self._bytes -= old.nbytes
                evicted.append(old.model_id)
            stored = self._add(model_id, model)
        if self._state is not None:
            for old_id in evicted:
                self._state.drop_model(old_id)
        return stored

    def _add(self, model_id: str, model: Model) -> StoredModel:
        stored = StoredModel(model_id, model, model_bytes(model), model.structure_fingerprint())
        self._models[model_id] = stored
        self._bytes += stored.nbytes
        return stored

    def entries(self) -> list[StoredModel]:
        """Every stored model, least recently used first."""
        with self._lock:
            return list(self._models.values())

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._bytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._models)
