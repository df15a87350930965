"""The ``ray:`` section of ``sip augment`` / ``sip synth`` recipes (read only with ``engine: ray``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["ENGINES", "RayConfig"]

ENGINES = ("local", "ray")


@dataclass(frozen=True)
class RayConfig:
    """Where and how wide the Ray Data pipeline runs.

    Attributes:
        address: the cluster to join (``auto``, ``ray://head:10001``, ``head:6379``); null starts a local Ray
            on this machine for the run and stops it after. An address where no cluster answers fails within
            seconds, naming it (:mod:`sip.scale.ray_address`).
        workers: generator actors (the pool that draws the images; one model copy each).
        caption_workers: reader + captioner actors of ``sip augment`` (light next to the generator).
        num_cpus: CPUs each actor reserves for Ray's scheduling (its torch threads are the driver's, so the bytes
            equal the local engine's; see :mod:`sip.scale.ray_engine`).
        num_gpus: GPUs each generator actor reserves (1 on a GPU cluster; fractions share a GPU).
    """

    address: str | None = None
    workers: int = 2
    caption_workers: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0

    def __post_init__(self):
        if self.workers < 1 or self.caption_workers < 1:
            raise ValueError(f"ray.workers and ray.caption_workers must be >= 1, got {self.workers} and "
                             f"{self.caption_workers}")
        for key, value in (("num_cpus", self.num_cpus), ("num_gpus", self.num_gpus)):
            if not math.isfinite(value):
                raise ValueError(f"ray.{key} must be a finite number, got {value}")
        if self.num_cpus <= 0 or self.num_gpus < 0:
            raise ValueError(f"ray.num_cpus must be > 0 and ray.num_gpus >= 0, got {self.num_cpus} and {self.num_gpus}")
        if self.address not in (None, "", "auto", "local"):
            from sip.scale.ray_address import parse_address

            parse_address(self.address)  # "host:port" or "ray://host:port", said before anything starts
