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

import numpy as np

from gradserve.server.errors import LimitExceeded, NotFound
from gradserve.worker.graph import Model


def model_bytes(model: Model) -> int:
    """Bytes of a model's parameters and constants: what it costs to keep it."""
    return sum(int(np.asarray(a).nbytes) for a in (*model.params.values(), *model.constants.values()))


@dataclass(frozen=True)
class StoredModel:
    model_id: str
    model: Model
    nbytes: int


class ModelStore:
    """Thread-safe LRU store of models; ``max_bytes`` bounds the sum of their sizes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._models: "OrderedDict[str, StoredModel]" = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

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
        with self._lock:
            stored = self._models.get(model_id)
            if stored is None:
                raise NotFound(f"model '{model_id}' is not on this server (upload it first)")
            self._models.move_to_end(model_id)
            return stored.model

    def put(self, model_id: str, model: Model) -> StoredModel:
        """Store ``model`` under ``model_id``, evicting least recently used models to make room."""
        nbytes = model_bytes(model)
        if nbytes > self.max_bytes:
            raise LimitExceeded(f"model of {nbytes} bytes does not fit the model store ({self.max_bytes} bytes)")
        with self._lock:
            existing = self._models.get(model_id)
            if existing is not None:
                self._models.move_to_end(model_id)
                return existing
            while self._models and self._bytes + nbytes > self.max_bytes:
                _, old = self._models.popitem(last=False)
                self._bytes -= old.nbytes
            stored = StoredModel(model_id, model, nbytes)
            self._models[model_id] = stored
            self._bytes += nbytes
            return stored

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._bytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._models)
