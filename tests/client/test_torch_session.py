"""gradserve.torch.session: a torch module trained where gradserve computes equals the same module
trained by torch itself (its own optimizer, param groups and clipping), inline, on Ray and through
a server; what a session cannot follow is refused by name."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import gradserve
import gradserve.torch
from gradserve.worker.graph import GraphError

from borrowed import Borrowed

STEPS = 5


def net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.GELU(), torch.nn.Linear(16, 3)
    ).double()


def batches():
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g))
        for _ in range(STEPS)
    ]


def optimizer(module: torch.nn.Module) -> torch.optim.Optimizer:
    first, rest = list(module[0].parameters()), [p for m in module[1:] for p in m.parameters()]
    return torch.optim.AdamW([{"params": first, "lr": 0.05, "weight_decay": 0.0}, {"params": rest}], lr=0.02)


def torch_losses(module: torch.nn.Module, data) -> list[float]:
    opt, losses = optimizer(module), []
    for x, y in data:
        opt.zero_grad()
        loss = F.cross_entropy(module(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    return losses


def check_trains_as_torch(**where) -> None:
    data = batches()
    theirs, ours = net(), net()
    want = torch_losses(theirs, data)
    with gradserve.torch.session(
        ours, *data[0], optimizer=optimizer(ours), loss_fn=F.cross_entropy, max_norm=1.0, **where
    ) as s:
        got = [s.step(x, y) for x, y in data]
        assert s.steps == STEPS
        before = copy.deepcopy(ours.state_dict())
        assert all(torch.equal(before[k], v) for k, v in net().state_dict().items())  # untouched until sync
        s.sync()
    np.testing.assert_allclose(got, want, rtol=1e-10)
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        np.testing.assert_allclose(p.detach().numpy(), q.detach().numpy(), rtol=1e-9, atol=1e-12, err_msg=name)


def test_a_torch_module_trains_in_a_session_as_with_torch_itself():
    check_trains_as_torch()


@pytest.mark.slow
def test_a_torch_module_trains_in_a_ray_session_partitioned(ray_engine):
    check_trains_as_torch(engine=ray_engine, partitions=2, micro_batches=2, replicas=1)


@pytest.mark.slow
def test_a_torch_module_trains_in_a_session_on_a_server(ray_engine):
    from serving import serving

    with serving(lambda: Borrowed(ray_engine)) as srv, gradserve.Client(srv.address, timeout=120) as client:
        check_trains_as_torch(client=client, partitions=2)


def test_what_a_session_cannot_follow_is_refused_by_name():
    x, y = torch.randn(4, 6, dtype=torch.float64), torch.randint(0, 3, (4,))
    bn = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3)).double()
    with pytest.raises(GraphError, match="module '1' is a BatchNorm in training mode"):
        gradserve.torch.session(bn, x, y, optimizer=torch.optim.SGD(bn.parameters(), lr=0.1), loss_fn=F.cross_entropy)
    gradserve.torch.session(
        bn.eval(), x, y, optimizer=torch.optim.SGD(bn.parameters(), lr=0.1), loss_fn=F.cross_entropy
    ).close()

    class Embedded(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.out = torch.nn.Embedding(10, 4, padding_idx=0), torch.nn.Linear(4, 3)

        def forward(self, tokens):
            return self.out(self.emb(tokens).mean(1))

    m = Embedded().double()
    tokens = torch.randint(0, 10, (4, 5))
    with pytest.raises(GraphError, match="'emb.weight' is an nn.Embedding weight with padding_idx=0"):
        gradserve.torch.session(
            m, tokens, y, optimizer=torch.optim.SGD(m.parameters(), lr=0.1), loss_fn=F.cross_entropy
        )
    with pytest.raises(Exception, match="NAdam"):
        gradserve.torch.session(bn.eval(), x, y, optimizer=torch.optim.NAdam(bn.parameters()), loss_fn=F.cross_entropy)
