"""``gradserve.torch``: ``backward(module, *args)`` fills ``p.grad`` as ``loss.backward()`` does.

Every check runs torch autograd on the same module and the same arguments and compares the loss and
each parameter's ``.grad`` (float64: 1e-9 relative; a module that computes its loss in float32,
GPT-2's, to float32's rounding). Exports take seconds, so each module is a module-scoped fixture:
``backward`` caches the export per module instance, and the tests share it.
"""

from __future__ import annotations

import contextlib
import copy
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradserve
import gradserve.torch as gt
from gradserve.worker.graph import GraphError
from borrowed import Borrowed

ROOT = Path(__file__).resolve().parents[2]


def torch_step(module: nn.Module, args, loss_fn=None) -> tuple[float, dict[str, torch.Tensor | None]]:
    """torch's loss and every parameter's .grad after ``loss.backward()`` from zero grads."""
    module.zero_grad(set_to_none=True)
    out = module(*args) if loss_fn is None else module(*args[:-1])
    loss = getattr(out, "loss", out) if loss_fn is None else loss_fn(out, args[-1])
    loss.backward()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in module.named_parameters()}
    module.zero_grad(set_to_none=True)
    return loss.item(), grads


def assert_backward_matches(module: nn.Module, args, loss_fn=None, rtol: float = 1e-9, **options) -> None:
    """gradserve's loss and .grad equal torch's; parameters torch leaves without a grad stay so."""
    want_loss, want = torch_step(module, args, loss_fn)
    loss = gt.backward(module, *args, loss_fn=loss_fn, **options)
    assert loss == pytest.approx(want_loss, rel=rtol, abs=0)
    # a gradient that is zero up to rounding (a conv bias before train-mode BatchNorm) has no scale
    # of its own: measure it against the module's largest
    floor = 1e-2 * max(float(g.abs().max()) for g in want.values() if g is not None)
    for name, p in module.named_parameters():
        if want[name] is None:
            assert p.grad is None, f"{name}: torch gives no gradient, gradserve gave one"
            continue
        assert p.grad is not None and p.grad.dtype == p.dtype and p.grad.shape == p.shape, name
        err = float((p.grad - want[name]).abs().max())
        assert err <= rtol * max(float(want[name].abs().max()), floor), f"dL/d{name}: max abs error {err:.3g}"
    module.zero_grad(set_to_none=True)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3)).double()


@pytest.fixture(scope="module")
def mlp_module() -> nn.Module:
    return mlp()


def batch(n: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen)


# -- importing ----------------------------------------------------------------------------------------
def test_plain_gradserve_imports_no_torch():
    """Run from the repository root, the directory a root-level torch.py would shadow torch from."""
    code = "import sys, gradserve; print(sorted(m for m in ('torch', 'gradserve.torch') if m in sys.modules))"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "[]", run.stdout + run.stderr


def test_both_spellings_are_one_module_and_the_real_torch_is_not_shadowed():
    import gradserve.client.torch as target
    from gradserve import torch as spelled

    assert gt is spelled is target is sys.modules["gradserve.torch"] and gt.__spec__.name == "gradserve.client.torch"
    assert Path(torch.__file__).parent.name == "torch" and "site-packages" in torch.__file__, torch.__file__


# -- gradients against torch autograd --------------------------------------------------------------
def test_mlp_gradients_equal_torch_and_accumulate_into_grad(mlp_module):
    x, y = batch()
    assert_backward_matches(mlp_module, (x, y), F.cross_entropy)
    _, want = torch_step(mlp_module, (x, y), F.cross_entropy)
    first = mlp_module[0].weight
    first.grad = torch.ones_like(first)  # an existing .grad is added to, as loss.backward() does
    gt.backward(mlp_module, x, y, loss_fn=F.cross_entropy)
    gt.backward(mlp_module, x, y, loss_fn=F.cross_entropy)
    torch.testing.assert_close(first.grad, 1 + 2 * want["0.weight"], rtol=1e-12, atol=1e-14)
    mlp_module.zero_grad(set_to_none=True)


def test_a_batch_of_one_and_other_batch_sizes_use_the_symbolic_batch(mlp_module):
    for n in (1, 9):
        assert_backward_matches(mlp_module, batch(n, seed=n), F.cross_entropy)


