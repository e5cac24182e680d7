"""Elementwise ops. Binary ops broadcast like numpy; their VJPs undo it with ``unbroadcast``.
Unary VJPs are ``g * f'(x)``, written with the output ``c.y`` where that is cheaper."""

from __future__ import annotations

import math

import numpy as np

from gradserve.worker.ops.registry import defop, unbroadcast

# -- binary, broadcasting ---------------------------------------------------------------------------
defop("Add", lambda c, a, b: a + b,
      lambda c, g: (unbroadcast(g, c.inputs[0].shape), unbroadcast(g, c.inputs[1].shape)), keep=())
defop("Sub", lambda c, a, b: a - b,
      lambda c, g: (unbroadcast(g, c.inputs[0].shape), unbroadcast(-g, c.inputs[1].shape)), keep=())
defop("Mul", lambda c, a, b: a * b,
      lambda c, g: (unbroadcast(g * c.inputs[1], c.inputs[0].shape) if c.needs[0] else None,
                    unbroadcast(g * c.inputs[0], c.inputs[1].shape) if c.needs[1] else None), keep="x")
defop("Div", lambda c, a, b: a / b,
      lambda c, g: (unbroadcast(g / c.inputs[1], c.inputs[0].shape) if c.needs[0] else None,
                    unbroadcast(-g * c.y / c.inputs[1], c.inputs[1].shape) if c.needs[1] else None))

# -- unary ----------------------------------------------------------------------------------------------
defop("Neg", lambda c, x: -x, lambda c, g: -g, keep=())
defop("Exp", lambda c, x: np.exp(x), lambda c, g: g * c.y, keep="y")
defop("Tanh", lambda c, x: np.tanh(x), lambda c, g: g * (1 - c.y * c.y), keep="y")
defop("Relu", lambda c, x: np.maximum(x, 0), lambda c, g: g * (c.y > 0), keep="y")
