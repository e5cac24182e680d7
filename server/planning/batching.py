"""Splitting a batch into micro-batches (and replicas) so that the summed result is exact.

A micro-batch's loss enters the total with a weight: for a loss that is a *sum* over the batch the
weight is 1; for a *mean* it is the micro-batch's share of the batch (its share of the non-ignored
targets for a cross-entropy with ``ignore_index``). The backward pass is seeded with that weight, so
dL/dw summed over micro-batches equals the unsplit job's.

That is only exact when every sample's values are computed independently of the other samples' until
one final reduction over the batch. :func:`loss_reduction` checks this by following the batch axis
through the graph with each op's batch rule -- the ``batch=`` field of its row in the op table (see
:mod:`gradserve.worker.ops.batch`), which passes only what keeps samples independent. Anything else
(a batch mean below the loss, training-mode BatchNorm, a term that does not depend on the batch and
would be counted once per micro-batch, the batch size used as data, a constant that holds the batch
size...) is refused, naming the node. This module holds the generic machinery; the ops' rules live
beside the ops.

A batched value is tagged with the axis its batch runs along (:class:`Rows`). Along that axis each
sample owns ``per`` consecutive entries, sample-major: a reshape (B, T, V) -> (B*T, V) keeps sample
i's rows together (rows i*T..(i+1)*T), so row-wise ops, and a mean over the B*T rows, stay exact.
``per`` is read from the shapes: the axis has n*per entries in a batch of n samples. The tags are
then checked against shape inference of every micro-batch size: a batched value must have b*per
entries there with b samples and every other axis unchanged, an unbatched value the same shape.

Models exported with a fixed batch size (no dynamic axes) are split too: the inputs whose declared
first axis is the common batch size get a symbolic first axis in a copy of the model, which the
micro-batches then run with (:attr:`Split.model`), with the exact rewrites of constants the rules
ask for (a Reshape's shape that spells out the batch gets -1 there).

Values computed from the batch's shape (tagged SHAPE) are evaluated where a rule needs them
(:mod:`gradserve.server.planning.side_values`), for any batch size, from the shapes the tags
predict: the axis an RNN's zero state ``ConstantOfShape([D, B, H])`` holds the batch on, the
indices of torch's ``as_strided``, checked at every micro-batch size (:meth:`_Follower.at_sizes`).
A mean over targets that are not ignored counts them in the labels the loss reads, computed from
the feeds when a Slice picks some of them (``labels[:, 1:]``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from gradserve.server.planning import side_values
from gradserve.server.planning.prepare import PreparedJob, prepare
from gradserve.worker.graph import GraphError, InputSpec, Model, Node
from gradserve.worker.ops import get_op
from gradserve.worker.ops.batch import NONE, SHAPE, BatchRule, Rows, never, refuse


@dataclass(frozen=True)
class Chunk:
    """One slice of the batch: its feeds and the weight of its loss in the total."""

    feeds: dict[str, np.ndarray]
    weight: float


@dataclass(frozen=True)
class Split:
    """The chunks of a job, the model they run with (the job's own, or for a fixed-batch export a
    copy whose batched inputs have a symbolic first axis), and the first chunk's prepared job."""

    model: Model
    chunks: list[Chunk]
    job: PreparedJob


