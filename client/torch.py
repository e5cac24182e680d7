"""``gradserve.torch``: a torch module in, ``p.grad`` out (the ``gradserve[torch]`` extra).

    opt = torch.optim.AdamW(model.parameters())
    for x, y in batches:
        opt.zero_grad()
        loss = gradserve.torch.backward(model, x, y, loss_fn=F.cross_entropy, client=client)
        opt.step()

:func:`backward` is ``loss_fn(module(*args[:-1]), args[-1]).backward()`` computed by gradserve --
inline, on a :func:`gradserve.local` engine or on a server -- and :func:`export` the Model it runs.
:func:`session` trains the module where gradserve computes, its weights and optimizer state kept
there between steps (:mod:`gradserve.client.torch_session`).

The Model's parameters are the module's trainable ones under their ``named_parameters()`` names
(a tied weight once); frozen parameters and buffers are constants. How the export keeps them so
whatever torch's exporter optimises: :mod:`gradserve.client.torch_export`. Exports are cached per
module instance and structure (this module's ``_entry``); every call sends the current weights.
"""

from __future__ import annotations

import hashlib
import types
import weakref
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import onnx

try:
    import torch
except ImportError as exc:  # the core install has no torch
    raise ImportError("gradserve.torch needs PyTorch: pip install 'gradserve[torch]'") from exc

from gradserve.client.torch_export import (
    LossFn,
    TorchMapping,
    as_args,
    batch_axes,
    batch_statistics_buffers,
    check_args,
    export_graph,
    numpy_of,
    state_of,
    to_model,
    update_running_statistics,
)
from gradserve.client.torch_session import TorchSession, session
from gradserve.worker.graph import Model

if TYPE_CHECKING:
    from gradserve.server.inline import InlineEngine

__all__ = ["export", "backward", "session", "TorchMapping", "TorchSession"]


# -- export -----------------------------------------------------------------------------------------
def export(
    module: torch.nn.Module,
    example_args: Sequence[Any] | torch.Tensor,
    loss_fn: LossFn | None = None,
    *,
    batch_axis: int | Sequence[int | None] | None = None,
) -> tuple[Model, TorchMapping]:
    """Export ``module`` with its loss as a gradserve Model, parameters named as in
    ``module.named_parameters()``.

    The loss is ``loss_fn(module(*args[:-1]), args[-1])`` when ``loss_fn`` is given (the last
    argument is the target; a tuple there is unpacked: ``loss_fn(output, *target)``), else
    ``module(*args)`` itself: a scalar tensor, or an object with a scalar ``.loss`` (transformers'
    outputs). Arguments are tensors.

    The batch axis is symbolic: axis 0 of every argument by default (all must share its size),
    ``batch_axis=k`` for axis k of each, or a sequence with one axis (or None) per argument.
    The module's mode is kept: BatchNorm in training mode normalises with the batch's statistics,
    in eval mode with its running ones (constants). Dropout has no random masks here: modules in
    training mode run as the identity, with a warning naming them.
    """
    entry = _entry(module, as_args(example_args), loss_fn, batch_axis)  # shared with backward()
    return entry.model, entry.mapping


# -- backward ---------------------------------------------------------------------------------------
@dataclass
class _Entry:
    """A cached export: the weightless ONNX graph, its mapping, and the Model for one set of
    constant values (re-imported when the buffers or frozen parameters change)."""

    proto: onnx.ModelProto
    mapping: TorchMapping
    model: Model
    constants_digest: str
    used: frozenset[str]  # trainable parameters the loss reads (torch leaves the others' .grad alone)
    running_stats: frozenset[str]  # buffers that do not change the loss: BatchNorm statistics in training mode
    loss_fn: LossFn | None  # kept alive: the cache key holds ids of what it closes over


_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, _Entry]]" = weakref.WeakKeyDictionary()
_INLINE: "list[InlineEngine]" = []


def backward(
    module: torch.nn.Module,
    *args: torch.Tensor,
    engine: Any = None,
    client: Any = None,
    loss_fn: LossFn | None = None,
    batch_axis: int | Sequence[int | None] | None = None,
    update_running_stats: bool = True,
    **job_options: Any,
) -> float:
    """``loss.backward()`` by gradserve: computes the loss of ``module`` on ``args`` (see
    :func:`export` for how the loss is formed) and adds dL/dw to ``p.grad`` of every parameter
    that requires grad and that the loss reads. Returns the loss as a float.

    Runs inline by default, on ``engine`` (``gradserve.local(...)``) or on a server through
    ``client`` (a :class:`gradserve.Client`); ``job_options`` go to their ``gradients`` call
    (``partitions=``, ``micro_batches=``...). The export is cached per module and structure (mode,
    parameter and argument shapes, loss_fn); each call sends the module's current weights.

    BatchNorms in training mode update their running statistics as torch's forward would, by a
    forward pass here without autograd (a job returns gradients only); ``update_running_stats=False``
    skips it (the statistics then stay as they are).
    """
    if engine is not None and client is not None:
        raise ValueError("give engine= or client=, not both")
    entry = _entry(module, as_args(args), loss_fn, batch_axis)
    runner = client if client is not None else engine if engine is not None else inline_engine()
    result = runner.gradients(entry.model, entry.mapping.feeds(args), **job_options)
    grads = entry.mapping.padding_rows_zeroed({k: g for k, g in result.grads.items() if k in entry.used})
    entry.mapping.accumulate(module, grads)
    if update_running_stats and entry.running_stats:
        update_running_statistics(module, args, loss_fn)
    return float(result.loss)


