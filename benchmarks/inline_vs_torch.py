"""Inline engine vs PyTorch autograd on the same models, in the same run (issue: foundation).

    .venv/bin/python benchmarks/inline_vs_torch.py [--repeat 9] [--rounds 3]

Times one full gradient computation (forward + backward, loss and dL/dw for every parameter):
torch autograd on the torch model, and gradserve's inline engine on the same model exported to
ONNX. Targets (issue 12): ratio <= 1.05 on the MLP, <= 1.3 on the CNN (the FFN block has none).

The compiled kernels' one-off cost is reported apart: compiling them all into an empty cache
(what the first run on a machine pays) and loading them from the cache (what every new process
pays, at engine start); neither is inside the timed steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import gradserve
from common import cpu_model, export_onnx, median_seconds, table


class WithLoss(nn.Module):
    def __init__(self, net: nn.Module, kind: str):
        super().__init__()
        self.net, self.kind = net, kind

    def forward(self, x, target):
        out = self.net(x)
        return F.mse_loss(out, target) if self.kind == "mse" else F.cross_entropy(out, target)


def mlp_case():
    torch.manual_seed(0)
    layers = []
    for _ in range(4):
        layers += [nn.Linear(1024, 1024), nn.ReLU()]
    net = WithLoss(nn.Sequential(*layers[:-1]), "mse")
    x, y = torch.randn(512, 1024), torch.randn(512, 1024)
    return "MLP 4x1024, batch 512, float32", net, x, y


def cnn_case():
    torch.manual_seed(0)
    body = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )
    net = WithLoss(body, "ce")
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    return "CNN 3 conv (32x32, batch 64), BatchNorm, float32", net, x, y


def run_side(side: str, case: str, repeat: int) -> dict:
    """Time one side on one model (in its own process, see main)."""
    name, net, x, y = CASES[case]()
    net.train()
    if side == "torch":
        params = list(net.parameters())

        def step():
            for p in params:
                p.grad = None
            loss = net(x, y)
            loss.backward()
            return float(loss)

    else:
        model = gradserve.load_onnx(export_onnx(net, [x, y], ["x", "target"]))
        feeds = {"x": x.numpy(), "target": y.numpy()}
        engine = gradserve.local()
        expected = float(net(x, y))
        loss = engine.gradients(model, feeds).loss
        # Correctness first: the timing is meaningless if the numbers differ.
        assert abs(loss - expected) <= 1e-4 * max(1.0, abs(expected)), f"loss {loss} differs from torch's {expected}"

        def step():
            return engine.gradients(model, feeds).loss

    return {"name": name, "seconds": median_seconds(step, repeat)}


def ffn_case():
    """A transformer's feed-forward block (Linear, GELU, Linear on (batch, sequence, features)):
    no target, it shows the elementwise kernels (GELU) beside the products."""
    torch.manual_seed(0)
    net = WithLoss(nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 256)), "mse")
    x, y = torch.randn(16, 128, 256), torch.randn(16, 128, 256)
    return "FFN 256-1024-256 GELU, 16 x 128 tokens, float32", net, x, y


CASES = {"mlp": mlp_case, "cnn": cnn_case, "ffn": ffn_case}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=7, help="timed runs per model (median reported)")
    parser.add_argument("--models", default="mlp,cnn,ffn", help="comma-separated subset of: mlp, cnn, ffn")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="times each side is run, alternating, each in a fresh process (this machine's speed "
        "drifts by several percent over minutes; the ratio reported is the median of the rounds)",
    )
    parser.add_argument("--side", choices=["torch", "gradserve"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    if args.side:  # child process: one side, one model, JSON out
        print(json.dumps(run_side(args.side, args.models, args.repeat)))
        return
    # Each side runs in a fresh process: torch's OpenMP threads keep spinning after each op and slow
    # down OpenBLAS's threads (and vice versa) when both live in one process.
    compile_s = kernel_warm_up(fresh=True)
    kernel_warm_up(fresh=False)  # fills the machine's cache if this is its first run
    load_s = kernel_warm_up(fresh=False)
    rows = []
    for case in args.models.split(","):
        rounds = []
        for _ in range(args.rounds):
            timed = {}
            for side in ("torch", "gradserve"):
                out = subprocess.run(
                    [sys.executable, __file__, "--side", side, "--models", case, "--repeat", str(args.repeat)],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
                timed[side] = json.loads(out.strip().splitlines()[-1])
            rounds.append((timed["torch"]["seconds"], timed["gradserve"]["seconds"]))
        ratios = sorted(ours / theirs for theirs, ours in rounds)
        t_torch, t_ours = (statistics.median(r[i] for r in rounds) for i in (0, 1))
        rows.append(
            (
                timed["torch"]["name"],
                f"{t_torch * 1e3:.1f}",
                f"{t_ours * 1e3:.1f}",
                f"{statistics.median(ratios):.2f}",
                f"{ratios[0]:.2f}-{ratios[-1]:.2f}",
            )
        )
    from gradserve.worker.ops import blas

    print(
        f"median of {args.repeat} runs per side and round, {args.rounds} rounds, {cpu_model()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, numpy {np.__version__}, gradserve's BLAS: {blas.backend().name} "
        f"(GRADSERVE_BLAS={os.environ.get('GRADSERVE_BLAS', 'auto')})"
    )
    print(table(rows, ("model", "torch ms", "gradserve inline ms", "ratio (median)", "ratio (range)")))
    print(
        f"compiled kernels (not in the times above): compiling all {compile_s:.1f} s (first run on a machine), "
        f"loading them from the cache {load_s:.2f} s (once per process)"
    )


def kernel_warm_up(fresh: bool) -> float:
    """Seconds a new process takes in gradserve.worker.kernels.warm_up(): into an empty cache
    (``fresh``: everything compiles) or from the machine's cache."""
    import tempfile

    code = "from gradserve.worker import kernels; print(kernels.warm_up())"
    with tempfile.TemporaryDirectory() as empty:
        env = {**os.environ, "NUMBA_CACHE_DIR": empty} if fresh else os.environ
        out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env).stdout
    return float(out.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
