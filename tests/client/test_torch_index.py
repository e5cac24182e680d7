"""Einsum and the indexing ops through real ONNX exports (both exporters), against torch autograd:
einsum attention, torch.gather + torch.cumsum, torch.topk(...).values.

Each test also records which ONNX ops the export holds, so a change of exporter is visible."""

from __future__ import annotations

import onnx
import pytest
import torch
from torch.nn import functional as F

from torch_oracle import EXPORTERS, check_module

D = 6


def _op_types(tmp_path, module, exporter) -> set[str]:
    path = tmp_path / f"{type(module).__name__}-{exporter}.onnx"
    return {n.op_type for n in onnx.load(str(path)).graph.node}


class EinsumAttention(torch.nn.Module):
    """Single-head attention written with einsum; mse loss."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.out = (torch.nn.Linear(D, D) for _ in range(4))

    def forward(self, x, target):
        q, k, v = self.q(x), self.k(x), self.v(x)
        # a scale exact in float32: dynamo stores a Python float like sqrt(D) rounded to float32
        scores = torch.einsum("bqd,bkd->bqk", q, k) * 0.375
        attended = torch.einsum("bqk,bkd->bqd", scores.softmax(-1), v)
        return F.mse_loss(self.out(attended), target)


class GatherCumsum(torch.nn.Module):
    """Picks entries of a projection per row with torch.gather, then a running sum along features."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(D, 2 * D)

    def forward(self, x, index):
        h = torch.tanh(self.proj(x))  # (batch, 2D)
        picked = torch.gather(h, 1, index)  # (batch, D): duplicates in index add
        running = torch.cumsum(picked, dim=1)
        # one mean: the legacy exporter casts a sum of two float64 means to float32
        return (torch.cat([running, torch.cumsum(h, dim=-1).flip(-1)], dim=1) ** 2).mean()


class TopKValues(torch.nn.Module):
    """Keeps the k largest features of a projection (values only)."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(D, 2 * D)
        self.head = torch.nn.Linear(3, 1)

    def forward(self, x):
        top = torch.topk(self.proj(x), 3, dim=-1).values
        return (self.head(top) ** 2).mean()


def _args(dtype):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 5, D, generator=gen, dtype=dtype)
    return x, torch.randn(4, 5, D, generator=gen, dtype=dtype)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_einsum_attention(tmp_path, exporter):
    module = EinsumAttention().double()
    check_module(module, _args(torch.float64), ["x", "target"], tmp_path, exporter=exporter)
    ops = _op_types(tmp_path, module, exporter)
    assert "Einsum" in ops, ops  # both exporters keep the equations as they are


def test_einsum_attention_float32(tmp_path):
    module = EinsumAttention()
    check_module(module, _args(torch.float32), ["x", "target"], tmp_path, exporter="legacy")


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_gather_cumsum(tmp_path, exporter):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, D, generator=gen, dtype=torch.float64)
    index = torch.randint(0, 2 * D, (4, D), generator=gen)
    index[:, 1] = index[:, 0]  # a guaranteed duplicate in every row
    module = GatherCumsum().double()
    check_module(module, (x, index), ["x", "index"], tmp_path, exporter=exporter)
    ops = _op_types(tmp_path, module, exporter)
    assert {"GatherElements", "CumSum"} <= ops, ops


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_topk_values(tmp_path, exporter):
    x = torch.randn(4, D, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    module = TopKValues().double()
    check_module(module, (x,), ["x"], tmp_path, exporter=exporter)
    assert "TopK" in _op_types(tmp_path, module, exporter)
