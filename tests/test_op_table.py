"""The README's table of supported ops is the registry's own (``python -m gradserve.worker.ops.table``)."""

from pathlib import Path

from gradserve.worker.ops.table import markdown

README = Path(__file__).resolve().parent.parent / "README.md"
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
