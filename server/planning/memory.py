"""The memory model: how many bytes one partition's worker needs, and what the cluster's nodes have.

A partition ``[start, end)`` of a prepared job's topological order needs, on its worker:

- **parameters** (and constants) it reads, resident for the whole job, and **gradients** of its
  floating-point parameters, one buffer each;
- **activations kept for the backward pass**, per micro-batch: the values the op registry says a
  VJP reads (``OpDef.keeps_input``, ``keep_outputs``) of nodes that record a tape entry, produced
  inside the partition (what it receives is counted once, as a boundary buffer);
- **boundary buffers**, per micro-batch: the values it receives (from earlier partitions, and the
  feeds it reads) and the values it hands on (to later partitions, and the loss);
- a **working set**: the largest single node's inputs and outputs, once (the step being computed).

Under 1F1B (:func:`gradserve.server.planning.schedule.one_f_one_b`) partition p waits for at most
K-p micro-batches' backwards, but with micro-batches the weight steps are deferred to the end
(zero-bubble), and until then every micro-batch's tape stays alive for them: activations and
boundary buffers count M times. Shapes are the job's, so plan with a micro-batch's shapes and give M. The sum gets a
``HEADROOM`` factor (op temporaries, what forwards ``save`` for their VJP, allocator slack) plus
``ACTOR_BASE_BYTES`` for the worker process itself (Python, numpy, Ray's core worker).

Nodes' memory comes from Ray's ``memory`` resource (``ray start --memory``, or the container limit
KubeRay sets): :func:`cluster_nodes` is the only function here that touches Ray.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from gradserve.proto.chunks import LimitExceeded
from gradserve.server.planning.prepare import PreparedJob
from gradserve.worker.autodiff import compile_program
from gradserve.worker.graph import Model
from gradserve.worker.ops import get_op

HEADROOM = 1.25  # on top of the counted buffers: op temporaries, saved forward state, allocator slack
ACTOR_BASE_BYTES = 128 << 20  # one worker process before it holds any tensor (Python, numpy, Ray)


class ResourceExhausted(LimitExceeded):
    """The job cannot fit the cluster's memory (RESOURCE_EXHAUSTED, through :class:`LimitExceeded`).
    Raised while planning, before anything runs; the message names the need and the largest node."""


@dataclass(frozen=True)
class NodeInfo:
    """One cluster node that can host partitions: Ray's node id, its CPUs and its memory in bytes
    (0: unknown, not checked)."""

    node_id: str
    cpus: float
    memory_bytes: int = 0


@dataclass(frozen=True)
class PartitionMemory:
    """The estimated memory of one partition's worker; ``total`` is what it asks Ray for."""

    params: int  # parameters and constants it reads
    grads: int  # gradients of its floating-point parameters
    activations: int  # kept for the backward pass, per micro-batch
    boundary: int  # received (boundary values, feeds) and handed on, per micro-batch
    working: int  # the largest node's inputs and outputs, once
    micro_batches: int = 1

    @property
    def in_flight(self) -> int:
        """Bytes that scale with the micro-batches in flight (all M under GPipe)."""
        return self.micro_batches * (self.activations + self.boundary)

    @property
    def total(self) -> int:
        """Bytes to request for the worker: the counted buffers times HEADROOM, plus the process."""
        counted = self.params + self.grads + self.working + self.in_flight
        return ACTOR_BASE_BYTES + int(np.ceil(HEADROOM * counted))

    def parts(self) -> str:
        """What the total is made of, one phrase (x M: per micro-batch, all in flight)."""
        m = f" x {self.micro_batches}" if self.micro_batches > 1 else ""
        return (
            f"parameters {fmt_bytes(self.params)}, gradients {fmt_bytes(self.grads)}, "
            f"activations {fmt_bytes(self.activations)}{m}, boundary {fmt_bytes(self.boundary)}{m}, "
            f"working {fmt_bytes(self.working)}"
        )

    def describe(self) -> str:
        return f"~{fmt_bytes(self.total)} ({self.parts()})"


