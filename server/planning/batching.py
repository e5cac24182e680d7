"""Splitting a batch into micro-batches (and replicas) so that the summed result is exact.

A micro-batch's loss enters the total with a weight: for a loss that is a *sum* over the batch the
weight is 1; for a *mean* it is the micro-batch's share of the batch (its share of the non-ignored
targets for a cross-entropy with ``ignore_index``). The backward pass is seeded with that weight, so
dL/dw summed over micro-batches equals the unsplit job's.

That is only exact when every sample's values are computed independently of the other samples' until
one final reduction over the batch. :func:`loss_reduction` checks this by following the batch axis
through the graph with a whitelist of ops known to keep samples independent; anything else (a batch
mean below the loss, training-mode BatchNorm, a term that does not depend on the batch and would be
counted once per micro-batch, the batch size used as data, a constant that holds the batch size...)
is refused, naming the node.

A batched value is tagged with the axis its batch runs along (:class:`Rows`). Along that axis each
sample owns ``per`` consecutive entries, sample-major: a reshape (B, T, V) -> (B*T, V) keeps sample
i's rows together (rows i*T..(i+1)*T), so row-wise ops, and a mean over the B*T rows, stay exact.
``per`` is read from the shapes: the axis has n*per entries in a batch of n samples. The tags are
then checked against shape inference of every micro-batch size: a batched value must have b*per
entries there with b samples and every other axis unchanged, an unbatched value the same shape.

Models exported with a fixed batch size (no dynamic axes) are split too: the inputs whose declared
first axis is the common batch size get a symbolic first axis in a copy of the model, which the
micro-batches then run with (:attr:`Split.model`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from gradserve.server.planning.prepare import PreparedJob, prepare
from gradserve.worker.graph import GraphError, InputSpec, Model, Node
from gradserve.worker.ops.linalg import FUSED_GEMM, FUSED_LINEAR
from gradserve.worker.ops.loss import FUSED_MSE


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
    batched, n = _batched_inputs(model, feeds)
    if n < parts:
        raise GraphError(f"a batch of {n} cannot be split into {parts} micro-batches x replicas")
    follower = _Follower(model, job, set(batched), n)
    kind, detail = follower.loss_reduction()
    bounds = np.linspace(0, n, parts + 1).round().astype(int)
    if kind == "count":  # every chunk needs a target that is not ignored, or its mean is 0/0
        labels, ignore = detail
        counted = np.flatnonzero((feeds[labels] != ignore).reshape(n, -1).any(axis=1))
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
        labels, ignore = detail
        total = int(np.count_nonzero(feeds[labels] != ignore))
        if total == 0:
            raise GraphError(f"every target in '{labels}' equals ignore_index {ignore}")
        weights = [int(np.count_nonzero(f[labels] != ignore)) / total for f in parts_feeds]
    run_model = _with_symbolic_batch(model, batched, follower.rewrites)
    # Every micro-batch size is checked against the tags (a few ms each; prepare caches them).
    jobs: dict[int, PreparedJob] = {}
    for part in parts_feeds:
        b = part[batched[0]].shape[0]
        if b not in jobs:
            jobs[b] = follower.check_size(run_model, part, b)
    return Split(run_model, [Chunk(f, w) for f, w in zip(parts_feeds, weights)], jobs[parts_feeds[0][batched[0]].shape[0]])


def _batched_inputs(model: Model, feeds: Mapping[str, np.ndarray]) -> tuple[list[str], int]:
    """The fed inputs that carry the batch on axis 0, and the batch size.

    Inputs declared with a symbolic first axis are the batch. A model with none (exported without
    dynamic axes) batches the inputs whose fixed first axis is the size most of them share.
    """
    fed = [s for s in model.inputs if s.name in feeds and s.shape]
    batched = [s.name for s in fed if not isinstance(s.shape[0], (int, np.integer))]
    if not batched:
        sizes = [int(s.shape[0]) for s in fed]
        if not sizes:
            raise GraphError("micro-batches/replicas need a fed input with at least one axis to split")
        common = max(sizes, key=lambda size: (sizes.count(size), -sizes.index(size)))
        batched = [s.name for s in fed if s.shape[0] == common]
    n = feeds[batched[0]].shape[0]
    for name in batched:
        if feeds[name].shape[0] != n:
            raise GraphError(f"feed '{name}' has batch size {feeds[name].shape[0]}, feed '{batched[0]}' has {n}")
    return batched, n


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
@dataclass(frozen=True)
class Rows:
    """A batched value: the batch runs along ``axis``, each sample's entries consecutive there.

    ``outer`` > 1 when a reshape merged axes *before* the batch into that axis (multi-head
    attention's (T, B*H, E/H) -> (T*B*H, E/H) rows): the axis then holds ``outer`` blocks of the n
    samples, each sample's ``per`` entries consecutive in every block. Row-wise ops keep it exact."""

    axis: int = 0
    outer: int = 1


# Other tags: not derived from the batch; derived only from its *shape* (Shape, and arithmetic on it:
# fine as a shape, wrong as data); or a tuple (kind, detail) for a value reduced over the batch.
NONE, SHAPE = "none", "shape"

_ELEMENTWISE = {
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where", "Neg", "Abs", "Exp", "Log",
    "Sqrt", "Reciprocal", "Tanh", "Sigmoid", "Relu", "LeakyRelu", "Softplus", "Erf", "Clip", "Cast",
    "Identity", "Dropout", "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Not", "And", "Or", "Xor",
    "HardSwish", "HardSigmoid", "Elu", "Selu", "Celu", "ThresholdedRelu", "Softsign", "Mish", "Gelu", "Shrink",
    "Sin", "Cos", "Tan", "Asin", "Acos", "Atan", "Sinh", "Cosh", "Asinh", "Acosh", "Atanh", "Floor", "Ceil",
    "Round", "Sign", "IsNaN", "IsInf", "Mod", "PRelu", "BitwiseAnd", "BitwiseOr", "BitwiseXor", "BitwiseNot",
}
# Batch on axis 0 of input 0; the other inputs are parameters; nothing mixes samples.
_PER_SAMPLE = {"Conv", "ConvTranspose", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool",
               "InstanceNormalization", "LRN", "GroupNormalization", "DepthToSpace", "SpaceToDepth", "Col2Im"}
# Ops working along one axis (attribute "axis", default given): exact when it is not the batch axis.
_AXIS_OPS = {"Softmax": -1, "LogSoftmax": -1, "Hardmax": -1, "LayerNormalization": -1, "Concat": None,
             "Split": 0, "TopK": -1, "GatherElements": 0}
_REDUCE = {"ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
           "ReduceSumSquare", "ReduceLogSumExp", "ReduceLogSum"}
_RNN = {"RNN", "GRU", "LSTM"}
_SAME_SHAPE = {"LRN", "GroupNormalization", "InstanceNormalization", "LayerNormalization", "Softmax", "LogSoftmax",
               "Hardmax", "CumSum"}
_LINEAR_ON_REDUCED = {"Neg", "Identity", "Squeeze", "Unsqueeze", "Reshape", "Cast", "CastLike", "Flatten",
                      "Transpose", "ReduceSum", "ReduceMean", "Expand"}
# Inputs that may hold values computed from the batch's shape: they are read as shapes, not data.
_SHAPE_INPUTS = {"Reshape": (1,), "Expand": (1,), "Slice": (1, 2, 3, 4), "ConstantOfShape": (0,), "Tile": (1,),
                 "Squeeze": (1,), "Unsqueeze": (1,), "Split": (1,), "Resize": (1, 2, 3), "TopK": (1,),
                 "CastLike": (1,), **{op: (1,) for op in _REDUCE}}
# Ops whose constant shape-like input may hold the fixed batch size of a fixed-batch export.
_SIZED_BY_CONSTANT = {"Reshape", "Expand", "ConstantOfShape", "Tile", "Slice"}
_BIG = 1 << 62  # a slice end at least this large means "to the end"


def loss_reduction(model: Model, job: PreparedJob, batched: set[str], n: int) -> tuple[str, object]:
    """How the loss reduces over the batch of ``n`` samples: ("sum", None), ("mean", None) or
    ("count", (labels feed, ignore_index)). Raises GraphError, naming the node, when splitting the
    batch would not be exact."""
    return _Follower(model, job, batched, n).loss_reduction()


class _Follower:
    """Tags every value of a job (see the module docs), then checks the tags at other batch sizes."""

    def __init__(self, model: Model, job: PreparedJob, batched: set[str], n: int):
        self.model, self.job, self.n = model, job, n
        self.batched = batched
        self.tags: dict[str, object] = {name: Rows(0) for name in batched}
        self.producer = {o: node for node in job.nodes for o in node.outputs if o}
        # node name -> (input index, constant): exact rewrites the micro-batches need (see expand_or_tile)
        self.rewrites: dict[str, tuple[int, np.ndarray]] = {}

    # -- shapes and constants --------------------------------------------------------------------
    def shape(self, name: str) -> tuple[int, ...] | None:
        info = self.job.shapes.get(name)
        if info is not None:
            return tuple(info.shape)
        # ONNX infers no shape for some function ops (GroupNormalization): they keep their input's.
        maker = self.producer.get(name)
        if maker is not None and maker.inputs and maker.op_type in _SAME_SHAPE:
            return self.shape(maker.inputs[0])
        if maker is not None and maker.op_type in _ELEMENTWISE and maker.outputs[0] == name:
            shapes = [self.shape(i) for i in maker.inputs if i]
            if None not in shapes:
                return tuple(np.broadcast_shapes(*shapes))
        return None

    def rank(self, name: str) -> int | None:
        s = self.shape(name)
        return None if s is None else len(s)

    def const(self, node: Node, k: int) -> np.ndarray | None:
        """Input ``k`` of ``node`` when it is a constant of the model, else None."""
        if len(node.inputs) > k and node.inputs[k] in self.model.constants:
            return np.asarray(self.model.constants[node.inputs[k]])
        return None

    # -- the pass --------------------------------------------------------------------------------
    def loss_reduction(self) -> tuple[str, object]:
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
        raise GraphError(f"loss '{self.model.loss}' is not a sum or mean over the batch, so it cannot be split into "
                         "micro-batches or replicas")

    def check_size(self, model: Model, feeds: Mapping[str, np.ndarray], b: int) -> PreparedJob:
        """Prepare ``model`` for a micro-batch of ``b`` samples and check every value's shape against
        its tag: b*per entries along a batched value's axis, every other axis as with the full batch."""
        try:
            job = prepare(model, feeds, self.job.input_grads)
        except GraphError as exc:
            raise GraphError(f"cannot split the batch into micro-batches or replicas exactly: with {b} samples "
                             f"instead of {self.n} the graph fails ({exc}); a constant may hold the batch size") from None
        for node in self.job.nodes:
            for name in node.outputs:
                full, part = self.shape(name), job.shapes.get(name)
                if not name or full is None or part is None:
                    continue
                want = list(full)
                tag = self.tags.get(name, NONE)
                if isinstance(tag, Rows):
                    want[tag.axis] = full[tag.axis] // self.n * b
                if tuple(part.shape) != tuple(want):
                    raise _refuse(node, f"gives '{name}' the shape {tuple(part.shape)} with {b} samples and "
                                        f"{full} with {self.n}: its samples do not stay apart along one axis")
        return job

    def propagate(self, node: Node, tags: list) -> object:
        op = node.op_type
        reduced = [t for t in tags if isinstance(t, tuple)]
        rows = [k for k, t in enumerate(tags) if isinstance(t, Rows)]
        if (op == "ConstantOfShape" and tags[0] == SHAPE) or (op in ("Expand", "Tile") and tags[:2] == [NONE, SHAPE]):
            # One value (or copies of an unbatched one) shaped like the batch: mixes no samples.
            # The batch is assumed on axis 0; check_size refuses it if it is not.
            return Rows(0)
        if not rows and not reduced:
            return SHAPE if SHAPE in tags else NONE
        shape_ok = set(_SHAPE_INPUTS.get(op, ()))
        if any(t == SHAPE and k not in shape_ok for k, t in enumerate(tags)):
            raise _refuse(node, "uses the batch size as data; each micro-batch would see its own size")
        if reduced:
            return _propagate_reduced(node, tags, reduced)
        if op in ("Shape", "Size"):
            return SHAPE
        if op == "CastLike":  # input 1 gives only its dtype
            return tags[0] if isinstance(tags[0], Rows) else NONE
        axis = tags[rows[0]].axis
        self._outer = tags[rows[0]].outer  # kept by every rule but reshape (see rows())
        if len({tags[k].outer for k in rows}) > 1:
            raise _refuse(node, "combines batched values whose samples are laid out differently")
        if op in _ELEMENTWISE:
            return self.elementwise(node, tags)
        if op == "MatMul":
            return self.matmul(node, tags, rows)
        if op == FUSED_LINEAR:  # a MatMul, then a bias that must not depend on the sample
            if 2 in rows:
                raise _refuse(node, "adds a bias computed from the batch to every sample's product")
            return self.matmul(node, tags, rows)
        if op in ("Gemm", FUSED_GEMM):  # the fused node's activation keeps the rows where they are
            if rows == [0] and axis == (1 if node.attrs.get("transA", 0) else 0):
                c = self.shape(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] else None
                if c is not None and len(c) == 2 and c[0] != 1:
                    raise self.mixing(node, 2, 0)
                return self.rows(0)
            raise _refuse(node, "contracts over the batch axis")
        if op in _PER_SAMPLE or (op == "BatchNormalization" and not node.attrs.get("training_mode", 0)) or op == "Resize":
            if rows != [0] or axis != 0:
                raise _refuse(node, "reads batched parameters, or has the batch off axis 0")
            if op == "Resize":
                self.check_resize(node, tags)
            return self.rows(0)
        if op == "BatchNormalization":
            raise _refuse(node, "in training mode normalises with statistics of the whole batch")
        if op in _RNN:
            return self.rnn(node, tags)
        if op == "Einsum":
            return self.einsum(node, tags)
        if op == "GridSample":  # sample i's image read at sample i's grid points
            if tags[0] != Rows(0) or tags[1] != Rows(0):
                raise _refuse(node, "samples images and grids that are not both batched on axis 0")
            return Rows(0)
        if op == "Det":  # one determinant per matrix of the last two axes
            if axis >= (self.rank(node.inputs[0]) or 0) - 2:
                raise _refuse(node, "takes determinants across the batch axis")
            return self.rows(axis)
        if op == "Flatten":
            k = int(node.attrs.get("axis", 1))
            k = k % len(self.shape(node.inputs[0]) or (1,)) if k < 0 else k
            if axis == 0 and k >= 1:
                return self.rows(0)  # merges the axes after the batch into its rows (or keeps them)
            raise _refuse(node, f"flattens the batch axis (axis {axis}) into another one")
        if op == "CumSum":
            c = self.const(node, 1)
            if c is None or tags[1] != NONE:
                raise _refuse(node, "has an axis that is not a constant")
            return self.along_axis(node, tags, rows, int(c.reshape(-1)[0]))
        if op in _AXIS_OPS:
            default = _AXIS_OPS[op] if _AXIS_OPS[op] is not None else 0
            out = self.along_axis(node, tags, rows, int(node.attrs.get("axis", default)))
            return [out] * len(node.outputs) if op in ("Split", "TopK") else out
        if op == "Transpose":
            perm = node.attrs.get("perm")
            if perm is None:
                perm = list(range((self.rank(node.inputs[0]) or 0) - 1, -1, -1))
            if axis in perm:
                return self.rows(list(perm).index(axis))
            raise _refuse(node, "moves the batch axis out of range")
        if op in ("Squeeze", "Unsqueeze"):
            return self.squeeze(node, axis)
        if op == "Slice":
            return self.slice(node, tags, axis)
        if op == "Reshape":
            return self.reshape(node, tags, axis)
        if op in ("Expand", "Tile"):
            return self.expand_or_tile(node, tags, axis)
        if op == "Pad":
            return self.pad(node, tags, axis)
        if op == "Gather":
            g = int(node.attrs.get("axis", 0))
            g = g % (self.rank(node.inputs[0]) or 1)
            if rows == [1]:
                return self.rows(g + axis)  # embedding lookup: sample i's indices pick rows of an unbatched table
            if rows == [0] and g != axis:
                return self.rows(axis if axis < g else axis - 1 + (self.rank(node.inputs[1]) or 0))
            raise _refuse(node, "gathers along the batch axis")
        if op in _REDUCE:
            return self.reduce(node, axis)
        if op == FUSED_MSE:  # a difference (elementwise), then a mean over every axis, the batch's too
            self.elementwise(node, tags)
            return ("mean", None)
        if op in ("SoftmaxCrossEntropyLoss", "NegativeLogLikelihoodLoss") and rows[:2] == [0, 1]:
            if tags[0].axis != 0 or tags[1] != tags[0]:
                raise _refuse(node, "has the batch off axis 0 of its scores or labels")
            reduction = node.attrs.get("reduction", "mean")
            if len(node.inputs) > 2 and node.inputs[2] and reduction == "mean":
                raise _refuse(node, "is a class-weighted mean")
            if reduction == "none":
                return self.rows(0)
            if reduction == "sum":
                return ("sum", None)
            if "ignore_index" in node.attrs:
                return ("count", (self.labels_feed(node), int(node.attrs["ignore_index"])))
            return ("mean", None)
        raise _refuse(node, "is not known to keep the samples of a batch independent")

    # -- rules -----------------------------------------------------------------------------------
    def rows(self, axis: int) -> Rows:
        """The batch on ``axis`` of a rule's output, laid out as in its batched inputs."""
        return Rows(axis, self._outer)

    def elementwise(self, node: Node, tags: list) -> Rows:
        """Broadcasting aligns axes from the right: every batched input must put its batch on the
        same output axis, and every unbatched input must have size 1 there (a bias, a scalar)."""
        ranks = [self.rank(i) if i else 0 for i in node.inputs]
        out_rank = self.rank(node.outputs[0]) or max((r or 0 for r in ranks), default=0)  # broadcast rank
        if None in ranks:
            raise _refuse(node, "has inputs or outputs of unknown shape")
        axes = {t.axis + out_rank - ranks[k] for k, t in enumerate(tags) if isinstance(t, Rows)}
        if len(axes) != 1:
            raise _refuse(node, "broadcasts batched inputs against each other along different axes")
        (out_axis,) = axes
        for k, t in enumerate(tags):
            p = out_axis - (out_rank - ranks[k])
            if node.inputs[k] and not isinstance(t, Rows) and p >= 0 and self.shape(node.inputs[k])[p] != 1:
                raise self.mixing(node, k, p)
        return self.rows(out_axis)

    def mixing(self, node: Node, k: int, p: int) -> GraphError:
        """The refusal for an unbatched input ``k`` that is not size 1 along the batch axis (at its
        axis ``p``): when it is exactly as long as the batch, a constant holds the batch size (a
        fixed-batch export), and the node that made it is named."""
        name = node.inputs[k]
        size = self.shape(name)[p]
        if size % self.n:
            return _refuse(node, f"mixes a batched value with the unbatched '{name}' along the batch axis")
        maker = self.producer.get(name)
        if maker is not None and maker.op_type in _SIZED_BY_CONSTANT:
            return _refuse(maker, f"has a constant shape that holds the batch size ({size} along axis {p}); "
                                  "each micro-batch needs its own")
        return _refuse(node, f"mixes a batched value with '{name}', whose axis {p} holds the batch size ({size}) "
                             "though it is not computed from the batch; each micro-batch needs its own")

    def matmul(self, node: Node, tags: list, rows: list[int]) -> Rows:
        ra, rb, ro = self.rank(node.inputs[0]), self.rank(node.inputs[1]), self.rank(node.outputs[0])
        if None in (ra, rb, ro):
            raise _refuse(node, "has inputs of unknown shape")
        a = tags[rows[0]].axis
        if rows == [0] and ra == ro and (a == ra - 2 or (a < ra - 2 and rb <= 2)):
            return self.rows(a)  # the batch along A's rows, or A's stacked matrices times one B
        if rows == [1] and rb == ro and a < rb - 2 and ra <= 2:
            return self.rows(a)
        if rows == [0, 1] and ra == rb == ro and a == tags[1].axis and a < ro - 2:
            return self.rows(a)  # batched product: sample i's matrices times sample i's matrices
        raise _refuse(node, "contracts over the batch axis")

    def along_axis(self, node: Node, tags: list, rows: list[int], op_axis: int) -> Rows:
        """Softmax, LayerNormalization, Concat, Split, TopK, GatherElements, CumSum: they work along
        ``op_axis`` (LayerNormalization: it and the axes after it), exact when the batch is not there."""
        op = node.op_type
        rank = self.rank(node.inputs[rows[0]])
        axis = tags[rows[0]].axis
        if rank is None:
            raise _refuse(node, "has an input of unknown shape")
        op_axis %= rank
        if op_axis == axis or (op == "LayerNormalization" and op_axis < axis):
            raise _refuse(node, f"works along the batch axis (axis {axis})")
        data = [k for k, (t, i) in enumerate(zip(tags, node.inputs)) if i]
        if op == "Concat" and any(tags[k] != tags[rows[0]] for k in data):
            raise _refuse(node, "concatenates a batched value with an unbatched one")
        if op == "GatherElements" and (tags[0] != tags[rows[0]] or tags[1] != tags[rows[0]]):
            raise _refuse(node, "gathers with data and indices not both batched along one axis")
        if op in ("LayerNormalization", "Split", "TopK", "CumSum", "Softmax", "LogSoftmax", "Hardmax") and rows != [0]:
            raise _refuse(node, "reads batched parameters")
        return self.rows(axis)

    def squeeze(self, node: Node, axis: int) -> Rows:
        op = node.op_type
        axes = _axes_of(self.model, node)
        in_rank = self.rank(node.inputs[0])
        if in_rank is None:
            raise _refuse(node, "has an input of unknown shape")
        if op == "Squeeze":
            if axes is None:  # every size-1 axis; the batch axis has n*per >= 2 entries (check_size sees b=1)
                axes = [k for k, d in enumerate(self.shape(node.inputs[0])) if d == 1]
            axes = sorted(a % in_rank for a in axes)
            if axis in axes:
                raise _refuse(node, "squeezes the batch axis")
            return self.rows(axis - sum(a < axis for a in axes))
        if axes is None:
            raise _refuse(node, "has axes that are not constants")
        out_rank = in_rank + len(axes)
        inserted = sorted(a % out_rank for a in axes)
        kept = [k for k in range(out_rank) if k not in inserted]
        return self.rows(kept[axis])

    def slice(self, node: Node, tags: list, axis: int) -> Rows:
        """Slices of other axes are per sample; along the batch axis only the whole of it."""
        starts, ends = self.const(node, 1), self.const(node, 2)
        axes = _axes_of(self.model, node)
        steps = self.const(node, 4)
        rank = self.rank(node.inputs[0]) or 1
        if len(node.inputs) > 3 and node.inputs[3] and axes is None:
            raise _refuse(node, "has axes that are not constants")
        if starts is None or ends is None:
            if axes is not None and axis not in [a % rank for a in axes]:
                return self.rows(axis)
            raise _refuse(node, "slices the batch axis with bounds that are not constants")
        axes = list(range(len(starts))) if axes is None else [a % rank for a in axes]
        if axis not in axes:
            return self.rows(axis)
        k = axes.index(axis)
        step = 1 if steps is None else int(steps.reshape(-1)[k])
        start, end = int(starts.reshape(-1)[k]), int(ends.reshape(-1)[k])
        full = self.shape(node.inputs[0])[axis]
        if step == 1 and (start == 0 or start <= -full):
            if end >= _BIG:
                return self.rows(axis)  # the whole axis: a no-op there
            if end == full:
                raise _refuse(node, f"has a constant end ({end}) that holds the batch size along the batch "
                                    "axis; each micro-batch needs its own")
        raise _refuse(node, "slices the batch axis")

    def reshape(self, node: Node, tags: list, axis: int) -> Rows:
        """Exact when each sample's elements stay runs along one output axis. In row-major order the
        input is P outer blocks (the axes before the batch axis, times its ``outer``), each holding
        the n samples one after the other, blk elements each. An output axis a whose preceding axes
        multiply to a divisor of P, and whose following axes to a divisor of blk, holds the batch the
        same way: (B, T, V) <-> (B*T, V); attention's heads (T, B, E) -> (T, B*H, E/H); and its rows
        (T, B*H, d) -> (T*B*H, d), where the T blocks become ``outer``. check_size confirms the output
        at every micro-batch size. A constant shape that spells the batch-derived length out (a
        fixed-batch export of ``x.view(64, -1)``) holds the batch size: refused."""
        src, dst = self.shape(node.inputs[0]), self.shape(node.outputs[0])
        if tags[1] not in (NONE, SHAPE) or src is None or dst is None or not dst:
            raise _refuse(node, "changes the batch axis")
        blocks = math.prod(src[:axis]) * tags[0].outer
        blk = math.prod(src) // (blocks * self.n)
        out = None
        for a in range(len(dst)):
            before, after = math.prod(dst[:a]), math.prod(dst[a + 1:])
            if blocks % before == 0 and after and blk % after == 0 and dst[a] == blocks // before * self.n * (blk // after):
                out = Rows(a, blocks // before)
                break
        if out is None:
            raise _refuse(node, "moves the batch to another place in the layout, or splits it")
        target = self.const(node, 1)
        if target is not None:
            entries = [int(v) for v in target.reshape(-1)]
            entry = entries[out.axis] if out.axis < len(entries) else None
            copies = entry == 0 and not node.attrs.get("allowzero", 0) and out.axis < len(src) \
                and src[out.axis] == dst[out.axis]
            if entry not in (-1, None) and not copies:
                raise _refuse(node, f"has a constant shape {entries} whose entry {entry} holds the batch size; each "
                                    "micro-batch needs its own (export with a dynamic batch, or reshape with -1 there)")
        return out

    def expand_or_tile(self, node: Node, tags: list, axis: int) -> Rows:
        """Expand/Tile of a batched value: exact when the batch axis is neither broadcast nor repeated."""
        rank = self.rank(node.inputs[0]) or 0
        out_axis = axis + (self.rank(node.outputs[0]) or rank) - rank  # Expand may prepend axes
        if tags[1] == SHAPE:
            return self.rows(out_axis)  # a shape computed from the batch's: check_size checks it follows
        c = self.const(node, 1)
        if c is None:
            raise _refuse(node, "has a shape that is not a constant")
        c = [int(v) for v in c.reshape(-1)]
        # Expand aligns its shape with the output's last axes; Tile has one repeat per axis.
        k = out_axis - ((self.rank(node.outputs[0]) or 0) - len(c)) if node.op_type == "Expand" else axis
        entry = c[k] if 0 <= k < len(c) else 1
        if entry == 1:
            return self.rows(out_axis)
        if node.op_type == "Expand" and entry == self.shape(node.inputs[0])[axis]:
            # A no-op along the batch axis that holds the batch size (the legacy exporter's
            # broadcast in mse_loss, from a fixed-batch export): 1 there keeps the input's own size
            # at every batch size, and changes nothing at this one.
            c[k] = 1
            self.rewrites[node.name] = (1, np.asarray(c, np.int64))
            return self.rows(out_axis)
        raise _refuse(node, "repeats or broadcasts along the batch axis")

    def pad(self, node: Node, tags: list, axis: int) -> Rows:
        pads = self.const(node, 1) if len(node.inputs) > 1 and node.inputs[1] else node.attrs.get("pads")
        if pads is None or any(isinstance(t, Rows) for t in tags[1:]):
            raise _refuse(node, "has pads that are not constants")
        pads = [int(p) for p in np.ravel(pads)]
        rank = self.rank(node.inputs[0]) or 0
        axes = _axes_of(self.model, node) or list(range(rank))
        axes = [a % rank for a in axes]
        if axis in axes and (pads[axes.index(axis)] or pads[len(axes) + axes.index(axis)]):
            raise _refuse(node, "pads the batch axis")
        return self.rows(axis)

    def reduce(self, node: Node, axis: int) -> object:
        op = node.op_type
        rank = self.rank(node.inputs[0])
        if rank is None:
            raise _refuse(node, "has an input of unknown shape")
        axes = _axes_of(self.model, node)
        if axes is None and len(node.inputs) > 1 and node.inputs[1] and node.inputs[1] not in self.model.constants:
            raise _refuse(node, "has axes that are not constants")
        if not axes:  # omitted or empty: every axis, unless asked to do nothing
            if node.attrs.get("noop_with_empty_axes", 0):
                return self.rows(axis)
            axes = list(range(rank))
        axes = [a % rank for a in axes]
        if axis not in axes:  # a reduction within each sample
            return self.rows(axis if node.attrs.get("keepdims", 1) else axis - sum(a < axis for a in axes))
        if op == "ReduceMean":
            return ("mean", None)
        if op == "ReduceSum":
            return ("sum", None)
        raise _refuse(node, "reduces over the batch with something other than a sum or a mean")

    def check_resize(self, node: Node, tags: list) -> None:
        """The scale along the batch axis must be 1, or the size the batch's own (from Shape)."""
        rank = self.rank(node.inputs[0]) or 0
        axes = [a % rank for a in node.attrs.get("axes", range(rank))]
        if 0 not in axes:
            return
        k = axes.index(0)
        scales, sizes = self.const(node, 2), self.const(node, 3)
        if scales is not None and scales.size and float(scales.reshape(-1)[k]) == 1.0:
            return
        if len(node.inputs) > 3 and tags[3] == SHAPE:
            return  # sizes computed from the batch's shape: check_size checks axis 0 follows it
        if sizes is not None and sizes.size and int(sizes.reshape(-1)[k]) == self.shape(node.inputs[0])[0]:
            raise _refuse(node, f"has constant sizes {sizes.tolist()} that hold the batch size; each micro-batch "
                                "needs its own")
        raise _refuse(node, "resizes along the batch axis")

    def rnn(self, node: Node, tags: list) -> list:
        """X is (T, B, I) for layout=0, (B, T, I) for layout=1; Y is (T, D, B, H) or (B, T, D, H); the
        states (D, B, H) or (B, D, H). Weights are unbatched; sequence_lens and initial states batched."""
        layout = int(node.attrs.get("layout", 0))
        x_axis, state_axis, y_axis = (1, 1, 2) if layout == 0 else (0, 0, 0)
        batched = {0: Rows(x_axis), 4: Rows(0), 5: Rows(state_axis), 6: Rows(state_axis)}
        if node.op_type != "LSTM":
            del batched[6]
        for k, (name, t) in enumerate(zip(node.inputs, tags)):
            if not name:
                continue
            want = batched.get(k, NONE)
            if t == want:
                continue
            if want == NONE:
                raise _refuse(node, f"reads batched weights ('{name}')")
            if t == NONE:
                raise _refuse(node, f"reads '{name}', which is not computed from the batch but has one entry per "
                                    "sample (it holds the batch size)")
            raise _refuse(node, f"does not have the batch on axis {want.axis} of '{name}' (layout={layout})")
        return [Rows(y_axis), Rows(state_axis), Rows(state_axis)][: len(node.outputs)]

    def einsum(self, node: Node, tags: list) -> Rows:
        """Exact when every batched operand's batch index is one letter, kept in the output (not
        summed) and absent from the unbatched operands."""
        eq = str(node.attrs.get("equation", "")).replace(" ", "")
        if "->" not in eq or "." in eq:
            raise _refuse(node, "has an equation without an explicit output or with '...'")
        lhs, out = eq.split("->")
        terms = lhs.split(",")
        letters = {terms[k][t.axis] for k, t in enumerate(tags) if isinstance(t, Rows) and t.axis < len(terms[k])}
        if len(letters) != 1:
            raise _refuse(node, "gives its batched operands different batch indices")
        (b,) = letters
        if b not in out or any(b in terms[k] for k, t in enumerate(tags) if not isinstance(t, Rows)):
            raise _refuse(node, f"sums over the batch index '{b}' or shares it with an unbatched operand")
        return self.rows(out.index(b))

    def labels_feed(self, node: Node) -> str:
        """The feed holding a loss's labels, through ops that only rearrange them within samples:
        counting its entries that are not ignore_index counts the loss's."""
        name = node.inputs[1]
        while name not in self.batched:
            maker = self.producer.get(name)
            if maker is None or maker.op_type not in ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity",
                                                      "Cast", "Transpose"):
                raise _refuse(node, f"has labels '{name}' that are not a feed (or a reshape of one), so "
                                    "micro-batches cannot be weighted by their targets")
            name = maker.inputs[0]
        return name


def _propagate_reduced(node: Node, tags: list, reduced: list) -> object:
    op = node.op_type
    if any(isinstance(t, Rows) for t in tags):
        raise _refuse(node, "combines a batch reduction with per-sample values")
    if op == "Mul" and len(reduced) == 1:
        return reduced[0]  # times a batch-independent factor: still linear in the reduction
    if op == "Div" and tags[0] in reduced and len(reduced) == 1:
        return reduced[0]
    if op in ("Add", "Sub"):
        if NONE in tags or SHAPE in tags:
            raise _refuse(node, "adds a term that does not depend on the batch; split into micro-batches it "
                                "would be counted once per micro-batch")
        if len(set(reduced)) == 1 and reduced[0][0] != "count":
            return reduced[0]
        raise _refuse(node, "adds batch reductions of different kinds (a sum and a mean, or cross-entropies)")
    if op in _LINEAR_ON_REDUCED and tags[0] in reduced and len(reduced) == 1:
        return reduced[0]
    raise _refuse(node, "is not linear in the batch reduction below it")


def _axes_of(model: Model, node: Node) -> list[int] | None:
    """The ``axes`` of a node, from its attribute (older opsets) or its constant input (Reduce* and
    Squeeze/Unsqueeze: input 1, Slice: 3, Pad: 3); None when omitted or not a constant."""
    if "axes" in node.attrs:
        return [int(a) for a in node.attrs["axes"]]
    index = 1 if node.op_type in _REDUCE or node.op_type in ("Squeeze", "Unsqueeze") else \
        {"Slice": 3, "Pad": 3}.get(node.op_type)
    if index is not None and len(node.inputs) > index and node.inputs[index] in model.constants:
        return [int(a) for a in np.ravel(model.constants[node.inputs[index]])]
    return None


def _refuse(node: Node, why: str) -> GraphError:
    return GraphError(f"cannot split the batch into micro-batches or replicas exactly: {node} {why}")
