"""gradserve.optim against torch.optim: every optimizer and option over 20 steps of random float64
gradients gives torch's weights to 1e-9 relative; param groups, clipping split over partitions,
schedules, the mapping from torch optimizers and the JSON descriptions. No Ray."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any, Callable

import numpy as np
import pytest
import torch

from gradserve.optim import (
    SGD,
    Adam,
    AdamW,
    Optimizer,
    ParamGroups,
    check_schedule,
    clip_scale,
    from_torch,
    local_sq_norm,
    lr_at,
)

STEPS = 20
SHAPES = {"w": (4, 3), "b": (3,), "k": (2, 2, 2), "big": (90, 100)}  # big: updated in two chunks
OURS = {"SGD": SGD, "Adam": Adam, "AdamW": AdamW}

CASES = [
    ("SGD", {"lr": 0.1}),
    ("SGD", {"lr": 0.1, "momentum": 0.9}),
    ("SGD", {"lr": 0.05, "momentum": 0.9, "dampening": 0.3}),
    ("SGD", {"lr": 0.05, "momentum": 0.8, "nesterov": True}),
    ("SGD", {"lr": 0.1, "weight_decay": 0.05}),
    ("SGD", {"lr": 0.1, "momentum": 0.5, "maximize": True}),
    ("SGD", {"lr": 0.02, "momentum": 0.9, "weight_decay": 0.1, "nesterov": True, "maximize": True}),
    ("Adam", {}),
    ("Adam", {"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-6}),
    ("Adam", {"lr": 0.01, "weight_decay": 0.1}),
    ("Adam", {"lr": 0.01, "amsgrad": True}),
    ("Adam", {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True, "maximize": True}),
    ("Adam", {"lr": 0.01, "betas": (0.3, 0.9)}),  # 1 - beta1 >= 0.5: torch's other lerp form
    ("AdamW", {}),
    ("AdamW", {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True}),
    ("AdamW", {"lr": 0.01, "weight_decay": 0.0, "maximize": True}),
    ("AdamW", {"lr": 0.01, "betas": (0.4, 0.95), "weight_decay": 0.3, "maximize": True}),
]


def _case_id(case: tuple[str, dict]) -> str:
    return case[0] + "".join(f"-{k}={v}" for k, v in case[1].items())


def _weights(seed: int = 0, dtype: Any = np.float64) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s).astype(dtype) for n, s in SHAPES.items()}


def _grads(seed: int = 1, dtype: Any = np.float64, spread: float = 0.0) -> list[dict[str, np.ndarray]]:
    """STEPS steps of random gradients; ``spread`` varies their size step to step (clipping)."""
    rng = np.random.default_rng(seed)
    steps = []
    for _ in range(STEPS):
        size = np.exp(rng.uniform(-spread, spread))
        steps.append({n: (size * rng.standard_normal(s)).astype(dtype) for n, s in SHAPES.items()})
    return steps


def _torch_run(
    make: Callable[[dict[str, torch.Tensor]], torch.optim.Optimizer],
    weights: dict[str, np.ndarray],
    grads: list[dict[str, np.ndarray]],
    max_norm: float | None = None,
    scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
) -> tuple[dict[str, np.ndarray], list[float]]:
    """torch's weights after the steps, and the norms clip_grad_norm_ returned."""
    tensors = {n: torch.tensor(w.copy(), requires_grad=True) for n, w in weights.items()}
    opt = make(tensors)
    sched = scheduler(opt) if scheduler else None
    norms = []
    for step_grads in grads:
        for n, t in tensors.items():
            t.grad = torch.tensor(step_grads[n].copy())
        if max_norm is not None:
            norms.append(float(torch.nn.utils.clip_grad_norm_(list(tensors.values()), max_norm)))
        opt.step()
        if sched:
            sched.step()
    return {n: t.detach().numpy() for n, t in tensors.items()}, norms


