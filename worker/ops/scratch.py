"""Per-thread scratch buffers for the temporaries of the convolution and pooling ops.

Separate from both because both use it, and because it is about memory, not geometry.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import numpy as np

_scratch = threading.local()
_SCRATCH_MAX_BYTES = 64 << 20


def scratch(name: str, shape, dtype) -> np.ndarray:
    """A per-thread reusable buffer for temporaries that never leave the op. Fresh multi-MB arrays
    cost page faults (and zeroing) on first touch, which for a conv layer adds up to a good part of
    the copies themselves; reusing the buffers keeps them mapped and warm. Very large requests are
    not cached, so the pool never holds more than a few of those sizes per thread."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    size = math.prod(shape)
    dtype = np.dtype(dtype)
    if size * dtype.itemsize > _SCRATCH_MAX_BYTES:
        return np.empty(shape, dtype)
    pool: dict[Any, np.ndarray] = _scratch.__dict__  # a thread-local's, keyed (name, dtype)
    buf = pool.get((name, dtype))
    if buf is None or buf.size < size:
        buf = pool[(name, dtype)] = np.empty(max(size, 1), dtype)
    return buf[:size].reshape(shape)