class MemoryModel:
    """Memory needs of contiguous ranges of a prepared job's nodes (positions in ``job.nodes``).

    Built once per (job, micro-batches); :meth:`needs` scans each start position once, so the
    needs of every candidate range cost what one pass per start does (as the partitioner's
    received-bytes table)."""

    def __init__(self, job: PreparedJob, model: Model, micro_batches: int = 1) -> None:
        self.job, self.micro_batches = job, micro_batches
        self.nodes = list(job.nodes)
        self._bytes = {v: info.nbytes for v, info in job.shapes.items()}
        resident = {**model.params, **model.constants}
        self._resident = {v: int(np.asarray(a).nbytes) for v, a in resident.items()}
        self._grads = set(job.params)
        self._feeds = {s.name for s in model.inputs}
        self._producer = {o: j for j, nd in enumerate(self.nodes) for o in nd.outputs if o}
        last: dict[str, int] = {}
        for j, nd in enumerate(self.nodes):
            for v in nd.inputs:
                if v:
                    last[v] = j
        self._last_reader = last
        self._closes: list[list[str]] = [[] for _ in self.nodes]
        for v, j in last.items():
            if v in self._producer:
                self._closes[j].append(v)
        # Which nodes keep a tape entry, and what each keeps: the same rules the runner applies.
        program = compile_program(self.nodes, [*job.shapes], [job.loss], job.wrt)
        self._kept: list[list[str]] = []
        for nd, records in zip(self.nodes, program.records):
            op = get_op(nd.op_type)
            kept = []
            if records and op is not None:
                kept = [v for k, v in enumerate(nd.inputs) if v and op.keeps_input(k) and v in self._producer]
                kept += [o for o in nd.outputs if o] if op.keep_outputs else []
            self._kept.append(kept)

    def size(self, value: str) -> int:
        return self._bytes.get(value, 0)

    def range(self, start: int, end: int) -> PartitionMemory:
        """The need of the partition made of nodes ``start..end-1``."""
        return self._scan(start, [end])[end]

    def needs(self, positions: Sequence[int]) -> np.ndarray:
        """``needs[a][b]``: total bytes of the range ``[positions[a], positions[b])`` (b > a)."""
        m = len(positions)
        out = np.zeros((m, m))
        for a, start in enumerate(positions[:-1]):
            for b, need in enumerate(self._scan(start, positions[a + 1 :]).values(), a + 1):
                out[a][b] = need.total
        return out

    def fewest_ranges(self, positions: Sequence[int], limit: float) -> int | None:
        """How many contiguous ranges (cut at ``positions``) at least, each needing at most
        ``limit`` bytes, greedily from the start; None when one step alone exceeds it."""
        needs, count, a, m = self.needs(positions), 0, 0, len(positions)
        while a < m - 1:
            b = a + 1
            if needs[a][b] > limit:
                return None
            while b + 1 < m and needs[a][b + 1] <= limit:
                b += 1
            count, a = count + 1, b
        return count

    def _scan(self, start: int, ends: Iterable[int]) -> dict[int, PartitionMemory]:
        ends = sorted(set(ends))
        want, result = set(ends), {}
        seen: set[str] = set()
        params = grads = activations = received = sent = working = 0
        for j in range(start, ends[-1]):
            nd = self.nodes[j]
            step = 0
            for v in nd.inputs:
                if not v:
                    continue
                if v in self._resident:  # parameters and constants: resident, not activations
                    if v not in seen:
                        seen.add(v)
                        params += self._resident[v]
                        grads += self._resident[v] if v in self._grads else 0
                    continue
                step += self.size(v)
                if v not in seen and (v in self._feeds or self._producer.get(v, start) < start):
                    seen.add(v)
                    received += self.size(v)
            for v in self._kept[j]:
                if v not in seen and self._producer[v] >= start:
                    seen.add(v)
                    activations += self.size(v)
            for o in nd.outputs:
                if o:
                    step += self.size(o)
                    if self._last_reader.get(o, -1) > j or o == self.job.loss:
                        sent += self.size(o)
            for v in self._closes[j]:  # values produced here whose last reader is this node
                if start <= self._producer[v] and v != self.job.loss:
                    sent -= self.size(v)
            working = max(working, step)
            if j + 1 in want:
                result[j + 1] = PartitionMemory(
                    params, grads, activations, received + sent, working, self.micro_batches
                )
        return result


