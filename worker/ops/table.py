"""The table of supported ops, made from the registry itself, so it cannot drift from what runs.

    python -m gradserve.worker.ops.table      # the Markdown table of the README's "Supported ops"

Ops are grouped by family (the module or modules that register them, see FAMILIES); an op registered without a VJP (comparisons,
shape arithmetic, rounding, indices...) is listed as having no gradient: errors never flow through it.
Ops that only graph rewrites make (``gradserve.*``, never sent by users) are not listed.
"""

from __future__ import annotations

from collections import defaultdict

from gradserve.worker.ops import REGISTRY

# module -> the heading of its row, in the order rows appear; a family split over several modules
# (elementwise ops, convolutions, ...) lists each of them under one heading, so it stays one row
FAMILIES = {
    "elementwise": "Elementwise",
    "unary": "Elementwise",
    "activations": "Elementwise",
    "linalg": "Linear algebra",
    "einsum": "Linear algebra",
    "reduce": "Reductions",
    "shape": "Shapes and data movement",
    "index": "Indexing",
    "conv": "Convolution",
    "conv_transpose": "Convolution",
    "pool": "Pooling",
    "norm": "Normalisation",
    "batchnorm": "Normalisation",
    "resize": "Resizing",
    "rnn": "Recurrent",
    "loss": "Losses",
}


def markdown() -> str:
    """The supported-op table in Markdown: one row per op family."""
    rows: dict[str, tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))
    unknown: set[str] = set()
    for op_type, opdef in REGISTRY.items():
        if op_type.startswith("gradserve."):
            continue
        module = opdef.forward.__module__.rsplit(".", 1)[-1]
        if module not in FAMILIES:
            unknown.add(module)
            continue
        with_grad, without = rows[FAMILIES[module]]
        (with_grad if opdef.vjp is not None else without).append(op_type)
    if unknown:
        raise RuntimeError(f"op modules without a family heading: {', '.join(sorted(unknown))}")
    lines = ["| family | ops with a VJP | ops without a gradient |", "| --- | --- | --- |"]
    for title in dict.fromkeys(FAMILIES.values()):
        if title in rows:
            with_grad, without = rows[title]
            lines.append(f"| {title} | {' '.join(sorted(with_grad))} | {' '.join(sorted(without))} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
