"""The compiled BatchNormalization kernels (gradserve.worker.kernels) and the fused
BatchNormalization -> MaxPool -> Relu node the rewrite makes: against a plain numpy reference
(forward and VJP, float32 and float64), against finite differences, and -- through whole graphs --
against the unfused ops within float rounding."""

import os

import numpy as np
import pytest

from gradcheck import check_vjp, run_op, unfused
from gradserve.server.inline import InlineEngine
from gradserve.server.planning.prepare import prepare
from gradserve.worker import kernels
from gradserve.worker.autodiff import backward, compile_program, forward
from gradserve.worker.graph import InputSpec, Model, Node
from gradserve.worker.ops.batchnorm import FUSED_BATCHNORM

pytestmark = pytest.mark.skipif(not kernels.available(), reason="numba is not available")
rng = np.random.default_rng(5)
TOL = {np.float32: 2e-5, np.float64: 1e-11}


# -- the numpy reference: BatchNormalization (batch statistics), ReLU, MaxPool, and their VJP ---------
def ref_pool_windows(shape, pool):
    """For each output position of a max pool over (H, W): the flat positions its window reads."""
    (h, w), (kh, kw), (sh, sw), (dh, dw), (ph, pw), (oh, ow) = shape, *pool
    windows = np.full((oh, ow, kh * kw), -1, np.int64)
    for oi in range(oh):
        for oj in range(ow):
            for ki in range(kh):
                for kj in range(kw):
                    i, j = oi * sh - ph + ki * dh, oj * sw - pw + kj * dw
                    if 0 <= i < h and 0 <= j < w:
                        windows[oi, oj, ki * kw + kj] = i * w + j
    return windows


def ref_forward(x, scale, bias, eps, relu, pool):
    """float64 reference: y = BN(x); MaxPool (first maximum wins) if ``pool``; ReLU if ``relu``.
    Returns the output and, per output, the flat position of the maximum (or None)."""
    x = x.astype(np.float64)
    mean, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))
    y = (x - mean[:, None, None]) / np.sqrt(var + eps)[:, None, None] * scale[:, None, None] + bias[:, None, None]
    at = None
    if pool is not None:
        windows = ref_pool_windows(x.shape[2:], pool)
        flat = y.reshape(y.shape[:2] + (-1,))
        vals = np.where(windows >= 0, flat[..., np.maximum(windows, 0)], -np.inf)  # (N, C, OH, OW, K)
        k = vals.argmax(axis=-1)
        y = np.take_along_axis(vals, k[..., None], -1)[..., 0]
        at = np.take_along_axis(np.broadcast_to(windows, vals.shape), k[..., None], -1)[..., 0]
    return (np.maximum(y, 0) if relu else y), at


def ref_vjp(x, scale, eps, y, at, g, relu):
    """dL/dx, dL/dscale, dL/dB of ref_forward, from the textbook formulas."""
    x = x.astype(np.float64)
    g = g.astype(np.float64) * (y > 0) if relu else g.astype(np.float64)
    if at is not None:  # scatter the pooled error back to each window's maximum
        gy = np.zeros(x.shape[:2] + (x.shape[2] * x.shape[3],))
        n, c = np.indices(at.shape[:2])
        for o in np.ndindex(at.shape[2:]):
            np.add.at(gy, (n, c, at[(slice(None), slice(None)) + o]), g[(slice(None), slice(None)) + o])
        g = gy.reshape(x.shape)
    axes, count = (0, 2, 3), x.size // x.shape[1]
    mean, inv = x.mean(axis=axes), 1 / np.sqrt(x.var(axis=axes) + eps)
    xhat = (x - mean[:, None, None]) * inv[:, None, None]
    dscale, dbias = (g * xhat).sum(axis=axes), g.sum(axis=axes)
    dx = (scale * inv)[:, None, None] * (g - (dbias / count)[:, None, None] - xhat * (dscale / count)[:, None, None])
    return dx, dscale, dbias