def test_export_names_parameters_as_the_module_does(mlp_module):
    model, mapping = gt.export(mlp_module, batch(), F.cross_entropy)
    assert list(model.params) == [n for n, _ in mlp_module.named_parameters()] == list(mapping.params)
    assert [s.shape[0] for s in model.inputs] == ["batch", "batch"]
    result = gradserve.local().gradients(model, mapping.feeds(batch()))
    _, want = torch_step(mlp_module, batch(), F.cross_entropy)
    for name, g in result.grads.items():
        torch.testing.assert_close(torch.as_tensor(g), want[name], rtol=1e-9, atol=1e-12)
    # a loss_fn written in a loop body is a new object each time: the same code reuses the export
    first, again = (gt.export(mlp_module, batch(), lambda out, y: F.cross_entropy(out, y))[0] for _ in range(2))
    assert first.nodes is again.nodes


class BranchesOnTheBatch(nn.Module):
    """Code that reads the batch size: torch's graph for one size would be wrong for others."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear(x)
        return h * 2 if x.shape[0] > 4 else h


def test_a_module_that_branches_on_the_batch_size_gets_a_graph_per_size():
    module = BranchesOnTheBatch().double()
    for n in (6, 3):
        assert_backward_matches(module, batch(n, seed=n), F.cross_entropy)
    _, mapping = gt.export(module, batch(3, seed=3), F.cross_entropy)
    assert mapping.static_batch == 3


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 3 * 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)
        return self.head(h.flatten(1))


@pytest.fixture(scope="module")
def cnn() -> nn.Module:
    torch.manual_seed(2)
    module = SmallCNN().double()
    with torch.no_grad():  # running statistics that differ from a fresh batch's
        module.bn.running_mean.uniform_(-0.5, 0.5)
        module.bn.running_var.uniform_(0.5, 2.0)
    return module


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_cnn_with_batchnorm_in_train_and_eval_mode(cnn, mode):
    getattr(cnn, mode)()
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(5, 2, 6, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (5,), generator=gen)
    stats = cnn.bn.running_mean.clone()
    assert_backward_matches(cnn, (x, y), F.cross_entropy)
    if mode == "train":  # the running statistics move as torch's training forward moves them
        theirs = copy.deepcopy(cnn)
        theirs(x)
        gt.backward(cnn, x, y, loss_fn=F.cross_entropy)
        cnn.zero_grad(set_to_none=True)
        for name, buffer in theirs.bn.named_buffers():
            torch.testing.assert_close(getattr(cnn.bn, name), buffer, rtol=1e-12, atol=1e-15, msg=name)
        assert int(cnn.bn.num_batches_tracked) == 3  # torch's reference forward, then two backward()s
    if mode == "eval":  # new running statistics reach the cached export
        with torch.no_grad():
            cnn.bn.running_mean.add_(0.25)
        assert_backward_matches(cnn, (x, y), F.cross_entropy)
        with torch.no_grad():
            cnn.bn.running_mean.copy_(stats)
    cnn.train()


class TiedLM(nn.Module):
    """An embedding tied to the output projection (one tensor, two names, two uses) and a frozen
    layer between them."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.mix = nn.Linear(6, 6)
        self.mix.weight.requires_grad_(False)
        self.out = nn.Linear(6, 11, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mix(self.embed(ids))))


def test_tied_weights_are_one_parameter_and_frozen_ones_constants():
    """The tied weight's gradient sums both uses; the frozen weight gets none (nor is one computed)."""
    torch.manual_seed(4)
    module = TiedLM().double()
    ids, targets = torch.randint(0, 11, (4, 5)), torch.randint(0, 11, (4, 5))
    loss_fn = lambda logits, t: F.cross_entropy(logits.reshape(-1, 11), t.reshape(-1))  # noqa: E731
    assert_backward_matches(module, (ids, targets), loss_fn)
    model, mapping = gt.export(module, (ids, targets), loss_fn)
    assert sorted(model.params) == ["embed.weight", "mix.bias"] == sorted(mapping.params)
    assert mapping.constants == ("mix.weight",)
    assert module.mix.weight.grad is None


