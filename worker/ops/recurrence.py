"""What the three recurrent layers of :mod:`.rnn` share: their attributes, the sequence in each
direction's processing order, the masking of steps past a sample's length, the states in and out,
the gate activations, the input projection and the errors at the inputs.

Separate from the cells themselves (:mod:`.rnn`: the RNN, GRU and LSTM steps and their
backpropagation through time) so each cell reads as its own recurrence; everything here is the
same for all three.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from gradserve.worker.ops import blas
from gradserve.worker.ops.activations import sigmoid
from gradserve.worker.ops.registry import OpError, str_attr


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


def activate(names: Sequence[Sequence[str]], k: int, x: np.ndarray) -> np.ndarray:
    """Activation ``k`` of each direction applied to x (D, ...)."""
    if len({n[k] for n in names}) == 1:
        return _ACTIVATIONS[names[0][k]][0](x)
    return np.stack([_ACTIVATIONS[n[k]][0](x[d]) for d, n in enumerate(names)])


def activation_slope(names: Sequence[Sequence[str]], k: int, y: np.ndarray) -> np.ndarray:
    """Derivative of activation ``k`` of each direction, from its outputs y (D, ...)."""
    if len({n[k] for n in names}) == 1:
        return _ACTIVATIONS[names[0][k]][1](y)
    return np.stack([_ACTIVATIONS[n[k]][1](y[d]) for d, n in enumerate(names)])


# -- attributes, layout and sequence order ----------------------------------------------------------
@dataclass
class Setup:
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


def setup(op: str, c, X: np.ndarray, W: np.ndarray, R: np.ndarray, seq_lens: np.ndarray | None) -> Setup:
    """Check the attributes and shapes of one application of ``op`` and derive its :class:`Setup`."""
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
    return Setup(op, D, H, T, B, layout, reverse, acts, None if clip is None else float(clip), lens, order, mask)


def clip_gate(x: np.ndarray, clip: float | None) -> np.ndarray:
    """A gate activation's argument bounded to [-clip, clip] (the ``clip`` attribute), if set."""
    return x if clip is None else np.clip(x, -clip, clip)


def initial_state(s: Setup, h: np.ndarray | None, dtype) -> np.ndarray:
    """An initial state input ((D, B, H), or (B, D, H) in layout 1) as (D, B, H); zeros if absent."""
    if h is None:
        return np.zeros((s.D, s.B, s.H), dtype)
    h = h if s.layout == 0 else h.transpose(1, 0, 2)
    if h.shape != (s.D, s.B, s.H):
        # e.g. torch's LSTM(proj_size=...) exported anyway: ONNX LSTM has no projections
        raise OpError(f"{s.op}: an initial state has shape {h.shape} in (directions, batch, hidden) order; "
                      f"hidden_size is {s.H} (projections, torch's proj_size, are not part of ONNX {s.op})")
    return h


def state_out(s: Setup, h: np.ndarray) -> np.ndarray:
    """A (D, B, H) state in the op's layout (for Y_h / Y_c, and the errors of initial states)."""
    return h if s.layout == 0 else np.ascontiguousarray(h.transpose(1, 0, 2))


def _seq_major(s: Setup, X: np.ndarray) -> np.ndarray:
    return X if s.layout == 0 else X.transpose(1, 0, 2)


def outputs(c, s: Setup, h_all: np.ndarray, c_all: np.ndarray | None = None):
    """Y, Y_h (and Y_c) from the states (D, T+1, B, H) in processing order, as many as declared."""
    hs = h_all[:, 1:]
    if s.mask is not None:
        hs = hs * s.mask  # steps past a sample's length output zeros
    Y = np.stack([s.orient(hs[d], rev) for d, rev in enumerate(s.reverse)], axis=1)  # (T, D, B, H)
    if s.layout == 1:
        Y = np.ascontiguousarray(Y.transpose(2, 0, 1, 3))
    outs = [Y, state_out(s, h_all[:, -1].copy())]
    if c_all is not None:
        outs.append(state_out(s, c_all[:, -1].copy()))
    n = max(1, c.n_outputs)
    return outs[0] if n == 1 else tuple(outs[:n])


