"""Small PyTorch models used as oracles for ONNX import, and a helper that exports them.

Each architecture comes in two flavours: a ``*WithLoss`` wrapper whose forward returns the scalar
training loss (so the exported ONNX graph's only output is the loss), and the bare network whose
output is logits/predictions (imported with a :class:`~gradserve.client.onnx_import.LossSpec`).

Models are built under a fixed seed by the ``make_*`` functions; call ``.double()`` for float64.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F


# -- MLP ----------------------------------------------------------------------------------------------
def make_mlp(seed: int = 0, n_in: int = 8, hidden: int = 16, n_out: int = 4) -> nn.Sequential:
    """Linear -> ReLU -> Linear -> Tanh -> Linear -> Sigmoid (keys "0.weight", "2.weight", ...)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(n_in, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.Tanh(),
        nn.Linear(hidden, n_out),
        nn.Sigmoid(),
    )


# -- CNN ----------------------------------------------------------------------------------------------
class SmallCNN(nn.Module):
    """Conv (stride 1, pad 1) -> BatchNorm (train mode) -> ReLU -> MaxPool -> grouped Conv (stride 2)
    -> ReLU -> AvgPool -> Conv 1x1 -> AdaptiveAvgPool(1) -> Flatten -> Linear. Input (N, 3, 12, 12)."""

    def __init__(self, n_classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, kernel_size=3, stride=1, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 8, kernel_size=3, stride=2, padding=1, groups=2)
        self.pool2 = nn.AvgPool2d(kernel_size=2, stride=1)
        self.conv3 = nn.Conv2d(8, 12, kernel_size=1)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(F.relu(self.bn1(self.conv1(x))))
        x = self.pool2(F.relu(self.conv2(x)))
        x = self.gap(self.conv3(x))
        return self.fc(torch.flatten(x, 1))


def make_cnn(seed: int = 0, n_classes: int = 5) -> SmallCNN:
    torch.manual_seed(seed)
    model = SmallCNN(n_classes)
    # Non-trivial BatchNorm affine parameters, so their gradients are not a special case.
    with torch.no_grad():
        model.bn1.weight.uniform_(0.5, 1.5)
        model.bn1.bias.uniform_(-0.5, 0.5)
    return model


# -- Transformer encoder block ------------------------------------------------------------------------
class SelfAttention(nn.Module):
    """Multi-head self-attention written out: Linear q/k/v, split heads, softmax(QK^T/sqrt(d))V."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads, self.d_head = n_heads, d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        # (B, T, D) -> (B, H, T, Dh)
        q, k, v = (z.reshape(b, t, self.n_heads, self.d_head).transpose(1, 2) for z in (q, k, v))
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.d_head), dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, d)
        return self.out(y)


class TransformerBlock(nn.Module):
    """Token + position embeddings, one pre-LayerNorm encoder block (attention, GELU feed-forward,
    residuals), final LayerNorm, mean-pool over tokens, Linear head. Input: int64 tokens (N, T)."""

    def __init__(self, vocab: int = 20, seq_len: int = 6, d_model: int = 16, n_heads: int = 2, n_out: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.randn(seq_len, d_model) * 0.1)
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.ff1 = nn.Linear(d_model, 2 * d_model)
        self.ff2 = nn.Linear(2 * d_model, d_model)
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, n_out)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos
        x = x + self.attn(self.ln1(x))
        x = x + self.ff2(F.gelu(self.ff1(self.ln2(x))))
        return self.head(self.ln_f(x).mean(dim=1))


def make_transformer(seed: int = 0, **kwargs) -> TransformerBlock:
    torch.manual_seed(seed)
    model = TransformerBlock(**kwargs)
    with torch.no_grad():  # LayerNorm affine away from (1, 0), so their gradients are exercised
        for ln in (model.ln1, model.ln2, model.ln_f):
            ln.weight.uniform_(0.5, 1.5)
            ln.bias.uniform_(-0.3, 0.3)
    return model


# -- loss wrappers ------------------------------------------------------------------------------------
class WithMSE(nn.Module):
    """``forward(x, target)`` returns ``MSELoss()(net(x), target)``; parameter names gain "net."."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self.net(x), target)


