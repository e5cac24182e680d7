"""A worker lost at a chosen moment of a job on the session's Ray engine, for the fault tests:
``with Ambush(engine, hold=pid, kill=pid, when=forward_of(0)) as ambush: engine.gradients(...,
progress=ambush)``. The moment is made certain by holding one worker back: its queue waits on a
gate (a call whose argument another actor returns when the test opens it), so every step that needs
that worker's results has not run when the victim is killed from the job's progress callback."""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import threading
from typing import Callable


@functools.lru_cache(maxsize=None)
def gate_class():
    import ray

    @ray.remote(num_cpus=0)
    class Gate:
        """``closed()`` returns once ``open()`` was called: an argument that holds back a call."""

        def __init__(self) -> None:
            self.opened = asyncio.Event()

        async def closed(self) -> str:
            await self.opened.wait()
            return "no such stage"  # what the held actor is asked to unload: nothing

        async def open(self) -> None:
            self.opened.set()

    return Gate


class Ambush:
    """Holds back the pool actor running in process ``hold`` (its queue waits on a gate), and, as
    the progress callback of a job, SIGKILLs process ``kill`` at the first event ``when`` accepts,
    then opens the gate. Use as a context manager: the gate is opened whatever happens."""

    def __init__(self, engine, hold: int, kill: int, when, on_event=None) -> None:
        self.kill, self.when, self.on_event = kill, when, on_event
        self.killed = threading.Event()
        self.events: list = []
        self.before_kill: list = []
        held = next(a for a, w in zip(engine._pool.actors, engine._pool.where) if w["pid"] == hold)  # noqa: SLF001
        self.gate = gate_class().remote()
        held.unload.remote(self.gate.closed.remote())  # the actor runs calls in order: this one first

    def __call__(self, event) -> None:
        self.events.append(event)
        if not self.killed.is_set() and self.when(event):
            self.before_kill = list(self.events)
            os.kill(self.kill, signal.SIGKILL)
            self.killed.set()
            self.gate.open.remote()

    def __enter__(self) -> "Ambush":
        # Should the moment never come (a placement other than the warm-up's), the job must not wait
        # for ever on the held actor: the gate opens by itself and the assertions say what happened.
        self._watchdog = threading.Timer(120, self.gate.open.remote)
        self._watchdog.start()
        return self

    def __exit__(self, *exc) -> None:
        import ray

        self._watchdog.cancel()
        ray.get(self.gate.open.remote())
        ray.kill(self.gate)


def forward_of(partition: int, micro_batch: int = 0, replica: int = 0) -> Callable:
    """The moment a forward step of (partition, micro-batch, replica) is reported."""
    return lambda e: (e.phase, e.partition, e.micro_batch, e.replica) == ("forward", partition, micro_batch, replica)


def backward_of(partition: int, micro_batch: int = 0, replica: int = 0) -> Callable:
    """The moment a backward step of (partition, micro-batch, replica) is reported."""
    return lambda e: (e.phase, e.partition, e.micro_batch, e.replica) == ("backward", partition, micro_batch, replica)