def _our_run(
    groups: ParamGroups,
    weights: dict[str, np.ndarray],
    grads: list[dict[str, np.ndarray]],
    schedule: Any = None,
    partitions: tuple[tuple[str, ...], ...] = (tuple(SHAPES),),
    max_norm: float | None = None,
) -> tuple[dict[str, np.ndarray], list[float]]:
    """Our weights after the steps, each partition updating its own parameters as a worker
    would, and the clip scales the driver computed."""
    params = {n: w.copy() for n, w in weights.items()}
    parts = [{n: params[n] for n in names} for names in partitions]
    states = [groups.init_state(part) for part in parts]
    scales = []
    for step, step_grads in enumerate(grads, start=1):
        scale = 1.0
        if max_norm is not None:
            scale = clip_scale(sum(local_sq_norm(step_grads[n] for n in part) for part in parts), max_norm)
            scales.append(scale)
        lr = lr_at(schedule, step) if schedule is not None else None
        for part, state in zip(parts, states):
            groups.step(part, {n: step_grads[n] for n in part}, state, step, lr=lr, grad_scale=scale)
    return params, scales


def _assert_same(ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray], rtol: float = 1e-9) -> None:
    assert ours.keys() == theirs.keys()
    for n in ours:
        assert ours[n].dtype == theirs[n].dtype, n
        np.testing.assert_allclose(ours[n], theirs[n], rtol=rtol, atol=rtol * np.abs(theirs[n]).max(), err_msg=n)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_each_optimizer_gives_torchs_weights(case):
    name, kwargs = case
    weights, grads = _weights(), _grads()
    theirs, _ = _torch_run(lambda t: getattr(torch.optim, name)(t.values(), **kwargs), weights, grads)
    ours, _ = _our_run(ParamGroups(OURS[name](**kwargs)), weights, grads)
    _assert_same(ours, theirs)
    assert not np.allclose(ours["w"], weights["w"])  # it did move


def test_float32_weights_stay_float32_and_track_torch():
    weights, grads = _weights(dtype=np.float32), _grads(dtype=np.float32)
    theirs, _ = _torch_run(lambda t: torch.optim.AdamW(t.values(), lr=0.01, amsgrad=True), weights, grads)
    ours, _ = _our_run(ParamGroups(AdamW(lr=0.01, amsgrad=True)), weights, grads)
    _assert_same(ours, theirs, rtol=1e-5)


def test_a_non_contiguous_parameter_is_updated_in_place_alike():
    opt, rng = AdamW(lr=0.1, amsgrad=True), np.random.default_rng(5)
    contiguous = rng.standard_normal((300, 40))
    transposed = np.asfortranarray(contiguous).T.copy().T  # the same values, column-major
    states = [opt.init_state(contiguous), opt.init_state(transposed)]
    for step in range(1, 4):
        grad = rng.standard_normal((300, 40))
        opt.step(contiguous, grad, states[0], step)
        opt.step(transposed, grad, states[1], step)
    assert not transposed.flags.c_contiguous and np.array_equal(contiguous, transposed)


def test_the_step_leaves_the_gradient_alone_and_takes_read_only_ones():
    grad = np.ones(3)
    grad.flags.writeable = False
    opt = SGD(lr=0.1, momentum=0.9, weight_decay=0.1, maximize=True)
    param, state = np.zeros(3), opt.init_state(np.zeros(3))
    opt.step(param, grad, state, 1)
    opt.step(param, grad, state, 2, lr=0.2)
    assert np.array_equal(grad, np.ones(3))
    with pytest.raises(ValueError, match=r"gradient of shape \(2,\) for a parameter of shape \(3,\)"):
        opt.step(param, np.ones(2), state, 3)
    with pytest.raises(ValueError, match="step must be an integer from 1"):
        opt.step(param, grad, state, 0)


