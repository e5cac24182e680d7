"""The Ray engine: a job's partitions on pooled Ray worker actors (``engine``), which actors each job
gets (``scheduler``: pure decisions), the pool of actors on the cluster's nodes (``pool``), and which
failures mean a lost worker, the ones a job is run again for (``worker_loss``)."""

from gradserve.server.ray_engine.engine import RayEngine
from gradserve.server.ray_engine.worker_loss import is_worker_loss

__all__ = ["RayEngine", "is_worker_loss"]
