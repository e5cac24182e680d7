"""The one place the ops reach BLAS: which library does the products, its threads, and GEMM on
strided numpy views that can add into its output (``out (+)= op(a) @ op(b)``).

**Which BLAS.** numpy's wheels bring OpenBLAS. Intel's MKL (the ``mkl`` wheel, installed with
``gradserve[mkl]``) runs the products of the benchmark models 10-13% faster on Intel CPUs (the MLP's
512 x 1024 x 1024, and twice as fast on a convolution's thin weight-error products). With
``GRADSERVE_BLAS=auto`` (the default) MKL is used where it is installed and the CPU is Intel's
(on other CPUs its fast paths are not guaranteed; OpenBLAS has kernels tuned for them), else
numpy's OpenBLAS; ``mkl`` or ``openblas`` asks for one, ``numpy`` makes no direct BLAS call at all
(every product through ``np.matmul``).

Every large product the ops make goes through :func:`matmul` or :func:`gemm`, so only one library
runs them: two libraries' thread pools in one process fight (an idle OpenBLAS thread spins for a
while after each product; an MKL product right after an OpenBLAS one measured 2.5x slower). Small
products (below :data:`SMALL_FLOPS`) go to ``np.matmul``, which runs them on one thread. On MKL a
stack of products is one batched call; on OpenBLAS numpy's own loop runs it.

**Why GEMM on views.** ``np.matmul`` hands contiguous-enough views to BLAS without copying, but it
always overwrites its output. A direct convolution is a *sum* of GEMMs over shifted views of one
padded input (``Y = sum_k W_k @ X[:, shift_k:]``); BLAS's own ``beta = 1`` does that sum for free.

The library is reached through ctypes (which releases the GIL): MKL's ``cblas_?gemm_64`` from the
``mkl`` wheel, or the ``cblas_?gemm`` of the OpenBLAS that numpy itself loaded (found through
threadpoolctl). A small self-test against ``np.matmul`` must pass before either is used.
:func:`available` says whether a dtype has a direct GEMM; callers keep a numpy path for when not.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import importlib.metadata
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

log = logging.getLogger(__name__)

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
# Symbol name stems as the OpenBLAS builds numpy ships with spell them: scipy-openblas (numpy >= 2
# wheels) prefixes "scipy_" and, being ILP64, suffixes "64_"; older numpy wheels only suffix.
_NAMINGS = (("scipy_", "64_"), ("", "64_"), ("", ""))
# Products with fewer multiply-adds than this go to np.matmul: a ctypes call costs a few
# microseconds more than numpy's, and BLAS runs a product this small on one thread anyway.
SMALL_FLOPS = 1 << 16
CHOICES = ("auto", "mkl", "openblas", "numpy")


@dataclass(frozen=True)
class Backend:
    """The BLAS library the ops call directly: its name ("mkl", "openblas", or "numpy" when none
    is called directly), version, and its ``cblas_?gemm`` per dtype char ('f', 'd').

    ``idle_threads_spin``: whether the library's threads keep a core busy for a while after each
    product (OpenBLAS's do; MKL's sleep, as :func:`_bind_mkl` asks). Other threads started between
    two products (the compiled kernels') then fight them for the cores."""

    name: str
    version: str = ""
    routines: dict[str, Callable] = dataclasses.field(default_factory=dict)  # (looked up per product)
    idle_threads_spin: bool = True
    # cblas_?gemm_batch_strided per dtype char, where the library has it (MKL): a stack of
    # products in one call, which MKL spreads over its threads (one call per matrix measured 5-13x
    # slower on attention-sized stacks: each call wakes the threads)
    batched: dict[str, Callable] = dataclasses.field(default_factory=dict)

    def routine(self, char: str) -> Callable | None:
        return self.routines.get(char)

    def batch_routine(self, char: str) -> Callable | None:
        return self.batched.get(char)


def backend() -> Backend:
    """The BLAS in use in this process (chosen and self-tested on first call; see the module doc)."""
    return _backend()


def available(dtype: np.dtype | type) -> bool:
    """Whether :func:`gemm` can run on arrays of ``dtype`` (float32 or float64)."""
    return backend().routine(np.dtype(dtype).char) is not None


def gemm(a: np.ndarray, b: np.ndarray, out: np.ndarray, *, accumulate: bool,
         trans_a: bool = False, trans_b: bool = False) -> None:
    """``out = op(a) @ op(b)``, or ``out += op(a) @ op(b)`` with ``accumulate``, where ``op``
    transposes when asked. All three are 2-D arrays of one float dtype whose rows may be strided
    (unit stride within a row, e.g. ``x[:, s:s + n]`` of a wider array); ``out`` must not overlap
    ``a`` or ``b``. Call only when :func:`available` says so."""
    fn = backend().routine(out.dtype.char)
    if fn is None:
        raise RuntimeError(f"no direct BLAS GEMM for {out.dtype}")
    _call(fn, a, b, out, accumulate, trans_a, trans_b)


def matmul(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``np.matmul(a, b, out=out)`` with the large products on :func:`backend`'s GEMM: operands in
    any layout BLAS can read (a transposed view is passed as BLAS's transpose flag, not copied); a
    stack of matrices times one matrix as one product over all the stack's rows (numpy would make
    one call per matrix); other stacks one GEMM per matrix. Small products, 1-D operands and
    integer dtypes are ``np.matmul``'s."""
    if a.ndim < 2 or b.ndim < 2 or a.shape[-1] != b.shape[-2]:
        return np.matmul(a, b) if out is None else np.matmul(a, b, out=out)  # numpy says what is wrong
    (m, k), n = a.shape[-2:], b.shape[-1]
    direct = (m * n * k >= SMALL_FLOPS and a.dtype == b.dtype and (out is None or out.dtype == a.dtype)
              and available(a.dtype))
    if a.ndim > 2 and b.ndim == 2:  # the stack's rows fold into one product
        shape = a.shape[:-1] + (n,)
        a2 = a.reshape(-1, k)  # a view unless the stack is itself strided
        if out is None:
            return (_into(a2, b, np.empty((a2.shape[0], n), a.dtype)) if direct else np.matmul(a2, b)).reshape(shape)
        if out.shape == shape and out.flags.c_contiguous:
            (_into if direct else _numpy_into)(a2, b, out.reshape(-1, n))
            return out
    if a.ndim == b.ndim == 2:
        if out is None:
            out = np.empty((m, n), np.result_type(a, b))
        (_into if direct else _numpy_into)(a, b, out)
        return out
    batch = backend().batch_routine(a.dtype.char) if direct else None
    if batch is None:  # numpy loops over the stack itself, in C
        return np.matmul(a, b) if out is None else np.matmul(a, b, out=out)
    stack = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    if out is not None and out.shape != stack + (m, n):
        return np.matmul(a, b, out=out)  # numpy's broadcasting rules and errors
    target = out if out is not None and _stacked(out) is not None and _layout(out[(0,) * len(stack)]) is False \
        else np.empty(stack + (m, n), a.dtype)
    _batched(batch, np.broadcast_to(a, stack + (m, k)), np.broadcast_to(b, stack + (k, n)), target, len(stack))
    if out is not None and target is not out:
        np.copyto(out, target)
    return target if out is None else out


def _stacked(x: np.ndarray, depth: int | None = None) -> int | None:
    """The one stride (in elements) between consecutive matrices of a stack whose leading
    ``depth`` axes (all but the last two) flatten into one, or None (it would need a copy)."""
    depth = x.ndim - 2 if depth is None else depth
    axes = [(size, stride) for size, stride in zip(x.shape[:depth], x.strides[:depth]) if size > 1]
    if any(outer[1] != inner[1] * inner[0] for outer, inner in zip(axes, axes[1:])):
        return None
    stride = axes[-1][1] if axes else 0
    return stride // x.itemsize if stride % x.itemsize == 0 else None


def _batched(fn: Callable, a: np.ndarray, b: np.ndarray, out: np.ndarray, depth: int) -> None:
    """``out[i] = a[i] @ b[i]`` over a stack (the leading ``depth`` axes, same shape for all three),
    in one ``cblas_?gemm_batch_strided`` call; an operand BLAS cannot address is copied first."""
    ops = []
    for x in (a, b):
        first = x[(0,) * depth]
        if _stacked(x, depth) is None or _layout(first) is None:
            x = np.ascontiguousarray(x)
            first = x[(0,) * depth]
        trans = bool(_layout(first))
        ops.append((x, first.T if trans else first, trans, _stacked(x, depth)))
    (_, a0, ta, sa), (_, b0, tb, sb) = ops
    m, n = out.shape[-2:]
    k = a.shape[-1]
    first = out[(0,) * depth]
    count = math.prod(out.shape[:depth])
    if count == 0 or m == 0 or n == 0:
        return
    if count == 1:  # (MKL wants the output's stride to be a whole matrix, even for one)
        gemm(a0, b0, first, accumulate=False, trans_a=ta, trans_b=tb)
        return
    lda, ldb, ldc = (_leading(x, out.dtype) for x in (a0, b0, first))
    fn(_ROW_MAJOR, _TRANS if ta else _NO_TRANS, _TRANS if tb else _NO_TRANS, m, n, k, 1.0,
       a0.ctypes.data, lda, sa, b0.ctypes.data, ldb, sb, 0.0, first.ctypes.data, ldc, _stacked(out, depth), count)


def _numpy_into(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> np.ndarray:
    return np.matmul(a, b, out=out)


def _into(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out[...] = a @ b`` for 2-D views, through the backend's GEMM where BLAS can address all
    three without a copy (else numpy's matmul)."""
    ta, tb = _layout(a), _layout(b)
    if ta is None or tb is None or _layout(out) is not False or min(a.shape + b.shape) == 0:
        return np.matmul(a, b, out=out)
    gemm(a.T if ta else a, b.T if tb else b, out, accumulate=False, trans_a=ta, trans_b=tb)
    return out


def _layout(x: np.ndarray) -> bool | None:
    """How BLAS can read a 2-D view: False row-major as it is, True as the transpose of a row-major
    view, None not at all (it would need a copy)."""
    item = x.itemsize
    rows, cols = x.shape
    if (cols <= 1 or x.strides[1] == item) and (rows <= 1 or (x.strides[0] % item == 0 and x.strides[0] >= cols * item)):
        return False
    if (rows <= 1 or x.strides[0] == item) and (cols <= 1 or (x.strides[1] % item == 0 and x.strides[1] >= rows * item)):
        return True
    return None


# -- threads ----------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _blas_libraries(library: str) -> tuple:
    """threadpoolctl's controllers of the BLAS libraries loaded once ``library`` is (it only sees
    those loaded when it looks), each able to read and set its thread count."""
    from threadpoolctl import ThreadpoolController

    return tuple(ThreadpoolController().select(user_api="blas").lib_controllers)


@contextlib.contextmanager
def limit(n: int | None) -> Iterator[None]:
    """BLAS products inside the block use up to ``n`` threads (None: no limit), in every BLAS
    library loaded (limits are per process: callers give one step at a time).

    Reads and sets each library's count directly (a ctypes call each), and only when it differs:
    threadpoolctl's own ``limit()`` describes every library on each entry, which cost ~0.2 ms per
    actor call, more than a small job's arithmetic."""
    if not n:
        yield
        return
    n = int(n)
    changed = []
    for lib in _blas_libraries(backend().name):
        before = lib.get_num_threads()
        if before != n:
            lib.set_num_threads(n)
            changed.append((lib, before))
    try:
        yield
    finally:
        for lib, before in changed:
            lib.set_num_threads(before)


# -- choosing and binding the library ------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _backend() -> Backend:
    choice = os.environ.get("GRADSERVE_BLAS", "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        log.warning("GRADSERVE_BLAS=%s is not one of %s; using auto", choice, ", ".join(CHOICES))
        choice = "auto"
    found = None
    if choice == "mkl" or (choice == "auto" and _intel_cpu()):
        found = _tested(_bind_mkl, "MKL")
        if found is None and choice == "mkl":
            log.warning("GRADSERVE_BLAS=mkl but MKL is not usable (pip install 'gradserve[mkl]'); using OpenBLAS")
    if found is None and choice != "numpy":
        found = _tested(_bind_openblas, "OpenBLAS")
    if found is None:
        log.info("no direct BLAS GEMM: products go through numpy's matmul")
        return Backend("numpy")
    log.info("BLAS: %s %s", found.name, found.version)
    return found


def _tested(bind: Callable[[], Backend | None], label: str) -> Backend | None:
    """The backend ``bind`` finds, with only the routines that pass their self-test."""
    try:
        found = bind()
    except Exception as exc:  # any surprise here means: try the next library
        log.warning("%s GEMM unavailable (%s)", label, exc)
        return None
    if found is None:
        return None
    good = {char: fn for char, fn in found.routines.items() if _self_test(fn, np.dtype(char))}
    batched = {char: fn for char, fn in found.batched.items() if char in good and _batch_self_test(fn, np.dtype(char))}
    if len(good) < len(found.routines) or len(batched) < len(found.batched):
        log.warning("%s GEMM failed its self-test for some dtypes; numpy's matmul does those", label)
    return dataclasses.replace(found, routines=good, batched=batched) if good else None


def _intel_cpu() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("vendor_id") and "GenuineIntel" in line for line in f)
    except OSError:
        return False


def _signature(fn: Any, char: str, index: type) -> Callable:  # fn: a CDLL function
    scalar = ctypes.c_float if char == "f" else ctypes.c_double
    ptr = ctypes.c_void_p
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, index, index, index,
                   scalar, ptr, index, ptr, index, scalar, ptr, index]
    fn.restype = None
    return fn


def _batch_signature(fn: Any, char: str) -> Callable:  # fn: a CDLL function
    scalar = ctypes.c_float if char == "f" else ctypes.c_double
    ptr, index = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, index, index, index, scalar,
                   ptr, index, index, ptr, index, index, scalar, ptr, index, index, index]
    fn.restype = None
    return fn


def _bind_mkl() -> Backend | None:
    try:
        files = importlib.metadata.files("mkl") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    paths = [str(f.locate()) for f in files if os.path.basename(str(f)).startswith("libmkl_rt.so")]
    if not paths:
        return None
    # Idle MKL threads sleep at once instead of spinning for 200 ms (Intel OpenMP's default), which
    # would take a core from the compiled kernels between two products; read when MKL starts its
    # threads, so set before it is loaded. A user's own setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # ... except for 1 ms after each product, so that a run of products (a convolution's, an RNN's
    # time steps) does not wake them every time: 50 products of 32 x 256 x 1024 took 9.5 ms with
    # threads that sleep at once, 4.3 ms with this (OpenBLAS: 6.4).
    os.environ.setdefault("KMP_BLOCKTIME", "1")
    handle = ctypes.CDLL(paths[0])
    version = ctypes.create_string_buffer(256)
    handle.mkl_get_version_string(version, len(version))
    # the _64 entry points take 64-bit integers whatever interface layer the user's environment picked
    routines = {char: _signature(getattr(handle, f"cblas_{'s' if char == 'f' else 'd'}gemm_64"), char, ctypes.c_int64)
                for char in "fd"}
    batched = {char: _batch_signature(getattr(handle, f"cblas_{'s' if char == 'f' else 'd'}gemm_batch_strided_64"), char)
               for char in "fd"}
    spins = os.environ["OMP_WAIT_POLICY"].upper() == "ACTIVE"
    return Backend("mkl", version.value.decode(errors="replace").strip(), routines, idle_threads_spin=spins, batched=batched)


def _bind_openblas() -> Backend | None:
    from threadpoolctl import threadpool_info

    for lib in threadpool_info():
        if lib.get("internal_api") != "openblas":
            continue
        handle = ctypes.CDLL(lib["filepath"])
        for prefix, suffix in _NAMINGS:
            names = [f"{prefix}cblas_{c}gemm{suffix}" for c in "sd"]
            config = getattr(handle, f"{prefix}openblas_get_config{suffix}", None)
            if config is None or not all(hasattr(handle, name) for name in names):
                continue
            config.restype = ctypes.c_char_p
            index = ctypes.c_int64 if b"USE64BITINT" in (config() or b"") else ctypes.c_int
            routines = {char: _signature(getattr(handle, name), char, index) for char, name in zip("fd", names)}
            return Backend("openblas", str(lib.get("version") or ""), routines)
    return None


def _call(fn: Callable, a: np.ndarray, b: np.ndarray, out: np.ndarray, accumulate: bool,
          trans_a: bool, trans_b: bool) -> None:
    lda, ldb, ldc = (_leading(x, out.dtype) for x in (a, b, out))  # checks 2-D, dtype, strides
    m, n = out.shape
    a_mk = a.shape[::-1] if trans_a else a.shape
    b_kn = b.shape[::-1] if trans_b else b.shape
    if a_mk[0] != m or b_kn[1] != n or a_mk[1] != b_kn[0]:
        raise ValueError(f"gemm shapes do not match: {a.shape}{'^T' if trans_a else ''} @ "
                         f"{b.shape}{'^T' if trans_b else ''} -> {out.shape}")
    if not out.flags.writeable:
        raise ValueError("gemm output is read-only")
    k = a_mk[1]
    if m == 0 or n == 0:
        return
    if k == 0:
        if not accumulate:
            out[...] = 0
        return
    fn(_ROW_MAJOR, _TRANS if trans_a else _NO_TRANS, _TRANS if trans_b else _NO_TRANS, m, n, k,
       1.0, a.ctypes.data, lda, b.ctypes.data, ldb, 1.0 if accumulate else 0.0, out.ctypes.data, ldc)


def _leading(x: np.ndarray, dtype: np.dtype) -> int:
    """The row stride of a row-major 2-D view, in elements (what BLAS calls lda)."""
    item = dtype.itemsize
    if x.ndim != 2 or x.dtype != dtype:
        raise ValueError(f"gemm needs 2-D {dtype} arrays, got {x.ndim}-D {x.dtype}")
    rows, cols = x.shape
    if cols > 1 and x.strides[1] != item:
        raise ValueError("gemm needs unit stride within rows")
    if rows <= 1:
        return max(1, cols)
    stride = x.strides[0]
    if stride % item or stride // item < max(1, cols):
        raise ValueError(f"gemm cannot use a row stride of {stride} bytes for rows of {cols}")
    return stride // item


def _self_test(fn: Callable, dtype: np.dtype) -> bool:
    """Products of strided views, in each transpose combination, overwriting and accumulating."""
    rng = np.random.default_rng(0)
    big = rng.standard_normal((9, 11)).astype(dtype)
    a, b = big[:3, 1:5], big[2:6, 3:8]  # (3, 4) and (4, 5) views with row stride 11
    tol = 1e-4 if dtype == np.float32 else 1e-12
    for trans_a in (False, True):
        for trans_b in (False, True):
            aa = big[4:8, 6:9] if trans_a else a  # (4, 3) view, used transposed
            bb = big[:5, 7:11] if trans_b else b  # (5, 4) view, used transposed
            want = (aa.T if trans_a else aa) @ (bb.T if trans_b else bb)
            out = np.ones((3, 5), dtype)
            _call(fn, aa, bb, out, True, trans_a, trans_b)
            if not np.allclose(out, 1 + want, rtol=tol, atol=tol):
                return False
            _call(fn, aa, bb, out, False, trans_a, trans_b)
            if not np.allclose(out, want, rtol=tol, atol=tol):
                return False
    return True


def _batch_self_test(fn: Callable, dtype: np.dtype) -> bool:
    """A stack of products with a broadcast (stride 0) operand and a transposed one."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((3, 4)).astype(dtype)  # one matrix for the whole stack
    b = rng.standard_normal((2, 5, 4)).astype(dtype).swapaxes(1, 2)  # (2, 4, 5), each transposed
    out = np.empty((2, 3, 5), dtype)
    _batched(fn, np.broadcast_to(a, (2, 3, 4)), b, out, 1)
    tol = 1e-4 if dtype == np.float32 else 1e-12
    return bool(np.allclose(out, np.matmul(a, b), rtol=tol, atol=tol))
