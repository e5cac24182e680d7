"""Recurrent layers: RNN, GRU and LSTM (ONNX semantics, opsets 13-21: versions 7 and 14, the latter
adding ``layout``).

Inputs ``X, W, R, [B], [sequence_lens], [initial_h], [initial_c, P]`` (the last two LSTM only);
outputs ``Y, [Y_h], [Y_c]``. Gate orders are ONNX's: LSTM [i o f c], GRU [z r h]; W (D, G*H, I),
R (D, G*H, H), B (D, 2*G*H) = [Wb, Rb]. ``direction`` forward / reverse / bidirectional
(D = 1, 1, 2; direction 0 of a bidirectional layer runs forward, 1 in reverse).

Everything runs in *processing order*: each direction sees its own copy of the sequence, reversed
(within each sample's ``sequence_lens``) for a reverse direction, so both directions step forward
together and every per-step product is one batched matmul over (D, B). Steps past a sample's
length leave its state unchanged and give zeros in Y (ONNX Runtime's semantics).

``clip`` bounds the argument of every gate activation (as ONNX Runtime does: the LSTM cell state
itself is not clipped); its VJP is zero where an argument was clipped. Activations: Sigmoid, Tanh
and Relu (whose derivatives follow from their outputs, so the forward saves only activated gates);
others are refused.

The VJPs are backpropagation through time: one Python loop over steps computing the error at every
gate pre-activation (dG, (D, T, B, G*H)), then dW, dR, dB and dX each in one product over all steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from gradserve.worker.ops import blas
from gradserve.worker.ops.conv import str_attr
from gradserve.worker.ops.elementwise import sigmoid
from gradserve.worker.graph import Node
from gradserve.worker.ops.batch import NONE, BatchRule, BatchView, Rows, refuse
from gradserve.worker.ops.registry import OpError, defop, numel


# -- activations ----------------------------------------------------------------------------------
# name -> (function, derivative expressed through the function's *output*)
_ACTIVATIONS: dict[str, tuple[Callable, Callable]] = {
    "sigmoid": (sigmoid, lambda y: y * (1 - y)),
    "tanh": (np.tanh, lambda y: 1 - y * y),
    "relu": (lambda x: np.maximum(x, 0), lambda y: (y > 0).astype(y.dtype)),
}

# per op: number of gates, and the default activations of one direction (f, g, h as ONNX names them)
_GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}
_DEFAULT_ACTS = {"RNN": ("Tanh",), "GRU": ("Sigmoid", "Tanh"), "LSTM": ("Sigmoid", "Tanh", "Tanh")}


def _act(names: Sequence[str], k: int, x: np.ndarray) -> np.ndarray:
    """Activation ``k`` of each direction applied to x (D, ...)."""
    if len({n[k] for n in names}) == 1:
        return _ACTIVATIONS[names[0][k]][0](x)
    return np.stack([_ACTIVATIONS[n[k]][0](x[d]) for d, n in enumerate(names)])


def _dact(names: Sequence[str], k: int, y: np.ndarray) -> np.ndarray:
    """Derivative of activation ``k`` of each direction, from its outputs y (D, ...)."""
    if len({n[k] for n in names}) == 1:
        return _ACTIVATIONS[names[0][k]][1](y)
    return np.stack([_ACTIVATIONS[n[k]][1](y[d]) for d, n in enumerate(names)])


# -- attributes, layout and sequence order ----------------------------------------------------------
@dataclass
class _Setup:
    """What the forward and the VJP share about one application of a recurrent op."""

    op: str
    D: int  # directions
    H: int  # hidden size
    T: int
    B: int
    layout: int
    reverse: tuple[bool, ...]  # per direction: does it run over the sequence reversed?
    acts: tuple[tuple[str, ...], ...]  # per direction, lower-case activation names
    clip: float | None
    lens: np.ndarray | None  # (B,) sequence lengths, None when every sample runs all T steps
    order: np.ndarray | None  # (T, B) time index of each processing step of a reversed sequence
    mask: np.ndarray | None  # (T, B, 1) 1 where a processing step is within its sample's length

    def orient(self, a: np.ndarray, rev: bool) -> np.ndarray:
        """a (T, B, ...) in time order -> processing order of a direction, and back (an involution:
        reversing each sample within its length twice is the identity)."""
        if not rev:
            return a
        if self.order is None:
            return a[::-1]
        return a[self.order, np.arange(self.B)]

    def per_direction(self, a: np.ndarray) -> np.ndarray:
        """a (T, B, ...) in time order -> (D, T, B, ...), each direction in its processing order."""
        if self.D == 1:
            return self.orient(a, self.reverse[0])[None]
        return np.stack([self.orient(a, rev) for rev in self.reverse])


def _setup(op: str, c, X: np.ndarray, W: np.ndarray, R: np.ndarray, seq_lens: np.ndarray | None) -> _Setup:
    direction = str_attr(c.attr("direction"), "forward")
    reverse = {"forward": (False,), "reverse": (True,), "bidirectional": (False, True)}.get(direction)
    if reverse is None:
        raise OpError(f"{op}: unknown direction '{direction}'")
    D = len(reverse)
    layout = int(c.attr("layout", 0))
    if layout not in (0, 1):
        raise OpError(f"{op}: layout must be 0 or 1, got {layout}")
    if X.ndim != 3:
        raise OpError(f"{op}: X must have rank 3, got shape {X.shape}")
    T, B = (X.shape[0], X.shape[1]) if layout == 0 else (X.shape[1], X.shape[0])
    H = R.shape[-1]
    G = _GATES[op]
    if c.attr("hidden_size") is not None and int(c.attr("hidden_size")) != H:
        raise OpError(f"{op}: hidden_size {c.attr('hidden_size')} but R has shape {R.shape}")
    if W.shape != (D, G * H, X.shape[2]) or R.shape != (D, G * H, H):
        raise OpError(f"{op}: W {W.shape} / R {R.shape} do not fit D={D}, {G} gates, hidden {H}, input {X.shape[2]}")
    names = c.attr("activations")
    n_act = len(_DEFAULT_ACTS[op])
    if names is None:
        names = _DEFAULT_ACTS[op] * D
    names = [str_attr(n, "") for n in names]
    if len(names) == n_act and D == 2:  # one set given for a bidirectional layer: both use it
        names = names * 2
    if len(names) != n_act * D:
        raise OpError(f"{op}: {len(names)} activations given, expected {n_act * D}")
    unknown = sorted({n for n in names if n.lower() not in _ACTIVATIONS})
    if unknown:
        raise OpError(f"{op}: activation(s) {', '.join(unknown)} not supported (only Sigmoid, Tanh, Relu)")
    acts = tuple(tuple(n.lower() for n in names[d * n_act:(d + 1) * n_act]) for d in range(D))
    clip = c.attr("clip")
    lens = order = mask = None
    if seq_lens is not None:
        lens = np.asarray(seq_lens).astype(np.int64).reshape(-1)
        if lens.shape != (B,) or np.any(lens < 0) or np.any(lens > T):
            raise OpError(f"{op}: sequence_lens {seq_lens.tolist()} must be {B} lengths in [0, {T}]")
        if np.all(lens == T):
            lens = None  # every sample runs every step: no masking needed
        else:
            t = np.arange(T)[:, None]
            order = np.where(t < lens, lens - 1 - t, t)
            mask = (t < lens)[:, :, None].astype(X.dtype)
    return _Setup(op, D, H, T, B, layout, reverse, acts, None if clip is None else float(clip), lens, order, mask)


def _clip(x: np.ndarray, clip: float | None) -> np.ndarray:
    return x if clip is None else np.clip(x, -clip, clip)


def _state(s: _Setup, h: np.ndarray | None, dtype) -> np.ndarray:
    """An initial state input ((D, B, H), or (B, D, H) in layout 1) as (D, B, H); zeros if absent."""
    if h is None:
        return np.zeros((s.D, s.B, s.H), dtype)
    h = h if s.layout == 0 else h.transpose(1, 0, 2)
    if h.shape != (s.D, s.B, s.H):
        # e.g. torch's LSTM(proj_size=...) exported anyway: ONNX LSTM has no projections
        raise OpError(f"{s.op}: an initial state has shape {h.shape} in (directions, batch, hidden) order; "
                      f"hidden_size is {s.H} (projections, torch's proj_size, are not part of ONNX {s.op})")
    return h


def _state_out(s: _Setup, h: np.ndarray) -> np.ndarray:
    """A (D, B, H) state in the op's layout (for Y_h / Y_c, and the errors of initial states)."""
    return h if s.layout == 0 else np.ascontiguousarray(h.transpose(1, 0, 2))


