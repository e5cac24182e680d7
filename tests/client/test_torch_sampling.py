"""Sampling layers against torch autograd through real ONNX exports: GridSample (a spatial transformer,
and a learned sampling grid for each padding and interpolation mode; both exporters) and Col2Im (an
nn.Unfold -> Linear -> nn.Fold block; the dynamo exporter only: the legacy exporter has no Col2Im at
opset 17). tests/torch_oracle.py compares the loss and every dL/dw."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from torch_oracle import EXPORTERS, check_module


class SpatialTransformer(nn.Module):
    """A conv + linear localisation net predicts an affine theta (starting near the identity), whose
    sampling grid resamples the input; then a conv, and an MSE loss against the target.

    ``affine_grid`` exports only with the dynamo exporter (the legacy one has no AffineGrid at opset 17);
    with ``manual_grid`` the grid is built from theta by a matrix product with the base grid instead,
    which both exporters write, so theta's gradient reaches the localisation net through GridSample's
    grid error either way."""

    def __init__(self, size: tuple[int, int], manual_grid: bool = False):
        super().__init__()
        self.loc = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 6)
        )
        with torch.no_grad():  # near the identity transform, as an STN is usually initialised
            self.loc[-1].weight.mul_(0.1)
            self.loc[-1].bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]))
        self.head = nn.Conv2d(2, 3, 3, padding=1)
        self.size, self.manual_grid = size, manual_grid
        h, w = size
        ys = (torch.arange(h) * 2 + 1) / h - 1  # pixel centres, align_corners=False
        xs = (torch.arange(w) * 2 + 1) / w - 1
        base = torch.stack([xs.expand(h, w), ys[:, None].expand(h, w), torch.ones(h, w)], dim=-1)
        self.register_buffer("base", base.reshape(1, h * w, 3))

    def forward(self, x, target):
        theta = self.loc(x).view(-1, 2, 3)
        if self.manual_grid:
            grid = torch.matmul(self.base.to(x.dtype), theta.transpose(1, 2)).view(-1, *self.size, 2)
        else:
            grid = F.affine_grid(theta, [x.shape[0], x.shape[1], *self.size], align_corners=False)
        y = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return F.mse_loss(self.head(y), target)


class LearnedGrid(nn.Module):
    """A conv, then F.grid_sample with a learned grid (one for the whole batch), then a conv."""

    def __init__(self, out: tuple[int, int], mode: str, padding_mode: str, align_corners: bool):
        super().__init__()
        self.a, self.b = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 2, 3, padding=1)
        gen = torch.Generator().manual_seed(1)
        self.grid = nn.Parameter(torch.rand((1, *out, 2), generator=gen) * 2.6 - 1.3)  # some points outside
        self.mode, self.padding_mode, self.align_corners = mode, padding_mode, align_corners

    def forward(self, x, target):
        grid = self.grid.to(x.dtype).expand(x.shape[0], -1, -1, -1)
        y = F.grid_sample(
            self.a(x), grid, mode=self.mode, padding_mode=self.padding_mode, align_corners=self.align_corners
        )
        return F.mse_loss(self.b(y), target)


class FoldBlock(nn.Module):
    """nn.Unfold into overlapping patches, a Linear on each patch, nn.Fold back (summing overlaps)."""

    def __init__(self, channels: int, size: tuple[int, int], kernel, stride, padding, dilation=1):
        super().__init__()
        kw = dict(kernel_size=kernel, stride=stride, padding=padding, dilation=dilation)
        k = kernel if isinstance(kernel, tuple) else (kernel, kernel)
        self.unfold, self.fold = nn.Unfold(**kw), nn.Fold(size, **kw)
        self.proj = nn.Linear(channels * k[0] * k[1], channels * k[0] * k[1])
        self.conv = nn.Conv2d(channels, channels, 1)

    def forward(self, x, target):
        cols = self.unfold(self.conv(x))  # (N, C*k*k, L)
        cols = self.proj(cols.transpose(1, 2)).transpose(1, 2)
        return F.mse_loss(self.fold(cols), target)


def data(in_shape, out_shape, dtype, batch: int = 2):
    gen = torch.Generator().manual_seed(0)
    return (
        torch.randn((batch, *in_shape), generator=gen, dtype=dtype),
        torch.randn((batch, *out_shape), generator=gen, dtype=dtype),
    )


def run(module: nn.Module, in_shape, out_shape, tmp_path, exporter, dtype=torch.float64, rtol=None):
    module = module.to(dtype)
    check_module(module, data(in_shape, out_shape, dtype), ["x", "target"], tmp_path, exporter=exporter, rtol=rtol)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_spatial_transformer_manual_grid(exporter, tmp_path):
    torch.manual_seed(0)
    run(SpatialTransformer((6, 7), manual_grid=True), (2, 8, 8), (3, 6, 7), tmp_path, exporter)


def test_spatial_transformer_affine_grid(tmp_path):
    """The dynamo exporter writes F.affine_grid as a constant base grid times theta (Mul, ReduceSum).
    It bakes that base grid in float32 precision (-0.83333331 for -5/6) even in a float64 model, so
    the exported model itself differs from torch's by ~1e-7 relative: hence the looser tolerance."""
    torch.manual_seed(0)
    run(SpatialTransformer((6, 7)), (2, 8, 8), (3, 6, 7), tmp_path, "dynamo", rtol=2e-6)


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("padding_mode", ["zeros", "border", "reflection"])
@pytest.mark.parametrize("align_corners", [False, True])
def test_learned_grid(padding_mode, align_corners, exporter, tmp_path):
    torch.manual_seed(0)
    run(LearnedGrid((5, 6), "bilinear", padding_mode, align_corners), (2, 7, 8), (2, 5, 6), tmp_path, exporter)


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("mode,padding_mode", [("bicubic", "border"), ("bicubic", "reflection"), ("nearest", "zeros")])
def test_learned_grid_modes(mode, padding_mode, exporter, tmp_path):
    """Nearest gives the grid no gradient (torch's is zero too); the convs before it still get theirs."""
    torch.manual_seed(0)
    run(LearnedGrid((4, 5), mode, padding_mode, False), (2, 6, 6), (2, 4, 5), tmp_path, exporter)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_learned_grid_float32(exporter, tmp_path):
    torch.manual_seed(0)
    run(LearnedGrid((5, 6), "bilinear", "border", False), (2, 7, 8), (2, 5, 6), tmp_path, exporter, torch.float32)


@pytest.mark.parametrize(
    "kernel,stride,padding,dilation", [(3, 2, 1, 1), (2, 2, 0, 1), ((3, 2), (1, 2), (1, 0), (2, 1))]
)
def test_unfold_linear_fold(kernel, stride, padding, dilation, tmp_path):
    torch.manual_seed(0)
    run(FoldBlock(2, (8, 8), kernel, stride, padding, dilation), (2, 8, 8), (2, 8, 8), tmp_path, "dynamo")


def test_unfold_linear_fold_float32(tmp_path):
    torch.manual_seed(0)
    run(FoldBlock(2, (8, 8), 3, 2, 1), (2, 8, 8), (2, 8, 8), tmp_path, "dynamo", torch.float32)
