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

The hub checks what it is sent and refuses, with :class:`HubRefusedError` naming the cause: a worker whose trie has
another ``branch_length`` or ``max_query_length``, or ids of another tokenizer (its fingerprint; the first worker
that sends one binds a hub that has none); token ids outside the vocabulary; entries of another origin than the
worker's; and impossible seqs (past the worker's journal version, or more entries than the worker can have made
since its last push). One hub process holds its ``path`` (a lock file, as ``lookahead serve --trie``).
"""

from __future__ import annotations

import dataclasses
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
from lookahead.store import DraftStore, Fingerprint
from lookahead.store.store import SHAPING
from lookahead.trie import JournalEntry, TrieDelta, derived_sources

log = logging.getLogger("lookahead_ray")

HUB_NAME = "lookahead-trie-hub"
NAMESPACE = "lookahead"
HUB_ORIGIN = "hub"


class HubRefusedError(ValueError):
    """The hub answered and refused a sync or snapshot: the message names the cause (another config or tokenizer,
    token ids outside the vocabulary, impossible seqs). Retrying does not help; the worker's setup must change."""


@dataclass
class WorkerRecord:
    """What the hub knows of one worker (keyed by its trie's origin)."""

    origin: str
    pid: int = 0
    host: str = ""
    syncs: int = 0
    merged: int = 0  # entries of its pushes the hub took in
    last_seen: float = 0.0
    version: int | None = None  # journal version of its last push with entries (None: none yet)
    seq: int = 0  # the highest seq of its own entries at that push


def without_removed(delta: TrieDelta, removed: list[str]) -> TrieDelta:
    """``delta`` with the answers derived from a ``removed`` source emptied (same origin and seq, no tokens).

    ``removed`` are the sources removed past the version the worker last pulled: it generated those answers before it
    knew of the removal (a deletion on another replica raced with them), so they are dropped as the removal would
    have dropped them had they arrived first (the worker drops its own copy when it pulls the removal)."""
    if not removed:
        return delta
    gone = set(removed)
    entries = tuple(JournalEntry(e.origin, e.seq, e.op, (), 0, 0, 0, e.source)
                    if e.op == "insert" and gone & set(derived_sources(e.source) or ()) else e
                    for e in delta.entries)
    return dataclasses.replace(delta, entries=entries)


def trie_config(config: LookaheadConfig) -> dict[str, Any]:
    """The constructor arguments of the engine's trie for ``config`` (the hub's trie must have the same)."""
    return new_trie(config).config()


