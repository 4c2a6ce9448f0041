"""Connecting to Ray: a running cluster (``--address``), or a local instance started for this command."""

from __future__ import annotations

import logging
from typing import Any

import ray

from .hub import NAMESPACE


def connect(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None) -> bool:
    """Initialise Ray unless it already is; True when this call started (or joined) it, so the caller shuts it down.

    ``address``: ``"auto"``, ``"ray://host:10001"`` or ``"host:6379"`` to join a cluster (``num_cpus``/``num_gpus``
    then come from the cluster); None starts a local instance (with ``num_cpus``/``num_gpus`` when given).
    """
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"namespace": NAMESPACE, "logging_level": logging.WARNING,
                              "include_dashboard": False, "configure_logging": True}
    if address is not None:
        kwargs["address"] = address
    else:
        if num_cpus is not None:
            kwargs["num_cpus"] = num_cpus
        if num_gpus is not None:
            kwargs["num_gpus"] = num_gpus
    ray.init(**kwargs)
    return True


def check_resources(workers: int, cpus_per_worker: float, gpus_per_worker: float) -> None:
    """Refuse a request the cluster can never place (it would wait forever): say what is asked and what exists."""
    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    if workers * cpus_per_worker > cpus:
        raise ValueError(f"{workers} workers x {cpus_per_worker} CPUs need {workers * cpus_per_worker:g} CPUs; the "
                         f"Ray cluster has {cpus:g}: lower --workers or --cpus-per-worker")
    if workers * gpus_per_worker > gpus:
        raise ValueError(f"{workers} workers x {gpus_per_worker} GPUs need {workers * gpus_per_worker:g} GPUs; the "
                         f"Ray cluster has {gpus:g}: lower --workers or --gpus-per-worker")
