"""gradserve: send a model (a graph of ops, its parameters, a batch and a scalar loss), get the loss
and dL/dw for every parameter back -- computed inline, on Ray workers, or by a gRPC server.

The package maps onto the repository's folders: ``gradserve.worker`` (ops, VJPs, running a graph),
``gradserve.server`` (planning, orchestration, the gRPC service), ``gradserve.client`` (builder,
ONNX import, client library, CLI) and ``gradserve.proto`` (wire contracts).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public names, imported on first use so `import gradserve` stays fast (Ray and gRPC load lazily).
_EXPORTS = {
    "Model": "gradserve.worker.graph",
    "GraphError": "gradserve.worker.graph",
    "ModelBuilder": "gradserve.client.builder",
    "Result": "gradserve.server.result",
    "local": "gradserve.client.local",
    "load_model": "gradserve.client.local",
    "load_onnx": "gradserve.client.onnx_import",
    "LossSpec": "gradserve.client.onnx_import",
    "Client": "gradserve.client.remote",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from gradserve.client.builder import ModelBuilder
    from gradserve.client.local import load_model, local
    from gradserve.client.onnx_import import LossSpec, load_onnx
    from gradserve.client.remote import Client
    from gradserve.server.result import Result
    from gradserve.worker.graph import GraphError, Model


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gradserve' has no attribute {name!r}")


class _TorchAlias:
    """``gradserve.torch`` is ``gradserve.client.torch`` (the ``gradserve[torch]`` extra). An import
    hook, not a file: a ``torch.py`` at the repository root would shadow the real torch for anything
    run from there. Nothing imports torch until ``gradserve.torch`` is imported."""

    NAME = "gradserve.torch"
    TARGET = "gradserve.client.torch"

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != self.NAME:
            return None
        import importlib.util

        # ignore: typeshed's loader protocol asks for the legacy load_module; importlib needs only these two
        return importlib.util.spec_from_loader(fullname, self)  # type: ignore[arg-type]

    def create_module(self, spec: Any) -> Any:
        import importlib

        module = importlib.import_module(self.TARGET)  # the one module object under both names
        self.spec = module.__spec__
        return module

    def exec_module(self, module: Any) -> None:
        module.__spec__ = self.spec  # importlib set the alias's spec on it


import sys as _sys  # noqa: E402

if not any(type(f).__name__ == "_TorchAlias" for f in _sys.meta_path):  # once, even across reloads
    _sys.meta_path.append(_TorchAlias())
