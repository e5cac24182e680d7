"""Map a ``torch.optim`` optimizer (SGD, Adam, AdamW) and its param groups to :mod:`gradserve.optim`.

torch is imported only when :func:`from_torch` is called, so ``import gradserve.optim`` never loads
it. What cannot be mapped is refused with one message naming it: another optimizer class (NAdam,
LBFGS, a subclass whose step may differ), groups that disagree on whether weight decay is decoupled
(Adam vs AdamW), step hooks gradserve would not run, state from steps already taken, a parameter
without a name and a trainable one in no group (a frozen one, ``requires_grad=False``, need not
be). Flags that choose an implementation or autograd behaviour without changing the arithmetic
(``foreach``, ``fused``, ``capturable``, ``differentiable``) are ignored.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping, Union

from gradserve.worker.optim import SGD, Adam, AdamW, Optimizer

_TORCH_CLASSES = ("SGD", "Adam", "AdamW")


NamedParameters = Union[Iterable[tuple[str, Any]], Mapping[str, Any]]


def from_torch(
    optimizer: Any, named_parameters: NamedParameters | None = None
) -> tuple[Optimizer, dict[str, dict[str, Any]]]:
    """``(optimizer, overrides)`` for a ``torch.optim`` optimizer: gradserve's optimizer with param
    group 0's hyper-parameters, and for each parameter of another group the hyper-parameters that
    differ, by name (``ParamGroups(*from_torch(opt, model.named_parameters()))``).

    ``named_parameters`` names the tensors (``module.named_parameters()`` or a dict); without it, the
    names the optimizer was built with (``torch.optim.Adam(model.named_parameters())``) are used.
    Raises ValueError naming what cannot be mapped.
    """
    import torch

    _check_class(optimizer, torch)
    _check_fresh(optimizer)
    groups = optimizer.param_groups
    kind = _group_class(optimizer, groups)
    names = _names_by_tensor(groups, named_parameters)
    base = _describe(kind, groups[0], 0, torch)
    overrides: dict[str, dict[str, Any]] = {}
    for index, group in enumerate(groups):
        described = _describe(kind, group, index, torch)
        fields = [f.name for f in dataclasses.fields(described)]  # type: ignore[arg-type]
        differs = {k: getattr(described, k) for k in fields if getattr(described, k) != getattr(base, k)}
        for tensor in group["params"] if differs else ():
            overrides[names[id(tensor)]] = dict(differs)
    return base, overrides


def _check_class(optimizer: Any, torch: Any) -> None:
    cls = type(optimizer)
    if not any(cls is getattr(torch.optim, name) for name in _TORCH_CLASSES):
        raise ValueError(
            f"cannot map {cls.__module__}.{cls.__qualname__}: "
            "gradserve.optim has torch.optim's SGD, Adam and AdamW"
            + (" (a subclass may change their step)" if isinstance(optimizer, torch.optim.Optimizer) else "")
        )


def _check_fresh(optimizer: Any) -> None:
    hooks = sum(len(getattr(optimizer, f"_optimizer_step_{when}_hooks", {})) for when in ("pre", "post"))
    if hooks:
        raise ValueError(f"cannot map an optimizer with {hooks} step hook(s): gradserve would not run them")
    if optimizer.state:
        raise ValueError(
            f"cannot map an optimizer that has taken steps (state for {len(optimizer.state)} parameters): "
            "from_torch maps hyper-parameters, not momentum or moments; map it before its first step"
        )


def _group_class(optimizer: Any, groups: list[dict[str, Any]]) -> type[Optimizer]:
    """SGD, Adam or AdamW: torch's Adam with ``decoupled_weight_decay=True`` is AdamW, so the
    groups must agree on it."""
    if type(optimizer).__name__ == "SGD":
        return SGD
    decoupled = {bool(g.get("decoupled_weight_decay", False)) for g in groups}
    if len(decoupled) > 1:
        raise ValueError(
            "cannot map param groups that disagree on decoupled_weight_decay: one model has one optimizer type"
        )
    return AdamW if decoupled.pop() else Adam


def _names_by_tensor(groups: list[dict[str, Any]], named_parameters: Any) -> dict[int, str]:
    """Each optimized tensor's name, by identity; refuses a tensor without one and a named
    parameter in no group."""
    if named_parameters is None:
        if not all("param_names" in g for g in groups):
            raise ValueError(
                "give named_parameters (e.g. model.named_parameters()): the optimizer was built from unnamed parameters"
            )
        return {id(t): n for g in groups for t, n in zip(g["params"], g["param_names"])}
    pairs = list(named_parameters.items() if isinstance(named_parameters, Mapping) else named_parameters)
    names: dict[int, str] = {}
    for name, tensor in pairs:
        names.setdefault(id(tensor), name)  # a tied tensor listed twice keeps its first name
    in_groups = {id(t) for g in groups for t in g["params"]}
    for index, group in enumerate(groups):
        for tensor in group["params"]:
            if id(tensor) not in names:
                raise ValueError(
                    f"param group {index} holds a parameter of shape {tuple(tensor.shape)} "
                    "that named_parameters does not name"
                )
    # A frozen parameter is a constant of the exported Model (no dL/dw): no group need hold it.
    outside = [n for n, t in pairs if id(t) not in in_groups and getattr(t, "requires_grad", True)]
    if outside:
        raise ValueError(
            f"trainable parameter {outside[0]!r} is in none of the optimizer's param groups"
            + (f" (nor are {len(outside) - 1} more)" if len(outside) > 1 else "")
            + ": name only the parameters it trains"
        )
    return names


def _describe(kind: type[Optimizer], group: Mapping[str, Any], index: int, torch: Any) -> Optimizer:
    """gradserve's optimizer with one param group's hyper-parameters (tensors become numbers)."""

    def plain(value: Any) -> Any:
        if torch.is_tensor(value):
            return value.item()
        return tuple(plain(v) for v in value) if isinstance(value, (tuple, list)) else value

    fields = [f.name for f in dataclasses.fields(kind)]  # type: ignore[arg-type]
    values = {k: plain(group[k]) for k in fields if k in group}
    try:
        return kind(**values)
    except ValueError as e:
        raise ValueError(f"param group {index}: {e}") from None
