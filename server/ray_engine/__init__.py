"""The Ray engine: a job's partitions on pooled Ray worker actors (``engine``), which actors each job
gets (``scheduler``: pure decisions), and the pool of actors on the cluster's nodes (``pool``)."""

from gradserve.server.ray_engine.engine import RayEngine

__all__ = ["RayEngine"]
