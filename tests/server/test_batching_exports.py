"""Micro-batches and replicas on the torch exports that used to be refused (issue 21, item 4): the
LM loss on ``labels[:, 1:]`` with ignore_index (a tiny transformers Llama), ``as_strided`` written by
the dynamo exporter as a Gather at indices computed from the input's shape, RNNs whose zero initial
states the legacy exporter builds from Shape/ConstantOfShape, and a fixed-batch export whose Reshape
spells the batch as a constant. Each split job equals the unsplit one (planning, run inline), and on
the Ray engine with partitions and micro-batches equals torch's autograd. The splits that would not
be exact stay refused, naming the node."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradserve
import gradserve.torch as gt
from gradcheck import assert_split_exact, split_inline
from gradserve.server.planning.batching import Rows, _Follower, split_batch
from gradserve.server.planning.prepare import prepare
from gradserve.worker.graph import GraphError
from torch_oracle import check_export, check_module, distinct_params_, export

IGNORE = -100


def loaded(module, args, names, tmp_path, exporter, dynamic_batch=True):
    """``module`` exported and loaded, with its feeds."""
    path = export(module, args, tmp_path / f"{type(module).__name__}-{exporter}.onnx", names, exporter, dynamic_batch)
    return gradserve.load_onnx(path), {n: a.detach().numpy() for n, a in zip(names, args)}


def refusal(model, feeds, parts=2):
    with pytest.raises(GraphError) as caught:
        split_batch(model, prepare(model, feeds), feeds, parts)
    return str(caught.value)


# -- 1. the LM loss on labels[:, 1:] -----------------------------------------------------------------
class TinyLlama(nn.Module):
    """transformers' LlamaForCausalLM, whose loss shifts the labels (``labels[:, 1:]``, ignore_index -100)."""

    def __init__(self):
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=29,
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=16,
        )
        self.lm = LlamaForCausalLM(config).double()

    def forward(self, ids, labels):
        return self.lm(input_ids=ids, labels=labels).loss


def lm_batch(B=6, T=5):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 29, (B, T), generator=gen)
    labels = ids.clone()
    labels[0, 1:] = IGNORE  # sample 0's one target left is the first, which the shift drops: it counts none
    labels[3, 2:] = IGNORE
    return ids, labels


@pytest.fixture(scope="module")
def llama() -> TinyLlama:
    """One TinyLlama for the tests below (they leave its parameters as they are): gradserve.torch
    caches an export per module, and a dynamo export of it takes seconds."""
    torch.manual_seed(0)
    return TinyLlama()


def test_llama_shifted_lm_loss_splits_weighted_by_its_targets(llama):
    model, mapping = gt.export(llama, lm_batch())
    feeds = dict(zip(["ids", "labels"], (a.numpy() for a in lm_batch())))
    feeds = {name: feeds[k] for name, k in zip(mapping.inputs, ["ids", "labels"])}
    want = gradserve.local().gradients(model, feeds)
    for parts in (2, 3):  # transformers computes the loss in float32 (logits.float()): equal to its rounding
        split, loss, grads = split_inline(model, feeds, parts)
        assert abs(loss - want.loss) <= 1e-6 * abs(want.loss), (loss, want.loss)
        for name, g in want.grads.items():
            np.testing.assert_allclose(grads[name], g, rtol=1e-5, atol=1e-6 * np.abs(g).max(), err_msg=name)
    labels = mapping.inputs[1]
    counted = (feeds[labels][:, 1:] != IGNORE).sum(axis=1)
    bounds = np.cumsum([0] + [c.feeds[labels].shape[0] for c in split.chunks])
    assert [c.weight for c in split.chunks] == [counted[a:b].sum() / counted.sum() for a, b in zip(bounds, bounds[1:])]


def test_labels_sliced_along_the_batch_are_refused():
    m = gradserve.ModelBuilder()
    x = m.input("x", (None, 3), np.float64)
    t = m.input("t", (None,), np.int64)
    logits = m.op(
        "Slice",
        x @ m.param("w", np.ones((3, 4))),
        m.constant(np.array([1])),
        m.constant(np.array([2**63 - 1])),
        m.constant(np.array([0])),
    )
    labels = m.op(
        "Slice",
        t,
        m.constant(np.array([1])),
        m.constant(np.array([2**63 - 1])),
        m.constant(np.array([0])),
        name="drop_first",
    )
    model = m.loss(m.op("SoftmaxCrossEntropyLoss", logits, labels, ignore_index=IGNORE))
    feeds = {"x": np.ones((6, 3)), "t": np.arange(6) % 4}
    assert "node 'drop_first' (Slice) slices the batch axis" in refusal(model, feeds)


