"""One local Ray instance (2 CPUs) shared by every Ray test of the session, and the tiny on-disk model they load.

Ray tests call :func:`local_ray` from a fixture: the first call starts Ray, later calls (in any test module) reuse
it, and it is shut down when the test process exits.
"""

from __future__ import annotations

import atexit
import functools
import logging
from pathlib import Path

import ray
import ray.data
from conftest import FLAT_CURVE, save_chat_model
from lookahead_ray.hub import NAMESPACE
from lookahead_ray.spec import GeneratorSpec

from lookahead.config import LookaheadConfig


@functools.cache
def local_ray() -> None:
    """Start the session's Ray instance (once)."""
    if not ray.is_initialized():
        ray.init(num_cpus=2, namespace=NAMESPACE, include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=False)
        atexit.register(ray.shutdown)
    ray.data.DataContext.get_current().enable_progress_bars = False


def tiny_spec(path: Path, **config: int) -> GeneratorSpec:
    """A spec of the tiny Llama saved at ``path``: float32 on CPU, one thread, a flat cost curve (no measuring)."""
    return GeneratorSpec(model=str(path), dtype="float32", device="cpu", config=LookaheadConfig(**config),
                         cost_curve=FLAT_CURVE, threads=1)


def save_tiny_model(path: Path) -> Path:
    """The tiny Llama with the plain chat template, saved like any local HF model."""
    return save_chat_model(path, "llama", seed=0)
