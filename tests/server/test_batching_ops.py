"""Planning micro-batches (server/planning/batching.py), without Ray, op by op: the row-independent
ops, per-sample and axis ops, recurrent layers, and the refusals that stay (each naming the node);
where the ops run, the weighted chunks equal the unsplit job (fixed-batch exports and merged
reshapes: test_batching.py)."""

from __future__ import annotations

import numpy as np
import pytest

import gradserve
from gradcheck import assert_split_exact
from graphs import RNG, _refusal_cases, f64, follow, graph, lm
from gradserve.server.planning.batching import Rows, _Follower, split_batch
from gradserve.server.planning.prepare import PreparedJob, prepare
from gradserve.worker.graph import GraphError, Node
from gradserve.worker.validate import infer_shapes, toposort


# -- new row-independent ops -------------------------------------------------------------------------
UNARY = [
    "HardSwish",
    "HardSigmoid",
    "Elu",
    "Selu",
    "ThresholdedRelu",
    "Softsign",
    "Mish",
    "Gelu",
    "Shrink",
    "Sin",
    "Cos",
    "Tan",
    "Atan",
    "Sinh",
    "Cosh",
    "Asinh",
    "Floor",
    "Ceil",
    "Round",
    "Sign",
]


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
    model = graph(
        [
            ("BitwiseAnd", ["i", "seven"], ["a"]),
            ("BitwiseXor", ["a", "i"], ["b"]),
            ("BitwiseNot", ["b"], ["c"]),
            ("BitwiseOr", ["c", "a"], ["d"]),
            ("Cast", ["d"], ["df"], {"to": 11}),
            ("IsNaN", ["x"], ["nan"]),
            ("IsInf", ["x"], ["inf"]),
            ("Or", ["nan", "inf"], ["bad"]),
            ("Where", ["bad", "zero", "x"], ["xw"]),
            ("Cast", ["xw"], ["x32"], {"to": 1}),  # Celu is float32-only
            ("Celu", ["x32"], ["c32"]),
            ("CastLike", ["c32", "x"], ["xc"]),
            ("Mul", ["xc", "df"], ["p"]),
            ("ReduceSum", ["p"], ["loss"], {"keepdims": 0}),
        ],
        [("x", ("batch", 4), np.float64), ("i", ("batch", 4), np.int64)],
        constants={"seven": np.array(7), "zero": np.array(0.0)},
        opset=18,
    )
    assert follow(model, feeds) == ("sum", None)


def test_per_sample_ops_split_exactly():
    m = gradserve.ModelBuilder()
    x = m.input("x", (None, 2, 5, 5), np.float64)
    h = m.op("ConvTranspose", x, m.param("k", f64(2, 4, 3, 3)), strides=[2, 2])
    h = m.op(
        "Resize",
        h,
        m.constant(np.zeros(0, np.float32)),
        m.constant(np.array([1.0, 1.0, 0.5, 0.5], np.float32)),
        mode="linear",
    )
    h = m.op("LRN", h, size=3)
    h = m.op("GroupNormalization", h, m.param("gs", f64(4)), m.param("gb", f64(4)), num_groups=2)
    model = m.loss(m.op("ReduceMean", h * h, keepdims=0))
    model.opset = 21  # GroupNormalization-21
    assert_split_exact(model, {"x": f64(6, 2, 5, 5)})


def test_resize_along_the_batch_is_refused():
    model = graph(
        [("Resize", ["x", "", "scales"], ["y"], {"mode": "nearest"}), ("ReduceSum", ["y"], ["loss"], {"keepdims": 0})],
        [("x", ("batch", 2, 3), np.float64)],
        constants={"scales": np.array([2.0, 1.0, 1.0], np.float32)},
        opset=18,
    )
    with pytest.raises(GraphError, match=r"node 'n0_Resize' \(Resize\) resizes along the batch axis"):
        follow(model, {"x": f64(6, 2, 3)})


def test_axis_ops_split_when_their_axis_is_not_the_batch():
    m = gradserve.ModelBuilder()
    x = m.input("x", (None, 5), np.float64)
    h = x @ m.param("w", f64(5, 5))
    c = m.op("CumSum", h, m.constant(np.array(1)))
    values, idx = m.op("TopK", h, m.constant(np.array([3])), axis=-1, n_outputs=2)
    g = m.op("GatherElements", c, idx, axis=1)
    e = m.op(
        "Einsum",
        m.op("Reshape", h, m.constant(np.array([-1, 5, 1]))),
        m.op("Reshape", c, m.constant(np.array([-1, 5, 1]))),
        equation="bqd,bkd->bqk",
    )
    model = m.loss(m.op("ReduceMean", g * values, keepdims=0) + m.op("ReduceMean", e, keepdims=0))
    assert_split_exact(model, {"x": f64(6, 5)})


