"""Keep freed activation buffers in the process instead of handing them back to the kernel.

A gradient step allocates and frees the same multi-MB activations every time. glibc's malloc
returns large freed blocks to the kernel (``munmap`` or trimming the heap top), so the next step
faults the pages in again, zero-filled: measured ~2,500 faults and ~5 ms of a 60 ms CNN step.
:func:`keep_freed_memory` raises glibc's mmap and trim thresholds (``mallopt``), so freed blocks
stay in the heap for reuse. The price: a process keeps its peak heap. The engines call it when
they start (the inline engine in the caller's process, each Ray worker in its own);
``GRADSERVE_KEEP_FREED_MEMORY=0`` turns it off. Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_done: bool | None = None


def keep_freed_memory() -> bool:
    """Tune this process's malloc once (idempotent); True if it took effect."""
    global _done
    if _done is None:
        _done = _tune()
    return _done


def _tune() -> bool:
    if os.environ.get("GRADSERVE_KEEP_FREED_MEMORY", "1") == "0":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # Blocks up to 1 GiB from the heap (glibc versions that cap the threshold take 32 MiB, the
    # largest they allow); never trim the heap top. Setting either fixes both (glibc then stops
    # adapting them), so the mmap threshold must be set, not left at its 128 KiB default.
    if not (mallopt(_M_MMAP_THRESHOLD, 1 << 30) or mallopt(_M_MMAP_THRESHOLD, 32 << 20)):
        return False
    ok = bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    log.debug("malloc tuned to keep freed memory: %s", ok)
    return ok
