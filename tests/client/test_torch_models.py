"""End to end against PyTorch: export a torch model to ONNX, run ``gradserve grad`` on it, and compare
the loss and every dL/dw with torch autograd (float32 and float64)."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch.nn import functional as F

import models as M
from gradserve.client.cli import main as cli_main

# Tolerances relative to the largest |torch gradient| of each parameter.
RTOL = {torch.float32: 1e-4, torch.float64: 1e-9}


def _case(arch: str, dtype: torch.dtype, batch: int = 4, seed: int = 1):
    """(net without loss, its input name, example input, label-ish target) for one architecture."""
    gen = torch.Generator().manual_seed(seed)
    if arch == "mlp":
        net = M.make_mlp()
        x = torch.randn(batch, 8, generator=gen, dtype=dtype)
        target = torch.rand(batch, 4, generator=gen, dtype=dtype)
        return net.to(dtype), "x", x, target
    if arch == "cnn":
        net = M.make_cnn()
        x = torch.randn(batch, 3, 12, 12, generator=gen, dtype=dtype)
        return net.to(dtype), "x", x, torch.randint(0, 5, (batch,), generator=gen)
    net = M.make_transformer()
    tokens = torch.randint(0, 20, (batch, 6), generator=gen)
    return net.to(dtype), "tokens", tokens, torch.randint(0, 3, (batch,), generator=gen)


def _torch_loss_fn(arch: str):
    return F.mse_loss if arch == "mlp" else F.cross_entropy


def _torch_grads(net: torch.nn.Module, loss: torch.Tensor) -> dict[str, np.ndarray]:
    net.zero_grad()
    loss.backward()
    return {k: p.grad.detach().numpy().copy() for k, p in net.named_parameters()}


def _run_cli(model: Path, feeds: dict[str, np.ndarray], tmp: Path, *extra: str, subprocess_run: bool = False):
    feeds_path, out_path = tmp / "feeds.npz", tmp / "grads.npz"
    np.savez(feeds_path, **feeds)
    argv = ["grad", str(model), "--feeds", str(feeds_path), "--out", str(out_path), "-q", *extra]
    if subprocess_run:
        script = Path(sys.executable).parent / "gradserve"
        cmd = [str(script)] if script.exists() else [sys.executable, "-m", "gradserve.client.cli"]
        proc = subprocess.run(cmd + argv, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
    else:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            status = cli_main(argv)
        assert status == 0, err.getvalue()
    with np.load(out_path) as data:
        return {k: data[k] for k in data.files}


def _onnx_name_for(torch_name: str, value: np.ndarray, initializers: dict[str, np.ndarray]) -> tuple[str, bool]:
    """The initializer holding a torch parameter, and whether it holds it transposed.

    The exporter keeps state_dict names, except where constant folding rewrote a parameter: then
    ``Linear`` weights before ``MatMul`` become a new initializer "onnx::MatMul_N" holding W^T."""
    if torch_name in initializers:
        return torch_name, False
    for name, init in initializers.items():
        if init.shape == value.shape and np.array_equal(init, value):
            return name, False
        if value.ndim == 2 and init.shape == value.T.shape and np.array_equal(init, value.T):
            return name, True
    raise AssertionError(f"no ONNX initializer holds torch parameter {torch_name}")


def _compare(net, torch_loss: float, torch_grads, got: dict[str, np.ndarray], onnx_path: Path, dtype) -> None:
    initializers = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(onnx_path)).graph.initializer}
    rtol = RTOL[dtype]
    assert abs(float(got["loss"]) - torch_loss) <= rtol * max(abs(torch_loss), 1e-3), (float(got["loss"]), torch_loss)
    state = {k: v.detach().numpy() for k, v in net.named_parameters()}
    # A gradient that is zero up to rounding (the bias of a conv feeding train-mode BatchNorm, whose
    # mean subtraction cancels it) has no scale of its own: measure it against the model's largest.
    floor = 1e-2 * max(float(np.max(np.abs(g))) for g in torch_grads.values())
    for name, want in torch_grads.items():
        onnx_name, transposed = _onnx_name_for(name, state[name], initializers)
        g = got[onnx_name].T if transposed else got[onnx_name]
        assert g.shape == want.shape and g.dtype == want.dtype, (name, g.shape, g.dtype)
        err = float(np.max(np.abs(g - want)))
        scale = float(np.max(np.abs(want)))
        assert err <= rtol * max(scale, floor), f"dL/d{name}: max abs error {err:.3g}, max |grad| {scale:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("arch", ["mlp", "cnn", "transformer"])
def test_loss_inside_model(arch, dtype, tmp_path):
    """The exported graph's only output is the scalar loss."""
    net, x_name, x, target = _case(arch, dtype)
    wrapped = (M.WithMSE if arch == "mlp" else M.WithCrossEntropy)(net)
    loss = wrapped(x, target)
    grads = _torch_grads(wrapped, loss)  # named "net.0.weight" ...: the exporter keeps these names
    target_name = "target" if arch == "mlp" else "labels"
    path = M.export(wrapped, (x, target), tmp_path / "model.onnx", [x_name, target_name], ["loss"])
    got = _run_cli(path, {x_name: x.numpy(), target_name: target.numpy()}, tmp_path)
    _compare(wrapped, loss.item(), grads, got, path, dtype)


