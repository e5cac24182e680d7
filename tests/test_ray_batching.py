"""Micro-batches and replicas through the Ray engine equal the unsplit inline job on real torch
exports: fixed-batch exports (no dynamic axes) by both exporters, and a GPT-style LM whose loss
merges the batch with the sequence axis (``logits.reshape(B*T, V)``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradserve
from gradserve.worker.graph import GraphError

from torch_oracle import check_module, distinct_params_, export

pytestmark = pytest.mark.slow  # needs Ray worker processes

INLINE = gradserve.local()


class MLPLoss(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 4))

    def forward(self, x, y):
        return F.mse_loss(self.net(x), y)


class ViewLoss(nn.Module):
    """``x.view(64, -1)``: a fixed export writes the batch size into the Reshape's shape constant."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x, y):
        return F.mse_loss(self.fc(x.view(64, -1)), y)


class TinyGPT(nn.Module):
    """Token + position embeddings, one causal self-attention block, the LM cross-entropy over B*T rows."""

    def __init__(self, vocab=11, block=6, dim=8, heads=2):
        super().__init__()
        self.tok, self.pos, self.heads = nn.Embedding(vocab, dim), nn.Embedding(block, dim), heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, vocab)
        self.register_buffer("mask", torch.tril(torch.ones(block, block, dtype=torch.bool)))

    def forward(self, tokens, targets):
        B, T = tokens.shape
        h = self.tok(tokens) + self.pos(torch.arange(T))
        q, k, v = self.qkv(self.ln1(h)).split(h.shape[-1], dim=-1)
        q, k, v = (z.view(B, T, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        att = att.masked_fill(~self.mask[:T, :T], float("-inf")).softmax(-1)
        h = h + self.proj((att @ v).transpose(1, 2).reshape(B, T, -1))
        h = h + self.mlp(self.ln2(h))
        logits = self.head(h)
        return F.cross_entropy(logits.reshape(B * T, logits.shape[-1]), targets.reshape(B * T))


def assert_same(result, reference, rtol=1e-10):
    assert result.loss == pytest.approx(reference.loss, rel=rtol)
    assert result.grads.keys() == reference.grads.keys()
    for name, want in reference.grads.items():
        scale = max(np.abs(want).max(), 1e-300)
        assert np.abs(result.grads[name] - want).max() <= rtol * scale, name


def exported(module, args, names, tmp_path, exporter, dynamic_batch):
    torch.manual_seed(0)
    distinct_params_(module)
    path = export(module, args, tmp_path / f"{type(module).__name__}-{exporter}.onnx", names, exporter, dynamic_batch)
    return gradserve.load_onnx(path), {n: a.numpy() for n, a in zip(names, args)}


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_fixed_batch_mlp_splits_exactly(ray_engine, tmp_path, exporter):
    torch.manual_seed(1)
    args = [torch.randn(64, 16, dtype=torch.float64), torch.randn(64, 4, dtype=torch.float64)]
    model, feeds = exported(MLPLoss().double(), args, ["x", "y"], tmp_path, exporter, dynamic_batch=False)
    assert all(isinstance(s.shape[0], int) for s in model.inputs), "exported without dynamic axes"
    reference = INLINE.gradients(model, feeds)
    assert_same(ray_engine.gradients(model, feeds, micro_batches=3), reference)
    assert_same(ray_engine.gradients(model, feeds, micro_batches=2, replicas=2, partitions=2), reference)
    result = ray_engine.gradients(model, feeds, replicas=2, input_grads=["x"])
    assert_same(result, reference)
    np.testing.assert_allclose(result.input_grads["x"], INLINE.gradients(model, feeds, input_grads=["x"]).input_grads["x"],
                               rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("run", [
    {"micro_batches": 3}, {"replicas": 2}, {"micro_batches": 2, "replicas": 2, "partitions": 3},
], ids=["mb3", "rep2", "mb2-rep2-part3"])
@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_gpt_lm_loss_over_merged_rows_splits_exactly(ray_engine, tmp_path, exporter, run):
    """(The dynamo export keeps sqrt(d) as a 0-d float initializer, i.e. a 0-d parameter, whose
    error is summed over 3 micro-batches' deferred weight steps.)"""
    torch.manual_seed(2)
    tokens, targets = torch.randint(0, 11, (7, 6)), torch.randint(0, 11, (7, 6))
    targets[1, :4] = -100  # ignored by F.cross_entropy: the chunk weights count the other targets
    model, feeds = exported(TinyGPT().double(), [tokens, targets], ["tokens", "targets"], tmp_path, exporter, True)
    assert_same(ray_engine.gradients(model, feeds, **run), INLINE.gradients(model, feeds))


def test_gpt_split_job_equals_torch(ray_engine, tmp_path):
    torch.manual_seed(3)
    tokens, targets = torch.randint(0, 11, (6, 6)), torch.randint(0, 11, (6, 6))
    check_module(TinyGPT().double(), [tokens, targets], ["tokens", "targets"], tmp_path, exporter="legacy",
                 engine=ray_engine, micro_batches=3)


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_fixed_export_with_the_batch_in_a_view_is_refused(ray_engine, tmp_path, exporter):
    torch.manual_seed(4)
    args = [torch.randn(64, 2, 4, dtype=torch.float64), torch.randn(64, 4, dtype=torch.float64)]
    model, feeds = exported(ViewLoss().double(), args, ["x", "y"], tmp_path, exporter, dynamic_batch=False)
    with pytest.raises(GraphError, match=r"node '.*' \(Reshape\) has a constant shape \[64, -1\] whose first entry "
                                         r"holds the batch size"):
        ray_engine.gradients(model, feeds, micro_batches=2)
    assert_same(ray_engine.gradients(model, feeds), INLINE.gradients(model, feeds))  # unsplit: fine
