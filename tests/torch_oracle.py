"""PyTorch autograd as the oracle for whole models, through a real ONNX export by either exporter.

    check_module(module, (x, target), ["x", "target"], tmp_path, exporter="dynamo")

``module(*args)`` returns the scalar loss. The module is exported (``"dynamo"``: torch's default
exporter, opset 18+; ``"legacy"``: the TorchScript exporter at opset 17), imported with
``gradserve.load_onnx`` and run by the inline engine (or the engine given); the loss and every
dL/dw must equal torch autograd's.

Exporters rename, transpose, reorder and concatenate parameters (an LSTM's gates are packed into one
initializer per direction, a Linear's weight may be stored as W^T). So gradients are mapped back
*by value*: :func:`distinct_params_` makes every parameter element a distinct number, each element of
a floating ONNX initializer is found among them, and the gradient of every copy is summed into the
parameter element it copies (a tied weight stored twice gets both contributions, as in torch).
Initializers that copy no parameter are constants of the graph (0.5, sqrt(d)...) and are skipped.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
import torch

import gradserve

EXPORTERS = ("dynamo", "legacy")
RTOL = {torch.float32: 2e-4, torch.float64: 1e-8}


def distinct_params_(module: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Add small noise to every parameter, so no two elements share a value (LayerNorm's ones and
    zeros included): exported copies can then be traced back to the element they copy."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
    return module


def export(
    module: torch.nn.Module,
    args: Sequence[torch.Tensor],
    path: str | Path,
    input_names: Sequence[str],
    exporter: str = "dynamo",
    dynamic_batch: bool = True,
    opset: int | None = None,
    optimize: bool = True,
) -> Path:
    """Export ``module`` (returning the loss) to ``path`` with ``exporter``; axis 0 of every input is
    a symbolic batch when ``dynamic_batch``. The module's mode is kept: the legacy exporter writes a
    train-mode BatchNorm with batch statistics; the dynamo exporter always writes its inference form
    (and, with ``optimize``, folds it into the conv before it)."""
    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            dynamic_shapes = None
            if dynamic_batch:
                batch = torch.export.Dim("batch")
                dynamic_shapes = tuple({0: batch} if a.dim() > 0 else None for a in args)
            kwargs: dict[str, Any] = {"opset_version": opset} if opset else {}
            torch.onnx.export(
                module,
                tuple(args),
                str(path),
                input_names=list(input_names),
                output_names=["loss"],
                dynamo=True,
                dynamic_shapes=dynamic_shapes,
                verbose=False,
                optimize=optimize,
                **kwargs,
            )
        elif exporter == "legacy":
            dynamic_axes = (
                {n: {0: "batch"} for n, a in zip(input_names, args) if a.dim() > 0} if dynamic_batch else None
            )
            torch.onnx.export(
                module,
                tuple(args),
                str(path),
                input_names=list(input_names),
                output_names=["loss"],
                dynamic_axes=dynamic_axes,
                opset_version=opset or 17,
                dynamo=False,
                training=torch.onnx.TrainingMode.PRESERVE,
                do_constant_folding=False,
            )
        else:
            raise ValueError(f"unknown exporter {exporter!r}")
    return path


def torch_gradients(module: torch.nn.Module, args: Sequence[torch.Tensor]) -> tuple[float, dict[str, np.ndarray]]:
    """The loss and dL/dp of every parameter, by torch autograd."""
    module.zero_grad()
    loss = module(*args)
    loss.backward()
    grads = {
        k: p.grad.detach().numpy().copy() if p.grad is not None else np.zeros(tuple(p.shape))
        for k, p in module.named_parameters()
    }
    return float(loss.detach()), grads


def grads_by_value(onnx_path: Path, module: torch.nn.Module, got: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """gradserve's gradients of the ONNX initializers, summed back onto the torch parameters whose
    elements they copy (see the module docstring)."""
    params = {k: p.detach().numpy() for k, p in module.named_parameters()}
    where: dict[tuple, tuple[str, int]] = {}
    for name, value in params.items():
        for i, v in enumerate(value.reshape(-1)):
            key = (value.dtype.str, v.tobytes())
            assert key not in where, f"parameters {name} and {where[key][0]} share the value {v}: call distinct_params_"
            where[key] = (name, i)
    mapped = {k: np.zeros_like(v) for k, v in params.items()}
    covered = {k: np.zeros(v.size, bool) for k, v in params.items()}
    for init in onnx.load(str(onnx_path)).graph.initializer:
        value = onnx.numpy_helper.to_array(init)
        if value.dtype.kind != "f" or init.name not in got:
            continue
        hits = [where.get((value.dtype.str, v.tobytes())) for v in value.reshape(-1)]
        if not any(hits):
            continue  # a constant of the graph, not a copy of a parameter
        assert all(hits), f"initializer {init.name} mixes parameter values with others"
        grad = np.asarray(got[init.name]).reshape(-1)
        for (name, i), g in zip(hits, grad):
            mapped[name].reshape(-1)[i] += g
            covered[name][i] = True
    for name, mask in covered.items():
        assert mask.all(), f"torch parameter {name}: no ONNX initializer holds {int((~mask).sum())} of its elements"
    return mapped


def check_module(
    module: torch.nn.Module,
    args: Sequence[torch.Tensor],
    input_names: Sequence[str],
    tmp_path: Path,
    exporter: str = "dynamo",
    dynamic_batch: bool = True,
    engine: Any = None,
    rtol: float | None = None,
    optimize: bool = True,
    batch_norm: str = "as-exported",
    opset: int | None = None,
    **run: Any,
) -> gradserve.Result:
    """Export ``module`` (returning a scalar loss), run it through gradserve and assert the loss and
    every dL/dw equal torch autograd's. ``optimize`` and ``opset`` go to the exporter, ``batch_norm``
    to ``gradserve.load_onnx``, ``run`` to ``engine.gradients`` (micro_batches=...). Returns
    gradserve's result."""
    distinct_params_(module)
    # torch first: the export runs the module again (a train-mode BatchNorm updates its statistics)
    want = torch_gradients(module, args)
    path = export(
        module,
        args,
        tmp_path / f"{type(module).__name__}-{exporter}.onnx",
        input_names,
        exporter,
        dynamic_batch,
        opset=opset,
        optimize=optimize,
    )
    return _compare(module, args, input_names, path, want, engine, rtol, batch_norm, run)


