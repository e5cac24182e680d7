"""Planning micro-batches (server/planning/batching.py), without Ray: which graphs split exactly, which are
refused (naming the node), the chunk weights, and -- where the ops run -- that the weighted sum of
the chunks' inline results equals the unsplit job's."""

from __future__ import annotations

import numpy as np
import pytest

import gradserve
from gradcheck import assert_split_exact
from graphs import _refusal_cases
from gradserve.server.planning.batching import Rows, _Follower, split_batch
from gradserve.server.planning.prepare import PreparedJob, prepare
from gradserve.worker.graph import GraphError, InputSpec, Model, Node
from gradserve.worker.validate import infer_shapes, toposort

RNG = np.random.default_rng(0)


def follow(model, feeds, batched=None, n=None):
    """The loss reduction found for a hand-built graph, shape-checked by ONNX only (the ops need not
    run yet): (kind, detail), or GraphError."""
    nodes = toposort(model.nodes)
    job = PreparedJob(tuple(nodes), infer_shapes(model, nodes, feeds), tuple(model.params), (), model.loss)
    batched = batched or {s.name for s in model.inputs if not isinstance(s.shape[0], int)}
    n = n or feeds[next(iter(batched))].shape[0]
    return _Follower(model, job, set(batched), n).loss_reduction()


def graph(nodes, inputs, params=None, constants=None, loss="loss", opset=17):
    specs = [InputSpec(name, np.dtype(dtype), shape) for name, shape, dtype in inputs]
    return Model(nodes=[Node(f"n{k}_{n[0]}", n[0], n[1], n[2], n[3] if len(n) > 3 else {}) for k, n in enumerate(nodes)],
                 inputs=specs, params=params or {}, loss=loss, constants=constants or {}, opset=opset)


def f64(*shape):
    return RNG.standard_normal(shape)


# -- fixed-batch exports ------------------------------------------------------------------------------
def test_fixed_batch_export_splits_with_a_symbolic_batch():
    m = gradserve.ModelBuilder()
    x = m.input("x", (8, 6), np.float64)
    y = m.input("y", (8, 2), np.float64)
    h = m.tanh(x @ m.param("w0", f64(6, 4)) + m.param("b0", f64(4)))
    out = h @ m.param("w1", f64(4, 2))
    model = m.loss(((out - y) * (out - y)).mean())
    feeds = {"x": f64(8, 6), "y": f64(8, 2)}
    split = assert_split_exact(model, feeds)
    assert [s.shape[0] for s in split.model.inputs] == ["batch", "batch"]
    assert [s.shape[0] for s in model.inputs] == [8, 8], "the caller's model is not changed"
    assert [c.feeds["x"].shape[0] for c in split.chunks] == [3, 2, 3]
    assert [c.weight for c in split.chunks] == [3 / 8, 2 / 8, 3 / 8]


def test_fixed_batch_only_batches_inputs_of_the_batch_size():
    m = gradserve.ModelBuilder()
    x = m.input("x", (8, 3), np.float64)
    table = m.input("table", (3, 3), np.float64)  # a per-job input that is not batched
    model = m.loss((m.tanh(x @ table @ m.param("w", f64(3, 2)))).sum())
    feeds = {"x": f64(8, 3), "table": f64(3, 3)}
    split = assert_split_exact(model, feeds)
    assert all(c.feeds["table"].shape == (3, 3) for c in split.chunks)
    assert split.model.input_spec("table").shape == (3, 3)


