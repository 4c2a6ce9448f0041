"""``lookahead serve --ray``: the OpenAI-compatible app (:func:`lookahead_server.app.create_app`) as a Ray Serve
deployment of N replicas, each with its own model and scheduler, all sharing the trie hub.

Each replica builds its engine, starts its :class:`~lookahead_ray.sync.TrieSync` (a warm start from the hub's trie,
then background syncs) and then the app, so what one replica answered drafts the same question on every other one a
sync interval later. With tenants (``--tenant-header`` / ``--tenant-keys``) each tenant's trie is synced the same
way, with that tenant's trie in the hub, from the tenant's first request on a replica (a warm start from the hub's
copy of it). Replicas do not persist tries themselves: the hub does (``--trie PATH``, tenants' files next to it).
Every response carries the header ``x-lookahead-replica`` (the replica's process id), to see where requests went.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from typing import Any

from lookahead_server.app import ServeSettings, create_app
from ray import serve

from lookahead.store import DraftStore

from .hub import HUB_NAME, NAMESPACE
from .spec import GeneratorSpec
from .sync import ActorHubClient, TrieSync
from .worker import hub_sync

APP_NAME = "lookahead"
REPLICA_HEADER = b"x-lookahead-replica"


class ReplicaHeader:
    """ASGI middleware adding ``x-lookahead-replica: <pid>`` to every HTTP response."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.value = str(os.getpid()).encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (REPLICA_HEADER, self.value)]
            await send(message)

        await self.app(scope, receive, send_with_header)


class _TrieHolder:
    """What :class:`TrieSync` syncs: an object with a ``trie`` attribute (here one tenant's trie)."""

    def __init__(self, trie: DraftStore) -> None:
        self.trie = trie


@serve.ingress()
class LookaheadReplica:
    """One replica: its engine, its trie synced with the hub, and the app over them (built by Serve after
    ``__init__``, its lifespan run by Serve: the scheduler starts with it)."""

    def __init__(self, spec: GeneratorSpec, settings: ServeSettings, hub_name: str | None = HUB_NAME,
                 sync_interval: float = 2.0, namespace: str = NAMESPACE) -> None:
        self.generator = spec.build()
        _ = self.generator.budget  # measure (or load) the cost model now, not in the first request
        self.sync = hub_sync(self.generator, hub_name, sync_interval, namespace)
        self.settings = dataclasses.replace(settings, trie_path=None)  # the hub persists the tries
        self.sync_interval = sync_interval
        self.tenant_syncs: dict[str, TrieSync] = {}  # one thread syncs them all (see _sync_tenants)
        self._tenant_thread: threading.Thread | None = None

    def sync_tenant(self, tenant: str, trie: DraftStore) -> DraftStore:
        """Start syncing ``tenant``'s trie (new on this replica) with the hub's copy; the trie the tenant drafts
        from (the hub's copy when ``trie`` is empty)."""
        hub = self.sync.hub
        if not isinstance(hub, ActorHubClient):  # sharing off
            return trie
        holder = _TrieHolder(trie)
        # the handle found at start: a hub gone since is retried by the sync (logged), never a failed request
        client = ActorHubClient(hub.handle, hub.timeout, tenant=tenant)
        self.tenant_syncs[tenant] = TrieSync(holder, client, self.sync_interval).start(background=False)
        if self._tenant_thread is None:
            self._tenant_thread = threading.Thread(target=self._sync_tenants, name="lookahead-tenant-sync",
                                                   daemon=True)
            self._tenant_thread.start()
        return holder.trie

    def _sync_tenants(self) -> None:
        """Every sync interval, sync each tenant's trie in turn (one thread however many tenants)."""
        while True:
            time.sleep(self.sync_interval)
            for sync in list(self.tenant_syncs.values()):
                sync.sync_now()

    def unload_tenant(self, tenant: str, trie: DraftStore) -> bool:
        """Let ``tenant``'s trie go (an idle tenant past ``--max-tenants``): push what it learned to the hub and stop
        its sync; True when the hub has it all (the tenant's next request starts warm from the hub's copy)."""
        sync = self.tenant_syncs.get(tenant)
        if sync is None or not sync.enabled or not sync.sync_now():
            return False  # nowhere to keep it: the tenant stays loaded
        self.tenant_syncs.pop(tenant, None)
        sync.stop(flush=False)
        return True

    def push_now(self, tenant: str | None) -> bool:
        """Push this replica's changes to ``tenant``'s trie (None: the global one) to the hub now (after a
        deletion: the hub saves a removal before it answers); False when sharing is off or the hub did not
        answer."""
        sync = self.sync if tenant is None else self.tenant_syncs.get(tenant)
        return sync is not None and sync.enabled and sync.sync_now()

    def __serve_build_asgi_app__(self) -> Any:
        app = create_app(self.generator, self.settings, on_new_tenant=self.sync_tenant, on_deleted=self.push_now,
                         on_unload_tenant=self.unload_tenant)
        app.add_middleware(ReplicaHeader)
        return app


def deployment(spec: GeneratorSpec, settings: ServeSettings, replicas: int = 2, hub_name: str | None = HUB_NAME,
               sync_interval: float = 2.0, cpus_per_replica: float = 1, gpus_per_replica: float = 0) -> Any:
    """The bound Serve application: ``replicas`` replicas of :class:`LookaheadReplica`; each takes up to
    ``max_batch_size + max_queue`` requests at a time (its own queue answers 429 past that)."""
    if not isinstance(replicas, int) or replicas < 1:
        raise ValueError(f"replicas must be an integer >= 1, got {replicas!r}")
    options = serve.deployment(
        LookaheadReplica, name="LookaheadReplica", num_replicas=replicas,
        max_ongoing_requests=settings.max_batch_size + settings.max_queue,
        ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica})
    return options.bind(spec, settings, hub_name, sync_interval)


def run_serve(spec: GeneratorSpec, settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000,
              replicas: int = 2, hub_name: str | None = HUB_NAME, sync_interval: float = 2.0,
              cpus_per_replica: float = 1, gpus_per_replica: float = 0) -> str:
    """Start Serve's HTTP proxy on ``host:port`` and the deployment (Ray must be initialised, the hub started when
    named); returns once every replica is up, with the base URL."""
    serve.start(http_options={"host": host, "port": port})
    app = deployment(spec, settings, replicas, hub_name, sync_interval, cpus_per_replica, gpus_per_replica)
    serve.run(app, name=APP_NAME, route_prefix="/")
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"
