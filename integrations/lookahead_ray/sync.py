"""A worker's link to the trie hub: a daemon thread that pushes what the worker learned and pulls what the others
learned, every few seconds, never inside a decoding step.

At start (before the worker decodes anything) an empty local trie is replaced by a replica of the hub's whole trie
(a warm start: what earlier runs and the other workers taught it). Then each sync exports the worker's own journal
entries since its last successful push, sends them, and merges the hub's entries since the version it last pulled.
Merging is idempotent, so a retried push changes nothing. The trie is thread-safe, so syncing while the worker
decodes only holds the trie's lock for the merge. If the hub is unreachable the worker logs it once and keeps decoding
with what it has; syncing resumes when the hub answers again (a restarted hub, with another instance id, is pulled
from its current version). A hub that answers with a refusal (:class:`~lookahead_ray.hub.HubRefusedError`: another
``branch_length``, another tokenizer, ...) is logged as an error naming the cause, not as unreachable.

The worker's trie is bound to its tokenizer's fingerprint (when the owner has a ``tokenizer`` and a ``model``), and
the worker sends it, with its trie's shaping config, at every sync.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Protocol

import ray

from lookahead.store import DraftStore, Fingerprint, tokenizer_fingerprint
from lookahead.store.store import SHAPING
from lookahead.trie import TrieDelta

from .hub import HubRefusedError, worker_identity

log = logging.getLogger("lookahead_ray")


class HubClient(Protocol):
    """What :class:`TrieSync` needs of a hub (see :class:`lookahead_ray.hub.TrieHubState`)."""

    def sync(self, delta: dict[str, Any] | None, since: int, worker: dict[str, Any]) -> dict[str, Any]: ...

    def snapshot(self) -> dict[str, Any]: ...


class ActorHubClient:
    """:class:`HubClient` over the hub's Ray actor handle, for the global trie or ``tenant``'s; a call that takes
    longer than ``timeout`` fails."""

    def __init__(self, handle: Any, timeout: float = 60.0, tenant: str | None = None) -> None:
        self.handle = handle
        self.timeout = timeout
        self.tenant = tenant

    def sync(self, delta: dict[str, Any] | None, since: int, worker: dict[str, Any]) -> dict[str, Any]:
        return ray.get(self.handle.sync.remote(delta, since, worker, self.tenant), timeout=self.timeout)

    def snapshot(self) -> dict[str, Any]:
        return ray.get(self.handle.snapshot.remote(self.tenant), timeout=self.timeout)


def replica_trie(data: bytes) -> DraftStore:
    """A store with the entries of a saved store (:meth:`DraftStore.to_bytes`) under a new origin of its own: what it
    holds counts as applied, so the hub's entries are not merged twice, and the entries it makes are its own."""
    return DraftStore.from_bytes(data, new_origin=True)


def own_entries(delta: TrieDelta, origin: str) -> TrieDelta:
    """``delta`` with only the entries ``origin`` made (what a worker merged from the hub goes back to no one)."""
    mine = tuple(e for e in delta.entries if e.origin == origin)
    return TrieDelta(delta.origin, delta.branch_length, delta.since, delta.version, mine)


@dataclass
class SyncStats:
    """What a :class:`TrieSync` did so far."""

    syncs: int = 0  # successful round trips
    pushed: int = 0  # own journal entries sent
    pulled: int = 0  # hub entries merged into the local trie
    warm_nodes: int = 0  # nodes of the hub's trie taken at start
    failures: int = 0
    missed: int = 0  # times the hub no longer had the entries past our version (we went on from its version)
    hub_reachable: bool | None = None  # None: never tried
    refused: str | None = None  # why the hub refused the last sync (None: it did not)


