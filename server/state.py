"""The server's state on disk (``gradserve serve --state-dir DIR``): what survives a restart or a crash.

Layout of ``DIR``:

- ``models/<model id>.model``: each stored model in gradserve's own format (a serialized
  ``gradserve.v1.Model``, never unpickled), named by its content hash and checked against it when
  read back;
- ``jobs/<job id>.feeds.npz``: an accepted job's feeds, written before the job is acknowledged;
- ``jobs/<job id>.result.npz``: a finished job's loss, dL/dw, dL/dx and info, until fetched or
  expired (read with ``allow_pickle=False``: arrays only);
- ``sessions/<session id>.session.npz``: an open training session's last checkpoint: its weights,
  optimizer state and description (model, optimizer, counts, step), until the session closes;
- ``state.sqlite3``: one row per job (model, options, client, state, error), in SQLite's
  write-ahead log mode;
- ``lock``: held (``flock``) while a server uses the directory, so a second server on the same
  directory fails at start instead of running the same jobs twice.

Every file is written atomically: to a temporary name in the same directory, flushed, fsynced,
renamed over the final name, and the directory fsynced; a crash leaves either the old state or the
new one, never half a file. A job's row is written after its feeds and before it is acknowledged,
so every acknowledged job can be run again; a result's file is written before its row says "done".
``max_bytes`` bounds the files' total size (models, feeds, results): a write that would exceed it
raises :class:`LimitExceeded` (RESOURCE_EXHAUSTED) and leaves nothing behind.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from gradserve.proto.npz import save_npz
from gradserve.server.errors import LimitExceeded
from gradserve.server.result import Result
from gradserve.worker.graph import GraphError, Model

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    model_id TEXT NOT NULL,
    options TEXT NOT NULL,      -- JSON: partitions, micro_batches, replicas, input_grads
    client TEXT NOT NULL,
    state TEXT NOT NULL,        -- queued, running, done, failed, cancelled
    error_code TEXT NOT NULL DEFAULT '',
    message TEXT NOT NULL DEFAULT '',
    submitted REAL NOT NULL,    -- wall-clock seconds (time.time())
    finished REAL
)
"""


class StateDirInUse(RuntimeError):
    """Another server holds the state directory."""


@dataclass(frozen=True)
class JobRecord:
    """A job as the state directory remembers it."""

    job_id: str
    model_id: str
    options: dict[str, Any]
    client: str
    state: str
    error_code: str
    message: str
    submitted: float
    finished: float | None


