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

The machinery all three share (attributes, processing order, masking, states) is in :mod:`.recurrence`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gradserve.worker.graph import Node
from gradserve.worker.ops import blas
from gradserve.worker.ops.batch import NONE, BatchRule, BatchView, Rows, refuse
from gradserve.worker.ops.recurrence import Setup, activate, activation_slope, clip_gate, initial_state, input_grads, \
    input_projection, masked, output_errors, outputs, save_inputs, setup, split_masked, state_out, sum_steps
from gradserve.worker.ops.registry import defop, numel


# -- RNN ---------------------------------------------------------------------------------------------
def _rnn(c, X, W, R, B=None, seq_lens=None, h0=None):
    s = setup("RNN", c, X, W, R, seq_lens)
    H = s.H
    Xd, xw = input_projection(s, X, W)
    if B is not None:
        xw += (B[:, :H] + B[:, H:])[:, None, None, :]
    Rt = R.transpose(0, 2, 1)
    h_all = np.empty((s.D, s.T + 1, s.B, H), X.dtype)
    h_all[:, 0] = initial_state(s, h0, X.dtype)
    keep = np.empty(xw.shape, bool) if s.clip is not None else None
    for t in range(s.T):
        pre = xw[:, t] + blas.matmul(h_all[:, t], Rt)
        if keep is not None:
            keep[:, t] = np.abs(pre) <= s.clip
        h_all[:, t + 1] = masked(s, t, activate(s.acts, 0, clip_gate(pre, s.clip)), h_all[:, t])
    save_inputs(c, s, Xd)
    c.save(h_all=h_all, keep=keep)
    return outputs(c, s, h_all)


def _rnn_vjp(c, gY=None, gYh=None):
    s: Setup = c.saved["setup"]
    W, R = c.inputs[1], c.inputs[2]
    h_all, keep = c.saved["h_all"], c.saved["keep"]
    dY, dh = output_errors(s, gY, gYh, W.dtype)
    dG = np.empty((s.D, s.T, s.B, s.H), W.dtype)
    # the new state of a step within its length is h_all[:, t + 1]; past it, its error is zero anyway
    dact = activation_slope(s.acts, 0, h_all[:, 1:])
    for t in range(s.T - 1, -1, -1):
        if dY is not None:
            dh = dh + dY[:, t]
        dnew, dpass = split_masked(s, t, dh)
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
        db = sum_steps(dG)
        return np.concatenate([db, db], axis=1)

    return tuple(input_grads(c, s, dG, W, dR, dB, dh))


# -- GRU ---------------------------------------------------------------------------------------------
def _gru(c, X, W, R, B=None, seq_lens=None, h0=None):
    s = setup("GRU", c, X, W, R, seq_lens)
    H = s.H
    lbr = bool(c.attr("linear_before_reset", 0))
    Xd, xw = input_projection(s, X, W)
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
    h_all[:, 0] = initial_state(s, h0, X.dtype)
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
            q_all[:, t] = q  # type: ignore[index]  # allocated with lbr
        else:
            pre_zr = x[..., : 2 * H] + blas.matmul(hp, Rt[..., : 2 * H])
        zr = activate(s.acts, 0, clip_gate(pre_zr, s.clip))
        r = zr[..., H:]
        if lbr:
            pre_h = x[..., 2 * H:] + r * q
        else:
            pre_h = x[..., 2 * H:] + blas.matmul(r * hp, Rt[..., 2 * H:])
        hh = activate(s.acts, 1, clip_gate(pre_h, s.clip))
        gates[:, t, :, : 2 * H] = zr
        gates[:, t, :, 2 * H:] = hh
        if keep is not None:
            keep[:, t, :, : 2 * H] = np.abs(pre_zr) <= s.clip
            keep[:, t, :, 2 * H:] = np.abs(pre_h) <= s.clip
        z = zr[..., :H]
        h_all[:, t + 1] = masked(s, t, hh + z * (hp - hh), hp)  # (1 - z) h~ + z H_prev
    save_inputs(c, s, Xd)
    c.save(h_all=h_all, gates=gates, q=q_all, keep=keep, lbr=lbr)
    return outputs(c, s, h_all)


def _gru_vjp(c, gY=None, gYh=None):
    s: Setup = c.saved["setup"]
    H = s.H
    W, R = c.inputs[1], c.inputs[2]
    h_all, gates, q_all, keep, lbr = (c.saved[k] for k in ("h_all", "gates", "q", "keep", "lbr"))
    dY, dh = output_errors(s, gY, gYh, W.dtype)
    dG = np.empty(gates.shape, W.dtype)  # errors at the pre-activations of z, r, h~
    dq_all = np.empty((s.D, s.T, s.B, H), W.dtype) if lbr else None
    dzr_act = activation_slope(s.acts, 0, gates[..., : 2 * H])
    dh_act = activation_slope(s.acts, 1, gates[..., 2 * H:])
    if keep is not None:
        dzr_act *= keep[..., : 2 * H]
        dh_act *= keep[..., 2 * H:]
    R_zr, R_h = R[:, : 2 * H], R[:, 2 * H:]
    for t in range(s.T - 1, -1, -1):
        hp = h_all[:, t]
        z, r, hh = gates[:, t, :, :H], gates[:, t, :, H: 2 * H], gates[:, t, :, 2 * H:]
        if dY is not None:
            dh = dh + dY[:, t]
        dnew, dpass = split_masked(s, t, dh)
        dph = dnew * (1 - z) * dh_act[:, t]
        dz = dnew * (hp - hh)
        dhp = dnew * z
        if lbr:
            dr = dph * q_all[:, t]
            dq = dph * r
            dq_all[:, t] = dq  # type: ignore[index]  # allocated with lbr
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
        dwb = sum_steps(dG)
        # ignore: with lbr, d_rec_h is dq_all, which is allocated then
        return np.concatenate([dwb, dwb[:, : 2 * H], sum_steps(d_rec_h)], axis=1)  # type: ignore[arg-type]

    return tuple(input_grads(c, s, dG, W, dR, dB, dh))