class TrieSync:
    """Keep a worker's trie in step with the hub.

    Args:
        owner: the object whose ``trie`` attribute is the worker's trie (a ``LookaheadGenerator``): read at every
            sync (a replaced trie is synced from its start), and set once by the warm start.
        hub: the hub client; None switches sharing off (``start`` and ``sync_now`` do nothing).
        interval: seconds between syncs of the background thread.
        warm_start: at :meth:`start`, replace an empty local trie with a replica of the hub's (call ``start`` before
            the worker decodes anything).
    """

    def __init__(self, owner: Any, hub: HubClient | None, interval: float = 2.0, warm_start: bool = True) -> None:
        if not interval > 0:
            raise ValueError(f"interval must be > 0 seconds, got {interval!r}")
        self.owner = owner
        self.hub = hub
        self.interval = interval
        self.warm_start = warm_start
        self.stats = SyncStats()
        self._trie: DraftStore | None = None
        self._pushed = 0  # local journal position already pushed
        self._hub_version = 0  # hub version already pulled
        self._hub_instance: str | None = None
        self._fingerprint: Fingerprint | None = None  # the owner's tokenizer's, once computed
        self._lock = threading.Lock()  # one sync at a time (thread and sync_now)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.hub is not None

    @property
    def background(self) -> bool:
        """Whether a daemon thread syncs every ``interval`` s (from ``start(background=True)`` to :meth:`stop`)."""
        return self._thread is not None

    def start(self, background: bool = True) -> TrieSync:
        """Warm start, sync once, then (``background``) sync every ``interval`` seconds in a daemon thread; without
        it the caller calls :meth:`sync_now` (one thread syncing several tries)."""
        if self.hub is None or self._thread is not None:
            return self
        if self.warm_start and len(self.owner.trie) == 0:
            try:
                self._take_snapshot()
            except Exception as error:  # noqa: BLE001 - without the hub the worker starts cold
                self._failed(error)
        self.sync_now()
        if background:
            self._thread = threading.Thread(target=self._run, name="lookahead-trie-sync", daemon=True)
            self._thread.start()
        return self

    def _bind(self, trie: DraftStore) -> None:
        """Bind ``trie`` to the owner's tokenizer (when it has one and the trie is not bound yet); a trie that does
        not fit it is a :class:`HubRefusedError` (logged with its cause, never as an unreachable hub)."""
        tokenizer, model = getattr(self.owner, "tokenizer", None), getattr(self.owner, "model", None)
        if trie.fingerprint is not None or tokenizer is None or model is None:
            return
        if self._fingerprint is None:
            self._fingerprint = tokenizer_fingerprint(tokenizer, int(model.config.vocab_size))
        try:
            trie.bind(self._fingerprint)
        except ValueError as error:
            raise HubRefusedError(f"this worker's trie does not fit its own tokenizer: {error}") from None

    def _take_snapshot(self) -> None:
        assert self.hub is not None
        local = self.owner.trie
        self._bind(local)
        reply = self.hub.snapshot()
        replica = replica_trie(reply["data"])
        for name in SHAPING:
            if getattr(replica, name) != getattr(local, name):
                raise HubRefusedError(f"the hub's trie has {name}={getattr(replica, name)}, this worker's "
                                      f"{name}={getattr(local, name)}: their windows cannot be merged. Start every "
                                      f"worker with the hub's settings")
        if local.fingerprint is not None:
            try:
                replica.bind(local.fingerprint)
            except ValueError as error:
                raise HubRefusedError(f"the hub's trie does not fit this worker's tokenizer: {error}") from None
        with self._lock:
            self.owner.trie = replica
            self._trie, self._hub_instance = replica, reply["hub"]
            self._pushed = self._hub_version = replica.version  # the saved journal position
        self.stats.warm_nodes = len(replica)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sync_now()

    def sync_now(self) -> bool:
        """One push and pull; False when sharing is off or the hub did not answer (the worker goes on alone)."""
        if self.hub is None:
            return False
        with self._lock:
            trie = self.owner.trie
            if trie is not self._trie:  # the owner got another trie: start over
                self._trie, self._pushed, self._hub_version, self._hub_instance = trie, 0, 0, None
            try:
                self._bind(trie)
                self._exchange(trie)
            except Exception as error:  # noqa: BLE001 - any failure of the hub leaves the worker decoding alone
                self._failed(error)
                return False
            if self.stats.hub_reachable is False or self.stats.refused is not None:
                log.warning("trie hub reachable again: sharing resumed")
            self.stats.hub_reachable = True
            self.stats.refused = None
            return True

    def _exchange(self, trie: DraftStore) -> None:
        assert self.hub is not None
        try:
            delta = own_entries(trie.export_delta(since=self._pushed), trie.origin)
        except ValueError:  # the journal dropped entries before we pushed them (journal_limit): go on from here
            self._pushed = trie.version
            delta = own_entries(trie.export_delta(since=self._pushed), trie.origin)
        worker = worker_identity(trie.origin, trie)
        reply = self.hub.sync(delta.to_dict() if len(delta) else None, self._hub_version, worker)
        self._pushed = delta.version
        trie.trim_journal(delta.version)  # the hub has them: the local journal need not keep them
        self.stats.pushed += len(delta)
        if self._hub_instance is not None and reply["hub"] != self._hub_instance:  # a restarted hub
            log.warning("the trie hub restarted: pulling what it has from now on")
            reply = self.hub.sync(None, 0, worker)
        self._hub_instance = reply["hub"]
        if reply["behind"]:
            self.stats.missed += 1
            removed = list(reply.get("removed") or ())
            for source in removed:  # removals are never missed: their tombstones outlive the hub's journal
                trie.remove_source(source, journal=False)
            log.warning("the trie hub no longer keeps its entries past version %d: going on from %d (%d removed "
                        "documents applied)", self._hub_version, reply["version"], len(removed))
        else:
            self.stats.pulled += trie.merge(TrieDelta.from_dict(reply["delta"]))
        self._hub_version = int(reply["version"])
        self.stats.syncs += 1

    def _failed(self, error: BaseException) -> None:
        self.stats.failures += 1
        refusal = _refusal(error)
        if refusal is not None:  # the hub answered: it is reachable, and this worker does not fit it
            if self.stats.refused != refusal:
                log.error("trie hub refused this worker: %s. It keeps decoding with its own trie, unshared, and "
                          "retries every %.0fs", refusal, self.interval)
            self.stats.refused = refusal
            self.stats.hub_reachable = True
            return
        if self.stats.hub_reachable is not False:
            log.warning("trie hub unreachable (%s: %s): this worker keeps decoding with its own trie and retries "
                        "every %.0fs", type(error).__name__, error, self.interval)
        self.stats.hub_reachable = False

    def stop(self, flush: bool = True, timeout: float = 30.0) -> None:
        """Stop the thread; with ``flush``, push what is left once more."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if flush:
            self.sync_now()


def _refusal(error: BaseException) -> str | None:
    """The hub's reason when ``error`` is its refusal (raised here, or by the hub actor and passed on by Ray)."""
    for candidate in (error, getattr(error, "cause", None)):
        if isinstance(candidate, HubRefusedError):
            return str(candidate.args[0]) if candidate.args else str(candidate)
    return None
