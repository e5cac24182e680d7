"""Wall time of small things, start-up included: the CLI's help, a tiny inline ``gradserve grad``,
importing the client library, and failing on an unreachable server (issues 19 and 23).

    .venv/bin/python benchmarks/cli_startup.py [--runs 10] [--rounds 3] [--importtime]

Writes a 2-layer tanh MLP (16 wide, mean-squared-error loss; common.mlp) as a gradserve model
(``tiny.gsm``) and as ONNX (``tiny.onnx``), and a batch of 32 (``f.npz``), into a temporary
directory. Each round runs every command ``--runs`` times in a fresh process (after one untimed
run, which also fills the kernel cache) and takes the median; the table gives the median over the
rounds with the rounds' range. Commands run as users run them: the ``gradserve`` script beside this
Python, ``python -c ...``, with their bytecode cached as an installed package's is (in a private
``PYTHONPYCACHEPREFIX``, so the checkout stays clean, even where ``PYTHONDONTWRITEBYTECODE`` is
set: compiling gradserve's sources adds 0.1-0.3 s to every process). ``python -c pass`` and
``import numpy`` are the floor. Every ``grad`` is checked: exit status 0, and its gradients equal
the inline engine's in this process. Beside the wall time, the processes' CPU time (user + system):
on a shared machine it moves less with the other load.
``--importtime`` also prints, per command, the largest imports ``python -X importtime`` reports.
The unreachable-server commands (``status`` and ``grad --server`` to a port nobody listens on)
must fail with "no gradserve server at ..." (exit status 1).
Targets (issue 19): the tiny inline ``grad`` under 1 s; an unreachable server reported within 5 s.

To time another checkout (say, the code before a change), run this script with ``PYTHONPATH``
pointing at a folder holding a ``gradserve`` link to that checkout's root: that copy then shadows
the installed one in every command.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import cpu_model, free_port, mlp, mlp_feeds, table

TARGET_SECONDS = 1.0
UNREACHABLE_SECONDS = 5.0
LAYERS, WIDTH, BATCH = 2, 16, 32


def _gradserve() -> list[str]:
    """The ``gradserve`` command as installed beside this Python (else through ``-m``)."""
    script = Path(sys.executable).parent / "gradserve"
    return [str(script)] if script.exists() else [sys.executable, "-m", "gradserve.client.cli"]


def _write_inputs(folder: Path) -> dict:
    """tiny.gsm, tiny.onnx and f.npz in ``folder``; returns the inline engine's gradients."""
    import gradserve

    model, feeds = mlp(LAYERS, WIDTH), mlp_feeds(BATCH, WIDTH)
    model.save(folder / "tiny.gsm")
    (folder / "tiny.onnx").write_bytes(_onnx_bytes(model))
    np.savez(folder / "f.npz", **feeds)
    result = gradserve.local().gradients(model, feeds)
    return {"loss": np.array(result.loss), **result.grads}


def _onnx_bytes(model) -> bytes:
    """``model`` as an ONNX file: its nodes (ONNX ops), its inputs with a symbolic batch, its
    parameters and constants as initializers, the loss as the graph's output."""
    from onnx import helper

    from gradserve.worker.validate import _onnx_attrs, onnx_model

    nodes = [helper.make_node(n.op_type, n.inputs, n.outputs, name=n.name, **_onnx_attrs(n)) for n in model.nodes]
    inputs = [
        helper.make_tensor_value_info(
            s.name, helper.np_dtype_to_tensor_dtype(s.dtype), [d if isinstance(d, int) else "batch" for d in s.shape]
        )
        for s in model.inputs
    ]
    inits = [
        helper.make_tensor(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape, v.tobytes(), raw=True)
        for k, v in {**model.params, **model.constants}.items()
    ]
    loss = helper.make_tensor_value_info(model.loss, helper.np_dtype_to_tensor_dtype(np.dtype(np.float32)), [])
    return onnx_model(
        helper.make_graph(nodes, "tiny", inputs, [loss], initializer=inits), model.opset
    ).SerializeToString()


def _commands(folder: Path) -> dict[str, list[str]]:
    cli, py = _gradserve(), sys.executable
    grad = ["--feeds", str(folder / "f.npz"), "--out", str(folder / "g.npz"), "--quiet"]
    nobody = f"127.0.0.1:{free_port()}"  # free now, and nothing here listens on it later
    return {
        "python -c pass (floor)": [py, "-c", "pass"],
        "python -c 'import numpy' (floor)": [py, "-c", "import numpy"],
        "gradserve --help": [*cli, "--help"],
        "gradserve grad --help": [*cli, "grad", "--help"],
        "gradserve grad tiny.gsm (inline)": [*cli, "grad", str(folder / "tiny.gsm"), *grad],
        "gradserve grad tiny.onnx (inline)": [*cli, "grad", str(folder / "tiny.onnx"), *grad],
        "import gradserve; gradserve.Client": [py, "-c", "import gradserve; gradserve.Client"],
        "gradserve status, unreachable server": [*cli, "status", "--server", nobody],
        "gradserve grad --server, unreachable": [*cli, "grad", str(folder / "tiny.gsm"), *grad, "--server", nobody],
    }