# -- LSTM --------------------------------------------------------------------------------------------
def _lstm(c, X, W, R, B=None, seq_lens=None, h0=None, c0=None, P=None):
    s = setup("LSTM", c, X, W, R, seq_lens)
    H = s.H
    coupled = bool(c.attr("input_forget", 0))
    Xd, xw = input_projection(s, X, W)
    if B is not None:
        xw += (B[:, : 4 * H] + B[:, 4 * H:])[:, None, None, :]
    if P is not None:  # peepholes [i o f], broadcast over the batch
        p_i, p_o, p_f = (P[:, None, k * H:(k + 1) * H] for k in range(3))
    Rt = R.transpose(0, 2, 1)
    h_all = np.empty((s.D, s.T + 1, s.B, H), X.dtype)
    c_all = np.empty_like(h_all)
    h_all[:, 0] = initial_state(s, h0, X.dtype)
    c_all[:, 0] = initial_state(s, c0, X.dtype)
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
        a[..., :H] = activate(s.acts, 0, clip_gate(pre[..., :H], s.clip))
        if coupled:  # input_forget: f = 1 - i
            a[..., 2 * H: 3 * H] = 1 - a[..., :H]
        else:
            a[..., 2 * H: 3 * H] = activate(s.acts, 0, clip_gate(pre[..., 2 * H: 3 * H], s.clip))
        a[..., 3 * H:] = activate(s.acts, 1, clip_gate(pre[..., 3 * H:], s.clip))
        c_new = a[..., 2 * H: 3 * H] * cp + a[..., :H] * a[..., 3 * H:]
        if P is not None:  # the output gate peeks at the *new* cell state
            pre[..., H: 2 * H] += p_o * c_new
        a[..., H: 2 * H] = activate(s.acts, 0, clip_gate(pre[..., H: 2 * H], s.clip))
        if keep is not None:
            keep[:, t] = np.abs(pre) <= s.clip
        hc = activate(s.acts, 2, c_new)
        hc_all[:, t] = hc
        c_all[:, t + 1] = masked(s, t, c_new, cp)
        h_all[:, t + 1] = masked(s, t, a[..., H: 2 * H] * hc, hp)
    save_inputs(c, s, Xd)
    c.save(h_all=h_all, c_all=c_all, gates=gates, hc=hc_all, keep=keep, coupled=coupled)
    return outputs(c, s, h_all, c_all)


def _lstm_vjp(c, gY=None, gYh=None, gYc=None):
    s: Setup = c.saved["setup"]
    H = s.H
    W, R = c.inputs[1], c.inputs[2]
    P = c.inputs[7] if len(c.inputs) > 7 else None
    h_all, c_all, gates, hc_all, keep, coupled = (
        c.saved[k] for k in ("h_all", "c_all", "gates", "hc", "keep", "coupled"))
    dY, dh = output_errors(s, gY, gYh, W.dtype)
    dc = np.zeros_like(dh) if gYc is None else np.array(initial_state(s, gYc, W.dtype), W.dtype)
    if P is not None:
        p_i, p_o, p_f = (P[:, None, k * H:(k + 1) * H] for k in range(3))
    dact = np.empty(gates.shape, W.dtype)  # activation derivatives of i, o, f, c~ (times keep)
    dact[..., : 3 * H] = activation_slope(s.acts, 0, gates[..., : 3 * H])
    dact[..., 3 * H:] = activation_slope(s.acts, 1, gates[..., 3 * H:])
    if keep is not None:
        dact *= keep
    dhc_all = activation_slope(s.acts, 2, hc_all)
    dG = np.empty(gates.shape, W.dtype)
    for t in range(s.T - 1, -1, -1):
        a = gates[:, t]
        i, o, f, g = a[..., :H], a[..., H: 2 * H], a[..., 2 * H: 3 * H], a[..., 3 * H:]
        cp = c_all[:, t]
        if dY is not None:
            dh = dh + dY[:, t]
        dh_new, dh_pass = split_masked(s, t, dh)
        dc_new, dc_pass = split_masked(s, t, dc)
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
        db = sum_steps(dG)
        return np.concatenate([db, db], axis=1)

    grads = input_grads(c, s, dG, W, dR, dB, dh)
    needs = list(c.needs) + [False] * 8
    n_in = len(c.inputs)
    grads.append(state_out(s, dc) if needs[6] and n_in > 6 and c.inputs[6] is not None else None)
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
        if not isinstance(want, Rows):  # NONE
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
# only when W needs an error (see save_inputs); the rest is saved state.
_PLANNING: dict[str, Any] = dict(batch=BatchRule(_rnn_batch), flops=_rnn_flops)
defop("RNN", _rnn, _rnn_vjp, keep=("x1", "x2"), differentiable=(0, 1, 2, 3, 5), **_PLANNING)
defop("GRU", _gru, _gru_vjp, keep=("x1", "x2"), differentiable=(0, 1, 2, 3, 5), **_PLANNING)
defop("LSTM", _lstm, _lstm_vjp, keep=("x1", "x2", "x7"), differentiable=(0, 1, 2, 3, 5, 6, 7), **_PLANNING)
