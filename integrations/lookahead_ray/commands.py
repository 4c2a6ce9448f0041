"""The ``--ray`` paths of ``lookahead summarize`` and ``lookahead serve``: connect to Ray, start the trie hub, run,
save the hub's trie and disconnect. The commands import this module only when ``--ray`` is given."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import time
from collections.abc import Iterator, Sequence

import ray
from lookahead_server.app import ServeSettings
from ray import serve

from lookahead.summarize import SourceDocument, SummaryRun

from .cluster import check_resources, connect
from .hub import HUB_NAME, start_hub, stop_hub, trie_config
from .serve import run_serve
from .spec import GeneratorSpec
from .summarize import PoolOptions, SummarizeOptions, summarize_documents

log = logging.getLogger("lookahead_ray")


@contextlib.contextmanager
def ray_session(address: str | None, workers: int, cpus_per_worker: float, gpus_per_worker: float,
                share: bool, spec: GeneratorSpec, trie_path: str | None, save_interval: float,
                detached_hub: bool = False) -> Iterator[str | None]:
    """Ray connected (a local instance unless ``address``), the resources checked and, when ``share``, the trie
    hub started (loading ``trie_path``); yields the hub's name (None: no sharing). On exit the hub saves and stops,
    and a Ray instance this call started is shut down."""
    if trie_path is not None and not share:
        raise ValueError("--trie is the trie hub's file: it needs trie sharing (leave out --no-trie-sharing)")
    started = connect(address)
    hub = None
    try:
        check_resources(workers, cpus_per_worker, gpus_per_worker)
        if share:
            hub = start_hub(trie_config(spec.config), trie_path, save_interval, detached=detached_hub)
        yield HUB_NAME if hub is not None else None
    finally:
        if hub is not None:
            stop_hub(hub)
        if started:
            ray.shutdown()


def summarize_on_ray(args: argparse.Namespace, documents: Sequence[SourceDocument]) -> SummaryRun:
    """``lookahead summarize ... --ray``: the documents on an actor pool of ``--workers`` workers."""
    spec = GeneratorSpec.from_args(args, threads=_threads(args.cpus_per_worker))
    options = SummarizeOptions(args.max_new_tokens, args.chunk_tokens, args.baseline)
    with ray_session(args.address, args.workers, args.cpus_per_worker, args.gpus_per_worker,
                     not args.no_trie_sharing, spec, args.trie, args.trie_save_interval) as hub_name:
        pool = PoolOptions(workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                           gpus_per_worker=args.gpus_per_worker, batch_size=args.worker_batch_size,
                           hub_name=hub_name)
        return summarize_documents(documents, args.out, spec, options, pool, progress=not args.no_progress)


def _threads(cpus: float) -> int:
    """torch threads of a worker with ``cpus`` CPUs (at least one)."""
    return max(1, int(cpus))



def serve_on_ray(args: argparse.Namespace, settings: ServeSettings) -> int:
    """``lookahead serve ... --ray``: ``--replicas`` replicas behind Serve's HTTP proxy until interrupted; the hub
    loads and saves ``--trie``."""
    spec = GeneratorSpec.from_args(args, threads=_threads(args.cpus_per_replica))
    with ray_session(args.address, args.replicas, args.cpus_per_replica, args.gpus_per_replica,
                     not args.no_trie_sharing, spec, args.trie, args.trie_save_interval) as hub_name:
        url = run_serve(spec, settings, args.host, args.port, args.replicas, hub_name,
                        cpus_per_replica=args.cpus_per_replica, gpus_per_replica=args.gpus_per_replica)
        log.info("serving %d replicas on %s (trie sharing %s); Ctrl-C stops", args.replicas, url,
                 "on" if hub_name else "off")
        previous = signal.signal(signal.SIGTERM, _interrupt)  # stop as on Ctrl-C: the hub saves its trie
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            log.info("stopping")
        finally:
            signal.signal(signal.SIGTERM, previous)
            serve.shutdown()
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