def estimate(job: PreparedJob, model: Model, bounds: Sequence[int], micro_batches: int = 1) -> list[PartitionMemory]:
    """The need of each partition ``[bounds[i], bounds[i+1])`` of ``job.nodes`` (a plan's cuts)."""
    mm = MemoryModel(job, model, micro_batches)
    return [mm.range(a, b) for a, b in zip(bounds, bounds[1:])]


# -- the cluster ---------------------------------------------------------------------------------


def cluster_nodes() -> list[NodeInfo]:
    """The alive Ray nodes that can host partitions (CPUs > 0), sorted by node id, with the
    ``memory`` resource Ray gives each. Needs a connected Ray (``ray.init``)."""
    import ray

    nodes = []
    for node in ray.nodes():
        resources = node.get("Resources", {})
        if node.get("Alive") and resources.get("CPU", 0) > 0:
            nodes.append(NodeInfo(node["NodeID"], float(resources["CPU"]), int(resources.get("memory", 0))))
    return sorted(nodes, key=lambda n: n.node_id)


def pack(needs: Sequence[int], nodes: Sequence[NodeInfo]) -> list[int] | None:
    """A node (index into ``nodes``) for each need, so no node's memory is exceeded: first fit,
    largest needs first, each on the node with the most memory left. None when they do not fit."""
    free = [n.memory_bytes for n in nodes]
    where = [0] * len(needs)
    for i in sorted(range(len(needs)), key=lambda i: -needs[i]):
        if not free:
            return None
        best = max(range(len(free)), key=lambda n: free[n])
        if free[best] < needs[i]:
            return None
        free[best] -= needs[i]
        where[i] = best
    return where


def largest(nodes: Sequence[NodeInfo]) -> NodeInfo:
    return max(nodes, key=lambda n: n.memory_bytes)


def describe_nodes(nodes: Sequence[NodeInfo]) -> str:
    sizes = sorted({n.memory_bytes for n in nodes}, reverse=True)
    each = " / ".join(fmt_bytes(s) for s in sizes[:3]) + (" ..." if len(sizes) > 3 else "")
    return f"{len(nodes)} node{'s' if len(nodes) != 1 else ''} with {each} of memory"


# -- sizes ---------------------------------------------------------------------------------------

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes from ``1200M``, ``2G``, ``1.5Gi``, ``512MiB`` or a plain number of bytes. Suffixes are
    binary (K = 1024), as Docker's and Ray's own memory options read them."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(?:([KMGT])(?:iB|i|B)?|B)?", str(text).strip(), re.IGNORECASE)
    if not match:
        raise ValueError(f"cannot read the size {text!r} (examples: 1200M, 2G, 1073741824)")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])


def fmt_bytes(b: float) -> str:
    """``1.2 GiB``, ``300.0 MiB``... for messages and plans."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= scale:
            return f"{b / scale:.1f} {unit}"
    return f"{int(b)} B"


def machine_node() -> NodeInfo:
    """This machine as one node (CPUs, physical memory): what ``gradserve plan`` assumes when no
    cluster is described."""
    import os

    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 0
    return NodeInfo("this-machine", float(os.cpu_count() or 1), int(memory))


def nodes_of(count: int, memory_bytes: int, cpus: float = 1.0) -> list[NodeInfo]:
    """A described cluster of ``count`` identical nodes (``gradserve plan --nodes``, tests)."""
    return [NodeInfo(f"node-{i}", cpus, memory_bytes) for i in range(count)]


__all__ = [
    "ACTOR_BASE_BYTES",
    "HEADROOM",
    "MemoryModel",
    "NodeInfo",
    "PartitionMemory",
    "ResourceExhausted",
    "cluster_nodes",
    "describe_nodes",
    "estimate",
    "fmt_bytes",
    "largest",
    "machine_node",
    "nodes_of",
    "pack",
    "parse_size",
]
