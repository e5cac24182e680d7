"""The test session's Ray engine lent to a server: ``serving(lambda: Borrowed(ray_engine))``."""

from __future__ import annotations

from typing import Any


class Borrowed:
    """Everything the engine has, but ``close()`` leaves it running for the tests after (the
    ``ray_engine`` fixture closes it)."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def close(self) -> None:
        pass