@pytest.mark.parametrize(
    "op,why",
    [
        ("CumSum", "works along the batch axis"),
        ("TopK", "works along the batch axis"),
        ("GatherElements", "works along the batch axis"),
        ("Einsum", "sums over the batch index"),
    ],
)
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
    model = graph(
        [("GatherElements", ["x", "idx"], ["y"], {"axis": 1}), ("ReduceSum", ["y"], ["loss"], {"keepdims": 0})],
        [("x", ("batch", 5), np.float64)],
        constants={"idx": np.zeros((6, 2), np.int64)},
    )
    with pytest.raises(GraphError, match=r"GatherElements\) gathers with data and indices not both batched"):
        follow(model, {"x": f64(6, 5)})


def rnn_model(op, layout, H=3, I=2, T=4):
    gates = {"RNN": 1, "GRU": 3, "LSTM": 4}[op]
    params = {"W": f64(1, gates * H, I) * 0.5, "R": f64(1, gates * H, H) * 0.5, "B": f64(1, 2 * gates * H) * 0.1}
    if layout == 0:  # batch_first data transposed to (T, B, I), as torch exports nn.LSTM(batch_first=True)
        nodes = [
            ("Transpose", ["x"], ["xt"], {"perm": [1, 0, 2]}),
            (op, ["xt", "W", "R", "B"], ["Y", "Y_h"], {"hidden_size": H, "layout": 0}),
            ("Squeeze", ["Y", "one"], ["Ys"]),  # (T, B, H)
            ("Transpose", ["Ys"], ["Yb"], {"perm": [1, 0, 2]}),
            ("Gather", ["Y_h", "zero"], ["h"], {"axis": 0}),
        ]  # (B, H)
    else:
        nodes = [
            (op, ["x", "W", "R", "B"], ["Y", "Y_h"], {"hidden_size": H, "layout": 1}),
            ("Squeeze", ["Y", "two"], ["Yb"]),  # (B, T, H)
            ("Squeeze", ["Y_h", "one"], ["h"]),
        ]
    nodes += [
        ("ReduceMean", ["Yb", "ax1"], ["m"], {"keepdims": 0}),
        ("Mul", ["m", "h"], ["p"]),
        ("ReduceMean", ["p"], ["loss"], {"keepdims": 0}),
    ]
    consts = {"one": np.array([1]), "two": np.array([2]), "zero": np.array(0), "ax1": np.array([1])}
    return graph(nodes, [("x", ("batch", T, I), np.float64)], params=params, constants=consts, opset=18), {
        "x": f64(6, T, I)
    }


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


@pytest.mark.parametrize(
    "case,match",
    [
        ("product of means", r"node 'mul\d+' \(Mul\) is not linear"),
        ("batch-independent term", r"node 'add\d+' \(Add\) adds a term that does not depend on the batch"),
        ("batch mean below the loss", r"node 'sub\d+' \(Sub\) combines a batch reduction with per-sample values"),
        ("training-mode BatchNorm", r"\(BatchNormalization\) in training mode normalises with statistics of the whole"),
    ],
)
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
    model = m.loss(m.op("SoftmaxCrossEntropyLoss", x @ m.param("w", f64(3, 4)), shifted, ignore_index=0, name="ce"))
    feeds = {"x": f64(6, 3), "t": RNG.integers(0, 3, 6)}
    with pytest.raises(GraphError, match=r"node 'ce' \(SoftmaxCrossEntropyLoss\) has labels '.*' that are not a feed"):
        split_batch(model, prepare(model, feeds), feeds, 2)


def test_tags_follow_the_batch_axis_through_transposes():
    model, feeds = rnn_model("LSTM", 0)
    nodes = toposort(model.nodes)
    job = PreparedJob(tuple(nodes), infer_shapes(model, nodes, feeds), tuple(model.params), (), model.loss)
    follower = _Follower(model, job, {"x"}, 6)
    follower.loss_reduction()
    assert [follower.tags[v] for v in ("xt", "Y", "Y_h", "Ys", "Yb", "h")] == [
        Rows(1),
        Rows(2),
        Rows(1),
        Rows(1),
        Rows(0),
        Rows(0),
    ]


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
    shifted = m.op(
        "BitShift",
        m.op("Cast", bits, **as_uint8),
        m.op("Cast", m.constant(np.array([1])), **as_uint8),
        direction="LEFT",
    )
    scale = m.op("Cast", shifted, to=11)  # to double
    model = m.loss(m.op("ReduceMean", m.tanh(x @ m.param("w", f64(4, 4))) * scale, keepdims=0))
    feeds = {"x": f64(B, 4), "bits": RNG.integers(0, 8, (B, 4))}
    split = assert_split_exact(model, feeds)
    assert [c.feeds["bits"].shape[0] for c in split.chunks] == [2, 2, 2]
