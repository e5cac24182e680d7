"""Telling whether torch's ONNX optimizer folded computations on parameters into new initializers.

torch's dynamo exporter (``torch.onnx.export(..., dynamo=True)``, the default since torch 2.9)
writes the exported program's signature into the graph's ``metadata_props`` under
:data:`SIGNATURE_KEY` (torch/onnx/_internal/exporter/_core.py): one line per input,
``p_fc_weight: PARAMETER target='fc.weight'``. Without its optimizer (``optimize=False``) every
parameter, buffer and lifted constant is an initializer named by its target, and the exporter's
own constants are ``Constant`` nodes. Its optimizer (the default) folds computations on them into
new initializers under generated names: a Linear's weight transposed (``val_39``), a position
embedding's lookup (``embedding_2``), BatchNorm folded into a convolution, packed RNN gates; and it
merges parameters of equal values into one. gradserve's dL/dw of such an initializer is exact but
is not the gradient of any of the module's parameters.

So a file with the signature, whose initializers include some of the signature's targets, and
floating tensors (not the scalars the exporter lifts: 0.5, sqrt(d)) that are none of them, was
written by that optimizer. Nothing is guessed or mapped back: the importer only warns.
"""

from __future__ import annotations

import re

import onnx

SIGNATURE_KEY = "pkg.torch.export.ExportedProgram.graph_signature"
_TARGET = re.compile(r"^\s*\S+: (PARAMETER|BUFFER|CONSTANT_TENSOR) target='([^']*)'", re.M)
_FLOATING = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
_SHOWN = 3  # names quoted in the warning


def folded_warning(proto: onnx.ModelProto) -> str | None:
    """The warning for a file torch's ONNX optimizer folded parameters in, else None (the legacy
    exporter, ``optimize=False``, other tools, ``gradserve.torch``'s exports)."""
    targets = _signature_targets(proto)
    initializers = proto.graph.initializer
    if not any(
        init.name in targets.get("PARAMETER", ()) or init.name in targets.get("BUFFER", ()) for init in initializers
    ):
        # no signature, or the module's tensors are not stored under their names: graph inputs
        # (gradserve.torch exports a function of its parameters) or a file some other tool rewrote
        return None
    known = set().union(*targets.values())
    folded = [
        init.name
        for init in initializers
        if init.data_type in _FLOATING and len(init.dims) > 0 and init.name not in known
    ]
    if not folded:
        return None
    stored = {init.name for init in initializers} | {vi.name for vi in proto.graph.input}
    absent = len(set(targets.get("PARAMETER", ())) - stored)
    shown = ", ".join(folded[:_SHOWN]) + (f", ... ({len(folded) - _SHOWN} more)" if len(folded) > _SHOWN else "")
    missing = (
        (
            f"; {absent} of the module's parameters are not in the file under their names (merged with "
            "equal-valued ones, folded, or tied)"
        )
        if absent
        else ""
    )
    return (
        f"{len(folded)} initializers look folded by torch's ONNX optimizer ({shown}: transposed weights, "
        f"constant lookups, packed gates){missing}; gradserve returns gradients of the tensors the file holds, "
        "and these are not your module's parameters. Export with gradserve.torch.export(module, args) "
        "(gradients keyed by module.named_parameters()), or torch.onnx.export(..., optimize=False)"
    )


def _signature_targets(proto: onnx.ModelProto) -> dict[str, list[str]]:
    """The exported program's parameter, buffer and constant names by kind ({} without a signature)."""
    signature = next((p.value for p in proto.graph.metadata_props if p.key == SIGNATURE_KEY), "")
    targets: dict[str, list[str]] = {}
    for kind, target in _TARGET.findall(signature):
        targets.setdefault(kind, []).append(target)
    return targets
