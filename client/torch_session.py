"""``gradserve.torch.session``: train a torch module where gradserve computes, a step moving only the batch.

    session = gradserve.torch.session(model, x, y, optimizer=torch.optim.AdamW(model.parameters()),
                                      loss_fn=F.cross_entropy, client=client, partitions=2)
    for x, y in batches:
        loss = session.step(x, y)      # forward, backward and AdamW's update on the workers
    session.sync()                     # the trained weights back into model's parameters

:func:`gradserve.torch.backward` sends the module's weights with every step, so any torch
optimizer works unchanged; a session keeps them, and the optimizer's state, on the workers
(:mod:`gradserve.server.session`). The torch optimizer is mapped to :mod:`gradserve.optim`'s,
param groups included (:func:`gradserve.optim.from_torch`; what cannot be mapped is refused, named).
The module itself is only read at the start and written by :meth:`TorchSession.sync`.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from gradserve.client.torch_export import LossFn, TorchMapping
from gradserve.worker.graph import GraphError
from gradserve.worker.optim import Optimizer, ParamGroups, Schedule


class TorchSession:
    """A training session of a torch module (open it with :func:`session`)."""

    def __init__(self, module: torch.nn.Module, mapping: TorchMapping, inner: Any) -> None:
        self.module = module
        self.mapping = mapping
        self.inner = inner  # the engine's or the server's session

    @property
    def steps(self) -> int:
        """Optimizer steps applied so far."""
        return self.inner.steps

    def step(self, *args: torch.Tensor) -> float:
        """One training step on ``args`` (as the export's arguments); returns the loss (before
        the update) as a float."""
        return float(self.inner.step(self.mapping.feeds(args)).loss)

    def sync(self) -> None:
        """Copy the session's current weights into the module's parameters (in place)."""
        weights = self.inner.weights(list(self.mapping.params))
        named = dict(self.module.named_parameters())
        with torch.no_grad():
            for name, value in weights.items():
                p = named[name]
                p.copy_(
                    torch.tensor(np.asarray(value), dtype=p.dtype, device=p.device).reshape(p.shape)
                )  # a copy: Ray's arrays are read-only

    def close(self) -> None:
        """Close the session (its weights stay on the workers until then: :meth:`sync` first)."""
        self.inner.close()

    def __enter__(self) -> "TorchSession":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def session(
    module: torch.nn.Module,
    *example_args: torch.Tensor,
    optimizer: Any,
    engine: Any = None,
    client: Any = None,
    loss_fn: LossFn | None = None,
    batch_axis: int | Sequence[int | None] | None = None,
    max_norm: float | None = None,
    schedule: Schedule | None = None,
    **options: Any,
) -> TorchSession:
    """Open a training session of ``module`` (its loss formed as :func:`gradserve.torch.export`
    says, from ``example_args``) on ``engine`` (``gradserve.local(...)``; inline by default) or a
    server (``client``). ``optimizer``: a ``torch.optim`` SGD, Adam or AdamW over the module's
    parameters (its param groups are kept), or a :mod:`gradserve.optim` optimizer. ``max_norm``:
    clip by global norm (``clip_grad_norm_``); ``schedule``: the lr per step. Other keywords go to
    the session (``partitions=``, ``micro_batches=``, ``replicas=``; on a local engine also
    ``checkpoint_steps=``/``checkpoint_seconds=``, which a server sets for itself).

    Refused, naming the module: BatchNorm in training mode (its running statistics would not
    follow the steps; put it in eval mode, or train with :func:`gradserve.torch.backward`) and
    ``nn.Embedding(padding_idx=...)`` weights (their padding row would train).
    """
    from gradserve.client import torch as bridge  # the export cache and the shared inline engine

    if engine is not None and client is not None:
        raise ValueError("give engine= or client=, not both")
    _refuse_unfollowed_state(module)
    model, mapping = bridge.export(module, example_args, loss_fn, batch_axis=batch_axis)
    if mapping.padding_rows:
        name, row = mapping.padding_rows[0]
        raise GraphError(
            f"parameter '{name}' is an nn.Embedding weight with padding_idx={row}: a session would "
            "train its padding row; use gradserve.torch.backward, or padding_idx=None"
        )
    groups = _groups(optimizer, module)
    opener = client if client is not None else engine if engine is not None else bridge.inline_engine()
    inner = opener.session(model, groups, max_norm=max_norm, schedule=schedule, **options)
    return TorchSession(module, mapping, inner)


def _groups(optimizer: Any, module: torch.nn.Module) -> ParamGroups | Optimizer:
    if isinstance(optimizer, (Optimizer, ParamGroups)):
        return optimizer
    if isinstance(optimizer, torch.optim.Optimizer):
        from gradserve.client.torch_optim import from_torch

        base, overrides = from_torch(optimizer, module.named_parameters())
        return ParamGroups(base, overrides)
    raise TypeError(f"optimizer must be a torch.optim or gradserve.optim optimizer, not {optimizer!r}")


def _refuse_unfollowed_state(module: torch.nn.Module) -> None:
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats:
            raise GraphError(
                f"module '{name or type(module).__name__}' is a BatchNorm in training mode: a session "
                "would not update its running statistics; call .eval() on it (batch statistics are "
                "then the running ones), or train with gradserve.torch.backward"
            )
