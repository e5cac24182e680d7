"""ONNX sequence ops (client/onnx_sequences.py): rewritten at import into plain tensor ops where the
length is known at load. Each op's gradient against torch autograd on hand-built graphs; sequences
of unknown length refused naming the node; GPT-2's ``optimize=False`` dynamo export (the exporter
writes ``qkv.split(...)`` as SplitToSequence/SequenceAt) against torch, split into micro-batches."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

import gradserve
from gradcheck import assert_same_result, assert_split_exact
from gradserve.worker.graph import GraphError
from torch_oracle import check_module, distinct_params_, export, grads_by_value, torch_gradients

RNG = np.random.default_rng(0)


def const(name: str, value) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value), name))


def node(op: str, inputs: list[str], outputs: list[str], **attrs) -> onnx.NodeProto:
    return helper.make_node(op, inputs, outputs, **attrs)


def loss_model(nodes: list[onnx.NodeProto], p: np.ndarray, r: np.ndarray, feeds=()) -> onnx.ModelProto:
    """A graph computing ``y`` from the parameter ``p``, with loss ``sum(y * r)``: dL/dp is the VJP
    of the sequence ops at the random direction ``r``."""
    nodes = [*nodes, const("r", r), node("Mul", ["y", "r"], ["yr"]), node("ReduceSum", ["yr"], ["loss"], keepdims=0)]
    inputs = [helper.make_tensor_value_info(n, t, s) for n, t, s in feeds]
    graph = helper.make_graph(
        nodes,
        "seq",
        inputs,
        [helper.make_tensor_value_info("loss", TensorProto.DOUBLE, [])],
        [numpy_helper.from_array(p, "p")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def torch_grad(fn, p: np.ndarray, r: np.ndarray) -> tuple[float, np.ndarray]:
    t = torch.tensor(p, requires_grad=True)
    loss = (fn(t) * torch.tensor(r)).sum()
    loss.backward()
    return float(loss.detach()), t.grad.numpy()


# (ONNX nodes giving y from p, the same in torch, the shape of p)
CASES = {
    # no split: pieces of size 1; keepdims=0 squeezes them; a negative position
    "split_each_squeezed_at": (
        [
            node("SplitToSequence", ["p"], ["s"], axis=1, keepdims=0),
            const("k", np.int64(-1)),
            node("SequenceAt", ["s", "k"], ["y"]),
        ],
        lambda p: p[:, -1],
        (3, 4),
    ),
    # a scalar split: chunks of 3, the last one smaller; insert at a position; concatenate
    "split_ragged_insert_concat": (
        [
            const("three", np.int64(3)),
            node("SplitToSequence", ["p", "three"], ["s"], axis=1),
            const("one", np.int64(1)),
            node("SequenceAt", ["s", "one"], ["last"]),
            const("zero", np.int64(0)),
            node("SequenceInsert", ["s", "last", "zero"], ["s2"]),
            node("ConcatFromSequence", ["s2"], ["y"], axis=1),
        ],
        lambda p: torch.cat([p[:, 3:], p[:, :3], p[:, 3:]], 1),
        (2, 4),
    ),
    # split sizes; stacked along a new axis
    "split_sizes_stack": (
        [
            const("sizes", np.array([2, 2], np.int64)),
            node("SplitToSequence", ["p", "sizes"], ["s"], axis=0),
            node("ConcatFromSequence", ["s"], ["y"], axis=-1, new_axis=1),
        ],
        lambda p: torch.stack(torch.split(p, [2, 2], 0), -1),
        (4, 3),
    ),
    # a list of tensors, one erased; its length used in arithmetic
    "construct_erase_length": (
        [
            node("Mul", ["p", "p"], ["pp"]),
            node("Tanh", ["p"], ["tp"]),
            node("SequenceConstruct", ["p", "pp", "tp"], ["s"]),
            const("zero", np.int64(0)),
            node("SequenceErase", ["s", "zero"], ["s2"]),
            node("SequenceErase", ["s2"], ["s3"]),
            node("SequenceLength", ["s"], ["n"]),
            node("Cast", ["n"], ["nf"], to=TensorProto.DOUBLE),
            node("ConcatFromSequence", ["s3"], ["c"], axis=0),
            node("Mul", ["c", "nf"], ["y"]),
        ],
        lambda p: 3 * p * p,
        (2, 3),
    ),
    # built from an empty sequence by appending and inserting
    "empty_append_insert": (
        [
            node("SequenceEmpty", [], ["e"], dtype=TensorProto.DOUBLE),
            node("SequenceInsert", ["e", "p"], ["s1"]),
            node("Tanh", ["p"], ["tp"]),
            const("first", np.int64(-1)),
            node("SequenceInsert", ["s1", "tp", "first"], ["s2"]),
            node("ConcatFromSequence", ["s2"], ["y"], axis=0, new_axis=1),
        ],
        lambda p: torch.stack([torch.tanh(p), p], 0),
        (3, 2),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_sequence_op_gradients_equal_torch(case):
    nodes, fn, shape = CASES[case]
    p = RNG.standard_normal(shape)
    want_loss, want = torch_grad(fn, p, r := RNG.standard_normal(tuple(fn(torch.tensor(p)).shape)))
    model = gradserve.load_onnx(loss_model(nodes, p, r))
    assert not any("Sequence" in n.op_type for n in model.nodes)  # plain tensor ops only
    result = gradserve.local().gradients(model, {})
    assert abs(result.loss - want_loss) <= 1e-12 * max(1.0, abs(want_loss))
    np.testing.assert_allclose(result.grads["p"], want, rtol=1e-12, atol=1e-14)


def test_split_of_a_batched_feed_splits_into_micro_batches():
    """Split along a static axis of a batched value: each micro-batch splits its own rows."""
    nodes = [
        node("MatMul", ["x", "p"], ["h"]),
        node("SplitToSequence", ["h"], ["s"], axis=1, keepdims=0),
        const("k", np.int64(1)),
        node("SequenceAt", ["s", "k"], ["a"]),
        const("j", np.int64(2)),
        node("SequenceAt", ["s", "j"], ["b"]),
        node("Mul", ["a", "b"], ["y0"]),
        node("ReduceMean", ["y0"], ["y"], keepdims=0),
    ]
    p, r = RNG.standard_normal((4, 3)), np.float64(1.5)
    model = gradserve.load_onnx(loss_model(nodes, p, r, [("x", TensorProto.DOUBLE, ["batch", 4])]))
    assert_split_exact(model, {"x": RNG.standard_normal((6, 4))})


def test_split_of_unknown_length_is_refused_naming_the_node():
    nodes = [
        node("SplitToSequence", ["x"], ["s"], axis=0, name="rows"),
        const("k", np.int64(0)),
        node("SequenceAt", ["s", "k"], ["a"]),
        node("Mul", ["a", "p"], ["y"]),
    ]
    proto = loss_model(nodes, RNG.standard_normal(3), RNG.standard_normal(3), [("x", TensorProto.DOUBLE, ["batch", 3])])
    with pytest.raises(GraphError, match=r"'rows' \(SplitToSequence\).*unknown length"):
        gradserve.load_onnx(proto)


def test_position_known_only_at_run_time_is_refused_naming_the_node():
    nodes = [
        node("SplitToSequence", ["p"], ["s"], axis=0, keepdims=0),
        node("SequenceAt", ["s", "i"], ["y"], name="pick"),
    ]
    proto = loss_model(nodes, RNG.standard_normal((3, 2)), RNG.standard_normal(2), [("i", TensorProto.INT64, [])])
    with pytest.raises(GraphError, match=r"'pick' \(SequenceAt\).*only known when the model runs"):
        gradserve.load_onnx(proto)


class _SplitsInLoops(torch.nn.Module):
    """torch.split in a loop (ragged chunks), unbind, and chunk: SplitToSequence and SequenceAt in
    the optimize=False export."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.out = torch.nn.Linear(4, 7), torch.nn.Linear(3, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        acc = 0
        for k, piece in enumerate(torch.split(h, 3, dim=1)):
            acc = acc + (k + 1) * torch.tanh(piece).sum(1, keepdim=True)
        stacked = torch.stack([c * c for c in torch.unbind(h, dim=1)[::2]], dim=1)
        a, b = torch.chunk(stacked, 2, dim=1)
        return ((acc + self.out(torch.cat([b, a], 1)[:, :3]) - t) ** 2).mean()