def _seq_major(s: _Setup, X: np.ndarray) -> np.ndarray:
    return X if s.layout == 0 else X.transpose(1, 0, 2)


def _outputs(c, s: _Setup, h_all: np.ndarray, c_all: np.ndarray | None = None):
    """Y, Y_h (and Y_c) from the states (D, T+1, B, H) in processing order, as many as declared."""
    hs = h_all[:, 1:]
    if s.mask is not None:
        hs = hs * s.mask  # steps past a sample's length output zeros
    Y = np.stack([s.orient(hs[d], rev) for d, rev in enumerate(s.reverse)], axis=1)  # (T, D, B, H)
    if s.layout == 1:
        Y = np.ascontiguousarray(Y.transpose(2, 0, 1, 3))
    outs = [Y, _state_out(s, h_all[:, -1].copy())]
    if c_all is not None:
        outs.append(_state_out(s, c_all[:, -1].copy()))
    n = max(1, c.n_outputs)
    return outs[0] if n == 1 else tuple(outs[:n])


def _input_projection(s: _Setup, X: np.ndarray, W: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each direction's inputs (D, T, B, I) in processing order and X @ W^T for all steps at once
    (D, T, B, G*H): the recurrence then adds only H @ R^T per step."""
    Xd = s.per_direction(_seq_major(s, X))
    xw = blas.matmul(Xd.reshape(s.D, s.T * s.B, -1), W.transpose(0, 2, 1)).reshape(s.D, s.T, s.B, -1)
    return Xd, xw


def _masked(s: _Setup, t: int, new: np.ndarray, old: np.ndarray) -> np.ndarray:
    """The state after processing step t: ``new`` for samples still within their length."""
    return new if s.mask is None else np.where(s.mask[t] > 0, new, old)


def _split_masked(s: _Setup, t: int, g: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """The error at a state after step t split into (error at the step's new value, error that
    passes straight to the previous state because the step was past the sample's length)."""
    if s.mask is None:
        return g, None
    return g * s.mask[t], g * (1 - s.mask[t])


def _output_errors(s: _Setup, gY: np.ndarray | None, gYh: np.ndarray | None, dtype):
    """Errors at Y in processing order (D, T, B, H) (None if no error) and at the final state (D, B, H)."""
    dY = None
    if gY is not None:
        g = gY if s.layout == 0 else gY.transpose(1, 2, 0, 3)  # (T, D, B, H)
        dY = np.stack([s.orient(g[:, d], rev) for d, rev in enumerate(s.reverse)])
        if s.mask is not None:
            dY = dY * s.mask  # padded outputs are constant zeros
    dh = np.zeros((s.D, s.B, s.H), dtype) if gYh is None else np.array(_state(s, gYh, dtype), dtype)
    return dY, dh


def _input_grads(c, s: _Setup, dG: np.ndarray, W: np.ndarray, dR: Callable[[], np.ndarray],
                 dB: Callable[[], np.ndarray], dh0: np.ndarray):
    """Errors at X, W, R, B, sequence_lens and initial_h from the gate errors dG (D, T, B, G*H);
    dR and dB are computed only when asked for."""
    needs = list(c.needs) + [False] * 8
    n_in = len(c.inputs)
    dG2 = dG.reshape(s.D, s.T * s.B, -1)
    dX = dW = None
    if needs[0]:
        dXd = blas.matmul(dG2, W).reshape(s.D, s.T, s.B, -1)
        dXs = sum(s.orient(dXd[d], rev) for d, rev in enumerate(s.reverse))
        dX = dXs if s.layout == 0 else np.ascontiguousarray(dXs.transpose(1, 0, 2))
    if needs[1]:
        Xd = c.saved["Xd"]
        dW = blas.matmul(dG2.transpose(0, 2, 1), Xd.reshape(s.D, s.T * s.B, -1))
    grads = [dX, dW, dR() if needs[2] else None, dB() if needs[3] and n_in > 3 else None, None,
             _state_out(s, dh0) if needs[5] and n_in > 5 and c.inputs[5] is not None else None]
    return grads


def _sum_tb(a: np.ndarray) -> np.ndarray:
    """(D, T, B, K) summed over steps and batch -> (D, K)."""
    return a.sum(axis=(1, 2))


def _save_inputs(c, s: _Setup, Xd: np.ndarray) -> None:
    # X is read only by dW: keep it (in processing order) only when W wants an error, so a layer whose
    # weights are frozen does not hold its input alive (X itself is not in ``keep``).
    c.save(setup=s, Xd=Xd if len(c.needs) > 1 and c.needs[1] else None)


# -- RNN ---------------------------------------------------------------------------------------------
def _rnn(c, X, W, R, B=None, seq_lens=None, h0=None):
    s = _setup("RNN", c, X, W, R, seq_lens)
    H = s.H
    Xd, xw = _input_projection(s, X, W)
    if B is not None:
        xw += (B[:, :H] + B[:, H:])[:, None, None, :]
    Rt = R.transpose(0, 2, 1)
    h_all = np.empty((s.D, s.T + 1, s.B, H), X.dtype)
    h_all[:, 0] = _state(s, h0, X.dtype)
    keep = np.empty(xw.shape, bool) if s.clip is not None else None
    for t in range(s.T):
        pre = xw[:, t] + blas.matmul(h_all[:, t], Rt)
        if keep is not None:
            keep[:, t] = np.abs(pre) <= s.clip
        h_all[:, t + 1] = _masked(s, t, _act(s.acts, 0, _clip(pre, s.clip)), h_all[:, t])
    _save_inputs(c, s, Xd)
    c.save(h_all=h_all, keep=keep)
    return _outputs(c, s, h_all)


def _rnn_vjp(c, gY=None, gYh=None):
    s: _Setup = c.saved["setup"]
    W, R = c.inputs[1], c.inputs[2]
    h_all, keep = c.saved["h_all"], c.saved["keep"]
    dY, dh = _output_errors(s, gY, gYh, W.dtype)
    dG = np.empty((s.D, s.T, s.B, s.H), W.dtype)
    # the new state of a step within its length is h_all[:, t + 1]; past it, its error is zero anyway
    dact = _dact(s.acts, 0, h_all[:, 1:])
    for t in range(s.T - 1, -1, -1):
        if dY is not None:
            dh = dh + dY[:, t]
        dnew, dpass = _split_masked(s, t, dh)
        g = dnew * dact[:, t]
        if keep is not None:
            g *= keep[:, t]
        dG[:, t] = g
        dh = blas.matmul(g, R)
        if dpass is not None:
            dh += dpass

    def dR():
        return blas.matmul(dG.reshape(s.D, -1, s.H).transpose(0, 2, 1), h_all[:, :-1].reshape(s.D, -1, s.H))

    def dB():
        db = _sum_tb(dG)
        return np.concatenate([db, db], axis=1)

    return tuple(_input_grads(c, s, dG, W, dR, dB, dh))


# -- GRU ---------------------------------------------------------------------------------------------
def _gru(c, X, W, R, B=None, seq_lens=None, h0=None):
    s = _setup("GRU", c, X, W, R, seq_lens)
    H = s.H
    lbr = bool(c.attr("linear_before_reset", 0))
    Xd, xw = _input_projection(s, X, W)
    rb_h = None
    if B is not None:
        wb, rb = B[:, : 3 * H], B[:, 3 * H:]
        bias = wb.copy()
        # Rb of the h gate goes inside r * (...) with linear_before_reset; otherwise all biases add
        bias[:, : 2 * H] += rb[:, : 2 * H]
        if lbr:
            rb_h = rb[:, None, 2 * H:]
        else:
            bias[:, 2 * H:] += rb[:, 2 * H:]
        xw += bias[:, None, None, :]
    Rt = R.transpose(0, 2, 1)  # (D, H, 3H)
    h_all = np.empty((s.D, s.T + 1, s.B, H), X.dtype)
    h_all[:, 0] = _state(s, h0, X.dtype)
    gates = np.empty(xw.shape, X.dtype)  # activated z, r, h~ per step
    q_all = np.empty((s.D, s.T, s.B, H), X.dtype) if lbr else None  # H_prev @ Rh^T + Rbh
    keep = np.empty(xw.shape, bool) if s.clip is not None else None
    for t in range(s.T):
        hp = h_all[:, t]
        x = xw[:, t]
        if lbr:
            rec = blas.matmul(hp, Rt)
            pre_zr = x[..., : 2 * H] + rec[..., : 2 * H]
            q = rec[..., 2 * H:] if rb_h is None else rec[..., 2 * H:] + rb_h
            q_all[:, t] = q
        else:
            pre_zr = x[..., : 2 * H] + blas.matmul(hp, Rt[..., : 2 * H])
        zr = _act(s.acts, 0, _clip(pre_zr, s.clip))
        r = zr[..., H:]
        if lbr:
            pre_h = x[..., 2 * H:] + r * q
        else:
            pre_h = x[..., 2 * H:] + blas.matmul(r * hp, Rt[..., 2 * H:])
        hh = _act(s.acts, 1, _clip(pre_h, s.clip))
        gates[:, t, :, : 2 * H] = zr
        gates[:, t, :, 2 * H:] = hh
        if keep is not None:
            keep[:, t, :, : 2 * H] = np.abs(pre_zr) <= s.clip
            keep[:, t, :, 2 * H:] = np.abs(pre_h) <= s.clip
        z = zr[..., :H]
        h_all[:, t + 1] = _masked(s, t, hh + z * (hp - hh), hp)  # (1 - z) h~ + z H_prev
    _save_inputs(c, s, Xd)
    c.save(h_all=h_all, gates=gates, q=q_all, keep=keep, lbr=lbr)
    return _outputs(c, s, h_all)


def _gru_vjp(c, gY=None, gYh=None):
    s: _Setup = c.saved["setup"]
    H = s.H
    W, R = c.inputs[1], c.inputs[2]
    h_all, gates, q_all, keep, lbr = (c.saved[k] for k in ("h_all", "gates", "q", "keep", "lbr"))
    dY, dh = _output_errors(s, gY, gYh, W.dtype)
    dG = np.empty(gates.shape, W.dtype)  # errors at the pre-activations of z, r, h~
    dq_all = np.empty((s.D, s.T, s.B, H), W.dtype) if lbr else None
    dzr_act = _dact(s.acts, 0, gates[..., : 2 * H])
    dh_act = _dact(s.acts, 1, gates[..., 2 * H:])
    if keep is not None:
        dzr_act *= keep[..., : 2 * H]
        dh_act *= keep[..., 2 * H:]
    R_zr, R_h = R[:, : 2 * H], R[:, 2 * H:]
    for t in range(s.T - 1, -1, -1):
        hp = h_all[:, t]
        z, r, hh = gates[:, t, :, :H], gates[:, t, :, H: 2 * H], gates[:, t, :, 2 * H:]
        if dY is not None:
            dh = dh + dY[:, t]
        dnew, dpass = _split_masked(s, t, dh)
        dph = dnew * (1 - z) * dh_act[:, t]
        dz = dnew * (hp - hh)
        dhp = dnew * z
        if lbr:
            dr = dph * q_all[:, t]
            dq = dph * r
            dq_all[:, t] = dq
            dhp += blas.matmul(dq, R_h)
        else:
            drh = blas.matmul(dph, R_h)  # error at r * H_prev
            dr = drh * hp
            dhp += drh * r
        dG[:, t, :, :H] = dz
        dG[:, t, :, H: 2 * H] = dr
        dG[:, t, :, : 2 * H] *= dzr_act[:, t]
        dG[:, t, :, 2 * H:] = dph
        dhp += blas.matmul(dG[:, t, :, : 2 * H], R_zr)
        dh = dhp if dpass is None else dhp + dpass

    # The recurrent side of the h gate: its error is dq (at H_prev @ Rh^T + Rbh) with
    # linear_before_reset, else the pre-activation error itself, taken against r * H_prev.
    d_rec_h = dq_all if lbr else dG[..., 2 * H:]

    def dR():
        hprev = h_all[:, :-1]
        rows = lambda a: a.reshape(s.D, s.T * s.B, -1)  # noqa: E731
        d_zr = blas.matmul(rows(dG[..., : 2 * H]).transpose(0, 2, 1), rows(hprev))
        h_in = hprev if lbr else gates[..., H: 2 * H] * hprev
        d_h = blas.matmul(rows(d_rec_h).transpose(0, 2, 1), rows(h_in))
        return np.concatenate([d_zr, d_h], axis=1)

    def dB():
        dwb = _sum_tb(dG)
        return np.concatenate([dwb, dwb[:, : 2 * H], _sum_tb(d_rec_h)], axis=1)

    return tuple(_input_grads(c, s, dG, W, dR, dB, dh))


# -- LSTM --------------------------------------------------------------------------------------------
def _lstm(c, X, W, R, B=None, seq_lens=None, h0=None, c0=None, P=None):
    s = _setup("LSTM", c, X, W, R, seq_lens)
    H = s.H
    coupled = bool(c.attr("input_forget", 0))
    Xd, xw = _input_projection(s, X, W)
    if B is not None:
        xw += (B[:, : 4 * H] + B[:, 4 * H:])[:, None, None, :]
    if P is not None:  # peepholes [i o f], broadcast over the batch
        p_i, p_o, p_f = (P[:, None, k * H:(k + 1) * H] for k in range(3))
    Rt = R.transpose(0, 2, 1)
    h_all = np.empty((s.D, s.T + 1, s.B, H), X.dtype)
    c_all = np.empty_like(h_all)
    h_all[:, 0] = _state(s, h0, X.dtype)
    c_all[:, 0] = _state(s, c0, X.dtype)
    gates = np.empty(xw.shape, X.dtype)  # activated i, o, f, c~ per step
    hc_all = np.empty((s.D, s.T, s.B, H), X.dtype)  # h(C_t)
    keep = np.empty(xw.shape, bool) if s.clip is not None else None
    for t in range(s.T):
        hp, cp = h_all[:, t], c_all[:, t]
        pre = xw[:, t] + blas.matmul(hp, Rt)
        if P is not None:
            pre[..., :H] += p_i * cp
            pre[..., 2 * H: 3 * H] += p_f * cp
        a = gates[:, t]
        a[..., :H] = _act(s.acts, 0, _clip(pre[..., :H], s.clip))
        if coupled:  # input_forget: f = 1 - i
            a[..., 2 * H: 3 * H] = 1 - a[..., :H]
        else:
            a[..., 2 * H: 3 * H] = _act(s.acts, 0, _clip(pre[..., 2 * H: 3 * H], s.clip))
        a[..., 3 * H:] = _act(s.acts, 1, _clip(pre[..., 3 * H:], s.clip))
        c_new = a[..., 2 * H: 3 * H] * cp + a[..., :H] * a[..., 3 * H:]
        if P is not None:  # the output gate peeks at the *new* cell state
            pre[..., H: 2 * H] += p_o * c_new
        a[..., H: 2 * H] = _act(s.acts, 0, _clip(pre[..., H: 2 * H], s.clip))
        if keep is not None:
            keep[:, t] = np.abs(pre) <= s.clip
        hc = _act(s.acts, 2, c_new)
        hc_all[:, t] = hc
        c_all[:, t + 1] = _masked(s, t, c_new, cp)
        h_all[:, t + 1] = _masked(s, t, a[..., H: 2 * H] * hc, hp)
    _save_inputs(c, s, Xd)
    c.save(h_all=h_all, c_all=c_all, gates=gates, hc=hc_all, keep=keep, coupled=coupled)
    return _outputs(c, s, h_all, c_all)


def _lstm_vjp(c, gY=None, gYh=None, gYc=None):
    s: _Setup = c.saved["setup"]
    H = s.H
    W, R = c.inputs[1], c.inputs[2]
    P = c.inputs[7] if len(c.inputs) > 7 else None
    h_all, c_all, gates, hc_all, keep, coupled = (
        c.saved[k] for k in ("h_all", "c_all", "gates", "hc", "keep", "coupled"))
    dY, dh = _output_errors(s, gY, gYh, W.dtype)
    dc = np.zeros_like(dh) if gYc is None else np.array(_state(s, gYc, W.dtype), W.dtype)
    if P is not None:
        p_i, p_o, p_f = (P[:, None, k * H:(k + 1) * H] for k in range(3))
    dact = np.empty(gates.shape, W.dtype)  # activation derivatives of i, o, f, c~ (times keep)
    dact[..., : 3 * H] = _dact(s.acts, 0, gates[..., : 3 * H])
    dact[..., 3 * H:] = _dact(s.acts, 1, gates[..., 3 * H:])
    if keep is not None:
        dact *= keep
    dhc_all = _dact(s.acts, 2, hc_all)
    dG = np.empty(gates.shape, W.dtype)
    for t in range(s.T - 1, -1, -1):
        a = gates[:, t]
        i, o, f, g = a[..., :H], a[..., H: 2 * H], a[..., 2 * H: 3 * H], a[..., 3 * H:]
        cp = c_all[:, t]
        if dY is not None:
            dh = dh + dY[:, t]
        dh_new, dh_pass = _split_masked(s, t, dh)
        dc_new, dc_pass = _split_masked(s, t, dc)
        d = dG[:, t]
        d[..., H: 2 * H] = dh_new * hc_all[:, t] * dact[:, t, :, H: 2 * H]  # o
        dcn = dc_new + dh_new * o * dhc_all[:, t]
        if P is not None:
            dcn += d[..., H: 2 * H] * p_o
        di = dcn * g
        df = dcn * cp
        if coupled:  # f = 1 - i: the forget gate's error goes to i, none to its own weights
            di -= df
            d[..., 2 * H: 3 * H] = 0
        else:
            d[..., 2 * H: 3 * H] = df * dact[:, t, :, 2 * H: 3 * H]
        d[..., :H] = di * dact[:, t, :, :H]
        d[..., 3 * H:] = dcn * i * dact[:, t, :, 3 * H:]
        dc = dcn * f
        if P is not None:
            dc += d[..., :H] * p_i + d[..., 2 * H: 3 * H] * p_f
        dh = blas.matmul(d, R)
        if dh_pass is not None:
            dh += dh_pass
            dc += dc_pass

    def dR():
        return blas.matmul(dG.reshape(s.D, -1, 4 * H).transpose(0, 2, 1), h_all[:, :-1].reshape(s.D, -1, H))

    def dB():
        db = _sum_tb(dG)
        return np.concatenate([db, db], axis=1)

    grads = _input_grads(c, s, dG, W, dR, dB, dh)
    needs = list(c.needs) + [False] * 8
    n_in = len(c.inputs)
    grads.append(_state_out(s, dc) if needs[6] and n_in > 6 and c.inputs[6] is not None else None)
    dP = None
    if needs[7] and P is not None:
        # i and f peek at C_{t-1}, o at C_t (masked steps have zero gate errors)
        dP = np.concatenate([
            np.einsum("dtbh,dtbh->dh", dG[..., :H], c_all[:, :-1]),
            np.einsum("dtbh,dtbh->dh", dG[..., H: 2 * H], c_all[:, 1:]),
            np.einsum("dtbh,dtbh->dh", dG[..., 2 * H: 3 * H], c_all[:, :-1]),
        ], axis=1)
    grads.append(dP)
    return tuple(grads)


def _rnn_batch(view: BatchView, node: Node, tags: list) -> list:
    """X is (T, B, I) for layout=0, (B, T, I) for layout=1; Y is (T, D, B, H) or (B, T, D, H); the
    states (D, B, H) or (B, D, H). Weights are unbatched; sequence_lens and initial states batched."""
    layout = int(node.attrs.get("layout", 0))
    x_axis, state_axis, y_axis = (1, 1, 2) if layout == 0 else (0, 0, 0)
    wanted = {0: Rows(x_axis), 4: Rows(0), 5: Rows(state_axis), 6: Rows(state_axis)}
    if node.op_type != "LSTM":
        del wanted[6]
    for k, (name, t) in enumerate(zip(node.inputs, tags)):
        want = wanted.get(k, NONE)
        if not name or t == want:
            continue
        if want == NONE:
            raise refuse(node, f"reads batched weights ('{name}')")
        if t == NONE:
            raise refuse(node, f"reads '{name}', which is not computed from the batch but has one entry per "
                               "sample (it holds the batch size)")
        raise refuse(node, f"does not have the batch on axis {want.axis} of '{name}' (layout={layout})")
    return [Rows(y_axis), Rows(state_axis), Rows(state_axis)][: len(node.outputs)]


def _rnn_flops(node: Node, shapes) -> int | None:
    """2 x multiply-adds: every step of every sample multiplies by W and R ((D, G*H, I), (D, G*H, H))."""
    if len(node.inputs) <= 2:
        return None
    first, w, r = (shapes.get(node.inputs[k]) for k in range(3))
    if w is None or r is None or first is None or len(first.shape) != 3:
        return None
    return 2 * first.shape[0] * first.shape[1] * (numel(w) + numel(r))


# Every VJP reads W and R (errors to X and to earlier steps) and LSTM's P; X is saved by the forward
# only when W needs an error (see _save_inputs); the rest is saved state.
_PLANNING = dict(batch=BatchRule(_rnn_batch), flops=_rnn_flops)
defop("RNN", _rnn, _rnn_vjp, keep=("x1", "x2"), differentiable=(0, 1, 2, 3, 5), **_PLANNING)
defop("GRU", _gru, _gru_vjp, keep=("x1", "x2"), differentiable=(0, 1, 2, 3, 5), **_PLANNING)
defop("LSTM", _lstm, _lstm_vjp, keep=("x1", "x2", "x7"), differentiable=(0, 1, 2, 3, 5, 6, 7), **_PLANNING)