def split_batch(model: Model, job: PreparedJob, feeds: Mapping[str, np.ndarray], parts: int) -> Split:
    """Split ``feeds`` (prepared as ``job``) along the batch axis into ``parts`` chunks with their
    loss weights. Raises GraphError, naming the node, when the split would not be exact."""
    if parts == 1:
        return Split(model, [Chunk(dict(feeds), 1.0)], job)
    batched, n = batched_inputs(model, feeds)
    if n < parts:
        raise GraphError(f"a batch of {n} cannot be split into {parts} micro-batches x replicas")
    follower = _Follower(model, job, set(batched), n)
    kind, detail = follower.loss_reduction()
    bounds = np.linspace(0, n, parts + 1).round().astype(int)
    if kind == "count":  # every chunk needs a target that is not ignored, or its mean is 0/0
        labels, ignore = detail
        counts = _target_counts(model, job, feeds, labels, ignore, n)
        counted = np.flatnonzero(counts)
        if len(counted) < parts:
            raise GraphError(
                f"only {len(counted)} samples have targets in '{labels}' that are not ignore_index {ignore}: "
                f"too few for {parts} micro-batches x replicas"
            )
        bounds = np.array([0, *counted[np.linspace(0, len(counted), parts + 1).round().astype(int)[1:-1]], n])
    parts_feeds = [{k: (v[a:b] if k in batched else v) for k, v in feeds.items()} for a, b in zip(bounds, bounds[1:])]
    if kind == "sum":
        weights = [1.0] * parts
    elif kind == "mean":
        weights = [float(b - a) / n for a, b in zip(bounds, bounds[1:])]
    else:  # "count": a mean over the targets that are not ignored
        weights = [int(counts[a:b].sum()) / int(counts.sum()) for a, b in zip(bounds, bounds[1:])]
    run_model = _with_symbolic_batch(model, batched, follower.rewrites)
    # Every micro-batch size is checked against the tags (a few ms each; prepare caches them).
    jobs: dict[int, PreparedJob] = {}
    for part in parts_feeds:
        b = part[batched[0]].shape[0]
        if b not in jobs:
            jobs[b] = follower.check_size(run_model, part, b)
    return Split(
        run_model, [Chunk(f, w) for f, w in zip(parts_feeds, weights)], jobs[parts_feeds[0][batched[0]].shape[0]]
    )


def batched_inputs(model: Model, feeds: Mapping[str, np.ndarray]) -> tuple[list[str], int]:
    """The fed inputs that carry the batch on axis 0, and the batch size.

    Inputs declared with a symbolic first axis are the batch. A model with none (exported without
    dynamic axes) batches the inputs whose fixed first axis is the size most of them share.
    """
    fed = [s for s in model.inputs if s.name in feeds and s.shape]
    batched = [s.name for s in fed if not isinstance(s.shape[0], (int, np.integer))]
    if not batched:
        sizes = [int(s.shape[0]) for s in fed if isinstance(s.shape[0], (int, np.integer))]  # all of them, here
        if not sizes:
            raise GraphError("micro-batches/replicas need a fed input with at least one axis to split")
        common = max(sizes, key=lambda size: (sizes.count(size), -sizes.index(size)))
        batched = [s.name for s in fed if s.shape[0] == common]
    n = feeds[batched[0]].shape[0]
    for name in batched:
        if feeds[name].shape[0] != n:
            raise GraphError(f"feed '{name}' has batch size {feeds[name].shape[0]}, feed '{batched[0]}' has {n}")
    return batched, n


def _target_counts(
    model: Model, job: PreparedJob, feeds: Mapping[str, np.ndarray], labels: str, ignore: int, n: int
) -> np.ndarray:
    """Each sample's count of targets in ``labels`` (a feed, or a value computed from the feeds one
    sample at a time, such as ``labels[:, 1:]``) that are not ``ignore``."""
    if labels in feeds:
        values = np.asarray(feeds[labels])
    else:
        producers = {o: node for node in job.nodes for o in node.outputs if o}
        sources = {**model.params, **feeds}
        nodes = side_values.subgraph(labels, producers, job.nodes, lambda v: v in sources or v in model.constants)
        if nodes is None:
            raise GraphError(f"the labels '{labels}' cannot be computed from the feeds to count their targets")
        values = side_values.evaluate(model, nodes, sources, labels)
    counts = np.count_nonzero(values.reshape(n, -1) != ignore, axis=1)
    if not counts.any():
        raise GraphError(f"every target in '{labels}' equals ignore_index {ignore}")
    return counts


