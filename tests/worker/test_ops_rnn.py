"""RNN, GRU and LSTM ops: forwards against onnx's reference implementation, torch and a naive
per-sample numpy oracle; VJPs by finite differences for every op x direction x layout and each
optional input, output and attribute."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradcheck import check_vjp, onnx_reference, run_op
from gradserve.worker.ops import OpError

T_, B_, I_, H_ = 4, 3, 3, 2
GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}
N_OUT = {"RNN": 2, "GRU": 2, "LSTM": 3}
DIRECTIONS = ["forward", "reverse", "bidirectional"]
LENS = np.array([2, 4, 1], np.int32)  # unequal, one full-length sample


def make_inputs(
    op,
    direction="forward",
    layout=0,
    bias=True,
    lens=None,
    init=True,
    peep=True,
    seed=0,
    dtype=np.float64,
    T=T_,
    B=B_,
    I=I_,
    H=H_,
):
    """[X, W, R, B, sequence_lens, initial_h, (initial_c, P)] with None for omitted inputs."""
    rng = np.random.default_rng(seed)
    D = 2 if direction == "bidirectional" else 1
    G = GATES[op]
    r = lambda *s: (rng.standard_normal(s) * 0.7).astype(dtype)  # noqa: E731
    X = r(T, B, I) if layout == 0 else r(B, T, I)
    state = (lambda: r(D, B, H)) if layout == 0 else (lambda: r(B, D, H))
    inputs = [
        X,
        r(D, G * H, I),
        r(D, G * H, H),
        r(D, 2 * G * H) if bias else None,
        None if lens is None else np.asarray(lens, np.int32),
        state() if init else None,
    ]
    if op == "LSTM":
        inputs += [state() if init else None, r(D, 3 * H) if peep else None]
    while inputs[-1] is None:  # trailing optional inputs are simply left off
        inputs.pop()
    return inputs


def attrs_for(direction="forward", layout=0, H=H_, **extra):
    return {"direction": direction, "layout": layout, "hidden_size": H, **extra}


# -- a naive oracle: one sample, one direction, one step at a time, straight from the ONNX equations --
def _sig(x):
    return 1 / (1 + np.exp(-x))


ACT = {"Sigmoid": _sig, "Tanh": np.tanh, "Relu": lambda x: np.maximum(x, 0)}
DEFAULT_ACTS = {"RNN": ["Tanh"], "GRU": ["Sigmoid", "Tanh"], "LSTM": ["Sigmoid", "Tanh", "Tanh"]}


def naive(
    op, inputs, direction="forward", layout=0, activations=None, clip=None, linear_before_reset=0, input_forget=0, **_
):
    inputs = list(inputs) + [None] * (8 - len(inputs))
    X, W, R, Bias, lens, h0, c0, P = inputs
    if layout:
        X = X.transpose(1, 0, 2)
        h0 = None if h0 is None else h0.transpose(1, 0, 2)
        c0 = None if c0 is None else c0.transpose(1, 0, 2)
    T, B, _ = X.shape
    D, H = W.shape[0], R.shape[-1]
    n = len(DEFAULT_ACTS[op])
    acts = activations or DEFAULT_ACTS[op] * D
    cl = (lambda v: v) if clip is None else (lambda v: np.clip(v, -clip, clip))
    Y, Yh, Yc = np.zeros((T, D, B, H)), np.zeros((D, B, H)), np.zeros((D, B, H))
    for d in range(D):
        f, g, hf = ([ACT[a] for a in acts[d * n : (d + 1) * n]] + [None, None])[:3]
        Wg, Rg = np.split(W[d], GATES[op]), np.split(R[d], GATES[op])
        bs = np.split(np.zeros(2 * GATES[op] * H) if Bias is None else Bias[d], 2 * GATES[op])
        Wb, Rb = bs[: GATES[op]], bs[GATES[op] :]
        for b in range(B):
            L = T if lens is None else int(lens[b])
            steps = range(L - 1, -1, -1) if (direction == "reverse" or d == 1) else range(L)
            h = np.zeros(H) if h0 is None else h0[d, b].astype(np.float64)
            c = np.zeros(H) if c0 is None else c0[d, b].astype(np.float64)
            for t in steps:
                x = X[t, b]
                lin = [Wg[k] @ x + Rg[k] @ h + Wb[k] + Rb[k] for k in range(GATES[op])]
                if op == "RNN":
                    h = f(cl(lin[0]))
                elif op == "GRU":
                    z, r = f(cl(lin[0])), f(cl(lin[1]))
                    if linear_before_reset:
                        hh = g(cl(Wg[2] @ x + r * (Rg[2] @ h + Rb[2]) + Wb[2]))
                    else:
                        hh = g(cl(Wg[2] @ x + Rg[2] @ (r * h) + Rb[2] + Wb[2]))
                    h = (1 - z) * hh + z * h
                else:
                    pi, po, pf = np.split(np.zeros(3 * H) if P is None else P[d], 3)
                    i = f(cl(lin[0] + pi * c))
                    fg = 1 - i if input_forget else f(cl(lin[2] + pf * c))
                    c = fg * c + i * g(cl(lin[3]))
                    o = f(cl(lin[1] + po * c))
                    h = o * hf(c)
                Y[t, d, b] = h
            Yh[d, b], Yc[d, b] = h, c
    if layout:
        Y, Yh, Yc = Y.transpose(2, 0, 1, 3), Yh.transpose(1, 0, 2), Yc.transpose(1, 0, 2)
    return [Y, Yh, Yc][: N_OUT[op]]


def assert_outputs(got, want, tol=1e-10):
    assert len(got) == len(want)
    for k, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, (k, g.shape, w.shape)
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol, err_msg=f"output {k}")


# -- forwards ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["RNN", "GRU", "LSTM"])
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("layout", [0, 1])
@pytest.mark.parametrize("full", [False, True])
def test_forward_matches_reference(op, direction, layout, full):
    inputs = make_inputs(op, direction, layout, bias=full, init=full, peep=full)
    attrs = attrs_for(direction, layout)
    for lbr in [0, 1] if op == "GRU" else [0]:
        a = dict(attrs, linear_before_reset=lbr) if op == "GRU" else attrs
        got = run_op(op, inputs, a, n_outputs=N_OUT[op])
        assert_outputs(got, onnx_reference(op, inputs, a, N_OUT[op], opset=14))
        assert_outputs(got, naive(op, inputs, **a))


@pytest.mark.parametrize("op", ["RNN", "GRU", "LSTM"])
def test_forward_fewer_outputs_and_float32(op):
    inputs = make_inputs(op, "bidirectional", dtype=np.float32)
    attrs = attrs_for("bidirectional")
    (y,) = run_op(op, inputs, attrs, n_outputs=1)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, naive(op, inputs, **attrs)[0], rtol=1e-5, atol=1e-6)
    ys = run_op(op, inputs, attrs, n_outputs=2)
    assert all(v.dtype == np.float32 for v in ys)


def _torch_layer(op, inputs, nonlinearity="tanh"):
    """A torch layer holding the ONNX weights (torch gate orders: LSTM [i f g o], GRU [r z n])."""
    W, R, B = inputs[1], inputs[2], inputs[3]
    D, H, I = W.shape[0], R.shape[-1], W.shape[-1]
    cls = {"RNN": torch.nn.RNN, "GRU": torch.nn.GRU, "LSTM": torch.nn.LSTM}[op]
    kw = {"nonlinearity": nonlinearity} if op == "RNN" else {}
    layer = cls(I, H, bidirectional=D == 2, **kw).double()
    perm = {"RNN": [0], "GRU": [1, 0, 2], "LSTM": [0, 2, 3, 1]}[op]
    rows = np.concatenate([np.arange(k * H, (k + 1) * H) for k in perm])
    G = GATES[op]
    with torch.no_grad():
        for d in range(D):
            sfx = "_l0" + ("_reverse" if d else "")
            getattr(layer, "weight_ih" + sfx).copy_(torch.from_numpy(W[d][rows]))
            getattr(layer, "weight_hh" + sfx).copy_(torch.from_numpy(R[d][rows]))
            getattr(layer, "bias_ih" + sfx).copy_(torch.from_numpy(B[d][: G * H][rows]))
            getattr(layer, "bias_hh" + sfx).copy_(torch.from_numpy(B[d][G * H :][rows]))
    return layer


@pytest.mark.parametrize("op", ["RNN", "GRU", "LSTM", "RNN-relu"])
@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
def test_forward_sequence_lens_matches_torch(op, direction):
    """torch's packed sequences: padding outputs zeros, h_n is each sample's state at its last step,
    the reverse direction runs each sample reversed within its own length."""
    op, _, nl = op.partition("-")
    inputs = make_inputs(op, direction, lens=LENS, peep=False)
    attrs = (
        attrs_for(direction, activations=["Relu"] * (2 if direction == "bidirectional" else 1))
        if nl
        else attrs_for(direction)
    )
    if op == "GRU":
        attrs["linear_before_reset"] = 1  # torch's GRU
    layer = _torch_layer(op, inputs, nl or "tanh")
    X = torch.from_numpy(inputs[0])
    packed = torch.nn.utils.rnn.pack_padded_sequence(X, torch.from_numpy(LENS).long(), enforce_sorted=False)
    state = tuple(torch.from_numpy(s) for s in inputs[5:7]) if op == "LSTM" else torch.from_numpy(inputs[5])
    out, hn = layer(packed, state)
    y, _ = torch.nn.utils.rnn.pad_packed_sequence(out, total_length=T_)
    D = 2 if direction == "bidirectional" else 1
    want = [y.detach().numpy().reshape(T_, B_, D, H_).transpose(0, 2, 1, 3)]
    want += [t.detach().numpy() for t in (hn if op == "LSTM" else (hn,))]
    got = run_op(op, inputs, attrs, n_outputs=N_OUT[op])
    assert_outputs(got, want)
    assert_outputs(got, naive(op, inputs, **attrs))


@pytest.mark.parametrize("op", ["RNN", "GRU", "LSTM"])
@pytest.mark.parametrize("direction", ["reverse", "bidirectional"])
@pytest.mark.parametrize("layout", [0, 1])
def test_forward_options_match_naive(op, direction, layout):
    """sequence_lens with reverse / layout 1, clip, non-default activations, input_forget: not in
    the reference implementation, so against the per-sample oracle (itself checked above)."""
    D = 2 if direction == "bidirectional" else 1
    acts = {
        "RNN": ["Relu", "Sigmoid"],
        "GRU": ["Tanh", "Relu", "Sigmoid", "Sigmoid"],
        "LSTM": ["Tanh", "Sigmoid", "Relu", "Sigmoid", "Relu", "Tanh"],
    }[op]
    inputs = make_inputs(op, direction, layout, lens=LENS, seed=3)
    for extra in [
        {},
        {"clip": 0.6},
        {"activations": acts[: len(DEFAULT_ACTS[op]) * D]},
        {"input_forget": 1} if op == "LSTM" else {"linear_before_reset": 1},
    ]:
        attrs = attrs_for(direction, layout, **extra)
        assert_outputs(run_op(op, inputs, attrs, n_outputs=N_OUT[op]), naive(op, inputs, **attrs))


def test_zero_length_sample_keeps_initial_state():
    inputs = make_inputs("LSTM", "bidirectional", lens=[0, 4, 2])
    y, yh, yc = run_op("LSTM", inputs, attrs_for("bidirectional"), n_outputs=3)
    assert not y[:, :, 0].any()
    np.testing.assert_array_equal(yh[:, 0], inputs[5][:, 0])
    np.testing.assert_array_equal(yc[:, 0], inputs[6][:, 0])


def test_refusals():
    inputs = make_inputs("GRU")
    with pytest.raises(Exception, match="Softsign"):
        run_op("GRU", inputs, attrs_for(activations=["Sigmoid", "Softsign"]), n_outputs=2)
    with pytest.raises(Exception, match="direction"):
        run_op("GRU", inputs, attrs_for("sideways"), n_outputs=2)
    with pytest.raises(Exception, match="hidden_size"):
        run_op("GRU", inputs, attrs_for(H=5), n_outputs=2)
    assert issubclass(OpError, ValueError)


# -- VJPs --------------------------------------------------------------------------------------------
def wrt_of(inputs):
    return [k for k, x in enumerate(inputs) if x is not None and k != 4]


@pytest.mark.parametrize("op", ["RNN", "GRU", "LSTM"])
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("layout", [0, 1])
@pytest.mark.parametrize("variant", ["bare", "full", "lens"])
def test_vjp(op, direction, layout, variant):
    """bare: X, W, R only; full: every optional input; lens: full plus unequal sequence_lens."""
    inputs = make_inputs(
        op,
        direction,
        layout,
        bias=variant != "bare",
        init=variant != "bare",
        peep=variant != "bare",
        lens=LENS if variant == "lens" else None,
        seed=1,
    )
    attrs = attrs_for(direction, layout)
    for lbr in [0, 1] if op == "GRU" else [None]:
        a = attrs if lbr is None else dict(attrs, linear_before_reset=lbr)
        check_vjp(op, inputs, a, wrt=wrt_of(inputs), n_outputs=N_OUT[op])


@pytest.mark.parametrize("op", ["RNN", "GRU", "LSTM"])
@pytest.mark.parametrize("direction", ["reverse", "bidirectional"])
def test_vjp_single_output_errors(op, direction):
    """Errors into only Y, only Y_h, only Y_c (the engine passes None for the others), and a node
    declaring only Y."""
    inputs = make_inputs(op, direction, layout=1, lens=LENS, seed=2)
    attrs = attrs_for(direction, 1)
    for k in range(N_OUT[op]):
        check_vjp(op, inputs, attrs, wrt=wrt_of(inputs), n_outputs=N_OUT[op], grad_outputs=[k])
    check_vjp(op, inputs, attrs, wrt=wrt_of(inputs), n_outputs=1)


@pytest.mark.parametrize("op", ["RNN", "GRU", "LSTM"])
@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
def test_vjp_clip_and_activations(op, direction):
    D = 2 if direction == "bidirectional" else 1
    inputs = make_inputs(op, direction, lens=LENS, seed=4)
    acts = {
        "RNN": ["Relu", "Sigmoid"],
        "GRU": ["Tanh", "Relu", "Sigmoid", "Sigmoid"],
        "LSTM": ["Tanh", "Sigmoid", "Relu", "Sigmoid", "Relu", "Tanh"],
    }[op]
    acts = acts[: len(DEFAULT_ACTS[op]) * D]
    for extra in [{"clip": 0.7}, {"activations": acts}, {"activations": acts, "clip": 0.9}]:
        attrs = attrs_for(direction, **extra)
        check_vjp(op, inputs, attrs, wrt=wrt_of(inputs), n_outputs=N_OUT[op])


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_vjp_lstm_input_forget(direction):
    inputs = make_inputs("LSTM", direction, lens=LENS, seed=5)
    check_vjp("LSTM", inputs, attrs_for(direction, input_forget=1), wrt=wrt_of(inputs), n_outputs=3)


@pytest.mark.parametrize("op", ["GRU", "LSTM"])
def test_vjp_subsets_and_opset13(op):
    """Only some inputs want an error (frozen weights: X is then not saved); an opset-13 node
    (version 7: no layout attribute)."""
    inputs = make_inputs(op, "bidirectional", lens=LENS, seed=6)
    attrs = {"direction": "bidirectional", "hidden_size": H_}
    check_vjp(op, inputs, attrs, wrt=[0], n_outputs=N_OUT[op], opset=13)
    check_vjp(op, inputs, attrs, wrt=[1, 2], n_outputs=N_OUT[op], opset=13)
    check_vjp(op, inputs, attrs, wrt=[5], n_outputs=N_OUT[op], opset=13)


def test_vjp_missing_middle_inputs():
    """B and initial_h omitted ("") while later inputs are given."""
    inputs = make_inputs("LSTM", "bidirectional", lens=LENS, seed=7)
    inputs[3] = inputs[5] = None
    check_vjp("LSTM", inputs, attrs_for("bidirectional"), wrt=wrt_of(inputs), n_outputs=3)


def test_an_initial_state_of_another_size_is_refused_naming_projections():
    """torch's dynamo exporter writes LSTM(proj_size=3) as an ONNX LSTM whose initial state has the
    projected size; ONNX LSTM has no projections, so the op refuses it with a clear message."""
    rng = np.random.default_rng(0)
    T, B, I, H = 2, 3, 4, 6
    x, w, r = rng.standard_normal((T, B, I)), rng.standard_normal((1, 4 * H, I)), rng.standard_normal((1, 4 * H, H))
    h0 = rng.standard_normal((1, B, 3))
    with pytest.raises(Exception, match=r"initial state has shape \(1, 3, 3\).*proj_size"):
        run_op("LSTM", [x, w, r, None, None, h0], {"hidden_size": H})