POOLS = {  # MaxPool attributes, and (kernel, strides, dilations, begin pads) for the reference
    "2x2": {"kernel_shape": [2, 2], "strides": [2, 2]},
    "2x2 odd size": {"kernel_shape": [2, 2], "strides": [2, 2]},
    "3x3 overlapping, padded": {"kernel_shape": [3, 3], "strides": [1, 1], "pads": [1, 1, 1, 1]},
    "3x2 ceil_mode": {"kernel_shape": [3, 2], "strides": [2, 2], "ceil_mode": 1},
    "2x2 dilated": {"kernel_shape": [2, 2], "strides": [1, 2], "dilations": [2, 1], "pads": [0, 1, 1, 0]},
}


def fused_attrs(eps, relu, pool_attrs):
    attrs = {"epsilon": eps, "relu": int(relu)}
    if pool_attrs is not None:
        attrs.update({"pool_" + k: v for k, v in pool_attrs.items()})
    return attrs


def ref_geometry(x_shape, pool_attrs):
    """The reference's pool tuple: from the unfused MaxPool's own output shape."""
    from gradserve.worker.ops.window import geometry, spatial_attrs
    from gradserve.worker.ops.registry import OpContext

    kernel, strides, dilations, pads, auto_pad = spatial_attrs(OpContext(pool_attrs), 2)
    out, lo, _ = geometry(x_shape[2:], kernel, strides, dilations, pads, auto_pad, bool(pool_attrs.get("ceil_mode", 0)))
    return kernel, strides, dilations, lo, out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("pool", [None, *POOLS])
@pytest.mark.parametrize("relu", [False, True])
def test_fused_batchnorm_against_numpy_reference(dtype, pool, relu):
    shape = (3, 4, 7, 9) if pool == "2x2 odd size" else (3, 4, 8, 6)
    pool_attrs = POOLS.get(pool)
    x = (rng.standard_normal(shape) * 2 + 1.5).astype(dtype)
    scale, bias = rng.standard_normal(4).astype(dtype), rng.standard_normal(4).astype(dtype)
    eps = 1e-3
    geometry = None if pool_attrs is None else ref_geometry(shape, pool_attrs)
    want, at = ref_forward(x, scale, bias, eps, relu, geometry)
    node = Node("bn", FUSED_BATCHNORM, ["x", "s", "b"], ["y"], fused_attrs(eps, relu, pool_attrs))
    prog = compile_program([node], ["x", "s", "b"], ["y"], ["x", "s", "b"])
    tape = forward(prog, {"x": x, "s": scale, "b": bias})
    y = tape.outputs["y"]
    assert y.dtype == dtype and y.shape == want.shape
    np.testing.assert_allclose(y, want, rtol=TOL[dtype], atol=TOL[dtype] * 10)
    g = rng.standard_normal(y.shape).astype(dtype)
    errs = backward(prog, tape, {"y": g})
    for name, ref in zip("xsb", ref_vjp(x, scale, eps, want, at, g, relu)):
        assert errs[name].dtype == dtype
        np.testing.assert_allclose(errs[name], ref, rtol=TOL[dtype] * 10, atol=TOL[dtype] * 10 * np.abs(ref).max())


