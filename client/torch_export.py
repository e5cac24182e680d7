"""How ``gradserve.torch`` turns a torch module and its loss into a gradserve Model.

torch's exporter is given a wrapper (:class:`_Functional`) whose *graph inputs* are the module's
parameters and buffers (``torch.func.functional_call``), so no exporter optimisation can fold,
transpose, pack or merge a parameter: nothing of theirs is constant. Those inputs then become the
Model's parameters, named as in ``module.named_parameters()`` (trainable ones), or Constant nodes
(frozen parameters and buffers: no dL/dw is computed for them). ``named_parameters()`` yields a
tied weight once, so it is one parameter whose gradient sums its uses, as in torch.

The exporter is torch's default (dynamo) one with its optimizer: it keeps shape-dependent control
flow honest (torch guards what the legacy tracer would bake in silently) and removes the sequence
ops and shape arithmetic it can; with the parameters as inputs it has nothing of theirs to fold.
"""

from __future__ import annotations

import logging
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from gradserve.client.onnx_import import load_onnx
from gradserve.worker.graph import GraphError, Model

LossFn = Callable[..., torch.Tensor]
_NUMPY_DTYPES = {
    torch.float16,
    torch.float32,
    torch.float64,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.bool,
}
_DROPOUT = (
    torch.nn.Dropout,
    torch.nn.Dropout1d,
    torch.nn.Dropout2d,
    torch.nn.Dropout3d,
    torch.nn.AlphaDropout,
    torch.nn.FeatureAlphaDropout,
)
_BATCH_NORM = torch.nn.modules.batchnorm._BatchNorm