GROUPS = [  # torch optimizer, base arguments, then per group: its parameters, its arguments
    ("SGD", {"lr": 0.1, "momentum": 0.9}, [("w b big", {}), ("k", {"lr": 0.01, "momentum": 0.5, "weight_decay": 0.1})]),
    ("Adam", {"lr": 0.01}, [("w big", {}), ("b k", {"betas": (0.5, 0.9), "amsgrad": True, "lr": 0.05})]),
    ("AdamW", {"lr": 0.02}, [("k", {"weight_decay": 0.0}), ("w b big", {})]),
]


@pytest.mark.parametrize("name, base, groups", GROUPS, ids=[g[0] for g in GROUPS])
def test_param_groups_mapped_from_torch_give_torchs_weights(name, base, groups):
    def make(t: dict[str, torch.Tensor]) -> torch.optim.Optimizer:
        return getattr(torch.optim, name)(
            [{"params": [t[n] for n in names.split()], **kw} for names, kw in groups], **base
        )

    weights, grads = _weights(), _grads()
    theirs, _ = _torch_run(make, weights, grads)
    tensors = {n: torch.tensor(w, requires_grad=True) for n, w in weights.items()}
    optimizer, overrides = from_torch(make(tensors), tensors)
    assert type(optimizer).__name__ == name and overrides  # some parameters differ from group 0
    ours, _ = _our_run(ParamGroups(optimizer, overrides), weights, grads, partitions=(("w", "big"), ("b", "k")))
    _assert_same(ours, theirs)


@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_clipping_split_over_two_partitions_equals_torchs_whole(name):
    weights, grads = _weights(), _grads(spread=1.5)
    for step_grads in grads:
        for g in step_grads.values():
            g.flags.writeable = False  # as gradients arrive from Ray's object store: scaled, not in place
    kwargs = {"lr": 0.05, "momentum": 0.9} if name == "SGD" else {"lr": 0.05}
    max_norm = float(np.median([np.sqrt(sum(np.sum(g**2) for g in step.values())) for step in grads]))
    theirs, norms = _torch_run(lambda t: getattr(torch.optim, name)(t.values(), **kwargs), weights, grads, max_norm)
    ours, scales = _our_run(
        ParamGroups(OURS[name](**kwargs)), weights, grads, None, (("w", "b"), ("k", "big")), max_norm
    )
    _assert_same(ours, theirs)
    assert any(s < 1 for s in scales) and any(s == 1 for s in scales)  # both sides of the threshold
    expected = [min(max_norm / (n + 1e-6), 1.0) for n in norms]
    np.testing.assert_allclose(scales, expected, rtol=1e-12)


def test_local_sq_norm_sums_partitions_in_float64_over_chunks():
    rng = np.random.default_rng(3)
    big = rng.standard_normal(3_000_001).astype(np.float32)  # several chunks
    small = rng.standard_normal((5, 7))
    whole = local_sq_norm([big, small])
    assert whole == pytest.approx(local_sq_norm([big]) + local_sq_norm([small]), rel=1e-15)
    assert whole == pytest.approx(float(np.sum(big.astype(np.float64) ** 2) + np.sum(small**2)), rel=1e-12)
    assert local_sq_norm([]) == 0.0
    with pytest.raises(ValueError, match="max_norm must be positive"):
        clip_scale(1.0, 0.0)


def test_list_schedule_replays_torchs_multistep_lr_across_groups():
    weights, grads = _weights(), _grads()

    def make(t: dict[str, torch.Tensor]) -> torch.optim.Optimizer:
        groups = [{"params": [t["w"], t["b"], t["big"]]}, {"params": [t["k"]], "lr": 0.03}]
        return torch.optim.SGD(groups, lr=0.1, momentum=0.9)

    multistep = lambda o: torch.optim.lr_scheduler.MultiStepLR(o, [5, 12], gamma=0.5)
    theirs, _ = _torch_run(make, weights, grads, scheduler=multistep)
    tensors = {n: torch.tensor(w, requires_grad=True) for n, w in weights.items()}
    groups = ParamGroups(*from_torch(make(tensors), tensors))
    schedule = [(1, 0.1), (6, 0.05), (13, 0.025)]  # the lr after k scheduler steps is step k + 1's
    ours, _ = _our_run(groups, weights, grads, schedule=schedule)
    _assert_same(ours, theirs)