def _with_symbolic_batch(model: Model, batched: Sequence[str], rewrites: Mapping[str, tuple[int, np.ndarray]]) -> Model:
    """``model`` with a symbolic first axis on every batched input and the ``rewrites`` of constant
    inputs applied (each to a new constant); ``model`` itself when there is nothing to change."""
    fixed = {s.name for s in model.inputs if s.name in batched and isinstance(s.shape[0], (int, np.integer))}
    if not fixed and not rewrites:
        return model
    used = {d for s in model.inputs for d in s.shape if isinstance(d, str)}
    symbol = next(f"batch{k or ''}" for k in range(len(used) + 1) if f"batch{k or ''}" not in used)
    inputs = [InputSpec(s.name, s.dtype, (symbol, *s.shape[1:])) if s.name in fixed else s for s in model.inputs]
    nodes, constants = list(model.nodes), dict(model.constants)
    for i, node in enumerate(nodes):
        if node.name in rewrites:
            k, value = rewrites[node.name]
            name = f"{node.inputs[k]}/per_micro_batch"
            while name in constants:
                name += "_"
            constants[name] = value
            nodes[i] = dataclasses.replace(node, inputs=[name if j == k else v for j, v in enumerate(node.inputs)])
    return dataclasses.replace(model, inputs=inputs, nodes=nodes, constants=constants)


# -- following the batch axis ------------------------------------------------------------------------
# An op without a row (never in a prepared job) or whose row states no rule.
_UNKNOWN = never("is not known to keep the samples of a batch independent")


def _rule(op_type: str) -> BatchRule:
    opdef = get_op(op_type)
    return opdef.batch if opdef is not None and opdef.batch is not None else _UNKNOWN


def loss_reduction(model: Model, job: PreparedJob, batched: set[str], n: int) -> tuple[str, Any]:
    """How the loss reduces over the batch of ``n`` samples: ("sum", None), ("mean", None) or
    ("count", (labels feed, ignore_index)). Raises GraphError, naming the node, when splitting the
    batch would not be exact."""
    return _Follower(model, job, batched, n).loss_reduction()