class Recurrent(nn.Module):
    """An embedding with a padding row into a bidirectional GRU into a 2-layer LSTM, batch first."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 3, padding_idx=0)
        self.gru = nn.GRU(3, 4, batch_first=True, bidirectional=True)
        self.lstm = nn.LSTM(8, 5, num_layers=2, batch_first=True)
        self.head = nn.Linear(5, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(self.gru(self.embed(ids))[0])[0][:, -1])


def test_gru_lstm_and_an_embeddings_padding_row():
    torch.manual_seed(5)
    module = Recurrent().double()
    ids, y = torch.tensor([[0, 1, 2], [3, 0, 4], [5, 6, 0]]), torch.randint(0, 2, (3,))
    assert_backward_matches(module, (ids, y), F.cross_entropy)  # torch's padding row gradient is 0


def test_a_padding_row_whose_weight_is_read_twice_is_refused_naming_it():
    m = gradserve.ModelBuilder()
    ids = m.input("ids", (None, 2), np.int64)
    w = m.param("embed.weight", np.ones((4, 3)))
    model = m.loss(m.op("Gather", w, ids).sum() + w.sum())
    mapping = gt.TorchMapping(("embed.weight",), (), ("input_0",), (0,), padding_rows=(("embed.weight", 0),))
    with pytest.raises(GraphError, match="parameter 'embed.weight' is an nn.Embedding weight with padding_idx"):
        mapping.check_padding(model)


@pytest.fixture(scope="module")
def gpt2() -> nn.Module:
    """A 2-layer transformers GPT-2 taking its labels from its inputs. Tests that train it put its
    weights back afterwards (:func:`restored`)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=50,
        n_positions=16,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(6)
    return _LabelsAreInputs(transformers.GPT2LMHeadModel(config).double())


@contextlib.contextmanager
def restored(module: nn.Module) -> Iterator[None]:
    """``module``'s parameters and buffers as they were on entry, again on exit."""
    state = copy.deepcopy(module.state_dict())
    try:
        yield
    finally:
        module.load_state_dict(state)


def test_transformers_gpt2_with_its_own_shifted_loss(gpt2):
    ids = torch.randint(0, 50, (3, 8), generator=torch.Generator().manual_seed(6))
    # transformers computes the loss in float32 whatever the module's dtype: float32's rounding
    assert_backward_matches(gpt2, (ids,), rtol=1e-5)


class _LabelsAreInputs(nn.Module):
    """transformers' LMs take labels as a keyword; backward() passes positional arguments."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(ids, labels=ids)


def test_an_optimizer_loop_equals_torchs_own(mlp_module):
    """20 AdamW steps: the weights each step sends are the module's current ones."""
    ours, theirs = mlp_module, copy.deepcopy(mlp_module)
    opt_ours, opt_theirs = (torch.optim.AdamW(m.parameters(), lr=0.05) for m in (ours, theirs))
    for step in range(20):
        x, y = batch(seed=100 + step)
        opt_ours.zero_grad()
        loss = gt.backward(ours, x, y, loss_fn=F.cross_entropy)
        opt_ours.step()
        opt_theirs.zero_grad()
        want = F.cross_entropy(theirs(x), y)
        want.backward()
        opt_theirs.step()
        assert loss == pytest.approx(want.item(), rel=1e-9), step
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12, msg=name)


# -- refusals -------------------------------------------------------------------------------------------
def test_arguments_without_a_common_batch_axis_are_refused_naming_one(mlp_module):
    x, y = batch()
    with pytest.raises(ValueError, match="argument 1 has size 5 on axis 0 where argument 0 has 6.*batch_axis="):
        gt.backward(mlp_module, x, y[:5], loss_fn=F.cross_entropy)
    with pytest.raises(ValueError, match="argument 1 .* has no axis 1"):
        gt.export(mlp_module, (x, y), F.cross_entropy, batch_axis=1)
    with pytest.raises(TypeError, match="argument 1 is a list"):
        gt.backward(mlp_module, x, [0, 1], loss_fn=F.cross_entropy)
    with pytest.raises(ValueError, match="engine= or client=, not both"):
        gt.backward(mlp_module, x, y, loss_fn=F.cross_entropy, engine=gradserve.local(), client=object())


def test_an_output_that_is_not_a_loss_is_refused(mlp_module):
    with pytest.raises(GraphError, match="not a scalar loss.*loss_fn="):
        gt.export(mlp_module, (batch()[0],))


def test_dropout_in_training_mode_warns_once_and_runs_as_the_identity():
    """Exported on a batch of one (torch.export would fix a size-1 axis), then run on five: one
    export, one warning."""
    torch.manual_seed(7)
    module = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3)).double()
    for n in (1, 5):
        x, y = batch(n, seed=10 + n)
        want_loss, want = torch_step(module.eval(), (x, y), F.cross_entropy)  # dropout off: the identity
        module.train()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss = gt.backward(module, x, y, loss_fn=F.cross_entropy)
        said = [str(w.message) for w in caught if "dropout" in str(w.message)]
        assert len(said) == (n == 1) and all(": 1; set p=0" in m for m in said), said
        assert module[1].training  # the module's mode is restored
        assert loss == pytest.approx(want_loss, rel=1e-9)
        for name, p in module.named_parameters():
            torch.testing.assert_close(p.grad, want[name], rtol=1e-9, atol=1e-12, msg=name)
        module.zero_grad(set_to_none=True)
    assert gt.export(module, batch(5), F.cross_entropy)[1].static_batch is None