def input_projection(s: Setup, X: np.ndarray, W: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each direction's inputs (D, T, B, I) in processing order and X @ W^T for all steps at once
    (D, T, B, G*H): the recurrence then adds only H @ R^T per step."""
    Xd = s.per_direction(_seq_major(s, X))
    xw = blas.matmul(Xd.reshape(s.D, s.T * s.B, -1), W.transpose(0, 2, 1)).reshape(s.D, s.T, s.B, -1)
    return Xd, xw


def masked(s: Setup, t: int, new: np.ndarray, old: np.ndarray) -> np.ndarray:
    """The state after processing step t: ``new`` for samples still within their length."""
    return new if s.mask is None else np.where(s.mask[t] > 0, new, old)


def split_masked(s: Setup, t: int, g: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """The error at a state after step t split into (error at the step's new value, error that
    passes straight to the previous state because the step was past the sample's length)."""
    if s.mask is None:
        return g, None
    return g * s.mask[t], g * (1 - s.mask[t])


def output_errors(s: Setup, gY: np.ndarray | None, gYh: np.ndarray | None, dtype):
    """Errors at Y in processing order (D, T, B, H) (None if no error) and at the final state (D, B, H)."""
    dY = None
    if gY is not None:
        g = gY if s.layout == 0 else gY.transpose(1, 2, 0, 3)  # (T, D, B, H)
        dY = np.stack([s.orient(g[:, d], rev) for d, rev in enumerate(s.reverse)])
        if s.mask is not None:
            dY = dY * s.mask  # padded outputs are constant zeros
    dh = np.zeros((s.D, s.B, s.H), dtype) if gYh is None else np.array(initial_state(s, gYh, dtype), dtype)
    return dY, dh


def input_grads(c, s: Setup, dG: np.ndarray, W: np.ndarray, dR: Callable[[], np.ndarray],
                 dB: Callable[[], np.ndarray], dh0: np.ndarray):
    """Errors at X, W, R, B, sequence_lens and initial_h from the gate errors dG (D, T, B, G*H);
    dR and dB are computed only when asked for."""
    needs = list(c.needs) + [False] * 8
    n_in = len(c.inputs)
    dG2 = dG.reshape(s.D, s.T * s.B, -1)
    dX = dW = None
    if needs[0]:
        dXd = blas.matmul(dG2, W).reshape(s.D, s.T, s.B, -1)
        # ignore: sum() starts from 0, but there is at least one direction
        dXs: np.ndarray = sum(s.orient(dXd[d], rev) for d, rev in enumerate(s.reverse))  # type: ignore[assignment]
        dX = dXs if s.layout == 0 else np.ascontiguousarray(dXs.transpose(1, 0, 2))
    if needs[1]:
        Xd = c.saved["Xd"]
        dW = blas.matmul(dG2.transpose(0, 2, 1), Xd.reshape(s.D, s.T * s.B, -1))
    grads = [dX, dW, dR() if needs[2] else None, dB() if needs[3] and n_in > 3 else None, None,
             state_out(s, dh0) if needs[5] and n_in > 5 and c.inputs[5] is not None else None]
    return grads


def sum_steps(a: np.ndarray) -> np.ndarray:
    """(D, T, B, K) summed over steps and batch -> (D, K)."""
    return a.sum(axis=(1, 2))


def save_inputs(c, s: Setup, Xd: np.ndarray) -> None:
    """Save the setup, and the inputs in processing order when dW will read them, for the VJP."""
    # X is read only by dW: keep it (in processing order) only when W wants an error, so a layer whose
    # weights are frozen does not hold its input alive (X itself is not in ``keep``).
    c.save(setup=s, Xd=Xd if len(c.needs) > 1 and c.needs[1] else None)