def check_export(
    module: torch.nn.Module,
    args: Sequence[torch.Tensor],
    input_names: Sequence[str],
    path: Path,
    engine: Any = None,
    rtol: float | None = None,
    batch_norm: str = "as-exported",
    **run: Any,
) -> gradserve.Result:
    """:func:`check_module` on an export of ``module`` made already (by :func:`export`, after
    :func:`distinct_params_`), for tests that share one export: the loss and every dL/dw gradserve
    computes from ``path`` must equal torch autograd's on ``module``."""
    return _compare(module, args, input_names, path, torch_gradients(module, args), engine, rtol, batch_norm, run)


def _compare(
    module: torch.nn.Module,
    args: Sequence[torch.Tensor],
    input_names: Sequence[str],
    path: Path,
    want_gradients: tuple[float, dict[str, np.ndarray]],
    engine: Any,
    rtol: float | None,
    batch_norm: str,
    run: dict[str, Any],
) -> gradserve.Result:
    want_loss, want = want_gradients
    model = gradserve.load_onnx(path, batch_norm=batch_norm)
    feeds = {n: a.detach().numpy() for n, a in zip(input_names, args)}
    result = (engine or gradserve.local()).gradients(model, feeds, **run)
    dtype = next(module.parameters()).dtype
    rtol = rtol or RTOL[dtype]
    assert abs(float(result.loss) - want_loss) <= rtol * max(abs(want_loss), 1e-3), (float(result.loss), want_loss)
    got = grads_by_value(path, module, result.grads)
    # A gradient that is zero up to rounding (a conv bias before train-mode BatchNorm) has no scale of
    # its own: measure it against the model's largest.
    floor = 1e-2 * max(float(np.max(np.abs(g))) for g in want.values())
    for name, w in want.items():
        err = float(np.max(np.abs(got[name] - w)))
        scale = float(np.max(np.abs(w)))
        assert err <= rtol * max(scale, floor), f"dL/d{name}: max abs error {err:.3g}, max |grad| {scale:.3g}"
    return result
