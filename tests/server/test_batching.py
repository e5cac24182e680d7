"""Planning micro-batches (server/planning/batching.py), without Ray: which graphs split exactly, which are
refused (naming the node), the chunk weights, and -- where the ops run -- that the weighted sum of
the chunks' inline results equals the unsplit job's."""

from __future__ import annotations

import numpy as np
import pytest

import gradserve
from gradcheck import assert_split_exact
from graphs import f64, follow, graph, lm
from gradserve.server.planning.batching import split_batch
from gradserve.server.planning.prepare import prepare
from gradserve.worker.graph import GraphError


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
    with pytest.raises(
        GraphError,
        match=r"node 'pairs' \(Reshape\) moves the batch to another place in the layout, "
        r"or splits it",
    ):
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
    s = m.op(
        "Slice",
        x,
        m.constant(np.array([0, 1])),
        m.constant(np.array([n, 4])),
        m.constant(np.array([0, 1])),
        name="slice",
    )
    model = m.loss((s @ m.param("w", f64(3, 1))).sum())
    with pytest.raises(GraphError, match=r"node 'slice' \(Slice\) has a constant end \(6\) that holds the batch size"):
        follow(model, {"x": f64(n, 4)}, {"x"})
    # slicing axis 0 to its end (INT64_MAX, as exporters write x[:, 1:]) and axis 1 is exact
    m = gradserve.ModelBuilder()
    x = m.input("x", (n, 4), np.float64)
    s = m.op(
        "Slice", x, m.constant(np.array([0, 1])), m.constant(np.array([2**63 - 1, 4])), m.constant(np.array([0, 1]))
    )
    assert_split_exact(m.loss((s @ m.param("w", f64(3, 1))).sum()), {"x": f64(n, 4)})


# -- reshapes that merge the batch with the axes after it ---------------------------------------------
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
        y = m.op(
            "Slice", rows, m.constant(np.array([0])), m.constant(np.array([B])), m.constant(np.array([0])), name="bad"
        )
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
    within = graph(
        [(op, ["x", "ax1"], ["r"], {"keepdims": 0}), ("ReduceSum", ["r"], ["loss"], {"keepdims": 0})],
        inputs,
        constants={"ax1": np.array([1])},
        opset=18,
    )
    assert follow(within, feeds) == ("sum", None)
    over = graph(
        [(op, ["x", "ax0"], ["r"], {"keepdims": 0}), ("ReduceSum", ["r"], ["loss"], {"keepdims": 0})],
        inputs,
        constants={"ax0": np.array([0])},
        opset=18,
    )
    if op in ("ReduceMean", "ReduceSum"):
        assert follow(over, feeds) == ({"ReduceMean": "mean", "ReduceSum": "sum"}[op], None)
    else:
        with pytest.raises(GraphError, match=rf"node 'n0_{op}' \({op}\) reduces over the batch"):
            follow(over, feeds)
    # an omitted axes input: every axis, or nothing with noop_with_empty_axes=1
    every = graph([(op, ["x"], ["loss"], {"keepdims": 0})], inputs, opset=18)
    if op in ("ReduceMean", "ReduceSum"):
        assert follow(every, feeds)[0] == {"ReduceMean": "mean", "ReduceSum": "sum"}[op]
    noop = graph(
        [(op, ["x"], ["r"], {"noop_with_empty_axes": 1}), ("ReduceMean", ["r"], ["loss"], {"keepdims": 0})],
        inputs,
        opset=18,
    )
    assert follow(noop, feeds) == ("mean", None)


def test_opset18_split_squeeze_unsqueeze_slice_inputs():
    feeds = {"x": f64(6, 4)}
    model = graph(
        [
            ("Split", ["x"], ["a", "b"], {"axis": 1, "num_outputs": 2}),
            ("Unsqueeze", ["a", "ax2"], ["u"]),
            ("Squeeze", ["u", "ax2"], ["s"]),
            ("Slice", ["s", "zero", "one", "ax1"], ["c"]),
            ("Mul", ["c", "b"], ["p"]),
            ("ReduceMean", ["p"], ["loss"], {"keepdims": 0}),
        ],
        [("x", ("batch", 4), np.float64)],
        constants={"ax2": np.array([2]), "ax1": np.array([1]), "zero": np.array([0]), "one": np.array([1])},
        opset=18,
    )
    assert follow(model, feeds) == ("mean", None)
    model.nodes[0].attrs["axis"] = 0
    with pytest.raises(GraphError, match=r"node 'n0_Split' \(Split\) works along the batch axis"):
        follow(model, feeds)