# -- through a server -----------------------------------------------------------------------------
@pytest.mark.slow
def test_training_through_a_server_with_partitions_and_micro_batches(ray_engine, mlp_module):
    from serving import serving

    with serving(lambda: Borrowed(ray_engine)) as srv, gradserve.Client(srv.address, timeout=120) as client:
        assert_backward_matches(
            mlp_module, batch(8, seed=9), F.cross_entropy, client=client, partitions=2, micro_batches=2
        )


@pytest.mark.slow
def test_an_encoder_trains_through_a_server_with_partitions_and_micro_batches(ray_engine):
    """transformers' BERT, 3 AdamW steps through a server on Ray: the same losses and weights as torch."""
    transformers = pytest.importorskip("transformers")
    from serving import serving

    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=16,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(8)
    ours = transformers.BertForSequenceClassification(config).double()
    theirs = copy.deepcopy(ours)
    opt_ours, opt_theirs = (torch.optim.AdamW(m.parameters(), lr=0.01) for m in (ours, theirs))
    loss_fn = lambda out, labels: F.cross_entropy(out.logits, labels)  # noqa: E731
    with serving(lambda: Borrowed(ray_engine)) as srv, gradserve.Client(srv.address, timeout=300) as client:
        for step in range(3):
            gen = torch.Generator().manual_seed(step)
            ids, labels = torch.randint(0, 50, (4, 8), generator=gen), torch.randint(0, 3, (4,), generator=gen)
            opt_ours.zero_grad()
            loss = gt.backward(ours, ids, labels, loss_fn=loss_fn, client=client, partitions=2, micro_batches=2)
            opt_ours.step()
            opt_theirs.zero_grad()
            want = loss_fn(theirs(ids), labels)
            want.backward()
            opt_theirs.step()
            assert loss == pytest.approx(want.item(), rel=1e-9), step
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12, msg=name)


def _train_alike(ours: nn.Module, steps, loss_fn, client, rtol: float, optimizer, **options) -> None:
    """Steps of ``optimizer`` (a torch.optim class and its arguments) through ``client``
    (gradserve.torch.backward) and with torch alone on a copy: the same losses, then the same weights."""
    theirs = copy.deepcopy(ours)
    opt_ours, opt_theirs = (optimizer[0](m.parameters(), **optimizer[1]) for m in (ours, theirs))
    for step, args in enumerate(steps):
        opt_ours.zero_grad()
        loss = gt.backward(ours, *args, loss_fn=loss_fn, client=client, **options)
        opt_ours.step()
        opt_theirs.zero_grad()
        out = theirs(*args) if loss_fn is None else theirs(*args[:-1])
        want = getattr(out, "loss", out) if loss_fn is None else loss_fn(out, args[-1])
        want.backward()
        opt_theirs.step()
        assert loss == pytest.approx(want.item(), rel=rtol), step
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=rtol * 1e-3, msg=name)


@pytest.mark.slow
def test_a_gpt2_and_a_cnn_train_through_a_server_as_in_torch(ray_engine, gpt2):
    """The issue's loop: a torch user's own optimizer, gradserve computing on a server, torch's
    result to rounding (GPT-2 computes its loss in float32; the CNN trains its BatchNorm in train mode)."""
    from serving import serving

    gen = torch.Generator().manual_seed(11)
    texts = [(torch.randint(0, 50, (4, 8), generator=gen),) for _ in range(3)]
    torch.manual_seed(2)
    cnn = SmallCNN().double()
    images = [
        (torch.randn(6, 2, 6, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (6,), generator=gen))
        for _ in range(3)
    ]
    with serving(lambda: Borrowed(ray_engine)) as srv, gradserve.Client(srv.address, timeout=300) as client:
        # SGD: Adam divides by each gradient's own size, which turns the rounding of a gradient that
        # is zero up to rounding (GPT-2's float32 loss; the conv bias before a train-mode BatchNorm)
        # into a step of up to lr either way: no oracle there
        sgd = (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01})
        with restored(gpt2):  # the module is shared with another test (its export is cached with it)
            _train_alike(gpt2, texts, None, client, 1e-5, sgd, partitions=2, micro_batches=2)
        _train_alike(
            cnn, images, F.cross_entropy, client, 1e-9, sgd, partitions=2
        )  # train-mode BatchNorm: its batch statistics need the whole batch
