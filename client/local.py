"""``gradserve.local(...)``: the gradient engines in this process, with no server at all."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradserve.worker.graph import Model

if TYPE_CHECKING:
    from gradserve.server.inline import InlineEngine
    from gradserve.server.ray_engine import RayEngine


def local(engine: str = "inline", **options: Any) -> "InlineEngine | RayEngine":
    """An engine in this process with ``.gradients(model, feeds) -> Result``.

    ``engine="inline"`` runs the whole graph here. ``engine="ray"`` partitions it over Ray worker
    actors (options: ``partitions``, ``micro_batches``, ``replicas`` -- each a number or ``"auto"``,
    the default -- and ``ray_address``); with no address it starts an embedded single-node Ray.
    Use it as a context manager to release workers.
    """
    if engine == "inline":
        if options:
            raise TypeError(f"the inline engine takes no options (got {', '.join(sorted(options))})")
        from gradserve.server.inline import InlineEngine

        return InlineEngine()
    if engine == "ray":
        from gradserve.server.ray_engine import RayEngine

        return RayEngine(**options)
    raise ValueError(f"unknown engine {engine!r} (choose 'inline' or 'ray')")


def load_model(path: str | Path, loss: Any = None, batch_norm: str = "as-exported") -> Model:
    """Load an ``.onnx`` file (with an optional loss spec and BatchNormalization mode, see
    :func:`gradserve.load_onnx`) or a model saved in gradserve's own format (:meth:`Model.save`)."""
    path = Path(path)
    if path.suffix == ".onnx":
        from gradserve.client.onnx_import import load_onnx

        # the path, so weights in external data files are found
        return load_onnx(path, loss=loss, batch_norm=batch_norm)
    model = Model.from_bytes(path.read_bytes())
    if loss is not None:
        raise ValueError("--loss applies to ONNX models; a gradserve model names its own loss")
    if batch_norm != "as-exported":
        raise ValueError("--batch-norm applies to ONNX models; a gradserve model is run as saved")
    return model