@pytest.mark.parametrize("pool", [None, *POOLS])
@pytest.mark.parametrize("relu", [False, True])
def test_fused_batchnorm_finite_differences(pool, relu):
    x, scale, bias = rng.standard_normal((2, 3, 7, 6)), rng.standard_normal(3), rng.standard_normal(3)
    check_vjp(FUSED_BATCHNORM, [x, scale, bias], fused_attrs(1e-3, relu, POOLS.get(pool)), check_shapes=False)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_batchnorm_kernel_against_numpy_path(dtype, offset, monkeypatch):
    """Plain training-mode BatchNormalization runs the kernel; numpy's path (taken without numba),
    in float64 on the same values, gives the same values and errors within rounding -- also for
    means far above the spread."""
    x = (rng.standard_normal((4, 3, 5, 5)) + offset).astype(dtype)
    inputs = [x, *(rng.standard_normal(3).astype(dtype) for _ in range(2)), np.zeros(3, dtype), np.ones(3, dtype)]
    g = np.linspace(-1, 1, x.size).reshape(x.shape).astype(dtype)

    def run(inputs, g):
        node = Node("bn", "BatchNormalization", ["x", "s", "b", "m", "v"], ["y", "rm", "rv"], {"training_mode": 1})
        prog = compile_program([node], ["x", "s", "b", "m", "v"], ["y", "rm", "rv"], ["x", "s", "b"])
        tape = forward(prog, dict(zip(["x", "s", "b", "m", "v"], inputs)))
        outs = [tape.outputs[o] for o in ("y", "rm", "rv")]
        errs = backward(prog, tape, {"y": g})
        return outs + [errs[k] for k in "xsb"]

    fast = run(inputs, g)
    monkeypatch.setattr(kernels, "get", lambda: None)
    slow = run([a.astype(np.float64) for a in inputs], g.astype(np.float64))
    tol = 3e-5 if dtype == np.float32 else 1e-9
    for a, b in zip(fast, slow):
        assert a.dtype == dtype
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(b).max())


def test_batchnorm_kernel_with_errors_at_running_statistics():
    """Errors reaching running_mean/running_var take the general VJP from the kernel's forward."""
    x = rng.standard_normal((3, 2, 4, 4)).astype(np.float32)
    inputs = [
        x,
        *(rng.standard_normal(2).astype(np.float32) for _ in range(2)),
        np.zeros(2, np.float32),
        np.ones(2, np.float32),
    ]
    y, rm, rv = run_op("BatchNormalization", inputs, {"training_mode": 1}, n_outputs=3)
    np.testing.assert_allclose(rv, 0.9 + 0.1 * x.astype(np.float64).var(axis=(0, 2, 3)), rtol=1e-5)
    check_vjp("BatchNormalization", [a.astype(np.float64) for a in inputs], {"training_mode": 1}, n_outputs=3)


# -- the rewrite: whole graphs, fused against unfused --------------------------------------------------
def bn_model(tail, dtype, extra_reader=False):
    """Conv -> BatchNormalization (train) -> ``tail`` (Relu / MaxPool nodes) -> sum of squares.
    With ``extra_reader`` the BatchNormalization's output is also summed into the loss."""
    nodes = [
        Node("conv", "Conv", ["x", "w"], ["c"], {"pads": [1, 1, 1, 1]}),
        Node(
            "bn",
            "BatchNormalization",
            ["c", "s", "b", "m", "v"],
            ["n", "rm", "rv"],
            {"training_mode": 1, "epsilon": 1e-3},
        ),
    ]
    value = "n"
    for i, (op, attrs) in enumerate(tail):
        nodes.append(Node(f"t{i}", op, [value], [f"t{i}"], attrs))
        value = f"t{i}"
    nodes += [Node("sq", "Mul", [value, value], ["sq"]), Node("sum", "ReduceSum", ["sq"], ["loss"], {"keepdims": 0})]
    if extra_reader:
        nodes[-1:] = [
            Node("s1", "ReduceSum", ["sq"], ["l1"], {"keepdims": 0}),
            Node("s2", "ReduceSum", ["n"], ["l2"], {"keepdims": 0}),
            Node("add", "Add", ["l1", "l2"], ["loss"]),
        ]
    params = {
        "w": rng.standard_normal((5, 3, 3, 3)).astype(dtype),
        "s": rng.standard_normal(5).astype(dtype),
        "b": rng.standard_normal(5).astype(dtype),
        "m": np.zeros(5, dtype),
        "v": np.ones(5, dtype),
    }
    model = Model(nodes, [InputSpec("x", np.dtype(dtype), (None, 3, 8, 8))], params, "loss")
    return model, {"x": rng.standard_normal((4, 3, 8, 8)).astype(dtype)}


