"""Activations through real ONNX exports (torch's dynamo exporter and the legacy TorchScript one):
the loss and every dL/dw gradserve computes must equal torch autograd's (see tests/torch_oracle.py).

What the exporters emit (torch 2.13; ``test_emitted_ops`` pins this down): the dynamo exporter
(opset 20) writes HardSwish, HardSigmoid, Elu, Selu, Celu (after a Cast), PRelu, Mish, Gelu (both
approximations: the ``approximate`` attribute), Sin, Cos, Atan; it decomposes Softsign into
Abs/Add/Div, and folds eval-mode BatchNorm into the preceding Conv. The legacy exporter (opset 17)
writes HardSwish, HardSigmoid, Elu, Selu, Celu, PRelu, Sin, Cos, Atan as ops, and decomposes Mish
(Softplus/Tanh/Mul), Softsign (Abs/Add/Div), exact GELU (Div/Erf/Add/Mul) and tanh GELU (Mul/Add/Tanh);
it keeps BatchNormalization and writes the SE pool as GlobalAveragePool.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from torch_oracle import EXPORTERS, check_export, check_module, distinct_params_, export

ACTIVATIONS = {
    "hardswish": nn.Hardswish,
    "hardsigmoid": nn.Hardsigmoid,
    "elu": lambda: nn.ELU(alpha=0.7),
    "selu": nn.SELU,
    "celu": lambda: nn.CELU(alpha=1.3),
    "prelu": lambda: nn.PReLU(num_parameters=8, init=0.2),
    "mish": nn.Mish,
    "softsign": nn.Softsign,
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
}


# Where float64 cannot agree to 1e-9: ONNX's Celu is float32-only, so both exporters wrap it in
# Cast(float32) ... Cast(float64); torch's float64 Hardsigmoid backward uses the slope
# float(1.0f / 6.0f), 3e-8 relative off the 1/6 of its forward (gradserve differentiates the forward).
RTOL_FLOAT64 = {"celu": 1e-5, "hardsigmoid": 1e-7}


class ActivationMLP(nn.Module):
    """Linear -> activation -> Linear, then sin/cos/atan of the result, with an mse loss."""

    def __init__(self, act: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.act = act
        self.fc2 = nn.Linear(8, 5)
        self.to(dtype)

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        h = self.fc2(self.act(self.fc1(x)))
        h = torch.sin(h) + torch.cos(2 * h) + torch.atan(h)
        return F.mse_loss(h, target)


def mlp_args(dtype: torch.dtype, batch: int = 7):
    gen = torch.Generator().manual_seed(0)
    # scale 3: the hidden pre-activations reach both sides of every kink (Hardswish's +-3...)
    return (torch.randn(batch, 6, generator=gen, dtype=dtype) * 3, torch.randn(batch, 5, generator=gen, dtype=dtype))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``exported(name, exporter)``: the float64 ActivationMLP of that activation (its parameters made
    distinct) and its export, made once for the gradient check and ``test_emitted_ops``: a dynamo
    export takes seconds."""
    folder = tmp_path_factory.mktemp("activations")
    made: dict[tuple[str, str], tuple[nn.Module, Path]] = {}

    def get(name: str, exporter: str) -> tuple[nn.Module, Path]:
        if (name, exporter) not in made:
            torch.manual_seed(0)
            module = distinct_params_(ActivationMLP(ACTIVATIONS[name](), torch.float64))
            path = export(
                module, mlp_args(torch.float64), folder / f"{name}-{exporter}.onnx", ["x", "target"], exporter
            )
            made[name, exporter] = module, path
        return made[name, exporter]

    return get


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_mlp(name, exporter, exported):
    module, path = exported(name, exporter)
    check_export(module, mlp_args(torch.float64), ["x", "target"], path, rtol=RTOL_FLOAT64.get(name))


@pytest.mark.parametrize("name", ["hardswish", "gelu", "prelu"])
def test_activation_mlp_float32(name, tmp_path):
    torch.manual_seed(0)
    module = ActivationMLP(ACTIVATIONS[name](), torch.float32)
    check_module(module, mlp_args(torch.float32), ["x", "target"], tmp_path, exporter="dynamo")


class MobileNetV3Block(nn.Module):
    """Inverted residual with squeeze-and-excitation (MobileNetV3): 1x1 expand -> BatchNorm (eval) ->
    Hardswish -> depthwise 3x3 -> SE (pool -> 1x1 -> ReLU -> 1x1 -> Hardsigmoid -> scale) -> 1x1
    project -> residual add; then a global pool, a Linear and cross entropy."""

    def __init__(self, channels: int = 4, expand: int = 12, squeeze: int = 3, classes: int = 5):
        super().__init__()
        self.expand = nn.Conv2d(channels, expand, 1, bias=False)
        self.bn = nn.BatchNorm2d(expand)
        self.act = nn.Hardswish()
        self.depthwise = nn.Conv2d(expand, expand, 3, padding=1, groups=expand)
        self.se_reduce = nn.Conv2d(expand, squeeze, 1)
        self.se_expand = nn.Conv2d(squeeze, expand, 1)
        self.project = nn.Conv2d(expand, channels, 1)
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.act(self.bn(self.expand(x)))
        h = self.depthwise(h)
        s = F.adaptive_avg_pool2d(h, 1)
        s = F.hardsigmoid(self.se_expand(F.relu(self.se_reduce(s))))
        h = self.project(h * s) + x
        return F.cross_entropy(self.head(h.mean(dim=(2, 3))), labels)


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_mobilenet_v3_block(exporter, dtype, tmp_path):
    torch.manual_seed(0)
    module = MobileNetV3Block().to(dtype)
    with torch.no_grad():  # eval-mode BatchNorm with statistics that are not the identity
        module.bn.running_mean.uniform_(-0.5, 0.5)
        module.bn.running_var.uniform_(0.5, 2.0)
    module.eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 6, 6, generator=gen, dtype=dtype) * 2
    labels = torch.randint(0, 5, (3,), generator=gen)
    # optimize=False: the dynamo exporter's optimizer would fold the eval-mode BatchNorm into the expand
    # conv's weight, which then copies no torch parameter (the oracle maps gradients back by value).
    # rtol: torch's float64 Hardsigmoid backward uses the slope float(1.0f / 6.0f), 3e-8 off 1/6.
    check_module(
        module,
        (x, labels),
        ["x", "labels"],
        tmp_path,
        exporter=exporter,
        optimize=False,
        rtol=1e-7 if dtype == torch.float64 else None,
    )


def _op_types(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_emitted_ops(exporter, exported):
    """The ONNX ops each exporter writes for these layers (documents which of our ops the exports use):
    in the exports test_activation_mlp checked."""
    found = {name: _op_types(exported(name, exporter)[1]) for name in ACTIVATIONS}
    assert {"Sin", "Cos", "Atan"} <= found["elu"]
    for name, op in [
        ("hardswish", "HardSwish"),
        ("hardsigmoid", "HardSigmoid"),
        ("elu", "Elu"),
        ("selu", "Selu"),
        ("celu", "Celu"),
        ("prelu", "PRelu"),
    ]:
        assert op in found[name], (name, sorted(found[name]))
    dynamo = exporter == "dynamo"
    assert ("Mish" in found["mish"]) == dynamo, sorted(found["mish"])
    assert "Softsign" not in found["softsign"] and "Div" in found["softsign"]  # both decompose it
    if dynamo:
        assert "Gelu" in found["gelu"] and "Gelu" in found["gelu_tanh"]
    else:
        assert "Erf" in found["gelu"] and "Tanh" in found["gelu_tanh"]