def test_split_unbind_chunk_in_loops_give_torch_gradients(tmp_path):
    module = _SplitsInLoops().double()
    gen = torch.Generator().manual_seed(2)
    x, t = torch.randn(6, 4, generator=gen, dtype=torch.float64), torch.randn(6, 1, generator=gen, dtype=torch.float64)
    check_module(module, (x, t), ["x", "t"], tmp_path, "dynamo", optimize=False)
    path = tmp_path / "_SplitsInLoops-dynamo.onnx"
    assert "SplitToSequence" in {n.op_type for n in onnx.load(str(path)).graph.node}
    assert_split_exact(gradserve.load_onnx(path), {"x": x.numpy(), "t": t.numpy()})


# -- GPT-2 as torch's dynamo exporter writes it without its optimizer ------------------------------------
class _GPT2Loss(torch.nn.Module):
    """transformers' GPT-2 with the shifted LM loss computed here, in the model's dtype (transformers'
    own loss upcasts to float32, which would cap the comparison at float32's rounding). Its MLP uses
    the exact GELU: the exporter writes the tanh form's constants (sqrt(2/pi)) in float32."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        config = GPT2Config(
            n_layer=2,
            n_head=2,
            n_embd=8,
            vocab_size=17,
            n_positions=16,
            attn_implementation="eager",
            activation_function="gelu",
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        self.lm = GPT2LMHeadModel(config).double().eval()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        logits = self.lm(input_ids=ids).logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """The module, a batch of token ids, torch's loss and gradients, and the optimize=False export."""
    module = distinct_params_(_GPT2Loss())
    ids = torch.randint(0, 17, (4, 6), generator=torch.Generator().manual_seed(1))
    want_loss, want = torch_gradients(module, (ids,))
    path = export(module, (ids,), tmp_path_factory.mktemp("gpt2") / "gpt2.onnx", ["ids"], "dynamo", optimize=False)
    assert "SplitToSequence" in {n.op_type for n in onnx.load(str(path)).graph.node}  # what this test is about
    return module, ids, want_loss, want, path


