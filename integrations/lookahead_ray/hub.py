"""The trie hub: one Ray actor holding the trie of past answers that every worker shares.

Workers (:class:`~lookahead_ray.sync.TrieSync`) call :meth:`TrieHubState.sync` on a short interval: it merges the
windows the worker learned since its last push (a :class:`~lookahead.trie.TrieDelta`) and returns what the hub
learned since the version the worker last saw. Merging is idempotent, and a trie ignores echoes of its own entries,
so a retried push or a delta that comes back to its author changes nothing. With ``path`` the hub loads its trie
from that file at start (a warm start across restarts; a corrupt file is moved aside, as ``lookahead serve --trie``
does) and saves it atomically every ``save_interval`` seconds when it changed, and at :meth:`TrieHubState.close`.

Tenants (``lookahead serve --tenant-header`` / ``--tenant-keys``): a call naming a ``tenant`` syncs that tenant's
trie instead of the global one, made on its first use (loaded from its file next to ``path``, as ``lookahead serve``
names it), so a tenant's past answers and documents reach every replica and no other tenant.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import ray
from lookahead_server.persistence import TrieStore
from lookahead_server.tenants import check_tenant, tenant_trie_path

from lookahead.config import LookaheadConfig
from lookahead.drafter import new_trie
from lookahead.store import DraftStore
from lookahead.trie import TrieDelta

log = logging.getLogger("lookahead_ray")

HUB_NAME = "lookahead-trie-hub"
NAMESPACE = "lookahead"
HUB_ORIGIN = "hub"


@dataclass
class WorkerRecord:
    """What the hub knows of one worker (keyed by its trie's origin)."""

    origin: str
    pid: int = 0
    host: str = ""
    syncs: int = 0
    merged: int = 0  # entries of its pushes the hub took in
    last_seen: float = 0.0


def trie_config(config: LookaheadConfig) -> dict[str, Any]:
    """The constructor arguments of the engine's trie for ``config`` (the hub's trie must have the same)."""
    return new_trie(config).config()


class TrieHubState:
    """The body of the hub actor (a plain class: usable, and testable, without Ray).

    Args:
        config: constructor arguments of the shared trie (:func:`trie_config`); ignored when ``path`` holds a trie.
        path: load the trie from this file at start and save it there (None: in memory only).
        save_interval: seconds between saves when the trie changed (0: only at :meth:`close`).
    """

    def __init__(self, config: dict[str, Any] | None = None, path: str | os.PathLike[str] | None = None,
                 save_interval: float = 60.0) -> None:
        if save_interval < 0:
            raise ValueError(f"save_interval must be >= 0 seconds, got {save_interval!r}")
        self.instance = uuid.uuid4().hex  # a restarted hub has another: workers then pull from version 0
        self.path = None if path is None else os.fspath(path)
        self.store = TrieStore(path) if path is not None else None
        loaded = self.store.load() if self.store is not None else None
        self.trie = loaded if loaded is not None else DraftStore(**{**(config or {}), "origin": HUB_ORIGIN})
        self.loaded_nodes = len(loaded) if loaded is not None else 0
        self.tenant_tries: dict[str, DraftStore] = {}  # tenant -> its trie, made on first use
        self.workers: dict[str, WorkerRecord] = {}
        self.saves = 0
        self._saved_versions: dict[str | None, int] = {None: self.trie.version}  # tenant (None: global) -> saved
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._saver: threading.Thread | None = None
        if self.store is not None and save_interval > 0:
            self._saver = threading.Thread(target=self._autosave, args=(save_interval,), name="lookahead-hub-save",
                                           daemon=True)
            self._saver.start()

    def trie_of(self, tenant: str | None = None) -> DraftStore:
        """The global trie (``tenant`` None) or ``tenant``'s, made on its first use: loaded from its file next to
        ``path`` when there is one, else empty with the global trie's knobs."""
        if tenant is None:
            return self.trie
        with self._lock:
            trie = self.tenant_tries.get(tenant)
            if trie is None:
                store = self._tenant_store(check_tenant(tenant, "trie hub"))
                loaded = store.load() if store is not None else None
                trie = loaded if loaded is not None else DraftStore(**{**self.trie.config(), "origin": HUB_ORIGIN})
                self.tenant_tries[tenant] = trie
                self._saved_versions[tenant] = trie.version
            return trie

    def _tenant_store(self, tenant: str) -> TrieStore | None:
        return None if self.path is None else TrieStore(tenant_trie_path(self.path, tenant))

    def sync(self, delta: dict[str, Any] | None, since: int, worker: dict[str, Any], tenant: str | None = None
             ) -> dict[str, Any]:
        """Merge the worker's ``delta`` (None: nothing new) into the trie of ``tenant`` (None: the global trie),
        return what that trie has past version ``since``.

        The reply holds ``hub`` (this hub's instance id), ``merged`` (entries of ``delta`` taken in), ``version``
        and ``delta`` (a :class:`~lookahead.trie.TrieDelta` as a dict, without the worker's own entries), or
        ``delta`` None and ``behind`` True when the entries past ``since`` are no longer kept (the worker then goes
        on from ``version``).
        """
        trie = self.trie_of(tenant)
        merged = trie.merge(TrieDelta.from_dict(delta)) if delta else 0
        origin = self._record(worker, merged)
        reply: dict[str, Any] = {"hub": self.instance, "merged": merged, "behind": False}
        try:
            out = trie.export_delta(since=since)
        except ValueError:  # past the journal's end, or before what it still keeps
            reply.update(version=trie.version, delta=None, behind=True)
            return reply
        others = tuple(e for e in out.entries if e.origin != origin)  # its own entries are no news to it
        reply.update(version=out.version, delta=TrieDelta(out.origin, out.branch_length, out.since, out.version,
                                                          others).to_dict())
        return reply

    def snapshot(self, tenant: str | None = None) -> dict[str, Any]:
        """The whole store of ``tenant`` (None: the global one) as :meth:`DraftStore.to_bytes` gives it, for a
        worker's warm start: ``hub`` (instance id) and ``data``."""
        return {"hub": self.instance, "data": self.trie_of(tenant).to_bytes()}

    def _record(self, worker: dict[str, Any], merged: int) -> str:
        """Note a worker's sync; returns its origin."""
        origin = str(worker.get("origin", "?"))
        with self._lock:
            record = self.workers.setdefault(origin, WorkerRecord(origin))
            record.pid = int(worker.get("pid", 0))
            record.host = str(worker.get("host", ""))
            record.syncs += 1
            record.merged += merged
            record.last_seen = time.time()
        return origin

    def stats(self) -> dict[str, Any]:
        """Size and version of the shared trie, saves, and every worker that synced."""
        with self._lock:
            workers = [asdict(w) for w in self.workers.values()]
            tenants = {name: len(trie) for name, trie in self.tenant_tries.items()}
        return {"instance": self.instance, "nodes": len(self.trie), "version": self.trie.version,
                "loaded_nodes": self.loaded_nodes, "saves": self.saves, "workers": workers, "tenants": tenants,
                "path": str(self.store.path) if self.store is not None else None}

    def save(self, force: bool = False) -> bool:
        """Save every trie (the global one, each tenant's to its own file) atomically that changed since its last
        save (or all, ``force``); False when nothing was written (no path, nothing new, or the writes failed:
        logged)."""
        if self.store is None:
            return False
        with self._lock:
            tries: list[tuple[str | None, DraftStore, TrieStore]] = [(None, self.trie, self.store)]
            for tenant, trie in self.tenant_tries.items():
                store = self._tenant_store(tenant)
                assert store is not None
                tries.append((tenant, trie, store))
            wrote = False
            for tenant, trie, store in tries:
                version = trie.version
                if not force and version == self._saved_versions.get(tenant):
                    continue
                try:
                    store.save(trie)
                except OSError as error:
                    log.error("trie hub: could not save the trie to %s: %s", store.path, error)
                    continue
                self._saved_versions[tenant] = version
                self.saves += 1
                wrote = True
            return wrote

    def _autosave(self, interval: float) -> None:
        while not self._closed.wait(interval):
            self.save()

    def close(self) -> bool:
        """Stop the periodic saves and save one last time (when changed); True when that save wrote the file."""
        self._closed.set()
        return self.save()


def _hub_actor_class() -> Any:
    """The Ray actor class of the hub: no CPU reserved (it only merges and copies counts), restarted if it dies (it
    then reloads its file)."""
    return ray.remote(num_cpus=0, max_restarts=-1)(TrieHubState)


def start_hub(config: dict[str, Any] | None = None, path: str | os.PathLike[str] | None = None,
              save_interval: float = 60.0, name: str = HUB_NAME, namespace: str = NAMESPACE,
              detached: bool = False) -> Any:
    """The named hub actor: the running one of that name, else a new one (Ray must be initialised).

    ``detached`` keeps it alive after this driver exits (``ray.kill`` it, or call ``close`` first to save)."""
    options: dict[str, Any] = {"name": name, "namespace": namespace, "get_if_exists": True}
    if detached:
        options["lifetime"] = "detached"
    path = None if path is None else os.fspath(path)
    handle = _hub_actor_class().options(**options).remote(config, path, save_interval)
    ray.get(handle.stats.remote())  # wait until it is up (and has loaded its file): errors surface here
    return handle


def find_hub(name: str = HUB_NAME, namespace: str = NAMESPACE) -> Any | None:
    """The running hub actor of that name, or None."""
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        return None


def stop_hub(handle: Any, timeout: float = 120.0) -> bool:
    """Save the hub's trie one last time and end the actor; True when that save wrote the file."""
    try:
        saved = bool(ray.get(handle.close.remote(), timeout=timeout))
    finally:
        ray.kill(handle, no_restart=True)
    return saved


def worker_identity(origin: str) -> dict[str, Any]:
    """How a worker introduces itself to the hub."""
    return {"origin": origin, "pid": os.getpid(), "host": socket.gethostname()}