class TrieHubState:
    """The body of the hub actor (a plain class: usable, and testable, without Ray).

    Args:
        config: constructor arguments of the shared trie (:func:`trie_config`); a file at ``path`` with another
            ``branch_length`` or ``max_query_length`` is refused.
        path: load the trie from this file at start and save it there (None: in memory only); the hub holds its
            lock until :meth:`close`.
        save_interval: seconds between saves when the trie changed (0: only at :meth:`close`).
        fingerprint: the tokenizer the workers use (None: the file's, else the first worker's that sends one).
    """

    def __init__(self, config: dict[str, Any] | None = None, path: str | os.PathLike[str] | None = None,
                 save_interval: float = 60.0, fingerprint: Fingerprint | None = None) -> None:
        if save_interval < 0:
            raise ValueError(f"save_interval must be >= 0 seconds, got {save_interval!r}")
        self.instance = uuid.uuid4().hex  # a restarted hub has another: workers then pull from version 0
        self.path = None if path is None else os.fspath(path)
        shape = {k: v for k, v in (config or {}).items() if k in SHAPING}
        self.store = TrieStore(path, fingerprint, shape) if path is not None else None
        loaded = self.store.load() if self.store is not None else None
        self.trie = loaded if loaded is not None else DraftStore(**{**(config or {}), "origin": HUB_ORIGIN})
        if fingerprint is not None:
            self.trie.bind(fingerprint)
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
                if loaded is None:
                    loaded = DraftStore(**{**self.trie.config(), "origin": HUB_ORIGIN})
                    if self.trie.fingerprint is not None:
                        loaded.bind(self.trie.fingerprint)
                trie = loaded
                self.tenant_tries[tenant] = trie
                self._saved_versions[tenant] = trie.version
            return trie

    def _tenant_store(self, tenant: str) -> TrieStore | None:
        if self.path is None:
            return None  # the global path's lock guards the tenants' files next to it
        return TrieStore(tenant_trie_path(self.path, tenant), self.trie.fingerprint,
                         {name: getattr(self.trie, name) for name in SHAPING}, lock=False)

    def sync(self, delta: dict[str, Any] | None, since: int, worker: dict[str, Any], tenant: str | None = None
             ) -> dict[str, Any]:
        """Merge the worker's ``delta`` (None: nothing new) into the trie of ``tenant`` (None: the global trie),
        return what that trie has past version ``since``.

        The reply holds ``hub`` (this hub's instance id), ``merged`` (entries of ``delta`` taken in), ``version``
        and ``delta`` (a :class:`~lookahead.trie.TrieDelta` as a dict, without the worker's own entries), or
        ``delta`` None and ``behind`` True when the entries past ``since`` are no longer kept (the worker then goes
        on from ``version``, after removing the sources in ``removed``: every removal past ``since``). A merged
        removal is saved at once (with ``path``), before the reply. Raises :class:`HubRefusedError` (naming the
        cause) for a worker or delta that does not fit this hub (see the module's doc); nothing of a refused delta
        is merged.
        """
        trie = self.trie_of(tenant)
        origin = str(worker.get("origin", "?"))
        try:
            self._admit(trie, worker)
            pushed = TrieDelta.from_dict(delta) if delta else None
            if pushed is not None:
                self._check_pushed(pushed, origin)
                pushed = without_removed(pushed, trie.removed_since(since))
            merged = trie.merge(pushed) if pushed is not None else 0
        except (TypeError, ValueError) as error:
            log.error("trie hub: refused a sync of worker %s (pid %s on %s): %s", origin, worker.get("pid"),
                      worker.get("host"), error)
            raise HubRefusedError(f"the trie hub refused worker {origin}: {error}") from None
        self._record(worker, merged, pushed)
        if merged and pushed is not None and any(e.op in ("remove", "source") for e in pushed.entries):
            self.save()  # a deletion (or a replaced document) is durable before the worker's sync returns
        reply: dict[str, Any] = {"hub": self.instance, "merged": merged, "behind": False}
        try:
            out = trie.export_delta(since=since)
        except ValueError:  # past the journal's end, or before what it still keeps
            # the entries are gone, the tombstones are not: a worker this far behind still forgets what was removed
            reply.update(version=trie.version, delta=None, behind=True, removed=trie.removed_since(since))
            return reply
        others = tuple(e for e in out.entries if e.origin != origin)  # its own entries are no news to it
        reply.update(version=out.version, delta=TrieDelta(out.origin, out.branch_length, out.since, out.version,
                                                          others).to_dict())
        return reply

    def snapshot(self, tenant: str | None = None) -> dict[str, Any]:
        """The whole store of ``tenant`` (None: the global one) as :meth:`DraftStore.to_bytes` gives it, for a
        worker's warm start: ``hub`` (instance id) and ``data``."""
        return {"hub": self.instance, "data": self.trie_of(tenant).to_bytes()}

    def _admit(self, trie: DraftStore, worker: dict[str, Any]) -> None:
        """Refuse a worker whose trie has another shape or tokenizer than ``trie`` (ValueError naming both); bind
        a trie without a fingerprint to the worker's."""
        config = worker.get("config") or {}
        for name in SHAPING:
            if name in config and config[name] != getattr(trie, name):
                raise ValueError(f"the worker's trie has {name}={config[name]}, the hub's {name}={getattr(trie, name)}"
                                 f": their windows cannot be merged. Start every worker with the hub's settings (or "
                                 f"a hub with the workers')")
        theirs = Fingerprint.from_dict(worker.get("fingerprint"))
        if theirs is None:
            return
        if trie.fingerprint is None:
            trie.bind(theirs)  # the first worker that says which tokenizer it uses; raises if the trie cannot be
            return
        if trie.fingerprint.conflict(theirs) is not None:
            raise ValueError(f"the worker's token ids are of {theirs.describe()}, the hub's trie holds ids of "
                             f"{trie.fingerprint.describe()}: the same ids would mean other text")

    def _check_pushed(self, delta: TrieDelta, origin: str) -> None:
        """Refuse a push that is not the worker's own entries, or whose seqs it cannot have made (ValueError)."""
        if delta.origin != origin:
            raise ValueError(f"the delta's origin is {delta.origin!r}, the worker's {origin!r}")
        seqs = []
        for i, entry in enumerate(delta.entries):
            if entry.origin != origin:
                raise ValueError(f"entry {i} has origin {entry.origin!r}: a worker pushes only its own entries "
                                 f"({origin!r})")
            seqs.append(entry.seq)
        with self._lock:
            record = self.workers.get(origin)
            last_version, last_seq = (None, 0) if record is None else (record.version, record.seq)
        if last_version is None or not seqs:
            return
        if delta.version < last_version:
            raise ValueError(f"the delta's version {delta.version} is below the worker's last push "
                             f"({last_version}): a journal never shrinks")
        most = last_seq + delta.version - last_version  # one own entry at most per journal entry since
        if max(seqs) > most:
            raise ValueError(f"seq {max(seqs)} is impossible: the worker's last push (journal version "
                             f"{last_version}) ended at seq {last_seq}, and {delta.version - last_version} journal "
                             f"entries later it can have made at most seq {most}")

    def _record(self, worker: dict[str, Any], merged: int, pushed: TrieDelta | None = None) -> str:
        """Note a worker's sync (and the journal version and last seq of a push with entries); returns its
        origin."""
        origin = str(worker.get("origin", "?"))
        with self._lock:
            record = self.workers.setdefault(origin, WorkerRecord(origin))
            record.pid = int(worker.get("pid", 0))
            record.host = str(worker.get("host", ""))
            record.syncs += 1
            record.merged += merged
            record.last_seen = time.time()
            if pushed is not None and len(pushed):
                record.version = max(record.version or 0, pushed.version)
                record.seq = max([record.seq, *(e.seq for e in pushed.entries)])
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
        """Stop the periodic saves, save one last time (when changed) and release the path's lock; True when that
        save wrote the file."""
        self._closed.set()
        try:
            return self.save()
        finally:
            if self.store is not None:
                self.store.close()


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


def worker_identity(origin: str, trie: DraftStore | None = None) -> dict[str, Any]:
    """How a worker introduces itself to the hub: its trie's origin, process and host, and (given ``trie``) the
    config that shapes its trie and the fingerprint of its tokenizer (None: unknown)."""
    identity: dict[str, Any] = {"origin": origin, "pid": os.getpid(), "host": socket.gethostname()}
    if trie is not None:
        identity["config"] = {name: getattr(trie, name) for name in SHAPING}
        identity["fingerprint"] = None if trie.fingerprint is None else trie.fingerprint.to_dict()
    return identity
