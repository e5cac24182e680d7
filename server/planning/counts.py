"""Counts of partitions, micro-batches and replicas: a whole number, or ``"auto"`` (the engine
chooses, see :mod:`gradserve.server.planning.auto`), and their one translation to and from the wire,
where 0 means ``auto`` (see ``proto/v1/service.proto``).

A module of its own, importing nothing but the standard library, so that the client library and
the command line can parse and send counts without loading the planner (which imports the op
library and ONNX).
"""

from __future__ import annotations

from typing import Final, Literal, Union

AUTO: Final = "auto"  # Final: its type is Literal["auto"], so it is a Count
Count = Union[int, Literal["auto"]]


def parse_count(text: str | int) -> Count:
    """``"auto"`` or a whole number >= 1 (CLI values, Python arguments); ValueError otherwise."""
    if isinstance(text, str) and text.strip().lower() == AUTO:
        return AUTO
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise ValueError(f"expected 'auto' or a whole number >= 1, got {text!r}") from None
    if value < 1 or (isinstance(text, float) and text != value):
        raise ValueError(f"expected 'auto' or a whole number >= 1, got {text!r}")
    return value


def count_to_wire(value: Count) -> int:
    """The JobOptions field for ``value``: 0 for auto, else the number (checked >= 1)."""
    value = parse_count(value)
    return 0 if value == AUTO else int(value)


def count_from_wire(value: int) -> Count:
    """A JobOptions field as Python: 0 (the proto3 default, so unset) means auto."""
    return AUTO if value == 0 else int(value)
