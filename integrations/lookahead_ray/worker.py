"""One engine as a Ray actor, its trie synced to the hub: the building block of the sharing measurement and tests,
and of any custom pipeline (``start_workers(2, spec)`` then ``ray.get(w.generate.remote(prompt))``)."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import ray

from lookahead.engine import LookaheadGenerator, Prompt
from lookahead.reference import greedy

from .hub import HUB_NAME, NAMESPACE, find_hub
from .spec import GeneratorSpec
from .sync import ActorHubClient, TrieSync


def hub_client(hub_name: str | None, namespace: str = NAMESPACE) -> ActorHubClient | None:
    """A client of the named hub (``hub_name`` None: None, sharing off).

    A hub that cannot be found is an error: sharing was asked for and would silently not happen."""
    if hub_name is None:
        return None
    handle = find_hub(hub_name, namespace)
    if handle is None:
        raise RuntimeError(f"no trie hub named {hub_name!r} in Ray namespace {namespace!r}: start it first "
                           "(lookahead_ray.hub.start_hub) or switch sharing off")
    return ActorHubClient(handle)


def hub_sync(generator: LookaheadGenerator, hub_name: str | None, interval: float,
             namespace: str = NAMESPACE) -> TrieSync:
    """A started :class:`TrieSync` of ``generator``'s trie with the named hub (``hub_name`` None: sharing off)."""
    return TrieSync(generator, hub_client(hub_name, namespace), interval).start()


class GenerateWorker:
    """A :class:`~lookahead.engine.LookaheadGenerator` in a worker process, sharing its trie through the hub.

    Args:
        spec: how to build the engine.
        hub_name: the hub to sync with (None: this worker learns alone).
        sync_interval: seconds between background syncs.
    """

    def __init__(self, spec: GeneratorSpec, hub_name: str | None = HUB_NAME, sync_interval: float = 2.0,
                 namespace: str = NAMESPACE) -> None:
        self.generator = spec.build()
        _ = self.generator.budget  # the cost curve now, not inside the first timed request
        self.sync = hub_sync(self.generator, hub_name, sync_interval, namespace)

    def generate(self, prompt: Prompt, max_new_tokens: int = 128, documents: Sequence[str] | None = None
                 ) -> dict[str, Any]:
        """Greedy lookahead decoding of one prompt: text, token ids and the engine's stats."""
        result = self.generator.generate(prompt, max_new_tokens=max_new_tokens, documents=documents)
        s = result.stats
        return {"text": result.text, "token_ids": list(result.token_ids), "new_tokens": s.new_tokens,
                "steps": s.steps, "tokens_per_step": s.tokens_per_step, "seconds": s.time_total,
                "prefill_seconds": s.time_prefill, "pid": os.getpid()}

    def plain(self, prompt: Prompt, max_new_tokens: int = 128) -> dict[str, Any]:
        """Plain HF greedy ``generate`` of the same prompt (the vanilla baseline): token ids and seconds."""
        prompt_ids = self.generator.encode(prompt)
        special = self.generator.inputs.special_ids()
        start = time.perf_counter()
        ids = greedy(self.generator.model, prompt_ids, max_new_tokens, **special.generate_kwargs())
        return {"token_ids": list(ids), "seconds": time.perf_counter() - start}

    def sync_now(self) -> bool:
        """Push and pull once now (False when sharing is off or the hub did not answer)."""
        return self.sync.sync_now()

    def info(self) -> dict[str, Any]:
        """This worker's process, trie size and sync counts."""
        s = self.sync.stats
        return {"pid": os.getpid(), "origin": self.generator.trie.origin, "trie_nodes": len(self.generator.trie),
                "sharing": self.sync.enabled, "syncs": s.syncs, "pushed": s.pushed, "pulled": s.pulled,
                "sync_failures": s.failures}

    def stop(self) -> None:
        """Push what is left and stop syncing."""
        self.sync.stop()


def start_workers(count: int, spec: GeneratorSpec, hub_name: str | None = HUB_NAME, sync_interval: float = 2.0,
                  cpus_per_worker: float = 1, gpus_per_worker: float = 0) -> list[Any]:
    """``count`` :class:`GenerateWorker` actors, each with its own model; returns once all are loaded."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    actor = ray.remote(GenerateWorker).options(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker)
    workers = [actor.remote(spec, hub_name, sync_interval) for _ in range(count)]
    ray.get([w.info.remote() for w in workers])
    return workers
