"""Everyday torch layers and blocks, each exported by both exporters and checked against torch
autograd (tests/torch_oracle.py): the models users bring, beyond the ones each op family tests."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradserve
import models as M
from gradcheck import assert_split_exact
from torch_oracle import EXPORTERS, check_export, distinct_params_, export

D = torch.float64


class Lambda(nn.Module):
    def __init__(self, fn: Callable, **modules: nn.Module):
        super().__init__()
        self.fn = fn
        for name, m in modules.items():
            setattr(self, name, m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self, x)


class ViT(nn.Module):
    """Patch embedding, a class token, learned positions, two pre-norm GELU encoder layers."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 2, 2)
        self.cls = nn.Parameter(torch.randn(1, 1, 8))
        self.pos = nn.Parameter(torch.randn(1, 10, 8))
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, norm_first=True, activation="gelu")
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch(x).flatten(2).transpose(1, 2)
        p = torch.cat([self.cls.expand(p.shape[0], -1, -1), p], 1) + self.pos
        return self.head(self.enc(p)[:, 0])


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7, channels-last LayerNorm, GELU MLP, layer scale, residual."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.ln = nn.LayerNorm(c)
        self.pw1, self.pw2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.full((c,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pw2(F.gelu(self.pw1(self.ln(self.dw(x).permute(0, 2, 3, 1))))) * self.gamma
        return x + y.permute(0, 3, 1, 2)


class TCN(nn.Module):
    """Causal dilated 1-D convolutions (pad, then cut the future off) with a residual."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv1d(4, 6, 3, dilation=2, padding=4), nn.Conv1d(6, 4, 3, padding=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.c2(F.relu(self.c1(x)[:, :, :-4]))[:, :, :-2]


class Seq2Seq(nn.Module):
    """nn.Transformer: encoder, decoder with a causal mask and cross-attention."""

    def __init__(self):
        super().__init__()
        self.t = nn.Transformer(8, 2, 1, 1, 16, dropout=0.0, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], dtype=x.dtype)
        return self.t(x, x * 0.5, tgt_mask=mask, tgt_is_causal=True)


class DenseBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)
        self.t = nn.Conv2d(12, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.a(x))
        b = F.relu(self.b(torch.cat([x, a], 1)))
        return F.avg_pool2d(self.t(torch.cat([x, a, b], 1)), 2)


class ShiftedWindows(nn.Module):
    """Swin's cyclic shift and window partition: roll, view, permute, attention inside windows."""

    def __init__(self):
        super().__init__()
        self.v = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 4, 4, C=4), 2x2 windows
        b = x.shape[0]
        y = torch.roll(x, shifts=(-1, -1), dims=(1, 2))
        w = y.view(b, 2, 2, 2, 2, 4).permute(0, 1, 3, 2, 4, 5).reshape(-1, 4, 4)
        w = torch.softmax(w @ w.transpose(1, 2), -1) @ self.v(w)
        return w.reshape(b, 2, 2, 2, 2, 4).permute(0, 1, 3, 2, 4, 5).reshape(b, 4, 4, 4)


def _img(c: int = 4, hw: int = 6) -> torch.Tensor:
    return torch.randn(3, c, hw, hw, dtype=D)


def _seq() -> torch.Tensor:
    return torch.randn(3, 5, 8, dtype=D)


def _vec() -> torch.Tensor:
    return torch.randn(3, 8, dtype=D)


# name -> (network, example input)
CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor]]] = {
    "multihead_attention": (
        lambda: Lambda(
            lambda s, x: s.m(x, x, x, need_weights=False)[0], m=nn.MultiheadAttention(8, 2, batch_first=True)
        ),
        _seq,
    ),
    "vit": (ViT, lambda: _img(3)),
    "convnext_block": (ConvNeXtBlock, lambda: _img(8, 7)),
    "tcn": (TCN, lambda: torch.randn(3, 4, 9, dtype=D)),
    "seq2seq_transformer": (Seq2Seq, _seq),
    "dense_block": (DenseBlock, _img),
    "shifted_windows": (ShiftedWindows, lambda: torch.randn(3, 4, 4, 4, dtype=D)),
    "pixel_shuffle": (lambda: nn.Sequential(nn.Conv2d(4, 8, 1), nn.PixelShuffle(2), nn.PixelUnshuffle(2)), _img),
    "adaptive_pools": (
        lambda: nn.Sequential(nn.Conv2d(4, 4, 1), nn.AdaptiveMaxPool2d(3), nn.AdaptiveAvgPool2d(1)),
        _img,
    ),
    "reflect_replicate_pad": (
        lambda: nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(4, 4, 3), nn.ReplicationPad2d(1)),
        _img,
    ),
    "normalize_cosine": (
        lambda: Lambda(
            lambda s, x: F.normalize(s.a(x), dim=-1) * F.cosine_similarity(s.a(x), s.b(x)).unsqueeze(1),
            a=nn.Linear(8, 4),
            b=nn.Linear(8, 4),
        ),
        _vec,
    ),
    "glu_shrinks_relu6_silu": (
        lambda: nn.Sequential(
            nn.Linear(8, 16),
            nn.GLU(),
            nn.Tanhshrink(),
            nn.Softshrink(0.1),
            nn.ReLU6(),
            nn.Linear(8, 8),
            nn.SiLU(),
            nn.LogSigmoid(),
        ),
        _vec,
    ),
    "std_var_chunk": (
        lambda: Lambda(
            lambda s, x: (
                torch.cat(list(reversed(s.l(x).chunk(3, -1))), -1) / s.l(x).std(-1, keepdim=True)
                + s.l(x).var(-1, keepdim=True)
            ),
            l=nn.Linear(8, 9),
        ),
        _vec,
    ),
    "unfold": (lambda: Lambda(lambda s, x: F.unfold(s.c(x), 2), c=nn.Conv2d(4, 4, 1)), _img),
    "sort_roll_flip": (
        lambda: Lambda(lambda s, x: torch.flip(torch.roll(torch.sort(s.l(x), 1)[0], 2, 1), [1]), l=nn.Linear(8, 8)),
        _vec,
    ),
    "masked_fill_clamp": (
        lambda: Lambda(lambda s, x: s.l(x).masked_fill(x > 0.5, 0.0).clamp(-0.5, 0.5), l=nn.Linear(8, 8)),
        _vec,
    ),
}