def test_callable_schedule_replays_torchs_lambda_lr():
    weights, grads = _weights(), _grads()
    warmup = lambda k: min(1.0, (k + 1) / 5) * 0.9**k  # torch's factor after k scheduler steps
    scheduler = lambda o: torch.optim.lr_scheduler.LambdaLR(o, warmup)
    theirs, _ = _torch_run(lambda t: torch.optim.AdamW(t.values(), lr=0.02), weights, grads, scheduler=scheduler)
    ours, _ = _our_run(ParamGroups(AdamW(lr=0.02)), weights, grads, schedule=lambda step: 0.02 * warmup(step - 1))
    _assert_same(ours, theirs)


def test_lr_at_and_its_refusals():
    schedule = [(1, 0.1), (10, 0.01), (20, 0.001)]
    assert [lr_at(schedule, s) for s in (1, 9, 10, 19, 20, 10_000)] == [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    assert lr_at(lambda s: 1 / s, 4) == 0.25
    assert check_schedule([[1, 1]]) == ((1, 1.0),)  # JSON gives lists
    for bad, message in [
        ([], "non-empty list"),
        ([(2, 0.1)], "must start at step 1"),
        ([(1, 0.1), (1, 0.2)], "steps must increase"),
        ([(1, -0.1)], "Invalid learning rate"),
        ([(1.5, 0.1)], "integer from 1"),
        ([(1, 0.1, 3)], "not a \\(step, lr\\) pair"),
        ([(1, "fast")], "must be a number"),
    ]:
        with pytest.raises(ValueError, match=message):
            lr_at(bad, 1)
    with pytest.raises(ValueError, match="Invalid learning rate for step 3"):
        lr_at(lambda s: -1.0, 3)


def test_from_torch_maps_named_optimizers_and_decoupled_adam():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Tanh(), torch.nn.Linear(2, 1)).double()
    opt = torch.optim.Adam(
        model.named_parameters(), lr=0.01, weight_decay=0.2, decoupled_weight_decay=True, foreach=True
    )
    optimizer, overrides = from_torch(opt)  # the names the optimizer was built with
    assert optimizer == AdamW(lr=0.01, weight_decay=0.2) and overrides == {}
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": torch.tensor(0.5)}]
    opt = torch.optim.SGD(groups, lr=0.1)
    optimizer, overrides = from_torch(opt, model.named_parameters())
    assert optimizer == SGD(lr=0.1) and overrides == {"2.weight": {"lr": 0.5}, "2.bias": {"lr": 0.5}}
    model[0].requires_grad_(False)  # frozen: a constant of the exported Model, in no group
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    assert from_torch(opt, model.named_parameters()) == (SGD(lr=0.1, momentum=0.9), {})


class _MySGD(torch.optim.SGD):
    pass