class StateDir:
    """The on-disk state of one server (see the module docs). Thread-safe."""

    def __init__(self, path: str | Path, max_bytes: int) -> None:
        self.path = Path(path).expanduser()
        self.max_bytes = max_bytes
        for sub in _SUBDIRS:
            (self.path / sub).mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.path / "lock", "a+")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.seek(0)
            holder = self._lock_file.read().strip() or "another process"
            self._lock_file.close()
            raise StateDirInUse(
                f"state directory {self.path} is in use by {holder}; give another --state-dir (or --state-dir none)"
            ) from None
        self._lock_file.seek(0)
        self._lock_file.truncate()
        self._lock_file.write(f"pid {os.getpid()}\n")
        self._lock_file.flush()
        self._mutex = threading.Lock()
        self._db = sqlite3.connect(self.path / "state.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(_SCHEMA)
        self._clean_temporaries()
        self._bytes = sum(f.stat().st_size for sub in _SUBDIRS for f in (self.path / sub).iterdir())

    def close(self) -> None:
        """Release the directory (the files stay)."""
        with self._mutex:
            self._db.close()
            self._lock_file.close()

    @property
    def nbytes(self) -> int:
        """Bytes of the files kept (models, feeds, results)."""
        with self._mutex:
            return self._bytes

    # -- models ------------------------------------------------------------------------------------
    def save_model(self, model_id: str, model: Model) -> None:
        """Keep ``model`` (a no-op when it is kept already)."""
        target = self._model_path(model_id)
        if not target.exists():
            self._write(target, model.to_bytes(), f"model {model_id[:16]}")

    def drop_model(self, model_id: str) -> None:
        self._remove(self._model_path(model_id))

    def models(self) -> Iterator[tuple[str, Model]]:
        """Every kept model whose file still hashes to its name; a damaged file is dropped."""
        for path in sorted((self.path / "models").glob("*.model")):
            model_id = path.stem
            try:
                model = Model.from_bytes(path.read_bytes())
                ok = model.fingerprint() == model_id
            except (OSError, GraphError):
                ok = False
            if ok:
                yield model_id, model
            else:
                self._remove(path)

    # -- jobs --------------------------------------------------------------------------------------
    def add_job(
        self, job_id: str, model_id: str, options: Mapping[str, Any], client: str, feeds: Mapping[str, np.ndarray]
    ) -> None:
        """Record an accepted job with its feeds (before it is acknowledged)."""
        self._write_npz(self._feeds_path(job_id), dict(feeds), f"the feeds of job {job_id}")
        with self._mutex:
            self._db.execute(
                "INSERT OR REPLACE INTO jobs (job_id, model_id, options, client, state, submitted) VALUES (?, ?, ?, ?, 'queued', ?)",
                (job_id, model_id, json.dumps(dict(options)), client, time.time()),
            )

    def set_state(self, job_id: str, state: str, error_code: str = "", message: str = "") -> None:
        """A job started (``running``), failed or was cancelled; a finished job's feeds are dropped."""
        with self._mutex:
            self._db.execute(
                "UPDATE jobs SET state = ?, error_code = ?, message = ?, finished = ? WHERE job_id = ?",
                (state, error_code, message, None if state in ("queued", "running") else time.time(), job_id),
            )
        if state not in ("queued", "running"):
            self._remove(self._feeds_path(job_id))

    def save_result(self, job_id: str, result: Result) -> None:
        """Keep a finished job's result (file first, then the row says done; feeds dropped)."""
        arrays = {
            "loss": np.asarray(result.loss, dtype=np.float64),
            "info": np.asarray(json.dumps(result.info, default=str)),
        }
        arrays.update({f"grad/{k}": v for k, v in result.grads.items()})
        arrays.update({f"input_grad/{k}": v for k, v in result.input_grads.items()})
        self._write_npz(self._result_path(job_id), arrays, f"the result of job {job_id}")
        self.set_state(job_id, "done")

    def load_result(self, job_id: str) -> Result:
        """A kept result (arrays only: ``allow_pickle=False``)."""
        with np.load(self._result_path(job_id), allow_pickle=False) as data:
            grads = {k[5:]: data[k] for k in data.files if k.startswith("grad/")}
            inputs = {k[11:]: data[k] for k in data.files if k.startswith("input_grad/")}
            return Result(float(data["loss"]), grads, inputs, json.loads(str(data["info"])))

    def load_feeds(self, job_id: str) -> dict[str, np.ndarray]:
        with np.load(self._feeds_path(job_id), allow_pickle=False) as data:
            return {k: data[k] for k in data.files}

    def forget_job(self, job_id: str) -> None:
        """Drop a job's row and files (its result was fetched, or expired)."""
        with self._mutex:
            self._db.execute("DELETE FROM jobs WHERE job_id = ?", (job_id,))
        self._remove(self._feeds_path(job_id))
        self._remove(self._result_path(job_id))

    def jobs(self) -> list[JobRecord]:
        """Every job kept, oldest first."""
        with self._mutex:
            rows = self._db.execute(
                "SELECT job_id, model_id, options, client, state, error_code, message, submitted, finished "
                "FROM jobs ORDER BY submitted"
            ).fetchall()
        return [JobRecord(r[0], r[1], json.loads(r[2]), *r[3:]) for r in rows]

    # -- files -------------------------------------------------------------------------------------
    # -- training sessions -----------------------------------------------------------------------------
    def save_session(
        self,
        session_id: str,
        meta: Mapping[str, Any],
        weights: Mapping[str, np.ndarray],
        states: Mapping[str, Mapping[str, np.ndarray]],
    ) -> None:
        """Keep a session's checkpoint (replacing its previous one): ``meta`` (JSON-able: model,
        optimizer, counts, step...), its weights and its optimizer state."""
        arrays = {"meta": np.array(json.dumps(dict(meta)))}
        arrays.update({f"w/{name}": value for name, value in weights.items()})
        arrays.update({f"s/{name}/{key}": value for name, state in states.items() for key, value in state.items()})
        self._write_npz(self._session_path(session_id), arrays, f"session {session_id}'s checkpoint")

    def drop_session(self, session_id: str) -> None:
        self._remove(self._session_path(session_id))

    def sessions(self) -> Iterator[tuple[str, dict[str, Any], dict[str, np.ndarray], dict[str, dict[str, np.ndarray]]]]:
        """Every kept session checkpoint: (id, meta, weights, optimizer states)."""
        for path in sorted((self.path / "sessions").glob("*.session.npz")):
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                weights: dict[str, np.ndarray] = {}
                states: dict[str, dict[str, np.ndarray]] = {}
                for key in data.files:
                    kind, _, rest = key.partition("/")
                    if kind == "w":
                        weights[rest] = data[key]
                    elif kind == "s":
                        name, _, state_key = rest.rpartition("/")
                        states.setdefault(name, {})[state_key] = data[key]
            yield path.name[: -len(".session.npz")], meta, weights, states

    def _session_path(self, session_id: str) -> Path:
        return self.path / "sessions" / f"{_safe(session_id)}.session.npz"

    def _model_path(self, model_id: str) -> Path:
        if len(model_id) != 64 or any(c not in "0123456789abcdef" for c in model_id):
            raise ValueError(f"not a model id: {model_id!r}")
        return self.path / "models" / f"{model_id}.model"

    def _feeds_path(self, job_id: str) -> Path:
        return self.path / "jobs" / f"{_safe(job_id)}.feeds.npz"

    def _result_path(self, job_id: str) -> Path:
        return self.path / "jobs" / f"{_safe(job_id)}.result.npz"

    def _write_npz(self, target: Path, arrays: dict[str, np.ndarray], what: str) -> None:
        buffer = io.BytesIO()
        save_npz(buffer, arrays)
        self._write(target, buffer.getvalue(), what)

    def _write(self, target: Path, data: bytes, what: str) -> None:
        """Write ``data`` to ``target`` atomically, within the byte budget."""
        with self._mutex:
            if self._bytes + len(data) > self.max_bytes:
                raise LimitExceeded(
                    f"{what} needs {len(data)} bytes on disk; the state directory holds {self._bytes} of "
                    f"{self.max_bytes} (--max-state-bytes)"
                )
            self._bytes += len(data)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            old = target.stat().st_size if target.exists() else 0
            os.replace(tmp, target)
            _fsync_dir(target.parent)
        except BaseException:
            with self._mutex:
                self._bytes -= len(data)
            tmp.unlink(missing_ok=True)
            raise
        if old:
            with self._mutex:
                self._bytes -= old

    def _remove(self, path: Path) -> None:
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return
        with self._mutex:
            self._bytes -= size

    def _clean_temporaries(self) -> None:
        """Temporary files a crash left behind."""
        for sub in _SUBDIRS:
            for tmp in (self.path / sub).glob(".*.tmp"):
                tmp.unlink(missing_ok=True)


_SUBDIRS = ("models", "jobs", "sessions")


def _safe(job_id: str) -> str:
    """A job id as a file name (ids are made by the registry; refuse anything path-like)."""
    if not job_id or any(c in job_id for c in "/\\\0") or job_id.startswith("."):
        raise ValueError(f"not a job id: {job_id!r}")
    return job_id


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def default_state_dir() -> Path:
    """Where ``gradserve serve`` keeps its state unless told otherwise: under the user's cache
    directory (``$XDG_CACHE_HOME`` or ``~/.cache``)."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "gradserve" / "state"
