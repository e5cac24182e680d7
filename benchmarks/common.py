"""Shared benchmark plumbing: timing medians, exporting torch models, printing a table."""

from __future__ import annotations

import io
import statistics
import time
import warnings
from typing import Callable, Sequence

import torch


def median_seconds(fn: Callable[[], object], repeat: int, warmup: int = 2) -> float:
    """Median wall time of ``fn`` over ``repeat`` runs after ``warmup`` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def export_onnx(model: torch.nn.Module, inputs: Sequence[torch.Tensor], names: Sequence[str], dynamic_batch: bool = False) -> bytes:
    """ONNX bytes of ``model`` (TorchScript exporter, opset 17), with the batch axis symbolic if asked."""
    f = io.BytesIO()
    axes = {n: {0: "batch"} for n in names} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, tuple(inputs), f, input_names=list(names), output_names=["loss"], opset_version=17,
            dynamo=False, training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
            dynamic_axes=axes,
        )
    return f.getvalue()


def table(rows: list[tuple], header: tuple) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(header), line(tuple("-" * w for w in widths)), *map(line, rows)])