class WithCrossEntropy(nn.Module):
    """``forward(x, labels)`` returns mean cross-entropy of ``net(x)`` against int64 labels."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.net(x), labels)


# -- export -------------------------------------------------------------------------------------------
def export(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    path: str | Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_batch: bool = False,
) -> Path:
    """Export ``model`` with the TorchScript exporter at opset 17, in the mode the model is in
    (a model in train mode exports BatchNorm with batch statistics, as torch computes its loss).

    ``dynamic_batch`` makes axis 0 of every input and of every non-scalar output a symbol "batch".
    """
    path = Path(path)
    dynamic_axes = None
    if dynamic_batch:
        dynamic_axes = {name: {0: "batch"} for name in input_names}
        with torch.no_grad():
            outs = model(*example_inputs)
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        dynamic_axes.update({name: {0: "batch"} for name, o in zip(output_names, outs) if o.dim() > 0})
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of dynamo; it is the one that gives
        # plain opset-17 graphs with state_dict initializer names, which is what we test.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            tuple(example_inputs),
            str(path),
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes=dynamic_axes,
            opset_version=17,
            dynamo=False,
            training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=not model.training,
        )
    return path


# -- GPT-style language model ----------------------------------------------------------------------
class CausalBlock(nn.Module):
    """Pre-LayerNorm decoder block: causal multi-head self-attention and a GELU MLP, with residuals."""

    def __init__(self, d_model: int, n_heads: int, seq_len: int, sdpa: bool):
        super().__init__()
        self.n_heads, self.d_head, self.sdpa = n_heads, d_model // n_heads, sdpa
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv, self.proj = nn.Linear(d_model, 3 * d_model), nn.Linear(d_model, d_model)
        self.fc, self.out = nn.Linear(d_model, 4 * d_model), nn.Linear(4 * d_model, d_model)
        self.register_buffer("mask", torch.tril(torch.ones(seq_len, seq_len, dtype=torch.bool)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.n_heads, self.d_head).transpose(1, 2) for z in (q, k, v))
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # nanoGPT's explicit form
            att = (q @ k.transpose(-2, -1)) / math.sqrt(self.d_head)
            att = torch.softmax(att.masked_fill(~self.mask[:t, :t], float("-inf")), dim=-1)
            y = att @ v
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """Token + position embeddings, ``n_layers`` causal pre-norm blocks, a final LayerNorm and an LM
    head tied to the token embedding. ``forward(tokens, targets)`` returns the standard LM loss
    ``F.cross_entropy(logits.reshape(B*T, V), targets.reshape(B*T))``."""

    def __init__(
        self,
        vocab: int = 17,
        seq_len: int = 6,
        d_model: int = 16,
        n_heads: int = 2,
        n_layers: int = 2,
        sdpa: bool = False,
    ):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(CausalBlock(d_model, n_heads, seq_len, sdpa) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        b, t = tokens.shape
        x = self.embed(tokens) + self.pos(torch.arange(t))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.reshape(b * t, -1), targets.reshape(b * t))


# -- ResNet basic block ------------------------------------------------------------------------------
class ResNetBlock(nn.Module):
    """Stem conv, then a ResNet basic block with a strided 1x1 projection shortcut, all with
    training-mode BatchNorm; global average pool and a Linear head. Input (N, 3, 8, 8)."""

    def __init__(self, c_in: int = 3, c: int = 8, n_classes: int = 5):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv1, self.bn1 = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * c)
        self.conv2, self.bn2 = nn.Conv2d(2 * c, 2 * c, 3, padding=1, bias=False), nn.BatchNorm2d(2 * c)
        self.down, self.bn_down = nn.Conv2d(c, 2 * c, 1, stride=2, bias=False), nn.BatchNorm2d(2 * c)
        self.fc = nn.Linear(2 * c, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.stem(x)))
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        y = F.relu(y + self.bn_down(self.down(x)))
        return self.fc(y.mean(dim=(2, 3)))
