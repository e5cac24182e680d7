"""One job, one preparation: the server checks a job against its model once, at submission, and
hands that preparation to the engine; the model's structure is hashed once, at upload."""

from __future__ import annotations

import pytest

from gradserve import Client
from gradserve.server.inline import InlineEngine
from gradserve.worker.graph import Model
from serving import REFERENCE, assert_same, batch, mlp, serving


class Recording:
    """The inline engine, noting the preparation each job arrives with."""

    name = "recording"
    splits = False

    def __init__(self) -> None:
        self.inner = InlineEngine()
        self.prepared: list = []

    def gradients(self, model, feeds, *, prepared=None, **options):
        self.prepared.append(prepared)
        return self.inner.gradients(model, feeds, prepared=prepared, **options)

    def close(self) -> None:
        pass


def test_jobs_reach_the_engine_prepared_and_hash_no_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = Recording()
    model, feeds = mlp(3), batch(4)
    with serving(lambda: engine) as srv, Client(srv.address, timeout=30) as client:
        model_id = client.upload(model)
        hashed: list[Model] = []
        original = Model.structure_fingerprint

        def counted(self: Model) -> str:
            hashed.append(self)
            return original(self)

        monkeypatch.setattr(Model, "structure_fingerprint", counted)
        results = [client.gradients(model_id, feeds) for _ in range(2)]
    assert hashed == [], "a job serialized the model's graph again to key its preparation"
    assert len(engine.prepared) == 2 and all(p is not None for p in engine.prepared)
    assert engine.prepared[0].structure == original(model)
    assert set(engine.prepared[0].params) == set(model.params)
    for result in results:
        assert_same(result, REFERENCE.gradients(model, feeds))
