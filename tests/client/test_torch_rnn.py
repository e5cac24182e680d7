"""Recurrent layers through real ONNX exports (both exporters), against torch autograd: an LSTM
tagger, a GRU regressor and tanh / relu RNN regressors (see tests/torch_oracle.py)."""

from __future__ import annotations

import collections

import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from torch_oracle import EXPORTERS, check_module

B, T, VOCAB, CLASSES = 3, 5, 11, 4


class Tagger(nn.Module):
    """Embedding -> 2-layer bidirectional LSTM (batch first) -> Linear -> per-token cross-entropy."""

    def __init__(self, emb: int = 4, hidden: int = 3):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, emb)
        self.lstm = nn.LSTM(emb, hidden, num_layers=2, bidirectional=True, batch_first=True)
        self.out = nn.Linear(2 * hidden, CLASSES)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(self.emb(tokens))
        logits = self.out(h)
        n = tokens.shape[0] * tokens.shape[1]
        return F.cross_entropy(logits.reshape(n, CLASSES), labels.reshape(n))


class Regressor(nn.Module):
    """A recurrent layer (batch first) -> last step's output and final state -> Linear -> MSE."""

    def __init__(self, cls: type = nn.GRU, features: int = 3, hidden: int = 4, **kw):
        super().__init__()
        self.rnn = cls(features, hidden, batch_first=True, **kw)
        self.out = nn.Linear(2 * hidden, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seq, h_n = self.rnn(x)
        feats = torch.cat([seq[:, -1], h_n[-1]], dim=1)  # both Y and Y_h carry errors
        return F.mse_loss(self.out(feats).squeeze(1), y)


class Seq2Seq(nn.Module):
    """An LSTM encoder whose final (h, c) starts an LSTM decoder: errors reach Y_h / Y_c of one
    node and initial_h / initial_c of the next."""

    def __init__(self, features: int = 3, hidden: int = 4):
        super().__init__()
        self.enc = nn.LSTM(features, hidden, batch_first=True)
        self.dec = nn.LSTM(features, hidden, batch_first=True)
        self.out = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _, state = self.enc(x)
        seq, _ = self.dec(x.flip(1), state)
        return F.mse_loss(self.out(seq).squeeze(2).mean(1), y)


def tagger_args():
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, VOCAB, (B, T), generator=gen), torch.randint(0, CLASSES, (B, T), generator=gen)


def regressor_args(dtype=torch.float64):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(B, T, 3, generator=gen, dtype=dtype), torch.randn(B, generator=gen, dtype=dtype)


def recurrent_ops(result_path) -> collections.Counter:
    return collections.Counter(
        n.op_type for n in onnx.load(str(result_path)).graph.node if n.op_type in ("LSTM", "GRU", "RNN")
    )


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_lstm_tagger(exporter, tmp_path):
    torch.manual_seed(0)
    check_module(Tagger().double(), tagger_args(), ["tokens", "labels"], tmp_path, exporter)
    assert recurrent_ops(tmp_path / f"Tagger-{exporter}.onnx") == {"LSTM": 2}


def test_lstm_tagger_float32(tmp_path):
    torch.manual_seed(0)
    check_module(Tagger(), tagger_args(), ["tokens", "labels"], tmp_path, "dynamo")


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("kind", ["GRU", "RNN-tanh", "RNN-relu", "GRU-bidirectional"])
def test_regressor(kind, exporter, tmp_path):
    torch.manual_seed(1)
    name, _, opt = kind.partition("-")
    kw = {"nonlinearity": opt} if name == "RNN" else {}
    if opt == "bidirectional":
        kw["bidirectional"] = True
    model = Regressor(getattr(nn, name), **kw).double()
    if opt == "bidirectional":
        model.out = nn.Linear(3 * model.rnn.hidden_size, 1).double()
    check_module(model, regressor_args(), ["x", "y"], tmp_path, exporter)
    ops = recurrent_ops(tmp_path / f"Regressor-{exporter}.onnx")
    if exporter == "legacy" or name == "GRU":  # the dynamo exporter unrolls nn.RNN into MatMul/Tanh
        assert ops == {name: 1}


def test_gru_regressor_float32(tmp_path):
    torch.manual_seed(2)
    check_module(Regressor(nn.GRU), regressor_args(torch.float32), ["x", "y"], tmp_path, "legacy")


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_lstm_encoder_decoder(exporter, tmp_path):
    torch.manual_seed(3)
    check_module(Seq2Seq().double(), regressor_args(), ["x", "y"], tmp_path, exporter)
    assert recurrent_ops(tmp_path / f"Seq2Seq-{exporter}.onnx") == {"LSTM": 2}