# -- 2. as_strided: a Gather at indices computed from the input's shape ------------------------------
class Windows(nn.Module):
    """Sliding windows of 3 time steps over each sample, by ``as_strided`` (what ``unfold`` is)."""

    def __init__(self, overlap_samples: bool = False):
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.overlap_samples = overlap_samples

    def forward(self, x):
        B, T, C = x.shape
        x = x.contiguous()
        if self.overlap_samples:  # sample s's windows start at row s of the whole batch: they read sample s+1
            w = x.as_strided((B, T - 2, 3, C), (C, C, C, 1))
        else:
            w = x.as_strided((B, T - 2, 3, C), (T * C, C, C, 1))
        return self.fc(w.transpose(-1, -2)).tanh().pow(2).mean()


def test_as_strided_windows_split():
    torch.manual_seed(0)
    x = torch.randn(5, 6, 4, dtype=torch.float64)
    model, mapping = gt.export(Windows().double(), (x,))
    assert any(n.op_type == "Gather" and "as_strided" in n.name for n in model.nodes)
    assert_split_exact(model, {mapping.inputs[0]: x.numpy()}, parts=(2, 3, 5))


def test_as_strided_across_samples_is_refused():
    x = torch.randn(5, 6, 4, dtype=torch.float64)
    model, mapping = gt.export(Windows(overlap_samples=True).double(), (x,))
    assert "(Gather) gathers along the batch axis at indices" in refusal(model, {mapping.inputs[0]: x.numpy()})


def gather_at_computed(axis_of_length: int, first: int = 1):
    """x[:, range(first, n)] along time, n the length of axis ``axis_of_length`` of x (from Shape)."""
    m = gradserve.ModelBuilder()
    x = m.input("x", (None, 6, 3), np.float64)
    length = m.op("Gather", m.op("Shape", x), m.constant(np.array(axis_of_length)), axis=0)
    start = m.constant(np.array(first)) if first >= 0 else m.op("Add", length, m.constant(np.array(first)))
    idx = m.op("Range", start, length, m.constant(np.array(1)))
    picked = m.op("Gather", x, idx, axis=1, name="pick")
    return m.loss(m.op("ReduceMean", m.tanh(picked @ m.param("w", np.linspace(-1, 1, 6).reshape(3, 2))), keepdims=0))


def test_gather_along_time_at_indices_from_the_shape_splits():
    x = np.random.default_rng(0).standard_normal((5, 6, 3))
    assert_split_exact(gather_at_computed(1), {"x": x}, parts=(2, 3))
    assert_split_exact(gather_at_computed(1, first=-2), {"x": x}, parts=(2, 3))  # the last two steps


@pytest.mark.parametrize(
    "first,why",
    [
        (-1, r"gathers at indices '.*' that change with the batch size"),  # x[:, B-1]: same shape, other step
        (1, r"gives 'pick_out0' the shape \(2, 1, 3\) with 2 samples"),  # x[:, 1:B]: fewer steps
    ],
)
def test_gather_at_indices_that_change_with_the_batch_size_is_refused(first, why):
    x = np.random.default_rng(0).standard_normal((5, 6, 3))
    assert re.search(r"node 'pick' \(Gather\) " + why, refusal(gather_at_computed(0, first), {"x": x}))


