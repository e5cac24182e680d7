"""Spatial layers against torch autograd through real ONNX exports (both exporters): ConvTranspose,
Resize (nearest and bilinear upsampling), GroupNormalization, LRN, and a small U-Net that uses them
together. Each module returns an MSE loss; tests/torch_oracle.py compares the loss and every dL/dw."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from torch_oracle import EXPORTERS, check_module


class WithLoss(nn.Module):
    """``body(x)`` compared with ``target`` by MSE."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x, target):
        return F.mse_loss(self.body(x), target)


class Interpolate(nn.Module):
    """A conv, then F.interpolate (Resize) by a factor of 2, then a conv."""

    def __init__(self, mode: str, align_corners: bool | None):
        super().__init__()
        self.a, self.b = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 2, 3, padding=1)
        self.mode, self.align_corners = mode, align_corners

    def forward(self, x):
        y = F.interpolate(self.a(x), scale_factor=2, mode=self.mode, align_corners=self.align_corners)
        return self.b(y)


class UNet(nn.Module):
    """conv -> GroupNorm -> ReLU -> down (max pool or stride-2 conv) -> conv -> up (ConvTranspose2d or
    Upsample + conv) -> concat with the skip -> conv."""

    def __init__(self, down: str = "pool", up: str = "transpose"):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU())
        self.down = nn.MaxPool2d(2) if down == "pool" else nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.mid = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU())
        if up == "transpose":
            self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        else:
            self.up = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(16, 8, 3, padding=1))
        self.dec = nn.Conv2d(16, 2, 3, padding=1)

    def forward(self, x):
        skip = self.enc(x)
        y = self.up(self.mid(self.down(skip)))
        return self.dec(torch.cat([y, skip], dim=1))


def data(c_in: int, c_out_size: tuple[int, ...], dtype, shape=(3, 8, 8), batch: int = 2):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((batch,) + shape, generator=gen, dtype=dtype)
    target = torch.randn((batch,) + c_out_size, generator=gen, dtype=dtype)
    return x, target


def run(body: nn.Module, in_shape, out_shape, tmp_path, exporter, dtype=torch.float64):
    module = WithLoss(body).to(dtype)
    x, target = data(in_shape[0], out_shape, dtype, in_shape)
    check_module(module, (x, target), ["x", "target"], tmp_path, exporter=exporter)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_conv_transpose(exporter, tmp_path):
    torch.manual_seed(0)
    body = nn.Sequential(
        nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2),
        nn.Tanh(),
        nn.ConvTranspose2d(6, 3, (2, 3), stride=1, dilation=(1, 2), bias=False),
    )
    run(body, (4, 5, 4), (3, 11, 12), tmp_path, exporter)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_upsample_nearest(exporter, tmp_path):
    torch.manual_seed(0)
    body = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(3, 2, 3, padding=1)
    )
    run(body, (2, 5, 6), (2, 10, 12), tmp_path, exporter)


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("exporter", EXPORTERS)
def test_interpolate_bilinear(exporter, align_corners, tmp_path):
    torch.manual_seed(0)
    run(Interpolate("bilinear", align_corners), (2, 5, 6), (2, 10, 12), tmp_path, exporter)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_group_norm(exporter, tmp_path):
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.GroupNorm(3, 6), nn.ReLU(), nn.Conv2d(6, 2, 1))
    run(body, (3, 6, 5), (2, 6, 5), tmp_path, exporter)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_local_response_norm(exporter, tmp_path):
    """(The legacy exporter writes LocalResponseNorm as Pad/AveragePool with an If on its rank, which
    import folds away.)"""
    torch.manual_seed(0)
    body = nn.Sequential(
        nn.Conv2d(3, 7, 3, padding=1), nn.LocalResponseNorm(3, alpha=0.1, beta=0.75, k=1.5), nn.Conv2d(7, 2, 1)
    )
    run(body, (3, 5, 5), (2, 5, 5), tmp_path, exporter)


@pytest.mark.parametrize("down,up", [("pool", "transpose"), ("conv", "upsample")])
@pytest.mark.parametrize("exporter", EXPORTERS)
def test_unet(exporter, down, up, tmp_path):
    torch.manual_seed(0)
    run(UNet(down, up), (3, 8, 8), (2, 8, 8), tmp_path, exporter)


def test_unet_float32(tmp_path):
    torch.manual_seed(0)
    run(UNet("pool", "transpose"), (3, 8, 8), (2, 8, 8), tmp_path, "dynamo", dtype=torch.float32)