def _environment(folder: Path) -> dict[str, str]:
    """This environment, with bytecode cached under ``folder`` (see the module docs)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(folder / "pycache")
    return env


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run(command: list[str], folder: Path, expected: dict) -> tuple[float, float]:
    """Wall and CPU seconds ``command`` took; exits the benchmark if it failed or its gradients
    are wrong."""
    out = folder / "g.npz"
    out.unlink(missing_ok=True)
    cpu, t = _cpu_seconds(), time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=_environment(folder))
    seconds, cpu = time.perf_counter() - t, _cpu_seconds() - cpu
    if "--server" in command:  # an unreachable server: the failure is the result
        if done.returncode != 1 or "no gradserve server at" not in done.stderr:
            sys.exit(
                f"{' '.join(command)}: expected 'no gradserve server at ...', exit 1; got {done.returncode}:\n"
                f"{done.stderr[-2000:]}"
            )
        return seconds, cpu
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} exited with {done.returncode}:\n{done.stderr[-3000:]}")
    if "grad" in command and "--help" not in command:
        with np.load(out) as got:
            for name, want in expected.items():
                if not np.allclose(got[name], want, rtol=1e-5, atol=1e-7):
                    sys.exit(f"{' '.join(command)}: {name} differs from the inline engine's")
    return seconds, cpu


def _largest_imports(command: list[str], folder: Path, count: int = 8) -> list[tuple[str, float]]:
    """The ``count`` top-level imports (as ``-X importtime`` nests them) that took longest, in seconds."""
    if Path(command[0]).name == "gradserve":  # the script: run its module with -X importtime instead
        command = [sys.executable, "-m", "gradserve.client.cli", *command[1:]]
    done = subprocess.run(
        [command[0], "-X", "importtime", *command[1:]], capture_output=True, text=True, env=_environment(folder)
    )
    rows = []
    for line in done.stderr.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+(\d+) \| ( *)(\S+)", line)
        if match and len(match.group(2)) <= 1:  # imported by the command itself, not by another module
            rows.append((match.group(3), int(match.group(1)) / 1e6))
    return sorted(rows, key=lambda r: -r[1])[:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10, help="timed runs of each command per round (default 10)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all commands (default 3)")
    parser.add_argument("--importtime", action="store_true", help="also print each command's largest imports")
    args = parser.parse_args()
    if args.runs < 1 or args.rounds < 1:
        parser.error("--runs and --rounds must be at least 1")
    import gradserve

    print(f"{cpu_model()}; gradserve from {Path(gradserve.__file__).parent}")
    with tempfile.TemporaryDirectory(prefix="gradserve-startup-") as tmp:
        folder = Path(tmp)
        expected = _write_inputs(folder)
        commands = _commands(folder)
        for command in commands.values():  # untimed: the page cache, the kernel cache
            _run(command, folder, expected)
        wall: dict[str, list[float]] = {name: [] for name in commands}
        cpu: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.rounds):
            for name, command in commands.items():
                runs = [_run(command, folder, expected) for _ in range(args.runs)]
                wall[name].append(statistics.median(w for w, _ in runs))
                cpu[name].append(statistics.median(c for _, c in runs))
        rows = []
        for name, values in wall.items():
            target = ""
            if name.startswith("gradserve grad tiny"):
                target = "< 1 s: " + ("met" if statistics.median(values) < TARGET_SECONDS else "MISSED")
            elif "unreachable" in name:
                target = "< 5 s: " + ("met" if statistics.median(values) < UNREACHABLE_SECONDS else "MISSED")
            rows.append(
                (
                    name,
                    f"{statistics.median(values):.3f} s",
                    f"{min(values):.3f}-{max(values):.3f}",
                    f"{statistics.median(cpu[name]):.3f} s",
                    target,
                )
            )
        print(table(rows, ("command", "wall, median", "rounds' range", "CPU, median", "target")))
        if args.importtime:
            for name, command in commands.items():
                print(f"\n{name}: largest imports")
                for module, seconds in _largest_imports(command, folder):
                    print(f"  {seconds:7.3f} s  {module}")


if __name__ == "__main__":
    main()
