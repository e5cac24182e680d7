"""What every engine returns for a gradient job."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Result:
    """The loss and dL/dw for every parameter (and dL/dx for inputs the caller asked for).

    ``info`` carries what the engine wants to report about the run: timings, the plan, which node
    ran which partition, and ``info["unreached"]``: the parameters the loss does not depend on
    (their dL/dw is zeros; torch would leave their ``.grad`` None, and an optimizer skips them).
    """

    loss: float
    grads: dict[str, np.ndarray]
    input_grads: dict[str, np.ndarray] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def to_npz_dict(self) -> dict[str, np.ndarray]:
        """The GRADS.npz layout: ``loss`` plus one array per parameter, keyed by parameter name
        (input gradients as ``input_grad/NAME``)."""
        out: dict[str, np.ndarray] = {"loss": np.asarray(self.loss)}
        for name, g in self.grads.items():
            if name == "loss":
                raise ValueError("a parameter named 'loss' clashes with the loss entry of GRADS.npz")
            out[name] = g
        for name, g in self.input_grads.items():
            out[f"input_grad/{name}"] = g
        return out