def inline_engine() -> "InlineEngine":
    """The inline engine :func:`backward` and :func:`session` run on when given neither ``engine=``
    nor ``client=``: one per process, made at first use."""
    if not _INLINE:
        from gradserve.server.inline import InlineEngine

        _INLINE.append(InlineEngine())  # what gradserve.local() makes
    return _INLINE[0]


def _entry(
    module: torch.nn.Module, args: tuple, loss_fn: LossFn | None, batch_axis: int | Sequence[int | None] | None
) -> _Entry:
    """The cached export for this call, its Model carrying the module's current state."""
    check_args(args)
    axes = batch_axes(args, batch_axis)
    per_module = _CACHE.setdefault(module, {})
    key = _structure_key(module, args, axes, loss_fn)
    sized = (*key, _batch_size(args, axes))  # the key of an export torch fixed to one batch size
    entry = per_module.get(key) or per_module.get(sized)
    if entry is None:
        proto, mapping = export_graph(module, args, loss_fn, axes)
        model = to_model(proto, module, mapping)
        mapping.check_padding(model)
        used = frozenset(i for n in model.nodes for i in n.inputs) & set(mapping.params)
        running = batch_statistics_buffers(module) & set(mapping.constants)
        entry = _Entry(proto, mapping, model, _digest(module, mapping.constants, running), used, running, loss_fn)
        per_module[key if mapping.static_batch is None else sized] = entry
        return entry
    digest = _digest(module, entry.mapping.constants, entry.running_stats)
    if digest != entry.constants_digest:
        entry.model, entry.constants_digest = to_model(entry.proto, module, entry.mapping), digest
    state = state_of(module)
    entry.model = replace(entry.model, params={n: numpy_of(state[n], f"'{n}'") for n in entry.mapping.params})
    return entry


def _structure_key(
    module: torch.nn.Module, args: Sequence[torch.Tensor], axes: Sequence[int | None], loss_fn: LossFn | None
) -> tuple:
    """What the exported graph depends on besides weights: each submodule's type and mode, the
    state's names, shapes and dtypes (and which parameters train), the arguments' shapes but for the
    batch axis, and the loss function."""
    modules = tuple((n, type(m), m.training) for n, m in module.named_modules())
    state = tuple(
        (n, tuple(t.shape), t.dtype, isinstance(t, torch.nn.Parameter) and t.requires_grad)
        for n, t in state_of(module).items()
    )
    shapes = tuple((a.dtype, tuple(None if d == ax else s for d, s in enumerate(a.shape))) for a, ax in zip(args, axes))
    return modules, state, shapes, tuple(axes), _fn_key(loss_fn)


def _fn_key(fn: Any) -> Any:
    """A loss function by its code and what it closes over, so a lambda written in the loop body
    (a new object each step) reuses the export; other callables by themselves."""
    if isinstance(fn, types.FunctionType):
        cells = tuple(id(c.cell_contents) for c in fn.__closure__ or ())
        return fn.__code__, cells, id(fn.__defaults__), id(fn.__kwdefaults__)
    try:
        hash(fn)
    except TypeError:
        return id(fn)
    return fn


def _batch_size(args: Sequence[torch.Tensor], axes: Sequence[int | None]) -> int | None:
    return next((a.shape[ax] for a, ax in zip(args, axes) if ax is not None), None)


def _digest(module: torch.nn.Module, names: Sequence[str], ignored: frozenset[str]) -> str:
    """A hash of the constants' current values (buffers and frozen parameters are folded into the
    graph at import, so a change needs a new import), but for ``ignored`` ones, which do not change
    the loss (running statistics a training step updates: no re-import per step)."""
    state = state_of(module)
    h = hashlib.blake2b(digest_size=16)
    for name in (n for n in names if n not in ignored):
        h.update(name.encode())
        h.update(np.ascontiguousarray(numpy_of(state[name], f"'{name}'")).data)
    return h.hexdigest()