@dataclass(frozen=True)
class TorchMapping:
    """How a module's tensors and a call's arguments map onto an exported Model.

    ``params``: the trainable parameters, Model parameters of the same names. ``constants``: frozen
    parameters and buffers, sent as Model constants. ``inputs``: the feed name of each positional
    argument, ``batch_axes`` its batch axis (None: not batched). ``static_batch``: the batch size
    the graph is fixed to when torch could not export it with a symbolic one (else None).
    ``padding_rows``: embedding rows torch gives no gradient (``padding_idx``), zeroed here.
    """

    params: tuple[str, ...]
    constants: tuple[str, ...]
    inputs: tuple[str, ...]
    batch_axes: tuple[int | None, ...]
    static_batch: int | None = None
    padding_rows: tuple[tuple[str, int], ...] = ()  # (trainable embedding weight, padding_idx)

    def feeds(self, args: Sequence[Any]) -> dict[str, np.ndarray]:
        """The feeds of a job on ``args`` (the same positional arguments as the export's)."""
        if len(args) != len(self.inputs):
            raise TypeError(f"the model was exported with {len(self.inputs)} arguments, got {len(args)}")
        return {name: numpy_of(a, f"argument {k}") for k, (name, a) in enumerate(zip(self.inputs, args))}

    def accumulate(self, module: torch.nn.Module, grads: dict[str, np.ndarray]) -> None:
        """Add each parameter's dL/dw to its ``.grad`` (created if None), in the parameter's dtype
        and device, as ``loss.backward()`` does. Parameters missing from ``grads`` are left alone."""
        named = dict(module.named_parameters())
        with torch.no_grad():
            for name in self.params:
                if name not in grads:
                    continue
                p = named[name]
                g = torch.as_tensor(np.asarray(grads[name])).to(dtype=p.dtype, device=p.device).reshape(p.shape)
                if p.grad is None:
                    p.grad = g
                else:
                    p.grad.add_(g)

    def padding_rows_zeroed(self, grads: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``grads`` with the padding row of each ``nn.Embedding(padding_idx=...)`` weight zeroed,
        as torch keeps it: the export writes the lookup as a plain Gather."""
        grads = dict(grads)
        for name, row in self.padding_rows:
            if name in grads:
                grads[name] = np.array(grads[name])
                grads[name][row] = 0
        return grads

    def check_padding(self, model: Model) -> None:
        """Zeroing the padding row is exact only where the lookup is the weight's one use."""
        for name, _ in self.padding_rows:
            readers = [n for n in model.nodes if name in n.inputs]
            if len(readers) > 1:
                raise GraphError(
                    f"parameter '{name}' is an nn.Embedding weight with padding_idx that the loss also "
                    f"reads elsewhere ({readers[1]}): its padding row's gradient cannot be told apart; "
                    "use padding_idx=None (the padding row then trains like any other)"
                )


def export_graph(
    module: torch.nn.Module, args: tuple, loss_fn: LossFn | None, batch_axis: int | Sequence[int | None] | None
) -> tuple[onnx.ModelProto, TorchMapping]:
    """The weightless ONNX graph of the loss and how the module's state and ``args`` map onto it."""
    check_args(args)
    axes = batch_axes(args, batch_axis)
    trainable, constants = _split_state(module)
    inputs = _input_names(len(args), {*trainable, *constants})
    with _dropout_off(module):
        proto, static = _export_proto(module, args, loss_fn, axes, trainable, constants, inputs)
    return proto, TorchMapping(
        tuple(trainable), tuple(constants), inputs, axes, static, _padding_rows(module, trainable)
    )


def _padding_rows(module: torch.nn.Module, trainable: dict[str, torch.Tensor]) -> tuple[tuple[str, int], ...]:
    names = {id(t): n for n, t in trainable.items()}
    return tuple(
        (names[id(m.weight)], m.padding_idx % m.num_embeddings)
        for m in module.modules()
        if isinstance(m, torch.nn.Embedding) and m.padding_idx is not None and id(m.weight) in names
    )


def as_args(args: Sequence[Any] | torch.Tensor) -> tuple[Any, ...]:
    """Example arguments as a tuple (one tensor may be given alone)."""
    return (args,) if isinstance(args, torch.Tensor) else tuple(args)


def check_args(args: Sequence[Any]) -> None:
    """TypeError naming the first argument that is not a tensor."""
    if not args:
        raise TypeError("the module needs at least one tensor argument (the batch)")
    for k, a in enumerate(args):
        if not isinstance(a, torch.Tensor):
            raise TypeError(f"argument {k} is a {type(a).__name__}; gradserve.torch takes tensor arguments only")


def batch_axes(args: Sequence[torch.Tensor], batch_axis: int | Sequence[int | None] | None) -> tuple[int | None, ...]:
    """One batch axis (or None) per argument; ValueError naming the argument that does not fit."""
    if batch_axis is None or isinstance(batch_axis, int):
        axis: int | None = batch_axis or 0
        axes = tuple(axis if a.dim() > 0 else None for a in args)
    else:
        axes = tuple(batch_axis)
        if len(axes) != len(args):
            raise ValueError(f"batch_axis has {len(axes)} entries for {len(args)} arguments")
    sizes: dict[int, int] = {}
    for k, (a, axis) in enumerate(zip(args, axes)):
        if axis is None:
            continue
        if not -a.dim() <= axis < a.dim():
            raise ValueError(
                f"argument {k} (shape {tuple(a.shape)}) has no axis {axis} to be the batch axis; pass batch_axis="
            )
        sizes[k] = a.shape[axis]
    if len(set(sizes.values())) > 1:
        first = next(iter(sizes))
        odd = next(k for k, s in sizes.items() if s != sizes[first])
        raise ValueError(
            f"cannot infer the batch axis: argument {odd} has size {sizes[odd]} on axis {axes[odd]} where "
            f"argument {first} has {sizes[first]} on axis {axes[first]}; pass batch_axis= (an axis, or one per "
            "argument, None for an unbatched one)"
        )
    return tuple(None if ax is None else ax % args[k].dim() for k, ax in enumerate(axes))


def _split_state(module: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Trainable parameters, and the rest of the state (frozen parameters, buffers), by name.
    ``named_parameters()`` yields a tied weight once, so it becomes one parameter."""
    trainable: dict[str, torch.Tensor] = {n: p for n, p in module.named_parameters() if p.requires_grad}
    constants: dict[str, torch.Tensor] = {n: p for n, p in module.named_parameters() if not p.requires_grad}
    constants.update(module.named_buffers())
    for name, t in {**trainable, **constants}.items():
        if t.dtype not in _NUMPY_DTYPES:
            raise TypeError(
                f"'{name}' has dtype {t.dtype}, which gradserve does not carry "
                "(floating parameters: float16, float32, float64)"
            )
    return trainable, constants


def _input_names(n: int, taken: set[str]) -> tuple[str, ...]:
    names = []
    for k in range(n):
        name = f"input_{k}"
        while name in taken:
            name = f"_{name}"
        names.append(name)
    return tuple(names)


class _dropout_off:
    """Dropout modules in training mode switched to eval for the export (gradserve has no random
    masks: its Dropout is the identity), with one warning naming them (``warn``)."""

    def __init__(self, module: torch.nn.Module, warn: bool = True) -> None:
        self.active = [(n, m) for n, m in module.named_modules() if isinstance(m, _DROPOUT) and m.training and m.p > 0]
        self.warn = warn

    def __enter__(self) -> None:
        if self.active and self.warn:
            names = ", ".join(n or "(the module)" for n, _ in self.active[:3])
            more = f" and {len(self.active) - 3} more" if len(self.active) > 3 else ""
            warnings.warn(
                f"gradserve.torch: dropout runs as the identity (gradserve has no random masks): "
                f"{names}{more}; set p=0 or call .eval() on them to silence this",
                stacklevel=3,
            )
        for _, m in self.active:
            m.training = False

    def __exit__(self, *exc: object) -> None:
        for _, m in self.active:
            m.training = True


class _Functional(torch.nn.Module):
    """The module and its loss as a function of (trainable parameters, other state, arguments)."""

    def __init__(
        self, module: torch.nn.Module, trainable: Sequence[str], constants: Sequence[str], loss_fn: LossFn | None
    ) -> None:
        super().__init__()
        self.module, self.trainable, self.constants, self.loss_fn = module, list(trainable), list(constants), loss_fn

    def forward(self, params: list[torch.Tensor], state: list[torch.Tensor], args: list[torch.Tensor]) -> torch.Tensor:
        # clones: BatchNorm in training mode updates its running statistics in place, and torch's
        # exporter cannot write a graph that mutates its own inputs
        values = {**dict(zip(self.trainable, params)), **{n: s.clone() for n, s in zip(self.constants, state)}}
        if self.loss_fn is None:
            return _loss_of(torch.func.functional_call(self.module, values, tuple(args)))
        target = args[-1]
        output = torch.func.functional_call(self.module, values, tuple(args[:-1]))
        return self.loss_fn(output, *(target if isinstance(target, (tuple, list)) else (target,)))


def _loss_of(output: Any) -> torch.Tensor:
    loss = getattr(output, "loss", output)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise GraphError(
            "the module's output is not a scalar loss (nor has a .loss); pass loss_fn= "
            "(the loss is then loss_fn(module(*args[:-1]), args[-1]))"
        )
    return loss.reshape(())


def _export_proto(
    module: torch.nn.Module,
    args: Sequence[torch.Tensor],
    loss_fn: LossFn | None,
    axes: Sequence[int | None],
    trainable: dict[str, torch.Tensor],
    constants: dict[str, torch.Tensor],
    inputs: Sequence[str],
) -> tuple[onnx.ModelProto, int | None]:
    """The ONNX graph of the loss, every parameter, buffer and argument a graph input; and the
    batch size it is fixed to when torch could not export a symbolic one (else None)."""
    wrapper = _Functional(module, list(trainable), list(constants), loss_fn)
    state = ([p.detach() for p in trainable.values()], [c.detach() for c in constants.values()])
    with torch.no_grad():  # one eager call first: a module that gives no loss fails in ms, not after tracing
        wrapper(*state, list(args))
    names = [*trainable, *constants, *inputs]
    dims = [None if ax is None else a.shape[ax] for a, ax in zip(args, axes)]
    batched = any(d is not None for d in dims)
    if batched:
        # torch.export specialises a dimension of size 1: trace a batch of two (the values do not matter)
        example = [a if ax is None or a.shape[ax] != 1 else torch.cat([a, a], ax) for a, ax in zip(args, axes)]
        batch = torch.export.Dim("batch")
        dynamic = (
            [None] * len(trainable),
            [None] * len(constants),
            [None if ax is None else {ax: batch} for ax in axes],
        )
        try:
            proto, any_batch = _onnx_export(wrapper, (*state, example), names, dynamic)
        except GraphError as exc:
            if not _is_constraint_error(exc):
                raise
        else:
            if any_batch and not _fixed_batch(proto, inputs, axes):
                return _name_batch(proto, inputs, axes), None
    # the module's code fixes the batch size, or branches on it: a graph for this call's batch
    static = next((d for d in dims if d is not None), None)
    return _onnx_export(wrapper, (*state, list(args)), names, None)[0], static


def _onnx_export(wrapper: torch.nn.Module, args: tuple, names: list[str], dynamic: Any) -> tuple[onnx.ModelProto, bool]:
    """torch's dynamo exporter with its optimizer (with every parameter a graph input, the optimizer
    has nothing of theirs to fold; it removes the sequence ops and shape arithmetic it can), and
    whether the graph holds for any batch size (False: torch found the code fixes or branches on it)."""
    quiet = logging.getLogger("torch.onnx")  # it logs a line per torchvision op it cannot register
    level = quiet.level
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quiet.setLevel(logging.ERROR)
        try:
            program = torch.onnx.export(
                wrapper,
                args,
                dynamo=True,
                dynamic_shapes=dynamic,
                input_names=names,
                output_names=["loss"],
                verbose=False,
                optimize=True,
            )
        except Exception as exc:  # noqa: BLE001 -- torch's errors are long; keep its summary line
            raise GraphError(f"torch could not export the module: {_summary(exc)}") from exc
        finally:
            quiet.setLevel(level)
    assert program is not None  # dynamo=True always returns an ONNXProgram
    return program.model_proto, _unrestricted(program.exported_program)


def _fixed_batch(proto: onnx.ModelProto, inputs: Sequence[str], axes: Sequence[int | None]) -> bool:
    """torch declared a size for the batch axis: the code fixed it (``x.reshape(6, -1)``)."""
    declared = {vi.name: vi.type.tensor_type.shape.dim for vi in proto.graph.input}
    return any(declared[n][ax].HasField("dim_value") for n, ax in zip(inputs, axes) if ax is not None and n in declared)


def _unrestricted(exported: Any) -> bool:
    """No shape symbol (the batch) is limited to a range: code that branches on the batch size
    (``if x.shape[0] > 4``) gives a graph that holds for part of the sizes only."""
    for symbol, bounds in getattr(exported, "range_constraints", {}).items():
        # torch's int_oo says it is finite (a sympy assumption), but it is above any size
        if str(symbol).startswith("s") and (bounds.lower > 1 or not bounds.upper > sys.maxsize):
            return False
    return True


def _name_batch(proto: onnx.ModelProto, inputs: Sequence[str], axes: Sequence[int | None]) -> onnx.ModelProto:
    """torch names the batch dimension 's0' or 's33'; gradserve's plans and errors say 'batch'."""
    declared = {vi.name: vi for vi in proto.graph.input}
    symbol = next(
        (
            declared[n].type.tensor_type.shape.dim[ax].dim_param
            for n, ax in zip(inputs, axes)
            if ax is not None and n in declared
        ),
        "",
    )
    if symbol:
        g = proto.graph
        for vi in [*g.input, *g.value_info, *g.output]:
            for d in vi.type.tensor_type.shape.dim:
                if d.dim_param == symbol:
                    d.dim_param = "batch"
    return proto


def _is_constraint_error(exc: BaseException) -> bool:
    """torch.export refused a symbolic batch (the code fixes the batch size)."""
    text = f"{exc} {exc.__cause__}"
    return "Constraint" in text or "specializ" in text or "guard" in text.lower()


def _summary(exc: BaseException) -> str:
    cause = exc.__cause__ or exc
    lines = [ln.strip() for ln in str(cause).splitlines() if ln.strip()]
    return f"{type(cause).__name__}: {lines[0] if lines else ''}"


def to_model(proto: onnx.ModelProto, module: torch.nn.Module, mapping: TorchMapping) -> Model:
    """The Model of an exported graph with the module's current state: trainable parameters become
    initializers (parameters), the rest of the state Constant nodes (constants)."""
    state = state_of(module)
    model = onnx.ModelProto()
    model.CopyFrom(proto)  # the export holds no weights (they were inputs): a cheap copy
    graph = model.graph
    state_inputs = {*mapping.params, *mapping.constants}
    kept = [vi for vi in graph.input if vi.name not in state_inputs]
    present = {vi.name for vi in graph.input}
    del graph.input[:]
    graph.input.extend(kept)
    # the exporter's own initializers (a 2.0, a mask) are constants of the graph, not parameters
    constants = [helper.make_node("Constant", [], [t.name], name=f"const/{t.name}", value=t) for t in graph.initializer]
    constants += [
        helper.make_node(
            "Constant", [], [n], name=f"state/{n}", value=numpy_helper.from_array(numpy_of(state[n], f"'{n}'"), n)
        )
        for n in mapping.constants
        if n in present
    ]
    del graph.initializer[:]
    graph.initializer.extend(numpy_helper.from_array(numpy_of(state[n], f"'{n}'"), n) for n in mapping.params)
    nodes = constants + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    return load_onnx(model, loss=graph.output[0].name, batch_norm=_batch_norm_mode(module))


def _batch_norm_mode(module: torch.nn.Module) -> str:
    """``"batch"`` when the module's BatchNorms normalise with batch statistics (training mode, or
    no running statistics): torch's exporter writes them in their inference form."""
    norms = [(n, m) for n, m in module.named_modules() if isinstance(m, _BATCH_NORM)]
    batch = [n for n, m in norms if m.training or not m.track_running_stats]
    if batch and len(batch) < len(norms):
        running = next(n for n, m in norms if n not in batch)
        raise GraphError(
            f"BatchNorm '{batch[0]}' normalises with batch statistics and '{running}' with running "
            "ones; gradserve.torch exports modules whose BatchNorms are all in one mode"
        )
    return "batch" if batch else "as-exported"


def state_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def numpy_of(t: Any, what: str) -> np.ndarray:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} is a {type(t).__name__}, not a tensor")
    if t.dtype not in _NUMPY_DTYPES:
        raise TypeError(f"{what} has dtype {t.dtype}, which gradserve does not carry")
    return t.detach().cpu().numpy()


def batch_statistics_buffers(module: torch.nn.Module) -> frozenset[str]:
    """The running statistics of BatchNorms in training mode: inputs of their nodes that do not
    change the loss (they normalise with the batch's statistics)."""
    return frozenset(
        f"{n}.{b}" if n else b
        for n, m in module.named_modules()
        if isinstance(m, _BATCH_NORM) and m.training
        for b, t in m.named_buffers(recurse=False)
        if t is not None
    )


def update_running_statistics(module: torch.nn.Module, args: Sequence[torch.Tensor], loss_fn: LossFn | None) -> None:
    """What torch's training forward does besides the loss: BatchNorms in training mode update
    their running statistics. A gradient job returns gradients only, so one forward here, without
    autograd, on the same arguments and weights (and dropout as the job ran it, the identity)."""
    with torch.no_grad(), _dropout_off(module, warn=False):
        module(*(args[:-1] if loss_fn is not None else args))
