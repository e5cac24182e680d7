"""The README's table of supported ops is the registry's own (``python -m gradserve.worker.ops.table``)."""

from pathlib import Path

import numpy as np

from gradserve.worker.ops.table import markdown

README = Path(__file__).resolve().parents[2] / "README.md"
BEGIN, END = "<!-- op table: python -m gradserve.worker.ops.table -->\n", "<!-- end of op table -->"


def test_readme_op_table_is_the_registry():
    text = README.read_text()
    assert BEGIN in text and END in text, "README.md lost the op table markers"
    table = text.split(BEGIN, 1)[1].split(END, 1)[0]
    assert table == markdown(), "README.md's op table is stale: paste `python -m gradserve.worker.ops.table` in"


def test_every_registered_op_is_in_the_table():
    from gradserve.worker.ops import REGISTRY

    listed = set(markdown().replace("|", " ").split())
    assert {op for op in REGISTRY if not op.startswith("gradserve.")} <= listed


# -- planning reads the table: every row must say how the op moves the batch and what it costs ----
def test_every_op_has_a_batch_rule_or_says_why_not():
    """Micro-batching follows the batch axis by each op's ``batch=`` rule; an op without one
    would be refused silently (as BitShift was), so every row states one, or why it has none."""
    from gradserve.worker.ops import REGISTRY
    from gradserve.worker.ops.batch import BatchRule

    missing = sorted(op for op, d in REGISTRY.items() if not isinstance(d.batch, BatchRule))
    assert not missing, f"ops without a batch rule (give their defop row batch=..., or never(reason)): {missing}"
    unexplained = sorted(op for op, d in REGISTRY.items() if d.batch.rule is None and not d.batch.refused.strip())
    assert not unexplained, f"ops marked not batchable without a reason: {unexplained}"


def test_every_op_has_a_flop_count():
    """The partitioner balances stages by each op's ``flops=`` count (per_element: the explicit default)."""
    from gradserve.worker.ops import REGISTRY

    missing = sorted(op for op, d in REGISTRY.items() if not callable(d.flops))
    assert not missing, f"ops without a FLOP count (give their defop row flops=..., e.g. per_element): {missing}"


def test_products_count_their_multiply_adds():
    """The ops whose cost is not one per element count their own: 2 x multiply-adds."""
    from gradserve.server.planning.cost import node_flops
    from gradserve.worker.graph import Node
    from gradserve.worker.validate import ValueInfo

    def info(*shape):
        return ValueInfo(shape, np.dtype(np.float32))

    shapes = {
        "a": info(8, 16),
        "w": info(16, 4),
        "y": info(8, 4),
        "x": info(2, 3, 10, 10),
        "k": info(5, 3, 3, 3),
        "c": info(2, 5, 8, 8),
        "seq": info(7, 2, 3),
        "W": info(1, 12, 3),
        "R": info(1, 12, 4),
        "Y": info(7, 1, 2, 4),
    }
    assert node_flops(Node("mm", "MatMul", ["a", "w"], ["y"]), shapes) == 2 * 8 * 4 * 16
    assert node_flops(Node("g", "Gemm", ["a", "w"], ["y"]), shapes) == 2 * 8 * 4 * 16
    assert node_flops(Node("conv", "Conv", ["x", "k"], ["c"]), shapes) == 2 * (2 * 5 * 8 * 8) * 27
    assert node_flops(Node("gru", "GRU", ["seq", "W", "R"], ["Y"]), shapes) == 2 * 7 * 2 * (36 + 48)
    assert node_flops(Node("relu", "Relu", ["y"], ["y2"]), shapes) == 8 * 4  # the default: one per element
    assert node_flops(Node("mm", "MatMul", ["unknown", "w"], ["y"]), shapes) == 16 * 4  # shapes unknown: the default