# The dynamo exporter stores Softshrink's lambda as a float32 constant (0.1 + 1.5e-9), so a float64
# graph differs from torch's by that much.
RTOL = {("glu_shrinks_relu6_silu", "dynamo"): 1e-6}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``exported(case, exporter)``: the case's network with an mse loss (its parameters made distinct),
    a batch of 6 samples ``(x, target)`` and their export with a dynamic batch, made once for both
    tests below: an export takes seconds."""
    folder = tmp_path_factory.mktemp("layers")
    made: dict[tuple[str, str], tuple[nn.Module, tuple[torch.Tensor, torch.Tensor], Path]] = {}

    def get(case: str, exporter: str) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor], Path]:
        if (case, exporter) not in made:
            make, example = CASES[case]
            torch.manual_seed(0)
            net = make().to(D)
            x = torch.cat([example(), example()])  # 6 samples
            with torch.no_grad():
                target = torch.randn(net(x).shape, dtype=D)
            module = distinct_params_(M.WithMSE(net))
            path = export(module, (x, target), folder / f"{case}-{exporter}.onnx", ["x", "target"], exporter)
            made[case, exporter] = module, (x, target), path
        return made[case, exporter]

    return get


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("case", list(CASES))
def test_layer_matches_torch(case, exporter, exported):
    module, args, path = exported(case, exporter)
    check_export(module, args, ["x", "target"], path, rtol=RTOL.get((case, exporter)))


# Blocks whose exports route the batch through attention's layouts ((T, B*H, d) heads, (T*B, E)
# rows), a class token expanded to the batch, shape arithmetic ONNX's inference cannot follow.
SPLIT_CASES = ["multihead_attention", "seq2seq_transformer", "vit", "shifted_windows", "std_var_chunk", "unfold"]


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("case", SPLIT_CASES)
def test_layer_splits_into_micro_batches_exactly(case, exporter, exported):
    """Exported with a dynamic batch (the export test_layer_matches_torch checked), the model splits
    into 2 and 3 micro-batches whose weighted results equal the unsplit job's (run inline, chunk by
    chunk)."""
    _, (x, target), path = exported(case, exporter)
    assert_split_exact(gradserve.load_onnx(path), {"x": x.numpy(), "target": target.numpy()})