def test_from_torch_refuses_what_it_cannot_map():
    model = torch.nn.Linear(3, 2).double()
    named = dict(model.named_parameters())
    mixed = [{"params": [model.weight]}, {"params": [model.bias], "decoupled_weight_decay": True}]
    refusals = [
        (torch.optim.NAdam(model.parameters()), named, "cannot map torch.optim.nadam.NAdam: gradserve.optim has"),
        (torch.optim.LBFGS(model.parameters()), named, "cannot map torch.optim.lbfgs.LBFGS"),
        (_MySGD(model.parameters()), named, r"_MySGD: .* \(a subclass may change their step\)"),
        (torch.optim.SGD([model.weight]), named, "trainable parameter 'bias' is in none of the optimizer's param"),
        (
            torch.optim.SGD(model.parameters()),
            {"weight": model.weight},
            r"param group 0 holds a parameter of shape \(2,\)",
        ),
        (torch.optim.SGD(model.parameters()), None, "give named_parameters"),
        (torch.optim.Adam(mixed), named, "disagree on decoupled_weight_decay"),
    ]
    hooked = torch.optim.SGD(model.parameters())
    hooked.register_step_post_hook(lambda *a: None)
    refusals.append((hooked, named, "1 step hook"))
    stepped = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3, dtype=torch.float64)).sum().backward()
    stepped.step()
    refusals.append((stepped, named, "has taken steps"))
    for opt, names, message in refusals:
        with pytest.raises(ValueError, match=message):
            from_torch(opt, names)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_descriptions_round_trip_through_json(case):
    name, kwargs = case
    opt = OURS[name](**kwargs)
    again = Optimizer.from_dict(json.loads(json.dumps(opt.to_dict())))
    assert again == opt and type(again) is type(opt)
    more = {"betas": (0.5, 0.6)} if "betas" in opt.to_dict() else {"momentum": 0.5}
    groups = ParamGroups(opt, {"w": {"lr": 0.5, "weight_decay": 0.25, **more}})
    assert ParamGroups.from_dict(json.loads(json.dumps(groups.to_dict()))) == groups


def test_bad_descriptions_are_refused_naming_the_fault():
    for bad, message in [
        ({"type": "NAdam"}, "unknown optimizer type 'NAdam'"),
        ({"type": "SGD", "betas": [0.9, 0.9]}, "SGD has no hyper-parameter 'betas'"),
        ({"type": "Adam", "betas": [0.9]}, "betas must be a pair of numbers"),
        ({"type": "Adam", "lr": "0.1"}, "lr must be a number"),
        ({"type": "Adam", "amsgrad": 1}, "amsgrad must be True or False"),
        ({"type": "SGD", "lr": float("nan")}, "lr must be finite"),
    ]:
        with pytest.raises(ValueError, match=message):
            Optimizer.from_dict(bad)
    with pytest.raises(ValueError, match="parameter 'w': Adam has no hyper-parameter 'momentum'"):
        ParamGroups(Adam(), {"w": {"momentum": 0.9}})


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("SGD", {"lr": -1.0}),
        ("SGD", {"momentum": -0.1}),
        ("SGD", {"weight_decay": -0.1}),
        ("SGD", {"nesterov": True}),
        ("SGD", {"momentum": 0.9, "dampening": 0.1, "nesterov": True}),
        ("Adam", {"eps": -1.0}),
        ("Adam", {"betas": (1.0, 0.9)}),
        ("AdamW", {"betas": (0.9, -0.1)}),
        ("AdamW", {"weight_decay": -1.0}),
    ],
)
def test_hyper_parameters_torch_refuses_are_refused_alike(name, kwargs):
    with pytest.raises(ValueError) as theirs:
        getattr(torch.optim, name)([torch.zeros(1, requires_grad=True)], **kwargs)
    with pytest.raises(ValueError) as ours:
        OURS[name](**kwargs)
    assert str(ours.value) == str(theirs.value)


def test_state_is_torchs_and_its_size_is_known():
    param = np.zeros((10, 10), np.float32)
    assert SGD().init_state(param) == {} and SGD(momentum=0.9).state_copies == 1
    state = AdamW(amsgrad=True).init_state(param)
    assert sorted(state) == ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"] and state["exp_avg"].dtype == np.float32
    groups = ParamGroups(Adam(), {"a": {"amsgrad": True}})
    assert groups.state_bytes({"a": param, "b": param}) == (3 + 2) * param.nbytes


def test_importing_gradserve_optim_loads_no_torch():
    code = "import sys, gradserve, gradserve.optim; assert 'torch' not in sys.modules and 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