# -- 3. RNNs of the legacy exporter: zero states from Shape/ConstantOfShape --------------------------
class Recurrent(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.rnn = (
            nn.GRU(3, 4, batch_first=True)
            if kind == "gru"
            else nn.LSTM(3, 4, num_layers=2, bidirectional=True, batch_first=True)
        )

    def forward(self, x, y):
        out = self.rnn(x)[0]
        return F.mse_loss(out[:, -1, :4], y)


def rnn_args(B=5):
    gen = torch.Generator().manual_seed(2)
    return [
        torch.randn(B, 4, 3, generator=gen, dtype=torch.float64),
        torch.randn(B, 4, generator=gen, dtype=torch.float64),
    ]


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_legacy_rnn_states_follow_the_batch(tmp_path, kind):
    torch.manual_seed(0)
    model, feeds = loaded(Recurrent(kind).double(), rnn_args(), ["x", "y"], tmp_path, "legacy")
    job = prepare(model, feeds)
    follower = _Follower(model, job, {"x", "y"}, 5)
    follower.loss_reduction()
    states = [n.outputs[0] for n in job.nodes if n.op_type == "ConstantOfShape" and n.name.startswith("/rnn/")]
    assert states and all(follower.tags[s] == Rows(1) for s in states), "(directions x layers, batch, hidden)"
    assert_split_exact(model, feeds, parts=(2, 3))


# -- 4. a fixed-batch export whose Reshape spells the batch as a constant ----------------------------
class FlatCrossEntropy(nn.Module):
    """``reshape(B * T)`` with B, T read from the input: a fixed-batch export writes 30 for B=3, T=10."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 5)

    def forward(self, x, t):
        B, T, _ = x.shape
        return F.cross_entropy(self.fc(x).reshape(B * T, 5), t.reshape(B * T), ignore_index=IGNORE)


def flat_args():
    gen = torch.Generator().manual_seed(3)
    t = torch.randint(0, 5, (3, 10), generator=gen)
    t[1, 3:] = IGNORE
    return [torch.randn(3, 10, 4, generator=gen, dtype=torch.float64), t]


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_fixed_batch_reshape_constant_is_rewritten_per_micro_batch(tmp_path, exporter):
    torch.manual_seed(0)
    model, feeds = loaded(FlatCrossEntropy().double(), flat_args(), ["x", "t"], tmp_path, exporter, dynamic_batch=False)
    reshapes = [n for n in model.nodes if n.op_type == "Reshape" and n.inputs[1] in model.constants]
    spelled = sorted(model.constants[n.inputs[1]].tolist() for n in reshapes)
    assert [30] in spelled and [30, 5] in spelled, spelled
    split = assert_split_exact(model, feeds, parts=(2, 3))
    names = {n.name for n in reshapes}
    rewritten = sorted(split.model.constants[n.inputs[1]].tolist() for n in split.model.nodes if n.name in names)
    assert [-1] in rewritten and [-1, 5] in rewritten, rewritten


# -- the Ray engine with partitions and micro-batches equals torch -----------------------------------
@pytest.mark.slow
def test_llama_backward_on_ray_with_micro_batches_equals_torch(ray_engine, llama):
    module = llama
    ids, labels = lm_batch()
    module.zero_grad()
    want_loss = float(module(ids, labels))
    module(ids, labels).backward()
    want = {k: p.grad.clone() for k, p in module.named_parameters()}
    module.zero_grad(set_to_none=True)
    loss = gt.backward(module, ids, labels, engine=ray_engine, partitions=2, micro_batches=2)
    # transformers computes the loss in float32 (logits.float()): equal to float32's rounding
    assert abs(loss - want_loss) <= 1e-6 * abs(want_loss), (loss, want_loss)
    floor = 1e-2 * max(float(g.abs().max()) for g in want.values())
    for name, p in module.named_parameters():
        err, scale = float((p.grad - want[name]).abs().max()), float(want[name].abs().max())
        assert err <= 1e-5 * max(scale, floor), f"dL/d{name}: max abs error {err:.3g}, max |grad| {scale:.3g}"


@pytest.mark.slow
@pytest.mark.parametrize("case", ["windows", "gru", "lstm", "fixed reshape"])
def test_split_exports_on_ray_equal_torch(ray_engine, tmp_path, case):
    torch.manual_seed(0)
    if case == "windows":
        module, args, names, exporter, dynamic = (
            Windows(),
            [torch.randn(5, 6, 4, dtype=torch.float64)],
            ["x"],
            "dynamo",
            True,
        )
    elif case == "fixed reshape":
        module, args, names, exporter, dynamic = FlatCrossEntropy(), flat_args(), ["x", "t"], "legacy", False
    else:
        module, args, names, exporter, dynamic = Recurrent(case), rnn_args(), ["x", "y"], "legacy", True
    distinct_params_(module.double())
    check_module(
        module,
        args,
        names,
        tmp_path,
        exporter=exporter,
        dynamic_batch=dynamic,
        engine=ray_engine,
        partitions=2,
        micro_batches=2,
    )
    # the same export again, split into replicas instead
    check_export(
        module, args, names, tmp_path / f"{type(module).__name__}-{exporter}.onnx", engine=ray_engine, replicas=2
    )
