"""The Ray engine: a job's partitions on pooled Ray worker actors (``engine``), the pool of actors
and where they are placed on the cluster (``pool``)."""

from gradserve.server.ray_engine.engine import RayEngine

__all__ = ["RayEngine"]