def test_fixed_batch_reshape_constant_holding_the_batch_size_is_rewritten():
    """x.view(6, -1) in a fixed-batch export: the 6 holds the batch size; the micro-batches' model
    gets -1 there (the other entry pinned). Merging two samples into one row stays refused."""
    n = 6
    m = gradserve.ModelBuilder()
    x = m.input("x", (n, 2, 3), np.float64)
    flat = m.op("Reshape", x, m.constant(np.array([n, -1])), name="view")
    model = m.loss((flat @ m.param("w", f64(6, 1))).mean())
    feeds = {"x": f64(n, 2, 3)}
    split = assert_split_exact(model, feeds)
    (node,) = [v for v in split.model.nodes if v.name == "view"]
    assert split.model.constants[node.inputs[1]].tolist() == [-1, 6]
    assert model.constants[model.nodes[0].inputs[1]].tolist() == [n, -1], "the caller's model is not changed"
    m = gradserve.ModelBuilder()
    x = m.input("x", (n, 2, 3), np.float64)
    pairs = m.op("Reshape", x, m.constant(np.array([n // 2, 12])), name="pairs")
    model = m.loss((pairs @ m.param("w", f64(12, 1))).mean())
    with pytest.raises(GraphError, match=r"node 'pairs' \(Reshape\) moves the batch to another place in the layout, "
                                         r"or splits it"):
        split_batch(model, prepare(model, feeds), feeds, 2)


@pytest.mark.parametrize("maker", ["ConstantOfShape", "Expand", "Tile"])
def test_fixed_batch_shape_constants_holding_the_batch_size_are_refused(maker):
    n = 6
    m = gradserve.ModelBuilder()
    x = m.input("x", (n, 4), np.float64)
    if maker == "ConstantOfShape":
        c = m.op("ConstantOfShape", m.constant(np.array([n, 4])), value=np.array([1.0]), name="made")
    elif maker == "Expand":
        c = m.op("Expand", m.constant(np.ones((1, 4))), m.constant(np.array([n, 4])), name="made")
    else:
        c = m.op("Tile", m.constant(np.ones((1, 4))), m.constant(np.array([n, 1])), name="made")
    model = m.loss(((x + c) @ m.param("w", f64(4, 1))).sum())
    feeds = {"x": f64(n, 4)}
    with pytest.raises(GraphError, match=rf"node 'made' \({maker}\) has a constant shape that holds the batch size"):
        split_batch(model, prepare(model, feeds), feeds, 2)


def test_fixed_batch_expand_and_slice_constants():
    n = 6
    m = gradserve.ModelBuilder()
    x = m.input("x", (n, 1), np.float64)
    # Expand to a constant that holds the batch size where the input has it (the legacy exporter's
    # broadcast in mse_loss): a no-op there, rewritten to 1 for the micro-batches
    e = m.op("Expand", x, m.constant(np.array([n, 4])), name="expand")
    model = m.loss((e @ m.param("w", f64(4, 1))).sum())
    split = assert_split_exact(model, {"x": f64(n, 1)})
    (node,) = [v for v in split.model.nodes if v.name == "expand"]
    assert split.model.constants[node.inputs[1]].tolist() == [1, 4]
    assert model.constants[model.nodes[0].inputs[1]].tolist() == [n, 4], "the caller's model is not changed"
    m = gradserve.ModelBuilder()
    x = m.input("x", (n, 4), np.float64)
    s = m.op("Slice", x, m.constant(np.array([0, 1])), m.constant(np.array([n, 4])), m.constant(np.array([0, 1])),
             name="slice")
    model = m.loss((s @ m.param("w", f64(3, 1))).sum())
    with pytest.raises(GraphError, match=r"node 'slice' \(Slice\) has a constant end \(6\) that holds the batch size"):
        follow(model, {"x": f64(n, 4)}, {"x"})
    # slicing axis 0 to its end (INT64_MAX, as exporters write x[:, 1:]) and axis 1 is exact
    m = gradserve.ModelBuilder()
    x = m.input("x", (n, 4), np.float64)
    s = m.op("Slice", x, m.constant(np.array([0, 1])), m.constant(np.array([2**63 - 1, 4])),
             m.constant(np.array([0, 1])))
    assert_split_exact(m.loss((s @ m.param("w", f64(3, 1))).sum()), {"x": f64(n, 4)})


# -- reshapes that merge the batch with the axes after it ---------------------------------------------
def lm(B=6, T=4, D=3, V=5, shape_from="constant", ignore=None, dynamic=True):
    """logits (B, T, V) -> (B*T, V) and targets (B, T) -> (B*T,) into a mean cross-entropy."""
    m = gradserve.ModelBuilder()
    x = m.input("x", (None if dynamic else B, T, D), np.float64)
    t = m.input("t", (None if dynamic else B, T), np.int64)
    logits = m.op("Add", x @ m.param("w", f64(D, V)), m.param("b", f64(V)))
    if shape_from == "constant":  # logits.view(-1, V)
        flat = m.op("Reshape", logits, m.constant(np.array([-1, V])), name="merge")
        labels = m.op("Reshape", t, m.constant(np.array([-1])), name="merge_t")
    else:  # logits.reshape(B*T, V), B from Shape, as the legacy exporter writes it
        b = m.op("Gather", m.op("Shape", x), m.constant(np.array(0)), axis=0)
        bt = m.op("Unsqueeze", m.op("Mul", b, m.constant(np.array(T))), m.constant(np.array([0])))
        flat = m.op("Reshape", logits, m.op("Concat", bt, m.constant(np.array([V])), axis=0), name="merge")
        labels = m.op("Reshape", t, bt, name="merge_t")
    attrs = {} if ignore is None else {"ignore_index": ignore}
    model = m.loss(m.op("SoftmaxCrossEntropyLoss", flat, labels, reduction="mean", **attrs))
    targets = RNG.integers(0, V, (B, T))
    if ignore is not None:
        targets[0] = ignore
        targets[3, 1:] = ignore
    return model, {"x": f64(B, T, D), "t": targets}


@pytest.mark.parametrize("shape_from", ["constant", "shape"])
@pytest.mark.parametrize("ignore", [None, -100])
def test_lm_loss_over_merged_rows_splits(shape_from, ignore):
    model, feeds = lm(shape_from=shape_from, ignore=ignore)
    split = assert_split_exact(model, feeds, parts=(2, 3, 5))
    if ignore is None:
        assert [c.weight for c in split.chunks] == [c.feeds["x"].shape[0] / 6 for c in split.chunks]
    else:  # the weights count the targets that are not ignored, through the reshape of the labels
        counted = (feeds["t"] != ignore).sum()
        assert [c.weight for c in split.chunks] == [(c.feeds["t"] != ignore).sum() / counted for c in split.chunks]


def test_fixed_batch_lm_with_minus_one_splits():
    model, feeds = lm(dynamic=False)
    assert_split_exact(model, feeds)


def test_merge_then_split_back():
    B, T, D = 6, 4, 3
    m = gradserve.ModelBuilder()
    x = m.input("x", (None, T, D), np.float64)
    rows = m.op("Reshape", x, m.constant(np.array([-1, D])))  # (B*T, D)
    h = m.tanh(rows @ m.param("w", f64(D, D)))
    back = m.op("Reshape", h, m.constant(np.array([-1, T, D])))  # (B, T, D)
    pooled = m.op("Softmax", back, axis=1) * back
    model = m.loss(m.op("ReduceMean", pooled, keepdims=0))
    assert_split_exact(model, {"x": f64(B, T, D)})


def test_merges_behind_other_axes_split_exactly():
    """nn.MultiheadAttention's layout: (B, T, D) -> (T, B, D) -> (T*B, D) rows (T blocks of the
    batch), a row-wise product, and back (T, B, H) -> (B, T, H); and the heads merge (T, B, D) ->
    (T, B*H, D/H)."""
    B, T, D, H = 6, 4, 4, 2
    m = gradserve.ModelBuilder()
    x = m.input("x", (None, T, D), np.float64)
    seq_first = m.op("Transpose", x, perm=[1, 0, 2])
    rows = m.op("Reshape", seq_first, m.constant(np.array([-1, D])))
    back = m.op("Reshape", rows @ m.param("w", f64(D, 3)), m.constant(np.array([T, -1, 3])))
    heads = m.op("Reshape", seq_first, m.constant(np.array([T, -1, D // H])))
    y = m.op("Transpose", back, perm=[1, 0, 2])
    model = m.loss(m.op("ReduceMean", y * y, keepdims=0) + m.op("ReduceMean", m.tanh(heads), keepdims=0))
    assert_split_exact(model, {"x": f64(B, T, D)})


@pytest.mark.parametrize("case", ["slice of merged rows", "split the batch", "batch to axis 1"])
def test_reshapes_that_move_the_batch_are_refused(case):
    B, T, D = 6, 4, 3
    m = gradserve.ModelBuilder()
    x = m.input("x", (None, T, D), np.float64)
    if case == "slice of merged rows":  # (T*B, D) rows are T blocks of the batch: the first B are one block
        rows = m.op("Reshape", m.op("Transpose", x, perm=[1, 0, 2]), m.constant(np.array([-1, D])))
        y = m.op("Slice", rows, m.constant(np.array([0])), m.constant(np.array([B])), m.constant(np.array([0])),
                 name="bad")
    elif case == "split the batch":
        y = m.op("Reshape", x, m.constant(np.array([2, -1, D])), name="bad")
    else:  # (B, T, D) -> (T, B*D) from Shape: axis 0 no longer follows the batch
        b = m.op("Gather", m.op("Shape", x), m.constant(np.array([0])), axis=0)
        shape = m.op("Concat", m.constant(np.array([T])), m.op("Mul", b, m.constant(np.array([D]))), axis=0)
        y = m.op("Reshape", x, shape, name="bad")
    model = m.loss(m.op("ReduceSum", y * y, keepdims=0))
    feeds = {"x": f64(B, T, D)}
    with pytest.raises(GraphError, match=r"node 'bad' \((Reshape|Transpose|Slice)\)"):
        split_batch(model, prepare(model, feeds), feeds, 2)


# -- opset-18+ forms ---------------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["ReduceMean", "ReduceSum", "ReduceMax", "ReduceL2", "ReduceLogSumExp"])
def test_opset18_reduce_axes_input(op):
    feeds = {"x": f64(6, 4)}
    inputs = [("x", ("batch", 4), np.float64)]
    within = graph([(op, ["x", "ax1"], ["r"], {"keepdims": 0}), ("ReduceSum", ["r"], ["loss"], {"keepdims": 0})],
                   inputs, constants={"ax1": np.array([1])}, opset=18)
    assert follow(within, feeds) == ("sum", None)
    over = graph([(op, ["x", "ax0"], ["r"], {"keepdims": 0}), ("ReduceSum", ["r"], ["loss"], {"keepdims": 0})],
                 inputs, constants={"ax0": np.array([0])}, opset=18)
    if op in ("ReduceMean", "ReduceSum"):
        assert follow(over, feeds) == ({"ReduceMean": "mean", "ReduceSum": "sum"}[op], None)
    else:
        with pytest.raises(GraphError, match=rf"node 'n0_{op}' \({op}\) reduces over the batch"):
            follow(over, feeds)
    # an omitted axes input: every axis, or nothing with noop_with_empty_axes=1
    every = graph([(op, ["x"], ["loss"], {"keepdims": 0})], inputs, opset=18)
    if op in ("ReduceMean", "ReduceSum"):
        assert follow(every, feeds)[0] == {"ReduceMean": "mean", "ReduceSum": "sum"}[op]
    noop = graph([(op, ["x"], ["r"], {"noop_with_empty_axes": 1}), ("ReduceMean", ["r"], ["loss"], {"keepdims": 0})],
                 inputs, opset=18)
    assert follow(noop, feeds) == ("mean", None)


def test_opset18_split_squeeze_unsqueeze_slice_inputs():
    feeds = {"x": f64(6, 4)}
    model = graph([
        ("Split", ["x"], ["a", "b"], {"axis": 1, "num_outputs": 2}),
        ("Unsqueeze", ["a", "ax2"], ["u"]),
        ("Squeeze", ["u", "ax2"], ["s"]),
        ("Slice", ["s", "zero", "one", "ax1"], ["c"]),
        ("Mul", ["c", "b"], ["p"]),
        ("ReduceMean", ["p"], ["loss"], {"keepdims": 0}),
    ], [("x", ("batch", 4), np.float64)], constants={"ax2": np.array([2]), "ax1": np.array([1]),
                                                      "zero": np.array([0]), "one": np.array([1])}, opset=18)
    assert follow(model, feeds) == ("mean", None)
    model.nodes[0].attrs["axis"] = 0
    with pytest.raises(GraphError, match=r"node 'n0_Split' \(Split\) works along the batch axis"):
        follow(model, feeds)


# -- new row-independent ops -------------------------------------------------------------------------
UNARY = ["HardSwish", "HardSigmoid", "Elu", "Selu", "ThresholdedRelu", "Softsign", "Mish", "Gelu", "Shrink",
         "Sin", "Cos", "Tan", "Atan", "Sinh", "Cosh", "Asinh", "Floor", "Ceil", "Round", "Sign"]


def test_new_elementwise_ops_split_exactly():
    m = gradserve.ModelBuilder()
    x = m.input("x", (None, 4), np.float64)
    h = x @ m.param("w", f64(4, 4))
    total = m.op("PRelu", h, m.param("slope", f64(4)))
    for op in UNARY:
        total = total + m.op(op, h * 0.3)
    total = total + m.op("Mod", h, m.constant(1.5), fmod=1) + m.op("CastLike", h, m.param("like", f64(1)))
    model = m.loss(m.op("ReduceMean", total * total, keepdims=0))
    model.opset = 20  # Gelu
    assert_split_exact(model, {"x": f64(6, 4)})


def test_bitwise_and_predicates_are_row_wise():
    feeds = {"x": f64(6, 4), "i": RNG.integers(0, 7, (6, 4))}
    model = graph([
        ("BitwiseAnd", ["i", "seven"], ["a"]), ("BitwiseXor", ["a", "i"], ["b"]), ("BitwiseNot", ["b"], ["c"]),
        ("BitwiseOr", ["c", "a"], ["d"]), ("Cast", ["d"], ["df"], {"to": 11}),
        ("IsNaN", ["x"], ["nan"]), ("IsInf", ["x"], ["inf"]), ("Or", ["nan", "inf"], ["bad"]),
        ("Where", ["bad", "zero", "x"], ["xw"]), ("Cast", ["xw"], ["x32"], {"to": 1}),  # Celu is float32-only
        ("Celu", ["x32"], ["c32"]), ("CastLike", ["c32", "x"], ["xc"]), ("Mul", ["xc", "df"], ["p"]),
        ("ReduceSum", ["p"], ["loss"], {"keepdims": 0}),
    ], [("x", ("batch", 4), np.float64), ("i", ("batch", 4), np.int64)],
        constants={"seven": np.array(7), "zero": np.array(0.0)}, opset=18)
    assert follow(model, feeds) == ("sum", None)


def test_per_sample_ops_split_exactly():
    m = gradserve.ModelBuilder()
    x = m.input("x", (None, 2, 5, 5), np.float64)
    h = m.op("ConvTranspose", x, m.param("k", f64(2, 4, 3, 3)), strides=[2, 2])
    h = m.op("Resize", h, m.constant(np.zeros(0, np.float32)), m.constant(np.array([1.0, 1.0, 0.5, 0.5], np.float32)),
             mode="linear")
    h = m.op("LRN", h, size=3)
    h = m.op("GroupNormalization", h, m.param("gs", f64(4)), m.param("gb", f64(4)), num_groups=2)
    model = m.loss(m.op("ReduceMean", h * h, keepdims=0))
    model.opset = 21  # GroupNormalization-21
    assert_split_exact(model, {"x": f64(6, 2, 5, 5)})


def test_resize_along_the_batch_is_refused():
    model = graph([("Resize", ["x", "", "scales"], ["y"], {"mode": "nearest"}),
                   ("ReduceSum", ["y"], ["loss"], {"keepdims": 0})],
                  [("x", ("batch", 2, 3), np.float64)], constants={"scales": np.array([2.0, 1.0, 1.0], np.float32)}, opset=18)
    with pytest.raises(GraphError, match=r"node 'n0_Resize' \(Resize\) resizes along the batch axis"):
        follow(model, {"x": f64(6, 2, 3)})


def test_axis_ops_split_when_their_axis_is_not_the_batch():
    m = gradserve.ModelBuilder()
    x = m.input("x", (None, 5), np.float64)
    h = x @ m.param("w", f64(5, 5))
    c = m.op("CumSum", h, m.constant(np.array(1)))
    values, idx = m.op("TopK", h, m.constant(np.array([3])), axis=-1, n_outputs=2)
    g = m.op("GatherElements", c, idx, axis=1)
    e = m.op("Einsum", m.op("Reshape", h, m.constant(np.array([-1, 5, 1]))),
             m.op("Reshape", c, m.constant(np.array([-1, 5, 1]))), equation="bqd,bkd->bqk")
    model = m.loss(m.op("ReduceMean", g * values, keepdims=0) + m.op("ReduceMean", e, keepdims=0))
    assert_split_exact(model, {"x": f64(6, 5)})


@pytest.mark.parametrize("op,why", [
    ("CumSum", "works along the batch axis"), ("TopK", "works along the batch axis"),
    ("GatherElements", "works along the batch axis"), ("Einsum", "sums over the batch index"),
])
def test_axis_ops_along_the_batch_are_refused(op, why):
    inputs = [("x", ("batch", 5), np.float64)]
    consts = {"zero": np.array(0), "k": np.array([2]), "idx": np.zeros((6, 5), np.int64)}
    nodes = {
        "CumSum": [("CumSum", ["x", "zero"], ["y"])],
        "TopK": [("TopK", ["x", "k"], ["y", "i"], {"axis": 0})],
        "GatherElements": [("Identity", ["x"], ["x2"]), ("GatherElements", ["x", "x2i"], ["y"], {"axis": 0})],
        "Einsum": [("Einsum", ["x", "x"], ["y"], {"equation": "bq,bk->qk"})],
    }[op]
    if op == "GatherElements":
        nodes = [("Cast", ["x"], ["x2i"], {"to": 7}), nodes[1]]
    model = graph([*nodes, ("ReduceSum", ["y"], ["loss"], {"keepdims": 0})], inputs, constants=consts)
    with pytest.raises(GraphError, match=rf"\({op}\) {why}"):
        follow(model, {"x": f64(6, 5)})


def test_gather_elements_with_unbatched_indices_is_refused():
    model = graph([("GatherElements", ["x", "idx"], ["y"], {"axis": 1}), ("ReduceSum", ["y"], ["loss"], {"keepdims": 0})],
                  [("x", ("batch", 5), np.float64)], constants={"idx": np.zeros((6, 2), np.int64)})
    with pytest.raises(GraphError, match=r"GatherElements\) gathers with data and indices not both batched"):
        follow(model, {"x": f64(6, 5)})


def rnn_model(op, layout, H=3, I=2, T=4):
    gates = {"RNN": 1, "GRU": 3, "LSTM": 4}[op]
    params = {"W": f64(1, gates * H, I) * 0.5, "R": f64(1, gates * H, H) * 0.5, "B": f64(1, 2 * gates * H) * 0.1}
    if layout == 0:  # batch_first data transposed to (T, B, I), as torch exports nn.LSTM(batch_first=True)
        nodes = [("Transpose", ["x"], ["xt"], {"perm": [1, 0, 2]}),
                 (op, ["xt", "W", "R", "B"], ["Y", "Y_h"], {"hidden_size": H, "layout": 0}),
                 ("Squeeze", ["Y", "one"], ["Ys"]),  # (T, B, H)
                 ("Transpose", ["Ys"], ["Yb"], {"perm": [1, 0, 2]}),
                 ("Gather", ["Y_h", "zero"], ["h"], {"axis": 0})]  # (B, H)
    else:
        nodes = [(op, ["x", "W", "R", "B"], ["Y", "Y_h"], {"hidden_size": H, "layout": 1}),
                 ("Squeeze", ["Y", "two"], ["Yb"]),  # (B, T, H)
                 ("Squeeze", ["Y_h", "one"], ["h"])]
    nodes += [("ReduceMean", ["Yb", "ax1"], ["m"], {"keepdims": 0}), ("Mul", ["m", "h"], ["p"]),
              ("ReduceMean", ["p"], ["loss"], {"keepdims": 0})]
    consts = {"one": np.array([1]), "two": np.array([2]), "zero": np.array(0), "ax1": np.array([1])}
    return graph(nodes, [("x", ("batch", T, I), np.float64)], params=params, constants=consts, opset=18), \
        {"x": f64(6, T, I)}


@pytest.mark.parametrize("layout", [0, 1])
@pytest.mark.parametrize("op", ["RNN", "GRU", "LSTM"])
def test_recurrent_layers_split_with_either_layout(op, layout):
    model, feeds = rnn_model(op, layout)
    assert follow(model, feeds) == ("mean", None)
    assert_split_exact(model, feeds)


def test_recurrent_layer_with_batch_on_the_wrong_axis_is_refused():
    model, feeds = rnn_model("LSTM", 1)
    model.nodes[0].attrs["layout"] = 0  # reads (B, T, I) as (T, B, I): the recurrence runs across samples
    model.nodes[1:] = [Node("mean", "ReduceMean", ["Y"], ["loss"], {"keepdims": 0})]
    with pytest.raises(GraphError, match=r"\(LSTM\) does not have the batch on axis 1 of 'x' \(layout=0\)"):
        follow(model, {"x": f64(4, 4, 2)}, {"x"}, n=4)


def test_recurrent_initial_state_of_the_batch_size_is_refused():
    model, feeds = rnn_model("GRU", 1)
    model.nodes[0].inputs += ["", "h0"]
    model.constants["h0"] = np.zeros((6, 1, 3))
    with pytest.raises(GraphError, match=r"\(GRU\) reads 'h0', which is not computed from the batch"):
        follow(model, feeds)


# -- refusals that stay ------------------------------------------------------------------------------
def test_batch_size_as_data_is_refused():
    m = gradserve.ModelBuilder()
    x = m.input("x", (None, 3), np.float64)
    n = m.op("Cast", m.op("Gather", m.op("Shape", x), m.constant(np.array(0)), axis=0), to=11, name="count")
    model = m.loss(m.op("Div", (x @ m.param("w", f64(3, 1))).sum(), n, name="div"))
    feeds = {"x": f64(6, 3)}
    with pytest.raises(GraphError, match=r"node 'div' \(Div\) uses the batch size as data"):
        split_batch(model, prepare(model, feeds), feeds, 2)


@pytest.mark.parametrize("case,match", [
    ("product of means", r"node 'mul\d+' \(Mul\) is not linear"),
    ("batch-independent term", r"node 'add\d+' \(Add\) adds a term that does not depend on the batch"),
    ("batch mean below the loss", r"node 'sub\d+' \(Sub\) combines a batch reduction with per-sample values"),
    ("training-mode BatchNorm", r"\(BatchNormalization\) in training mode normalises with statistics of the whole"),
])
def test_existing_refusals_name_the_node(case, match):
    model, _ = _refusal_cases()[case]
    feeds = {"x": np.arange(12.0).reshape(4, 3)}
    with pytest.raises(GraphError, match=match):
        split_batch(model, prepare(model, feeds), feeds, 2)


def test_one_part_is_the_job_itself():
    model, feeds = lm()
    job = prepare(model, feeds)
    split = split_batch(model, job, feeds, 1)
    assert split.model is model and split.job is job and split.chunks[0].weight == 1.0


def test_labels_computed_from_a_feed_cannot_weight_by_count():
    m = gradserve.ModelBuilder()
    x = m.input("x", (None, 3), np.float64)
    t = m.input("t", (None,), np.int64)
    shifted = m.op("Add", t, m.constant(np.array(1)), name="shift")
    model = m.loss(m.op("SoftmaxCrossEntropyLoss", x @ m.param("w", f64(3, 4)), shifted, ignore_index=0,
                        name="ce"))
    feeds = {"x": f64(6, 3), "t": RNG.integers(0, 3, 6)}
    with pytest.raises(GraphError, match=r"node 'ce' \(SoftmaxCrossEntropyLoss\) has labels '.*' that are not a feed"):
        split_batch(model, prepare(model, feeds), feeds, 2)


def test_tags_follow_the_batch_axis_through_transposes():
    model, feeds = rnn_model("LSTM", 0)
    nodes = toposort(model.nodes)
    job = PreparedJob(tuple(nodes), infer_shapes(model, nodes, feeds), tuple(model.params), (), model.loss)
    follower = _Follower(model, job, {"x"}, 6)
    follower.loss_reduction()
    assert [follower.tags[v] for v in ("xt", "Y", "Y_h", "Ys", "Yb", "h")] == \
        [Rows(1), Rows(2), Rows(1), Rows(1), Rows(0), Rows(0)]


def test_grid_sample_and_col2im_split_per_sample():
    """A spatial transformer's sampling (image and grid both per sample) and nn.Fold's Col2Im."""
    B = 6
    m = gradserve.ModelBuilder()
    x = m.input("x", (None, 2, 4, 4), np.float64)
    grid = m.tanh(m.op("Transpose", m.op("Conv", x, m.param("wg", f64(2, 2, 1, 1))), perm=[0, 2, 3, 1]))
    sampled = m.op("GridSample", x, grid, align_corners=0)
    cols = m.op("Reshape", sampled, m.constant(np.array([0, 8, 4])))  # (B, C*2*2, L=4): 2x2 blocks of a 4x4 image
    folded = m.op("Col2Im", cols, m.constant(np.array([4, 4])), m.constant(np.array([2, 2])), strides=[2, 2])
    model = m.loss(m.op("ReduceMean", folded * folded, keepdims=0))
    model.opset = 20
    assert_split_exact(model, {"x": f64(B, 2, 4, 4)})


def test_bit_shift_splits_exactly():
    """BitShift had a row in the op table but no batch rule, so micro-batching refused any model
    using it; its rule now comes from the op's row (elementwise, like every op of its module)."""
    B = 6
    m = gradserve.ModelBuilder()
    x = m.input("x", (None, 4), np.float64)
    bits = m.input("bits", (None, 4), np.int64)
    as_uint8 = {"to": 2}  # BitShift takes unsigned ints only, which do not travel on the wire: cast in the graph
    shifted = m.op("BitShift", m.op("Cast", bits, **as_uint8), m.op("Cast", m.constant(np.array([1])), **as_uint8),
                   direction="LEFT")
    scale = m.op("Cast", shifted, to=11)  # to double
    model = m.loss(m.op("ReduceMean", m.tanh(x @ m.param("w", f64(4, 4))) * scale, keepdims=0))
    feeds = {"x": f64(B, 4), "bits": RNG.integers(0, 8, (B, 4))}
    split = assert_split_exact(model, feeds)
    assert [c.feeds["bits"].shape[0] for c in split.chunks] == [2, 2, 2]
