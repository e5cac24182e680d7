"""Which engine the server computes with, and how a job is handed to it.

The server takes an *engine factory*: any callable returning an :class:`Engine`.
:func:`engine_factory` builds the one ``gradserve serve --engine`` asks for. The Ray engine is
imported lazily, only when chosen, so the inline engine works without Ray ever loading.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Protocol

from gradserve.server.job import Job, JobOptions
from gradserve.server.result import Result

log = logging.getLogger("gradserve.server")


class Engine(Protocol):
    """What the server asks of an engine.

    ``gradients(model, feeds, *, input_grads, progress, cancelled, prepared)`` computes one job
    (``prepared``: the :class:`~gradserve.server.planning.prepare.PreparedJob` the server made
    when it checked the job, or None: the engine prepares it then); an engine
    that ``splits`` the work (Ray) also takes ``partitions``, ``micro_batches``, ``replicas`` (a
    number or "auto"), ``model_key`` (the server's verified content hash of the model) and
    ``job_id`` (the server's id, for its logs). ``session(model, optimizer, ...)`` opens a training
    session (:mod:`gradserve.server.session`). Optional: ``capacity()`` (jobs it usefully runs at
    once) and ``status()`` (its nodes, for ``gradserve status``).
    """

    name: str
    splits: bool

    # *args, **options: Any: each engine declares its own keyword options
    def gradients(self, model: Any, feeds: Any, *args: Any, **options: Any) -> Result: ...

    def session(self, model: Any, optimizer: Any, *args: Any, **options: Any) -> Any: ...

    def close(self) -> None: ...


EngineFactory = Callable[[], Engine]

ENGINES = ("ray", "inline")


class EngineUnavailable(RuntimeError):
    """The chosen engine cannot be constructed here."""


def _ray_engine_class() -> type | None:
    try:
        from gradserve.server.ray_engine import RayEngine
    except ModuleNotFoundError as exc:
        if exc.name == "gradserve.server.ray_engine":
            return None  # not written/installed yet; any other missing module is a real error
        raise
    return RayEngine


def engine_factory(kind: str | None = None, *, ray_address: str | None = None) -> EngineFactory:
    """A factory for the engine named ``kind``: "ray", "inline", or None for "ray when it is
    available, else inline" (with a warning). Asking for "ray" explicitly when it is missing
    raises :class:`EngineUnavailable` with a message saying what to do."""
    if kind not in (None, *ENGINES):
        raise EngineUnavailable(f"unknown engine {kind!r} (choose one of {', '.join(ENGINES)})")
    if kind == "inline":
        if ray_address:
            raise EngineUnavailable("--ray-address needs --engine ray")
        return _inline
    ray_engine = _ray_engine_class()
    if ray_engine is None:
        if kind == "ray":
            raise EngineUnavailable(
                "the ray engine is not available in this installation (gradserve.server.ray_engine is "
                "missing); run with --engine inline"
            )
        log.warning("the ray engine is not available in this installation; serving with the inline engine")
        return _inline
    return lambda: ray_engine(ray_address=ray_address)


def _inline() -> Engine:
    from gradserve.server.inline import InlineEngine

    return InlineEngine(warm_up=True)  # the server lives long: its jobs should not pay the kernels' loading


class EngineRunner:
    """Runs jobs on one engine; the job registry's ``runner``."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.name = getattr(engine, "name", type(engine).__name__)
        # Engines that split the work (Ray) take partitions/micro_batches/replicas per call, and the
        # server's model id (a content hash verified at upload: they need not hash the weights
        # again) and job id; the inline engine runs the whole graph at once.
        self.splits = bool(getattr(engine, "splits", False))

    def capacity(self) -> int | None:
        """Jobs the engine usefully computes at once (the Ray engine: follows the cluster's CPUs);
        None when the engine cannot tell (the inline engine): the job registry's default applies."""
        capacity = getattr(self.engine, "capacity", None)
        return capacity() if capacity is not None else None

    def effective(self, options: JobOptions) -> JobOptions:
        """The options as this engine will honour them."""
        if self.splits:
            return options
        return dataclasses.replace(options, partitions=1, micro_batches=1, replicas=1)

    def __call__(self, job: Job) -> Result:
        assert job.model is not None and job.feeds is not None
        kwargs: dict[str, Any] = dict(
            input_grads=job.options.input_grads, progress=job.add_event, cancelled=job.cancelled, prepared=job.prepared
        )
        if self.splits:
            kwargs.update(
                partitions=job.options.partitions,
                micro_batches=job.options.micro_batches,
                replicas=job.options.replicas,
                model_key=job.model_id,
                job_id=job.id,
            )
        return self.engine.gradients(job.model, job.feeds, **kwargs)

    def session(self, model, optimizer, counts: tuple, **options: Any):
        """A training session on the engine (:mod:`gradserve.server.session`); ``counts``:
        (partitions, micro_batches, replicas), for engines that split the work."""
        if self.splits:
            partitions, micro_batches, replicas = counts
            return self.engine.session(
                model, optimizer, partitions=partitions, micro_batches=micro_batches, replicas=replicas, **options
            )
        return self.engine.session(model, optimizer, **options)

    def close(self) -> None:
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()
