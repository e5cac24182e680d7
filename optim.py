"""``gradserve.optim``: optimizers as torch.optim defines them (SGD, Adam, AdamW), param groups,
clipping by global norm and learning-rate schedules, in numpy. The code lives in
:mod:`gradserve.worker.optim`, since the workers that hold the weights apply it;
``from_torch`` (in :mod:`gradserve.client.torch_optim`) maps a ``torch.optim`` optimizer to these and
imports torch only when called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gradserve.worker.optim import (
    CLIP_EPS,
    SGD,
    Adam,
    AdamW,
    Optimizer,
    ParamGroups,
    Schedule,
    State,
    check_schedule,
    clip_scale,
    local_sq_norm,
    lr_at,
)

__all__ = [
    "CLIP_EPS",
    "SGD",
    "Adam",
    "AdamW",
    "Optimizer",
    "ParamGroups",
    "Schedule",
    "State",
    "check_schedule",
    "clip_scale",
    "from_torch",
    "local_sq_norm",
    "lr_at",
]

if TYPE_CHECKING:  # pragma: no cover
    from gradserve.client.torch_optim import from_torch


def __getattr__(name: str) -> Any:
    if name == "from_torch":  # on first use: the client layer, and torch only when it is called
        from gradserve.client.torch_optim import from_torch

        globals()[name] = from_torch
        return from_torch
    raise AttributeError(f"module 'gradserve.optim' has no attribute {name!r}")
