"""Forward and reverse pass over a (sub)graph: the core every engine runs.

:func:`compile_program` turns topologically sorted nodes into a :class:`Program` that knows which
values need an error and when each activation can be dropped. :func:`forward` runs it and records a
:class:`Tape`; :func:`backward` walks the tape in reverse, calling each op's VJP and *summing* the
errors of a value that feeds several consumers (the multivariate chain rule). A Program is a whole
model for the inline engine, or one partition for a Ray worker: the same code path either way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import numpy as np

from gradserve.worker.graph import GraphError, Node
from gradserve.worker.ops import OpContext, OpDef, get_op, stand_in


class NodeError(GraphError):
    """An op failed at run time; the message names the node."""


@dataclass
class Program:
    """A runnable (sub)graph.

    ``sources`` are the values it is given (feeds, parameters, constants, boundary activations),
    ``outputs`` the values it must hand back after forward (the loss, boundary activations), and
    ``wrt`` the sources whose error dL/d(value) backward must return.
    """

    nodes: list[Node]
    ops: list[OpDef]
    sources: frozenset[str]
    outputs: frozenset[str]
    wrt: frozenset[str]
    requires_grad: frozenset[str]  # values that depend on a ``wrt`` value through differentiable inputs
    needs: list[tuple[bool, ...]]  # per node, per input: does that input need an error?
    records: list[bool]  # per node: keep a tape entry (some input needs an error)
    drop_after: list[list[str]]  # per node: values no later node reads


@dataclass
class Tape:
    """What a forward pass leaves for the backward pass: one context per recorded node."""

    entries: list[OpContext | None]
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    # With ``defer`` in backward: the VJPs still owed to deferred values, as (node index, context
    # whose ``needs`` marks only the deferred inputs, errors at the node's outputs).
    deferred: list[tuple[int, OpContext, list]] = field(default_factory=list)


def compile_program(nodes: list[Node], sources: Iterable[str], outputs: Iterable[str], wrt: Iterable[str]) -> Program:
    """Prepare topologically sorted ``nodes`` for running."""
    sources, outputs, wrt = frozenset(sources), frozenset(outputs), frozenset(wrt)
    ops: list[OpDef] = []
    for node in nodes:
        op = get_op(node.op_type)
        if op is None:
            raise GraphError(f"{node}: unsupported op type '{node.op_type}'")
        ops.append(op)
    # Values whose error is wanted, propagated forward: a value requires grad if any differentiable
    # input of its producer does.
    requires = set(wrt)
    needs, records = [], []
    for node, op in zip(nodes, ops):
        flags = tuple(bool(i) and i in requires and op.can_differentiate(k) for k, i in enumerate(node.inputs))
        needs.append(flags)
        records.append(any(flags))
        if any(flags):
            requires.update(o for o in node.outputs if o)
    last_use: dict[str, int] = {}
    for idx, node in enumerate(nodes):
        for i in node.inputs:
            if i:
                last_use[i] = idx
    drop_after: list[list[str]] = [[] for _ in nodes]
    for value, idx in last_use.items():
        if value not in outputs and value not in sources:
            drop_after[idx].append(value)
    return Program(nodes, ops, sources, outputs, wrt, frozenset(requires), needs, records, drop_after)


def forward(program: Program, values: Mapping[str, np.ndarray]) -> Tape:
    """Run the program on ``values`` (all its sources); return the tape with the outputs."""
    env = dict(values)
    entries: list[OpContext | None] = [None] * len(program.nodes)
    for idx, (node, op) in enumerate(zip(program.nodes, program.ops)):
        args = [env[i] if i else None for i in node.inputs]
        # ``needs`` is known before the forward runs, so a forward can skip saving what no VJP reads.
        ctx = OpContext(node.attrs, node=node.name, n_outputs=len(node.outputs), needs=program.needs[idx])
        try:
            result = op.forward(ctx, *args)
        except (GraphError, MemoryError):
            raise
        except Exception as exc:
            raise NodeError(f"{node}: {type(exc).__name__}: {exc}") from exc
        outs = result if isinstance(result, tuple) else (result,)
        if len(outs) < len([o for o in node.outputs if o]):
            raise NodeError(f"{node}: produced {len(outs)} outputs, the node declares {len(node.outputs)}")
        for name, value in zip(node.outputs, outs):
            if name:
                env[name] = value
        if program.records[idx]:
            # None: an optional input the node leaves out, which no VJP reads
            ctx.inputs = [a if a is None or op.keeps_input(k) else stand_in(a) for k, a in enumerate(args)]  # type: ignore[misc]
            ctx.outputs = [o if op.keep_outputs else stand_in(o) for o in outs[: len(node.outputs)]]
            entries[idx] = ctx
        for dead in program.drop_after[idx]:
            env.pop(dead, None)
    missing = [o for o in program.outputs if o not in env]
    if missing:
        raise GraphError(f"values {missing} were not computed")
    return Tape(entries, {o: env[o] for o in program.outputs})


def backward(
    program: Program, tape: Tape, errors: Mapping[str, np.ndarray], defer: Iterable[str] = ()
) -> dict[str, np.ndarray]:
    """Reverse pass: given dL/d(output) for some outputs, return dL/d(value) for the ``wrt`` values
    that the errors reach. Consumes the tape (each entry is freed once used).

    ``defer`` names source values (typically parameters) whose errors are *not* computed now: the
    VJP work they need is queued on the tape for :func:`backward_deferred`. This is the zero-bubble
    split: errors that another worker is waiting for first, weight gradients after.
    """
    defer = frozenset(defer)
    errs: dict[str, np.ndarray] = dict(errors)
    owned: set[str] = set()  # error buffers we allocated and may add into in place
    for idx in range(len(program.nodes) - 1, -1, -1):
        ctx = tape.entries[idx]
        if ctx is None:
            continue
        tape.entries[idx] = None
        node = program.nodes[idx]
        grads_out = [errs.pop(o, None) if o else None for o in node.outputs]
        if all(g is None for g in grads_out):
            continue
        if defer:
            later = tuple(n and i in defer for i, n in zip(node.inputs, ctx.needs))
            if any(later):
                tape.deferred.append((idx, _with_needs(ctx, later), grads_out))
                ctx = _with_needs(ctx, tuple(n and not d for n, d in zip(ctx.needs, later)))
                if not any(ctx.needs):
                    continue
        _apply_vjp(program, idx, ctx, grads_out, errs, owned)
    return {name: errs[name] for name in program.wrt if name in errs}


def backward_deferred(program: Program, tapes: Iterable[Tape]) -> dict[str, np.ndarray]:
    """Run the VJP work :func:`backward` deferred on ``tapes`` (one per micro-batch); return the
    errors of the deferred values, summed over every backward pass recorded on them.

    A node's deferred work from several tapes goes to its op's ``merge`` first where it has one:
    the weight error of a matrix product is then one product over all micro-batches' rows, as
    the unsplit batch would compute it, not one thin product per micro-batch summed afterwards."""
    by_node: dict[int, list[tuple[OpContext, list]]] = {}
    for tape in tapes:
        for idx, ctx, grads_out in tape.deferred:  # ctx.needs marks just the inputs held back
            by_node.setdefault(idx, []).append((ctx, grads_out))
        tape.deferred = []
    errs: dict[str, np.ndarray] = {}
    owned: set[str] = set()
    for idx, entries in by_node.items():
        merge = program.ops[idx].merge
        if len(entries) > 1 and merge is not None and len({tuple(c.needs) for c, _ in entries}) == 1:
            merged = merge(entries)
            if merged is not None:
                entries = [merged]
        for ctx, grads_out in entries:
            _apply_vjp(program, idx, ctx, grads_out, errs, owned)
    return errs


def _with_needs(ctx: OpContext, needs: tuple[bool, ...]) -> OpContext:
    return dataclasses.replace(ctx, needs=needs)


def _apply_vjp(program: Program, idx: int, ctx: OpContext, grads_out: list, errs: dict, owned: set) -> None:
    node, op = program.nodes[idx], program.ops[idx]
    try:
        result = op.vjp(ctx, *grads_out)  # type: ignore[misc]  # recorded: it can differentiate, so has a VJP
    except Exception as exc:
        raise NodeError(f"{node}: backward failed: {type(exc).__name__}: {exc}") from exc
    grads_in = result if isinstance(result, (tuple, list)) else (result,)
    for k, (name, g) in enumerate(zip(node.inputs, grads_in)):
        if g is None or not ctx.needs[k]:
            continue
        x = ctx.inputs[k]
        if g.shape != x.shape:
            raise NodeError(f"{node}: VJP gave input '{name}' an error of shape {g.shape}, expected {x.shape}")
        if g.dtype != x.dtype:
            g = g.astype(x.dtype)
        _accumulate(errs, owned, name, g)


def _accumulate(errs: dict[str, np.ndarray], owned: set[str], name: str, g: np.ndarray) -> None:
    """Sum a new error into ``errs[name]`` (the sum over a value's consumers)."""
    if name not in errs:
        errs[name] = g
    elif name in owned:
        np.add(errs[name], g, out=errs[name])
    else:
        # never write into a buffer a VJP may still share; asarray: the sum of two 0-d arrays is a
        # numpy scalar, which the in-place add above cannot write into
        errs[name] = np.asarray(errs[name] + g)
        owned.add(name)
