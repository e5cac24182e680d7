"""Models as torch exports them today: the default dynamo exporter (opset 18+) and the legacy
TorchScript exporter (opset 17), each through ``gradserve.load_onnx`` and the inline engine, against
torch autograd (see tests/torch_oracle.py)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import gradserve

import models as M
from torch_oracle import EXPORTERS, check_module, export


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_dynamo_mlp_with_mse_loss(dtype, tmp_path):
    net = M.WithMSE(M.make_mlp()).to(dtype)
    x, t = torch.randn(5, 8, generator=_gen(), dtype=dtype), torch.rand(5, 4, generator=_gen(1), dtype=dtype)
    check_module(net, (x, t), ["x", "target"], tmp_path, "dynamo")
    assert onnx.load(str(tmp_path / "WithMSE-dynamo.onnx")).opset_import[0].version >= 18


# A train-mode BatchNorm: the legacy exporter writes training_mode=1; the dynamo exporter writes the
# inference form whatever the module's mode (and its optimizer folds that into the conv), so it is
# exported unoptimized and loaded with batch_norm="batch".
TRAIN_MODE_EXPORTS = [("legacy", {}), ("dynamo", {"optimize": False, "batch_norm": "batch"})]


@pytest.mark.parametrize("exporter,options", TRAIN_MODE_EXPORTS, ids=[e for e, _ in TRAIN_MODE_EXPORTS])
def test_cnn_train_mode_batch_norm(exporter, options, tmp_path):
    net = M.WithCrossEntropy(M.make_cnn()).double()
    x = torch.randn(4, 3, 12, 12, generator=_gen(), dtype=torch.float64)
    check_module(net, (x, torch.randint(0, 5, (4,), generator=_gen(1))), ["x", "labels"], tmp_path, exporter, **options)


@pytest.mark.parametrize("exporter,options", TRAIN_MODE_EXPORTS, ids=[e for e, _ in TRAIN_MODE_EXPORTS])
def test_resnet_block_train_mode_batch_norm(exporter, options, tmp_path):
    torch.manual_seed(0)
    net = M.WithCrossEntropy(M.ResNetBlock()).double()
    x = torch.randn(3, 3, 8, 8, generator=_gen(), dtype=torch.float64)
    check_module(net, (x, torch.randint(0, 5, (3,), generator=_gen(1))), ["x", "labels"], tmp_path, exporter, **options)


def test_eval_mode_resnet_block_default_dynamo_export(tmp_path):
    """In eval mode the default dynamo export (optimized: BatchNorm folded into the conv weights)
    gives torch's eval-mode loss and the gradient of every parameter that survives as itself."""
    torch.manual_seed(0)
    net = M.WithCrossEntropy(M.ResNetBlock()).double().eval()
    x = torch.randn(3, 3, 8, 8, generator=_gen(), dtype=torch.float64)
    labels = torch.randint(0, 5, (3,), generator=_gen(1))
    path = export(net, (x, labels), tmp_path / "resnet.onnx", ["x", "labels"], "dynamo")
    result = gradserve.load_onnx(path)
    got = gradserve.local().gradients(result, {"x": x.numpy(), "labels": labels.numpy()})
    loss = net(x, labels)
    loss.backward()
    assert abs(float(got.loss) - float(loss)) < 1e-10
    np.testing.assert_allclose(got.grads["net.fc.weight"], net.net.fc.weight.grad.numpy(), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("sdpa", [False, True], ids=["explicit-mask", "sdpa"])
def test_gpt_lm_tied_embeddings_gelu(exporter, sdpa, tmp_path):
    """Pre-norm causal blocks with GELU, a LM head tied to the embedding, and the standard LM loss
    over (B*T, V) rows."""
    torch.manual_seed(0)
    net = M.GPT(sdpa=sdpa).double()
    tokens = torch.randint(0, 17, (3, 6), generator=_gen())
    targets = torch.randint(0, 17, (3, 6), generator=_gen(1))
    check_module(net, (tokens, targets), ["tokens", "targets"], tmp_path, exporter)


def test_gpt_lm_float32(tmp_path):
    torch.manual_seed(0)
    net = M.GPT(n_layers=1)
    tokens, targets = torch.randint(0, 17, (2, 6), generator=_gen()), torch.randint(0, 17, (2, 6), generator=_gen(1))
    check_module(net, (tokens, targets), ["tokens", "targets"], tmp_path, "dynamo")


@pytest.mark.parametrize("opset", [18, 19, 20, 21])
def test_dynamo_opsets(opset, tmp_path):
    """The dynamo exporter at each opset it writes: the model keeps that opset, and its gradients
    equal torch autograd's."""
    torch.manual_seed(0)
    net = M.GPT(n_layers=1).double()
    tokens, targets = torch.randint(0, 17, (2, 6), generator=_gen()), torch.randint(0, 17, (2, 6), generator=_gen(1))
    # one export, at that opset, both for the opset checks and for the gradients against torch
    check_module(net, (tokens, targets), ["tokens", "targets"], tmp_path, "dynamo", opset=opset)
    path = tmp_path / "GPT-dynamo.onnx"
    assert onnx.load(str(path)).opset_import[0].version == opset
    assert gradserve.load_onnx(path).opset == opset
