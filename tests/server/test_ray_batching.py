"""Micro-batches and replicas through the Ray engine equal the unsplit inline job on real torch
exports: fixed-batch exports (no dynamic axes) by both exporters, and a GPT-style LM whose loss
merges the batch with the sequence axis (``logits.reshape(B*T, V)``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradserve

import models as M
from gradcheck import assert_same_result
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


def export_with_feeds(module, args, names, tmp_path, exporter, dynamic_batch):
    """The path of ``module``'s export (its parameters made distinct) and its feeds."""
    torch.manual_seed(0)
    distinct_params_(module)
    path = export(module, args, tmp_path / f"{type(module).__name__}-{exporter}.onnx", names, exporter, dynamic_batch)
    return path, {n: a.numpy() for n, a in zip(names, args)}


def exported(module, args, names, tmp_path, exporter, dynamic_batch):
    path, feeds = export_with_feeds(module, args, names, tmp_path, exporter, dynamic_batch)
    return gradserve.load_onnx(path), feeds


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_fixed_batch_mlp_splits_exactly(ray_engine, tmp_path, exporter):
    torch.manual_seed(1)
    args = [torch.randn(64, 16, dtype=torch.float64), torch.randn(64, 4, dtype=torch.float64)]
    model, feeds = exported(MLPLoss().double(), args, ["x", "y"], tmp_path, exporter, dynamic_batch=False)
    assert all(isinstance(s.shape[0], int) for s in model.inputs), "exported without dynamic axes"
    reference = INLINE.gradients(model, feeds)
    assert_same_result(ray_engine.gradients(model, feeds, micro_batches=3), reference)
    assert_same_result(ray_engine.gradients(model, feeds, micro_batches=2, replicas=2, partitions=2), reference)
    result = ray_engine.gradients(model, feeds, replicas=2, input_grads=["x"])
    assert_same_result(result, reference)
    np.testing.assert_allclose(
        result.input_grads["x"],
        INLINE.gradients(model, feeds, input_grads=["x"]).input_grads["x"],
        rtol=1e-10,
        atol=1e-15,
    )


@pytest.fixture(scope="module")
def gpt_lm(tmp_path_factory):
    """``gpt_lm(exporter)``: the GPT-style LM's export by that exporter and its feeds, exported once
    for every way of splitting it below (an export takes seconds), loaded afresh for each."""
    folder = tmp_path_factory.mktemp("gpt")
    made = {}

    def get(exporter):
        if exporter not in made:
            torch.manual_seed(2)
            tokens, targets = torch.randint(0, 11, (7, 6)), torch.randint(0, 11, (7, 6))
            targets[1, :4] = -100  # ignored by F.cross_entropy: the chunk weights count the other targets
            made[exporter] = export_with_feeds(
                M.GPT(vocab=11, d_model=8, n_layers=1).double(),
                [tokens, targets],
                ["tokens", "targets"],
                folder,
                exporter,
                True,
            )
        return gradserve.load_onnx(made[exporter][0]), made[exporter][1]

    return get


@pytest.mark.parametrize(
    "run",
    [
        {"micro_batches": 3},
        {"replicas": 2},
        {"micro_batches": 2, "replicas": 2, "partitions": 3},
    ],
    ids=["mb3", "rep2", "mb2-rep2-part3"],
)
@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_gpt_lm_loss_over_merged_rows_splits_exactly(ray_engine, gpt_lm, exporter, run):
    """(The dynamo export keeps sqrt(d) as a 0-d float initializer, i.e. a 0-d parameter, whose
    error is summed over 3 micro-batches' deferred weight steps.)"""
    model, feeds = gpt_lm(exporter)
    assert_same_result(ray_engine.gradients(model, feeds, **run), INLINE.gradients(model, feeds))


def test_gpt_split_job_equals_torch(ray_engine, tmp_path):
    torch.manual_seed(3)
    tokens, targets = torch.randint(0, 11, (6, 6)), torch.randint(0, 11, (6, 6))
    check_module(
        M.GPT(vocab=11, d_model=8, n_layers=1).double(),
        [tokens, targets],
        ["tokens", "targets"],
        tmp_path,
        exporter="legacy",
        engine=ray_engine,
        micro_batches=3,
    )


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_fixed_export_with_the_batch_in_a_view_splits(ray_engine, tmp_path, exporter):
    """The Reshape's [64, -1] becomes [-1, 8] in the micro-batches' model (issue 21)."""
    torch.manual_seed(4)
    args = [torch.randn(64, 2, 4, dtype=torch.float64), torch.randn(64, 4, dtype=torch.float64)]
    model, feeds = exported(ViewLoss().double(), args, ["x", "y"], tmp_path, exporter, dynamic_batch=False)
    want = INLINE.gradients(model, feeds)
    assert_same_result(ray_engine.gradients(model, feeds, micro_batches=2, partitions=2), want)