class _Follower:
    """Tags every value of a job (see the module docs and :mod:`gradserve.worker.ops.batch`), then
    checks the tags at other batch sizes. It is the :class:`~gradserve.worker.ops.batch.BatchView`
    the ops' rules read."""

    def __init__(self, model: Model, job: PreparedJob, batched: set[str], n: int):
        self.model, self.job, self.n = model, job, n
        self.batched = batched
        self.tags: dict[str, object] = {name: Rows(0) for name in batched}
        self._producers = {o: node for node in job.nodes for o in node.outputs if o}
        # node name -> (input index, constant): exact rewrites the micro-batches need (see rewrite)
        self.rewrites: dict[str, tuple[int, np.ndarray]] = {}
        # (node, check): what each micro-batch size must satisfy beyond its shapes (see at_sizes)
        self.checks: list[tuple[Node, Callable[[int], str | None]]] = []
        self._shape_values: dict[tuple[str, int], np.ndarray | None] = {}
        self._outer = 1

    # -- the view the rules read -----------------------------------------------------------------
    def shape(self, name: str) -> tuple[int, ...] | None:
        info = self.job.shapes.get(name)
        if info is not None:
            return tuple(info.shape)
        # ONNX infers no shape for some function ops (GroupNormalization): the op's rule says what it is.
        maker = self._producers.get(name)
        if maker is None or not maker.inputs:
            return None
        infer = _rule(maker.op_type).infer
        if infer == "same":
            return self.shape(maker.inputs[0])
        if infer == "broadcast" and maker.outputs[0] == name:
            shapes = [self.shape(i) for i in maker.inputs if i]
            known = [s for s in shapes if s is not None]
            if len(known) == len(shapes):
                return tuple(np.broadcast_shapes(*known))
        return None

    def rank(self, name: str) -> int | None:
        s = self.shape(name)
        return None if s is None else len(s)

    def const(self, node: Node, k: int) -> np.ndarray | None:
        if len(node.inputs) > k and node.inputs[k] in self.model.constants:
            return np.asarray(self.model.constants[node.inputs[k]])
        return None

    def axes(self, node: Node, k: int) -> list[int] | None:
        if "axes" in node.attrs:
            return [int(a) for a in node.attrs["axes"]]
        c = self.const(node, k)
        return None if c is None else [int(a) for a in np.ravel(c)]

    def rows(self, axis: int) -> Rows:
        return Rows(axis, self._outer)

    def producer(self, name: str) -> Node | None:
        return self._producers.get(name)

    def mixing(self, node: Node, k: int, p: int) -> GraphError:
        """When the unbatched input is exactly as long as the batch, a constant holds the batch size
        (a fixed-batch export), and the node that made it is named."""
        name = node.inputs[k]
        shape = self.shape(name)
        assert shape is not None  # the rules ask only about inputs whose shape they read
        size = shape[p]
        if size % self.n:
            return refuse(node, f"mixes a batched value with the unbatched '{name}' along the batch axis")
        maker = self._producers.get(name)
        if maker is not None and _rule(maker.op_type).sized_by_constant:
            return refuse(
                maker,
                f"has a constant shape that holds the batch size ({size} along axis {p}); "
                "each micro-batch needs its own",
            )
        return refuse(
            node,
            f"mixes a batched value with '{name}', whose axis {p} holds the batch size ({size}) "
            "though it is not computed from the batch; each micro-batch needs its own",
        )

    def rewrite(self, node: Node, k: int, value: np.ndarray) -> None:
        self.rewrites[node.name] = (k, value)

    def at_sizes(self, node: Node, check: Callable[[int], str | None]) -> None:
        self.checks.append((node, check))

    def shape_value(self, name: str, b: int | None = None) -> np.ndarray | None:
        """``name``, computed from the batch's shape only, for a batch of ``b`` samples (default
        the job's): each Shape node reads the shape its input's tag predicts at that size, which
        check_size confirms for the sizes the micro-batches have. None when it reads anything else
        that is not a constant."""
        b = self.n if b is None else b
        if (name, b) not in self._shape_values:
            self._shape_values[name, b] = self._evaluate_shape_value(name, b)
        return self._shape_values[name, b]

    def _evaluate_shape_value(self, name: str, b: int) -> np.ndarray | None:
        values: dict[str, np.ndarray] = {}

        def source(v: str) -> bool:
            maker = self._producers.get(v)
            if maker is not None and maker.op_type in ("Shape", "Size"):
                shape = self._shape_at(maker.inputs[0], b)
                if shape is not None:
                    values[v] = side_values.shape_of(maker, shape)
                    return True
            return v in self.model.constants

        nodes = side_values.subgraph(name, self._producers, self.job.nodes, source)
        if nodes is None or any(self.tags.get(o) not in (NONE, SHAPE) for node in nodes for o in node.outputs if o):
            return None
        try:
            return side_values.evaluate(self.model, nodes, values, name)
        except (GraphError, ValueError, IndexError):  # the arithmetic fails at that size (OpError is a ValueError)
            return None

    def _shape_at(self, name: str, b: int) -> tuple[int, ...] | None:
        """The shape its tag predicts for ``name`` in a batch of ``b`` samples."""
        full, tag = self.shape(name), self.tags.get(name, NONE)
        if full is None or tag == SHAPE or isinstance(tag, tuple):
            return None
        if isinstance(tag, Rows):
            return tuple(d // self.n * b if a == tag.axis else d for a, d in enumerate(full))
        return full

    def shaped_axis(self, node: Node, k: int) -> int:
        """The axis of ``node``'s output that input ``k`` (a shape computed from the batch's: a
        ConstantOfShape's shape, an Expand's, a Tile's repeats) sizes with the batch: the one entry
        that grows in proportion to the batch (an RNN's zero state (D, B, H) has it on axis 1).
        Axis 0 when that cannot be told; check_size then checks it."""
        at_n, at_more = self.shape_value(node.inputs[k]), self.shape_value(node.inputs[k], self.n + 1)
        if at_n is None or at_more is None or at_n.ndim != 1 or at_n.shape != at_more.shape:
            return 0
        moved = np.flatnonzero(at_n != at_more)
        if len(moved) != 1 or at_n[moved[0]] % self.n or at_more[moved[0]] != at_n[moved[0]] // self.n * (self.n + 1):
            return 0
        return int(moved[0]) + (self.rank(node.outputs[0]) or len(at_n)) - len(at_n)

    # -- the pass --------------------------------------------------------------------------------
    def loss_reduction(self) -> tuple[str, Any]:
        for node in self.job.nodes:
            tags = [self.tags.get(i, NONE) if i else NONE for i in node.inputs]
            out = self.propagate(node, tags)
            outs = out if isinstance(out, list) else [out] * len(node.outputs)
            for name, tag in zip(node.outputs, outs):
                if name:
                    self.tags[name] = tag
        final = self.tags.get(self.model.loss, NONE)
        if isinstance(final, tuple):
            return final
        raise GraphError(
            f"loss '{self.model.loss}' is not a sum or mean over the batch, so it cannot be split into "
            "micro-batches or replicas"
        )

    def check_size(self, model: Model, feeds: Mapping[str, np.ndarray], b: int) -> PreparedJob:
        """Prepare ``model`` for a micro-batch of ``b`` samples and check every value's shape against
        its tag: b*per entries along a batched value's axis, every other axis as with the full batch."""
        try:
            job = prepare(model, feeds, self.job.input_grads)
        except GraphError as exc:
            raise GraphError(
                f"cannot split the batch into micro-batches or replicas exactly: with {b} samples "
                f"instead of {self.n} the graph fails ({exc}); a constant may hold the batch size"
            ) from None
        for node in self.job.nodes:
            for name in node.outputs:
                full, part = self.shape(name), job.shapes.get(name)
                if not name or full is None or part is None:
                    continue
                want = list(full)
                tag = self.tags.get(name, NONE)
                if tag == SHAPE:  # read as a shape or checked by value (at_sizes): may grow with the batch
                    continue
                if isinstance(tag, Rows):
                    want[tag.axis] = full[tag.axis] // self.n * b
                if tuple(part.shape) != tuple(want):
                    raise refuse(
                        node,
                        f"gives '{name}' the shape {tuple(part.shape)} with {b} samples and "
                        f"{full} with {self.n}: its samples do not stay apart along one axis",
                    )
        for node, check in self.checks:
            fault = check(b)
            if fault:
                raise refuse(node, fault)
        return job

    def propagate(self, node: Node, tags: list) -> object:
        """The tag(s) of ``node``'s outputs from its inputs' ``tags``: the generic part here, the
        op's own in its rule."""
        rule = _rule(node.op_type)
        reduced = [t for t in tags if isinstance(t, tuple)]
        rows = [k for k, t in enumerate(tags) if isinstance(t, Rows)]
        k = rule.shaped_by
        if (
            k is not None
            and k < len(tags)
            and tags[k] == SHAPE
            and all(t == NONE for j, t in enumerate(tags) if j != k)
        ):
            # One value (or copies of an unbatched one) shaped like the batch: mixes no samples.
            # check_size refuses it if the batch is not on the axis found.
            return Rows(self.shaped_axis(node, k))
        if not rows and not reduced:
            return SHAPE if SHAPE in tags else NONE
        if any(t == SHAPE and k not in rule.shape_inputs for k, t in enumerate(tags)):
            raise refuse(node, "uses the batch size as data; each micro-batch would see its own size")
        if reduced:
            if rows:
                raise refuse(node, "combines a batch reduction with per-sample values")
            if rule.reduced is None:
                raise refuse(node, "is not linear in the batch reduction below it")
            return rule.reduced(node, tags, reduced)
        if rule.rule is None:
            raise refuse(node, rule.refused)
        self._outer = tags[rows[0]].outer  # kept by every rule but reshape (see rows())
        if len({tags[k].outer for k in rows}) > 1:
            raise refuse(node, "combines batched values whose samples are laid out differently")
        return rule.rule(self, node, tags)
