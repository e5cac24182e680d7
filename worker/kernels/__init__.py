"""Compiled kernels: the hot loops numpy can only do in several passes over memory, JIT-compiled by
numba. This package is their one home; the ops in :mod:`gradserve.worker.ops` call them.

- **Loading.** :func:`get` imports the kernel module (and numba, 0.3 s) the first time an op
  calls a kernel, and numba loads each kernel from its cache the first time it runs (~20 ms), so
  processes that never run one -- clients, the CLI on small jobs (the ops take numpy's paths below
  a size where a kernel pays) -- pay neither. :func:`enabled` answers "are the kernels on here?"
  without importing numba: planning decides its rewrites with it. Kernels are compiled once per
  machine: ``cache=True``, in ``NUMBA_CACHE_DIR`` -- by default ``$XDG_CACHE_HOME/gradserve/numba``
  (``~/.cache/...``), so a read-only install works; a user's own ``NUMBA_CACHE_DIR`` wins.
- **Warm-up.** :func:`warm_up` loads every kernel for float32 and float64 from the cache (0.6-1 s)
  where a full compile already ran on this machine; long-lived processes -- Ray workers, the
  server -- call it at start so no job pays the loading. On a machine that never compiled them it
  compiles nothing (all of them took 45 s on one core of an AMD EPYC, the whole of a first demo's
  wait): each kernel then compiles the first time a job needs it, once per machine, and processes
  that need none -- small jobs take numpy's paths -- pay nothing. ``warm_up(compile=True)``
  compiles them all and marks the cache complete (:func:`_complete_marker`).
- **Threads.** Kernels parallel over channels use numba's (OpenMP) threads: as many as
  :func:`threads` allows the calling thread, as threadpoolctl limits BLAS -- an engine that gives a
  step ``n`` BLAS threads wraps the step in ``threads(n)`` too, so pipelined stages on one node do
  not oversubscribe it. Without a budget (``GRADSERVE_KERNEL_THREADS`` sets one), kernels run on
  every core where the products run on MKL, whose idle threads sleep, and on one thread where they
  run on OpenBLAS: its idle threads spin for a while after each product, and a second kernel thread
  fights them for a core (inside the benchmark CNN's step on 2 cores, two kernel threads made the
  kernels 1.7x and the convolutions around them 1.4x slower than one; on MKL they made the kernels
  1.8x faster). Idle kernel threads sleep rather than spin (``OMP_WAIT_POLICY=PASSIVE`` unless the
  user set it).
- **Without numba** (it cannot be imported on some platform, or ``GRADSERVE_KERNELS=0``),
  :func:`get` returns None, a warning says so once, and the ops run their numpy paths.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import logging
import os
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Iterator

log = logging.getLogger(__name__)

# Arrays of fewer elements take the ops' numpy paths, not a kernel: numba's call overhead outweighs
# the passes a kernel saves there, and a process whose arrays are all smaller never imports numba.
MIN_SIZE = 1 << 14

# float32 (and float16) erf: Eigen's / XLA's single-precision x P(x^2)/Q(x^2) on x clipped to
# [-4, 4] (erf(4) rounds to 1 in float32), coefficients highest degree first. The one source for
# the op's numpy path (ops/unary.py) and the compiled one (kernels/compiled.py).
ERF32 = (
    (
        -2.72614225801306e-10,
        2.77068142495902e-08,
        -2.10102402082508e-06,
        -5.69250639462346e-05,
        -7.34990630326855e-04,
        -2.95459980854025e-03,
        -1.60960333262415e-02,
    ),
    (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03, -1.42647390514189e-02),
)

_lock = threading.Lock()
_loaded: ModuleType | None = None
_failed: str | None = None
_warm = False
_budget = threading.local()


def cache_dir() -> Path:
    """Where compiled kernels are cached: ``NUMBA_CACHE_DIR`` if the user set it, else gradserve's
    folder under the user's cache directory."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return Path(os.environ["NUMBA_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gradserve" / "numba"


