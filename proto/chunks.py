"""Tensors too big for one message: a header per tensor, then its raw bytes in chunks.

Built on :mod:`gradserve.proto.tensors` (the one codec: dtype codes, little-endian C-order bytes).
A sender turns named arrays into ``TensorHeader`` messages plus a stream of ``TensorChunk``
messages of at most :data:`CHUNK_BYTES` each; a receiver feeds the chunks to an
:class:`Assembler`, which checks every chunk strictly against the declared headers.

Why so strict: the receiver is a server and the stream may be hostile. The declared sizes are
checked against the limits *before* anything is allocated, a tensor's buffer is allocated only to
its declared size, and a chunk that does not land exactly where the next bytes are expected
(wrong offset, overlap, overflow, undeclared name) is rejected with an error naming the tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping

import numpy as np

from gradserve.proto import tensors
from gradserve.proto.tensors import TensorDecodeError
from gradserve.proto.v1 import model_pb2, service_pb2

CHUNK_BYTES = 1 << 20  # 1 MiB: far below gRPC's 4 MiB default message size, with room for framing
MAX_RANK = 64


class LimitExceeded(ValueError):
    """A declared or received size exceeds a configured limit (a gRPC server answers
    RESOURCE_EXHAUSTED)."""


def _wire_dtype(code: model_pb2.DType) -> np.dtype:
    # The codec's dtypes are native; on the wire they are little-endian.
    return tensors.numpy_dtype(code).newbyteorder("<")


# -- sending ---------------------------------------------------------------------------------------


def header(name: str, array: np.ndarray) -> service_pb2.TensorHeader:
    """The header declaring ``array`` under ``name`` (``ValueError`` for unsupported dtypes)."""
    array = np.asarray(array)
    return service_pb2.TensorHeader(name=name, dtype=tensors.dtype_code(array.dtype), shape=array.shape)


def headers(arrays: Mapping[str, np.ndarray]) -> list[service_pb2.TensorHeader]:
    """One header per named array, in mapping order."""
    return [header(name, a) for name, a in arrays.items()]


def chunks(
    arrays: Mapping[str, np.ndarray], chunk_bytes: int = CHUNK_BYTES, start: Mapping[str, int] | None = None
) -> Iterator[service_pb2.TensorChunk]:
    """The bytes of every array as TensorChunk messages of at most ``chunk_bytes``, tensor after
    tensor. Lazy, so a big model is never held twice in serialized form. ``start`` (resuming an
    upload): per tensor name, the byte offset its chunks begin at (the receiver holds the bytes
    before it); tensors not named start at 0, those it covers entirely send nothing."""
    if chunk_bytes <= 0:
        raise ValueError("chunk_bytes must be positive")
    start = start or {}
    for name, array in arrays.items():
        array = np.asarray(array)
        wire = np.ascontiguousarray(array, dtype=_wire_dtype(tensors.dtype_code(array.dtype)))
        raw = wire.reshape(-1).view(np.uint8).data  # a memoryview of its bytes
        first = int(start.get(name, 0))
        if first < 0:
            raise ValueError(f"start offset of '{name}' is negative")
        for offset in range(first, len(raw), chunk_bytes):
            yield service_pb2.TensorChunk(name=name, offset=offset, data=raw[offset : offset + chunk_bytes].tobytes())


# -- receiving -------------------------------------------------------------------------------------


@dataclass
class _Slot:
    what: str  # "parameter 'w'": how errors name it
    shape: tuple[int, ...]
    dtype: np.dtype  # wire (little-endian) dtype
    nbytes: int
    filled: int = 0
    array: np.ndarray | None = None  # allocated on the first chunk


class Assembler:
    """Reassembles declared tensors from their chunks.

    Declare the expected tensors with :meth:`declare` (several groups may share one byte budget,
    e.g. a model's parameters and constants), :meth:`add` every chunk, then :meth:`finish`.
    ``what`` names the whole in limit errors ("model", "feed", ...). ``max_total_bytes`` bounds the
    declared bytes of all tensors together, ``max_elements`` each tensor's element count,
    ``max_chunk_bytes`` a single chunk; exceeding one raises :class:`LimitExceeded`. Anything
    malformed raises :class:`~gradserve.proto.tensors.TensorDecodeError` naming the tensor.

    Resuming (an upload whose stream broke): what was received stays valid -- a chunk is checked
    before a byte of it is written -- so the same assembler can take a second stream. :meth:`received`
    tells the sender where each tensor stands; :meth:`resume` then relaxes one rule for the new
    stream: a chunk may start below what its tensor already holds (a sender that resends from the
    start), and those bytes are skipped. Gaps are still refused.
    """

    def __init__(
        self,
        *,
        what: str = "tensor",
        max_total_bytes: int | None = None,
        max_elements: int | None = None,
        max_chunk_bytes: int | None = None,
    ) -> None:
        self.what = what
        self.max_total_bytes = max_total_bytes
        self.max_elements = max_elements
        self.max_chunk_bytes = max_chunk_bytes
        self._slots: dict[str, _Slot] = {}
        self.total_bytes = 0
        self.received_bytes = 0
        self.resumed = False  # see resume()

    def declare(self, headers: Iterable[service_pb2.TensorHeader], kind: str = "tensor") -> list[str]:
        """Expect the tensors of ``headers``; ``kind`` names them in errors ("parameter", ...).
        Checks every limit on the declared sizes before any byte is allocated. Returns the names."""
        names = []
        for h in headers:
            what = f"{kind} '{h.name}'"
            if not h.name:
                raise TensorDecodeError(f"a {kind} header has no name")
            if h.name in self._slots:
                raise TensorDecodeError(f"{what} is declared twice (as {self._slots[h.name].what})")
            try:
                dtype = _wire_dtype(h.dtype)
            except TensorDecodeError as exc:
                raise TensorDecodeError(f"{what}: {exc}") from None
            shape = tuple(int(d) for d in h.shape)
            if len(shape) > MAX_RANK:
                raise TensorDecodeError(f"{what}: {len(shape)} dimensions (at most {MAX_RANK})")
            if any(d < 0 for d in shape):
                raise TensorDecodeError(f"{what}: negative dimension in shape {shape}")
            elements = 1
            for d in shape:  # Python ints: a hostile shape cannot overflow the product
                elements *= d
            if self.max_elements is not None and elements > self.max_elements:
                raise LimitExceeded(
                    f"{what} of shape {shape} has {elements} elements; the limit is {self.max_elements} per tensor"
                )
            nbytes = elements * dtype.itemsize
            if self.max_total_bytes is not None and self.total_bytes + nbytes > self.max_total_bytes:
                raise LimitExceeded(
                    f"{what} ({nbytes} bytes) brings the {self.what} data to {self.total_bytes + nbytes} bytes; "
                    f"the limit is {self.max_total_bytes}"
                )
            self.total_bytes += nbytes
            self._slots[h.name] = _Slot(what, shape, dtype, nbytes)
            names.append(h.name)
        return names

    def add(self, chunk: service_pb2.TensorChunk) -> None:
        """Take one chunk; it must continue its tensor exactly where the previous chunk ended."""
        slot = self._slots.get(chunk.name)
        if slot is None:
            raise TensorDecodeError(f"chunk for undeclared tensor '{chunk.name}' (not in the {self.what} header)")
        size = len(chunk.data)
        if self.max_chunk_bytes is not None and size > self.max_chunk_bytes:
            raise LimitExceeded(f"{slot.what}: chunk of {size} bytes; the limit is {self.max_chunk_bytes}")
        if size == 0:
            raise TensorDecodeError(f"{slot.what}: empty chunk at offset {chunk.offset}")
        offset = chunk.offset
        if self.resumed and offset < slot.filled:
            if offset + size <= slot.filled:
                return  # bytes this assembler already holds: a resent chunk
            data: bytes | memoryview = memoryview(chunk.data)[slot.filled - offset :]  # the part past them is new
            offset, size = slot.filled, size - (slot.filled - offset)
        else:
            data = chunk.data
        if offset != slot.filled:
            raise TensorDecodeError(
                f"{slot.what}: chunk at offset {chunk.offset}, expected offset {slot.filled} "
                f"(chunks of a tensor must arrive in order, without gaps or overlaps)"
            )
        if slot.filled + size > slot.nbytes:
            raise TensorDecodeError(
                f"{slot.what}: shape {slot.shape} of {slot.dtype.name} needs {slot.nbytes} bytes, "
                f"but chunks bring at least {slot.filled + size}"
            )
        if slot.array is None:
            slot.array = np.empty(slot.nbytes, np.uint8)  # exactly the declared size, never more
        slot.array[slot.filled : slot.filled + size] = np.frombuffer(data, np.uint8)
        slot.filled += size
        self.received_bytes += size

    def received(self) -> dict[str, int]:
        """Bytes received so far of every declared tensor (contiguous from offset 0), in
        declaration order."""
        return {name: slot.filled for name, slot in self._slots.items()}

    def resume(self) -> None:
        """Take a further stream after one that broke (class docs): chunks below what a tensor
        already holds are skipped instead of refused."""
        self.resumed = True

    def finish(self) -> dict[str, np.ndarray]:
        """The arrays (native byte order, writable), once every declared byte has arrived. When
        some are missing it raises and keeps everything, so the assembler can still be resumed."""
        for slot in self._slots.values():
            if slot.filled != slot.nbytes:
                raise TensorDecodeError(
                    f"{slot.what}: shape {slot.shape} of {slot.dtype.name} needs {slot.nbytes} bytes, got {slot.filled}"
                )
        out: dict[str, np.ndarray] = {}
        for name, slot in self._slots.items():
            raw = slot.array if slot.array is not None else np.empty(0, np.uint8)
            array = raw.view(slot.dtype).reshape(slot.shape)
            out[name] = array.astype(slot.dtype.newbyteorder("="), copy=False)
            slot.array = None
        return out
