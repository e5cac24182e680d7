import os
import sys
from pathlib import Path

import pytest

# tests/ helpers (gradcheck.py, models.py, dags.py) are imported as plain modules.
sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("RAY_DEDUP_LOGS", "1")


@pytest.fixture(scope="session")
def ray_engine():
    """One embedded Ray (and one worker pool) for the whole test session: Ray takes seconds to start."""
    import ray

    from gradserve.server.ray_engine import RayEngine

    try:
        engine = RayEngine(threads_per_worker=1)
    except Exception:  # noqa: BLE001 -- Ray waits 30 s for its raylet; a loaded 2-core machine can miss that once
        if ray.is_initialized():
            ray.shutdown()
        engine = RayEngine(threads_per_worker=1)
    yield engine
    engine.close()
    if ray.is_initialized():
        ray.shutdown()