RELU, POOL = ("Relu", {}), ("MaxPool", POOLS["2x2"])
TAILS = {
    "relu, pool": ([RELU, POOL], "bn t0 t1"),
    "pool, relu": ([POOL, RELU], "bn t0 t1"),
    "relu": ([RELU], "bn t0"),
    "pool": ([POOL], "bn t0"),
    "overlapping pool, relu": ([("MaxPool", POOLS["3x3 overlapping, padded"]), RELU], "bn t0 t1"),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("tail", TAILS)
def test_rewrite_fuses_batchnorm_within_rounding(tail, dtype):
    model, feeds = bn_model(TAILS[tail][0], dtype)
    job = prepare(model, feeds)
    fused = [n for n in job.nodes if n.op_type == FUSED_BATCHNORM]
    assert [n.name for n in fused] == ["bn"] and [n.op_type for n in job.nodes][-2:] == ["Mul", "ReduceSum"]
    assert len(job.nodes) == 4
    assert any(r.startswith("node 'bn' (BatchNormalization) runs as one kernel with") for r in job.rewrites)
    result = InlineEngine().gradients(model, feeds)
    loss, grads = unfused(model, feeds)
    tol = 1e-5 if dtype == np.float32 else 1e-11
    assert abs(result.loss - loss) <= tol * abs(loss)
    for name in ("w", "s", "b"):
        np.testing.assert_allclose(result.grads[name], grads[name], rtol=tol, atol=tol * np.abs(grads[name]).max())
        assert np.abs(grads[name]).sum() > 0


def test_no_fusion_where_it_would_change_meaning():
    # the normalised activation has a second reader
    model, feeds = bn_model([RELU, POOL], np.float32, extra_reader=True)
    assert not any(n.op_type == FUSED_BATCHNORM for n in prepare(model, feeds).nodes)
    # the running statistics are read
    model, feeds = bn_model([RELU], np.float32)
    model.nodes[-1] = Node("sum", "ReduceSum", ["sq"], ["l1"], {"keepdims": 0})
    model.nodes += [
        Node("s2", "ReduceSum", ["rm"], ["l2"], {"keepdims": 0}),
        Node("add", "Add", ["l1", "l2"], ["loss"]),
    ]
    assert not any(n.op_type == FUSED_BATCHNORM for n in prepare(model, feeds).nodes)
    # inference mode
    model, feeds = bn_model([RELU], np.float32)
    model.nodes[1] = Node("bn", "BatchNormalization", ["c", "s", "b", "m", "v"], ["n"], {})
    assert not any(n.op_type == FUSED_BATCHNORM for n in prepare(model, feeds).nodes)


def test_warm_up_and_thread_budget(monkeypatch):
    import numba

    from gradserve.worker.ops import blas

    assert kernels.warm_up() >= 0
    monkeypatch.delenv("GRADSERVE_KERNEL_THREADS", raising=False)
    every_core = min(len(os.sched_getaffinity(0)), numba.config.NUMBA_NUM_THREADS)
    default = 1 if blas.backend().idle_threads_spin else every_core
    assert kernels.thread_budget() == default
    model, feeds = bn_model([RELU, POOL], np.float32)
    want = InlineEngine().gradients(model, feeds)
    with kernels.threads(2):
        assert kernels.thread_budget() == min(2, numba.config.NUMBA_NUM_THREADS)
        got = InlineEngine().gradients(model, feeds)
        assert numba.get_num_threads() == kernels.thread_budget()  # what the last kernel ran on
    assert kernels.thread_budget() == default
    assert got.loss == pytest.approx(want.loss, rel=1e-6)
    monkeypatch.setenv("GRADSERVE_KERNEL_THREADS", "1")
    assert kernels.thread_budget() == 1


@pytest.mark.parametrize("library", ["openblas", "mkl"])
def test_kernels_take_every_core_unless_the_blas_threads_spin(monkeypatch, library):
    """One kernel thread beside OpenBLAS (its idle threads spin), every core beside MKL (its sleep)."""
    import importlib.metadata

    import numba

    from gradserve.worker.ops import blas

    if library == "mkl":
        try:
            importlib.metadata.distribution("mkl")
        except importlib.metadata.PackageNotFoundError:
            pytest.skip("the mkl extra is not installed")
    monkeypatch.delenv("GRADSERVE_KERNEL_THREADS", raising=False)
    monkeypatch.setenv("GRADSERVE_BLAS", library)
    blas._backend.cache_clear()
    try:
        assert blas.backend().name == library
        every_core = min(len(os.sched_getaffinity(0)), numba.config.NUMBA_NUM_THREADS)
        assert kernels.thread_budget() == (1 if library == "openblas" else every_core)
    finally:
        monkeypatch.undo()
        blas._backend.cache_clear()


def test_without_numba_the_numpy_paths_give_the_same_gradients(tmp_path):
    """GRADSERVE_KERNELS=0 (as when numba cannot be imported): one warning, no fusion, and the
    numpy ops give the kernels' loss and gradients within rounding."""
    import subprocess
    import sys

    model, feeds = bn_model([RELU, POOL], np.float64)
    model.save(tmp_path / "model.gsm")
    np.savez(tmp_path / "feeds.npz", **feeds)
    code = f"""
import numpy as np
from gradserve.worker import kernels
from gradserve.worker.graph import Model
from gradserve.worker.ops.batchnorm import FUSED_BATCHNORM
from gradserve.server.inline import InlineEngine
from gradserve.server.planning.prepare import prepare
assert not kernels.available()
model = Model.load({str(tmp_path / "model.gsm")!r})
feeds = dict(np.load({str(tmp_path / "feeds.npz")!r}))
assert not any(n.op_type == FUSED_BATCHNORM for n in prepare(model, feeds).nodes)
r = InlineEngine().gradients(model, feeds)
np.savez({str(tmp_path / "out.npz")!r}, loss=r.loss, **r.grads)
"""
    import os

    env = {**os.environ, "GRADSERVE_KERNELS": "0"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stderr.count("compiled kernels off (GRADSERVE_KERNELS=0)") == 1
    slow = np.load(tmp_path / "out.npz")
    fast = InlineEngine().gradients(model, feeds)
    assert abs(fast.loss - float(slow["loss"])) <= 1e-11 * abs(fast.loss)
    for name in ("w", "s", "b"):
        np.testing.assert_allclose(fast.grads[name], slow[name], rtol=1e-10, atol=1e-10 * np.abs(slow[name]).max())


def test_warm_up_loads_only_what_a_full_compile_left_in_the_cache(tmp_path):
    """A cold machine compiles no kernel at start (each compiles when a job first needs it); once a
    full compile marked the cache complete, a new process's warm-up loads them all."""
    import subprocess
    import sys

    # The module's own warm_up (45 s of compiling on a cold cache) is stood in for by a no-op in the
    # runs that reach it: what is tested is when it is called and what the marker then says.
    probe = (
        "import sys; from gradserve.worker import kernels\n"
        "if sys.argv[1] != 'cold':\n"
        "    kernels.get().warm_up = lambda: None\n"
        "seconds = kernels.warm_up(compile=sys.argv[1] == 'compile')\n"
        "d = kernels.cache_dir()\n"
        "print(seconds > 0, 'numba' in sys.modules, d.exists() and any(p.name.startswith('complete-') for p in d.iterdir()))"
    )
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache")}

    def run(mode: str) -> list[str]:
        done = subprocess.run([sys.executable, "-c", probe, mode], env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    assert run("cold") == ["False", "False", "False"]  # nothing compiled, numba not even imported
    assert run("load") == ["False", "True", "False"]  # still no marker: warm-up stays a no-op
    assert run("compile") == ["True", "True", "True"]  # a full compile marks the cache complete
    assert run("load") == ["True", "True", "True"]  # the next process loads them all at start