def _configure() -> None:
    """Before numba starts: idle OpenMP threads sleep (a spinning one takes a core from OpenBLAS's
    threads in the matrix products between two kernels: convolutions measured 50% slower inside a
    step), and numba's cache goes to :func:`cache_dir` (set before any kernel is defined: numba
    picks a function's cache location when it is decorated)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    path = cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
        writable = os.access(path, os.W_OK)
    except OSError:
        writable = False
    if not writable:  # no usable home: numba then caches beside the sources or not at all
        log.warning("numba kernel cache %s is not writable; kernels compile in every process", path)
        return
    os.environ.setdefault("NUMBA_CACHE_DIR", str(path))
    import numba

    numba.config.CACHE_DIR = os.environ["NUMBA_CACHE_DIR"]  # type: ignore[attr-defined]  # set at run time


def get() -> ModuleType | None:
    """The kernels (module :mod:`.compiled`), importing numba on first call; None if the kernels
    are off (said once, as a warning)."""
    global _loaded, _failed
    if _loaded is not None or _failed is not None:
        return _loaded
    with _lock:
        if _loaded is None and _failed is None:
            if os.environ.get("GRADSERVE_KERNELS", "1") == "0":
                _failed = "GRADSERVE_KERNELS=0"
            else:
                try:
                    _configure()
                    from gradserve.worker.kernels import compiled
                except ImportError as exc:
                    _failed = f"numba cannot be imported: {type(exc).__name__}: {exc}"
                else:
                    _loaded = compiled
            if _failed is not None:
                log.warning(
                    "compiled kernels off (%s): gradserve runs its numpy paths, slower on normalisation and pooling",
                    _failed,
                )
    return _loaded


def available() -> bool:
    """Whether the compiled kernels can run here (imports numba to find out)."""
    return get() is not None


def enabled() -> bool:
    """Whether the kernels are on here -- not turned off (``GRADSERVE_KERNELS=0``) and numba
    installed -- answered without importing numba. Where numba is installed but cannot be imported
    this says True and :func:`available` False: whoever must run a kernel asks :func:`get`."""
    if _loaded is not None or _failed is not None:
        return _loaded is not None
    return os.environ.get("GRADSERVE_KERNELS", "1") != "0" and _numba_installed()


@functools.lru_cache(maxsize=None)
def _numba_installed() -> bool:
    return importlib.util.find_spec("numba") is not None


def _default_threads() -> int:
    """The budget outside :func:`threads`: ``GRADSERVE_KERNEL_THREADS``, else every core unless the
    BLAS's idle threads spin (see the module doc)."""
    try:
        return max(1, int(os.environ["GRADSERVE_KERNEL_THREADS"]))
    except (KeyError, ValueError):
        pass
    from gradserve.worker.ops import blas  # (imported here: the ops import this package)

    return 1 if blas.backend().idle_threads_spin else len(os.sched_getaffinity(0))


def thread_budget() -> int:
    """How many threads a kernel launched from this thread may use (numba's pool size at most)."""
    import numba

    pool = numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined]  # numba.config defines it at run time
    return min(getattr(_budget, "n", None) or _default_threads(), pool)


@contextlib.contextmanager
def threads(n: int | None) -> Iterator[None]:
    """Kernels launched from this thread inside the block use up to ``n`` threads (None: the
    default), as ``threadpoolctl.threadpool_limits(n, user_api="blas")`` does for BLAS."""
    before = getattr(_budget, "n", None)
    _budget.n = max(1, int(n)) if n else None
    try:
        yield
    finally:
        _budget.n = before


def _complete_marker() -> Path:
    """The file that says every kernel of this version of the kernel module is in the cache: it
    names the module's size and modification time and numba's version (a changed module or numba
    compiles anew, into other cache entries)."""
    import importlib.metadata

    source = Path(__file__).with_name("compiled.py")
    stat = source.stat()
    try:
        numba_version = importlib.metadata.version("numba")
    except importlib.metadata.PackageNotFoundError:
        numba_version = "none"
    where = hashlib.sha1(str(source).encode()).hexdigest()[:8]  # numba caches per source path too
    key = f"{stat.st_size}-{int(stat.st_mtime)}-{numba_version}-{where}"
    return cache_dir() / f"complete-{key}"


def warm_up(compile: bool = False) -> float:
    """Load every kernel for float32 and float64 from the cache, once per process, where a full
    compile ran on this machine (else nothing: kernels compile on first use); ``compile=True``
    compiles what is missing and marks the cache complete. Returns the seconds it took (0 once
    done, without kernels, or with nothing compiled yet)."""
    global _warm
    if _warm:
        return 0.0
    t = time.perf_counter()
    if not compile and not _complete_marker().exists():
        log.info("compiled kernels: not all in the cache yet; each compiles the first time a job needs it")
        return 0.0
    k = get()
    if k is None:
        return 0.0
    with _lock:
        if not _warm:
            k.warm_up()
            _warm = True
            with contextlib.suppress(OSError):  # an unwritable cache: the next process loads lazily
                _complete_marker().touch()
    return time.perf_counter() - t