@pytest.mark.parametrize(
    "arch,spec",
    [
        ("mlp", "mse"),
        ("mlp", "mse:pred:y"),
        ("cnn", "cross_entropy:logits:labels"),
        ("transformer", "cross_entropy:logits:labels"),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_logits_model_with_loss_spec(arch, spec, dtype, tmp_path):
    """The exported graph outputs predictions/logits; ``--loss`` appends the loss torch computes."""
    net, x_name, x, target = _case(arch, dtype)
    out_name = "pred" if arch == "mlp" else "logits"
    loss = _torch_loss_fn(arch)(net(x), target)
    grads = _torch_grads(net, loss)
    path = M.export(net, (x,), tmp_path / "model.onnx", [x_name], [out_name])
    target_name = spec.split(":")[2] if spec.count(":") == 2 else "target"
    got = _run_cli(path, {x_name: x.numpy(), target_name: target.numpy()}, tmp_path, "--loss", spec)
    _compare(net, loss.item(), grads, got, path, dtype)


def test_dynamic_batch_transformer(tmp_path):
    """Exported with a symbolic batch, the Shape -> Gather -> Concat -> Reshape chains stay in the graph
    and the same file serves two batch sizes."""
    net, _, x, target = _case("transformer", torch.float64)
    path = M.export(net, (x,), tmp_path / "model.onnx", ["tokens"], ["logits"], dynamic_batch=True)
    for batch in (3, 7):
        _, _, xb, tb = _case("transformer", torch.float64, batch=batch, seed=batch)
        loss = F.cross_entropy(net(xb), tb)
        grads = _torch_grads(net, loss)
        got = _run_cli(path, {"tokens": xb.numpy(), "labels": tb.numpy()}, tmp_path, "--loss", "cross_entropy::labels")
        _compare(net, loss.item(), grads, got, path, torch.float64)


def test_eval_mode_export_renames_folded_weights(tmp_path):
    """In eval mode the exporter constant-folds Transpose(W) of each Linear before a MatMul into a new
    initializer "onnx::MatMul_N" = W^T; gradients come back under that name, transposed."""
    net, _, x, target = _case("transformer", torch.float32)
    net.eval()  # no dropout or batch norm: same function, but the exporter folds constants
    loss = F.cross_entropy(net(x), target)
    grads = _torch_grads(net, loss)
    path = M.export(net, (x,), tmp_path / "model.onnx", ["tokens"], ["logits"])
    names = {i.name for i in onnx.load(str(path)).graph.initializer}
    assert "attn.qkv.weight" not in names and any(n.startswith("onnx::MatMul") for n in names)
    got = _run_cli(path, {"tokens": x.numpy(), "labels": target.numpy()}, tmp_path, "--loss", "cross_entropy::labels")
    _compare(net, loss.item(), grads, got, path, torch.float32)


def test_batchnorm_running_stats_are_inert_parameters(tmp_path):
    """In train mode BatchNormalization has training_mode=1 and reads the running statistics only
    to emit updated ones; they become "parameters" (floating initializers) with zero gradient, and
    num_batches_tracked is not exported at all."""
    net, _, x, target = _case("cnn", torch.float64)
    path = M.export(net, (x,), tmp_path / "model.onnx", ["x"], ["logits"])
    got = _run_cli(path, {"x": x.numpy(), "labels": target.numpy()}, tmp_path, "--loss", "cross_entropy::labels")
    for stat in ("bn1.running_mean", "bn1.running_var"):
        assert stat in got and not np.any(got[stat])
    assert "bn1.num_batches_tracked" not in got


def test_console_command(tmp_path):
    """The installed ``gradserve`` command (a subprocess) gives the same numbers."""
    net, _, x, target = _case("mlp", torch.float64)
    wrapped = M.WithMSE(net)
    loss = wrapped(x, target)
    grads = _torch_grads(wrapped, loss)
    path = M.export(wrapped, (x, target), tmp_path / "model.onnx", ["x", "target"], ["loss"])
    got = _run_cli(path, {"x": x.numpy(), "target": target.numpy()}, tmp_path, subprocess_run=True)
    _compare(wrapped, loss.item(), grads, got, path, torch.float64)