def check_against_torch(gpt2, result) -> None:
    module, _, want_loss, want, path = gpt2
    assert abs(result.loss - want_loss) <= 1e-9 * abs(want_loss), (result.loss, want_loss)
    got = grads_by_value(path, module, result.grads)
    for name, w in want.items():
        np.testing.assert_allclose(got[name], w, rtol=1e-9, atol=1e-9 * np.abs(w).max(), err_msg=name)


def test_gpt2_unoptimized_dynamo_export_gives_torch_gradients(gpt2):
    model = gradserve.load_onnx(gpt2[4])
    assert not any("Sequence" in n.op_type for n in model.nodes)
    check_against_torch(gpt2, gradserve.local().gradients(model, {"ids": gpt2[1].numpy()}))


def test_gpt2_unoptimized_dynamo_export_splits_into_micro_batches(gpt2):
    assert_split_exact(gradserve.load_onnx(gpt2[4]), {"ids": gpt2[1].numpy()}, parts=(2,))


@pytest.mark.slow
def test_gpt2_unoptimized_dynamo_export_on_ray_with_micro_batches(gpt2, ray_engine):
    model, feeds = gradserve.load_onnx(gpt2[4]), {"ids": gpt2[1].numpy()}
    result = ray_engine.gradients(model, feeds, partitions=1, micro_batches=2)
    check_against_torch(gpt2, result)
    assert_same_result(result, gradserve.local().gradients(model, feeds), rtol=1e-10)
