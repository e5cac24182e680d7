"""Files from torch's default ONNX export (client/onnx_folded.py): its optimizer folds computations on
parameters into new initializers (a Linear's weight transposed, the position-embedding lookup), so
``load_onnx`` and ``gradserve grad`` warn once, naming both remedies; an ``optimize=False`` export, a
legacy export and ``gradserve.torch``'s own export load without the warning."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings

import numpy as np
import onnx
import pytest
import torch

import gradserve
from gradserve.client.onnx_folded import SIGNATURE_KEY

FOLDED = "initializers look folded by torch's ONNX optimizer"


class _GPT2Loss(torch.nn.Module):
    """A transformers GPT-2 from a small config (no hub) returning its LM loss. Its lm_head is an
    nn.Linear (stored transposed by the optimizer) and its position embedding a lookup of a constant
    range (folded into a constant)."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        self.lm = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=20, n_positions=16)).eval()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=ids, labels=ids).loss


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """The module and its file from torch's default dynamo call, with optimize=False, and the legacy exporter."""
    module, ids = _GPT2Loss(), torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(0))
    folder = tmp_path_factory.mktemp("folded")
    paths = {kind: folder / f"{kind}.onnx" for kind in ("default", "unoptimized", "legacy")}
    dynamic = ({0: torch.export.Dim("batch")},)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (ids,), str(paths["default"]), input_names=["ids"], dynamo=True, dynamic_shapes=dynamic
        )
        torch.onnx.export(
            module,
            (ids,),
            str(paths["unoptimized"]),
            input_names=["ids"],
            dynamo=True,
            dynamic_shapes=dynamic,
            optimize=False,
        )
        torch.onnx.export(
            module, (ids,), str(paths["legacy"]), input_names=["ids"], dynamo=False, dynamic_axes={"ids": {0: "batch"}}
        )
    return module, ids, paths


def folded_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "gradserve.onnx" and FOLDED in r.getMessage()]


def test_default_export_of_a_transformers_model_loads_with_one_warning(exports, caplog):
    module, ids, paths = exports
    with caplog.at_level(logging.WARNING, logger="gradserve.onnx"):
        model = gradserve.load_onnx(paths["default"])
    [message] = folded_warnings(caplog)
    # the count is the file's floating tensors that are none of the module's parameters (a tied
    # weight under either of its names)
    named = {n for n, _ in module.named_parameters(remove_duplicate=False)}
    initializers = onnx.load(str(paths["default"])).graph.initializer
    foreign = [i.name for i in initializers if i.data_type == onnx.TensorProto.FLOAT and i.dims and i.name not in named]
    assert foreign and message.startswith(f"{len(foreign)} {FOLDED} ({', '.join(foreign[:3])}")
    assert "gradserve.torch.export" in message and "optimize=False" in message
    assert "not your module's parameters" in message
    # it still loads and runs: exact gradients of the tensors the file holds, under their names
    result = gradserve.local().gradients(model, {"ids": ids.numpy()})
    assert set(foreign) <= set(result.grads) and np.isfinite(result.loss)


@pytest.mark.parametrize("kind", ["unoptimized", "legacy"])
def test_unfolded_exports_load_without_the_warning(exports, kind, caplog):
    _, _, paths = exports
    with caplog.at_level(logging.WARNING, logger="gradserve.onnx"):
        gradserve.load_onnx(paths[kind])
    assert folded_warnings(caplog) == []


def test_the_signal_is_the_dynamo_exporters_signature(exports):
    """The dynamo files carry the exported program's signature (the warning's evidence); the
    optimize=False one holds the module's parameters under their own names only."""
    module, _, paths = exports
    graphs = {k: onnx.load(str(p)).graph for k, p in paths.items()}
    assert SIGNATURE_KEY in {m.key for m in graphs["default"].metadata_props}
    assert SIGNATURE_KEY not in {m.key for m in graphs["legacy"].metadata_props}
    floating = {i.name for i in graphs["unoptimized"].initializer if i.data_type == onnx.TensorProto.FLOAT}
    assert floating <= {n for n, _ in module.named_parameters(remove_duplicate=False)}


def test_gradserve_torch_export_does_not_warn(caplog):
    """gradserve.torch exports with the optimizer on, every parameter a graph input: nothing folded."""
    import gradserve.torch as gt

    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
    with caplog.at_level(logging.WARNING, logger="gradserve.onnx"):
        gt.export(net, (torch.randn(5, 4), torch.randn(5, 1)), torch.nn.functional.mse_loss)
    assert folded_warnings(caplog) == []


def test_cli_prints_the_warning(exports, tmp_path):
    _, ids, paths = exports
    feeds = tmp_path / "feeds.npz"
    np.savez(feeds, ids=ids.numpy())
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gradserve.client.cli",
            "grad",
            str(paths["default"]),
            "--feeds",
            str(feeds),
            "--out",
            str(tmp_path / "g.npz"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if FOLDED in ln]
    assert len(lines) == 1 and "WARNING gradserve.onnx" in lines[0] and "optimize=False" in lines[0]
