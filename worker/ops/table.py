"""The table of supported ops, made from the registry itself, so it cannot drift from what runs.

    python -m gradserve.worker.ops.table      # the Markdown table of the README's "Supported ops"

Ops are grouped by the module that registers them; an op registered without a VJP (comparisons,
shape arithmetic, rounding, indices...) is listed as having no gradient: errors never flow through it.
Ops that only graph rewrites make (``gradserve.*``, never sent by users) are not listed.
"""

from __future__ import annotations

from collections import defaultdict

from gradserve.worker.ops import REGISTRY

# module -> the heading of its row, in the order rows appear
FAMILIES = {
    "elementwise": "Elementwise",
    "linalg": "Linear algebra",
    "reduce": "Reductions",
    "shape": "Shapes and data movement",
    "index": "Indexing",
    "conv": "Convolution",
    "pool": "Pooling",
    "norm": "Normalisation",
    "resize": "Resizing",
    "rnn": "Recurrent",
    "loss": "Losses",
}


def markdown() -> str:
    """The supported-op table in Markdown: one row per op family."""
    rows: dict[str, tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))
    for op_type, opdef in REGISTRY.items():
        if op_type.startswith("gradserve."):
            continue
        module = opdef.forward.__module__.rsplit(".", 1)[-1]
        with_grad, without = rows[module]
        (with_grad if opdef.vjp is not None else without).append(op_type)
    unknown = sorted(set(rows) - set(FAMILIES))
    if unknown:
        raise RuntimeError(f"op modules without a family heading: {', '.join(unknown)}")
    lines = ["| family | ops with a VJP | ops without a gradient |", "| --- | --- | --- |"]
    for module, title in FAMILIES.items():
        if module in rows:
            with_grad, without = rows[module]
            lines.append(f"| {title} | {' '.join(sorted(with_grad))} | {' '.join(sorted(without))} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
