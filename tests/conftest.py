import os
import signal
import sys
import time
from pathlib import Path

import pytest

# The helpers at tests/ (serving.py, gradcheck.py, models.py, dags.py...) are imported as plain modules,
# from the test files in every subfolder: this folder is on sys.path before any of them is collected.
sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("RAY_DEDUP_LOGS", "1")


def _ray_daemons(children_only: bool = False) -> list[int]:
    """Pids of the raylets and GCS servers on this machine (any Ray instance's), or only of those
    this process started."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        if name in ("raylet", "gcs_server") and (not children_only or parent == os.getpid()):
            pids.append(int(pid))
    return pids


def _wait_for_no_ray_daemons(seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while _ray_daemons() and time.monotonic() < deadline:
        time.sleep(0.5)


@pytest.fixture(scope="session")
def ray_engine():
    """One embedded Ray (and one worker pool) for the whole test session: Ray takes seconds to start."""
    import ray

    from gradserve.server.ray_engine import RayEngine

    # Ray gives its raylet 30 s to start. Right after a local-cluster test, that cluster's daemons
    # may still be shutting down and take the 2 cores: let them go first, and try again if missed.
    _wait_for_no_ray_daemons(15)  # a cluster of the developer's own would stay: do not wait long
    for attempt in range(3):
        try:
            engine = RayEngine(threads_per_worker=1)
            break
        except Exception:  # noqa: BLE001 -- the last attempt's error is the one reported
            if ray.is_initialized():
                ray.shutdown()
            for pid in _ray_daemons(children_only=True):  # what the failed start left running
                os.kill(pid, signal.SIGKILL)
            if attempt == 2:
                raise
            _wait_for_no_ray_daemons(30)
    yield engine
    engine.close()
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    """A self-signed certificate for localhost and 127.0.0.1, and its key: (cert.pem, key.pem)."""
    from tls import self_signed  # a helper module at tests/: importable once sys.path has it (above)

    d = tmp_path_factory.mktemp("tls")
    self_signed(d / "cert.pem", d / "key.pem", alt_names="DNS:localhost,IP:127.0.0.1")
    return d / "cert.pem", d / "key.pem"
