"""Tenants: who a request belongs to, and the trie each tenant drafts from.

A request's tenant comes from a header (``tenant_header``, set by a trusted gateway) or from its API key through a
keys file (``tenant_keys``: one ``KEY TENANT`` pair a line). Each tenant drafts from a trie of its own (its past
answers and the documents it sent), kept in its own file next to the global one; a request without a tenant drafts
from the generator's (default) trie. Drafts never change an answer, only its speed, and speed is observable: one
trie per tenant closes that timing side channel between tenants.

The engine's generator holds the default trie; a tenant's request is submitted with its tenant's trie
(``Scheduler.submit(..., trie=...)``), which its drafter drafts from and its answer is learned into.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from lookahead.budget import DraftBudget
from lookahead.engine import LookaheadGenerator
from lookahead.store import DraftStore

from .errors import ApiError
from .persistence import TrieFileError, TrieStore, engine_identity

log = logging.getLogger("lookahead_server")

#: what a tenant name may be: it names a file, so letters, digits, '.', '_' and '-' only (not starting with '.')
TENANT_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")


def check_tenant(name: str, where: str) -> str:
    """``name`` if it is a valid tenant name, else a ValueError saying what is allowed."""
    if not isinstance(name, str) or not TENANT_NAME.fullmatch(name):
        raise ValueError(f"{where}: tenant name {name!r} is not allowed; use 1 to 64 letters, digits, '.', '_' or "
                         f"'-', not starting with '.'")
    return name


def read_tenant_keys(path: str | os.PathLike[str]) -> dict[str, str]:
    """API key -> tenant from a keys file: one ``KEY TENANT`` pair a line; blank lines and ``#`` comments ignored."""
    keys: dict[str, str] = {}
    text = Path(path).read_text(encoding="utf-8")
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        where = f"{path}, line {number}"
        if len(parts) != 2:
            raise ValueError(f"{where}: expected 'KEY TENANT' (two words), got {len(parts)} word(s)")
        key, tenant = parts
        if key in keys:
            raise ValueError(f"{where}: this key is listed twice")
        keys[key] = check_tenant(tenant, where)
    if not keys:
        raise ValueError(f"{path}: no 'KEY TENANT' lines")
    return keys


def tenant_trie_path(global_path: str | os.PathLike[str], tenant: str) -> Path:
    """Where ``tenant``'s trie is saved: next to the global file, ``store.bin`` -> ``store.tenant-NAME.bin``."""
    path = Path(global_path)
    stem, dot, suffixes = path.name.partition(".")
    return path.with_name(f"{stem}.tenant-{tenant}{dot}{suffixes}")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class Access:
    """Authorization and the tenant of a request, from its headers.

    Args:
        api_key: the server's own key; a request with it has no tenant (the default trie).
        tenant_header: a header naming the request's tenant (absent: no tenant). Trust it only behind a gateway
            that sets it.
        tenant_keys: API key -> tenant; every listed key is accepted and decides the tenant.
    """

    def __init__(self, api_key: str | None = None, tenant_header: str | None = None,
                 tenant_keys: Mapping[str, str] | None = None) -> None:
        if tenant_header is not None and tenant_keys:
            raise ValueError("give tenant_header or tenant_keys, not both: a request's tenant comes from one of them")
        if tenant_header is not None and not re.fullmatch(r"[A-Za-z0-9-]+", tenant_header):
            raise ValueError(f"tenant_header must be a header name (letters, digits, '-'), got {tenant_header!r}")
        self.api_key = api_key
        self.tenant_header = tenant_header.lower() if tenant_header else None
        self._keys = {_digest(k): check_tenant(t, "tenant_keys") for k, t in (tenant_keys or {}).items()}

    @property
    def needs_key(self) -> bool:
        return self.api_key is not None or bool(self._keys)

    def tenant(self, headers: Mapping[str, str]) -> str | None:
        """The request's tenant (None: the default trie); an :class:`ApiError` 401/400 when it may not come in."""
        if self.needs_key:
            return self._by_key(headers)
        if self.tenant_header is not None:
            value = headers.get(self.tenant_header)
            if value is None or not value.strip():
                return None
            try:
                return check_tenant(value.strip(), f"header {self.tenant_header}")
            except ValueError as error:
                raise ApiError(400, str(error), param=self.tenant_header) from None
        return None

    def _by_key(self, headers: Mapping[str, str]) -> str | None:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() == "bearer" and token:
            if self.api_key is not None and hmac.compare_digest(token.encode(), self.api_key.encode()):
                return self._header_tenant(headers)
            tenant = self._keys.get(_digest(token))
            if tenant is not None:
                return tenant
        raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def sees_internals(self, headers: Mapping[str, str]) -> bool:
        """Whether a request may see server internals (queue, trie sizes in ``/health``): with the server's own key,
        or on a server open to all (no key, no tenants)."""
        if self.api_key is None:
            return not self._keys and self.tenant_header is None
        scheme, _, token = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    def _header_tenant(self, headers: Mapping[str, str]) -> str | None:
        """With the server's own key, the tenant header (when configured) still names the tenant."""
        if self.tenant_header is None:
            return None
        return Access(tenant_header=self.tenant_header).tenant(headers)


class TenantTries:
    """The default trie (the generator's) and one trie per tenant, made or loaded from its file on first use, each
    with a draft budget of its own (one tenant's traffic never changes another's draft sizes).

    At most ``max_tenants`` tenant tries are held. A new tenant past that unloads the least recently used tenant
    with no request in flight: ``on_unload`` keeps its trie (the server saves it to its file) and it is loaded again
    on its next request. Without ``on_unload`` (no file to keep it in) the new tenant is refused (403) instead:
    unloading would lose its documents.

    Locks: one per tenant around loading and unloading it (a slow file or hub sync of one tenant never delays
    another's requests); the shared lock guards the tables only and is never held during file or hub work.

    Args:
        generator: owns the default trie and budget, and makes empty tries (its knobs).
        trie_path: the global trie file; tenant ``NAME``'s is :func:`tenant_trie_path` of it (None: memory only).
        max_tenants: most tenant tries held at once.
        on_load: called with each trie read from a file (to warn about knobs that differ).
        on_new: called with a tenant and its trie when the trie is made or loaded; the trie it returns is the
            tenant's (a replica of ``lookahead serve --ray`` starts the tenant's hub sync there).
        on_unload: called with a tenant and its trie before it is unloaded; True when its content is kept (saved),
            False to keep it held.
    """

    def __init__(self, generator: LookaheadGenerator, trie_path: str | None = None, max_tenants: int = 64,
                 on_load: Callable[[DraftStore], None] | None = None,
                 on_new: Callable[[str, DraftStore], DraftStore] | None = None,
                 on_unload: Callable[[str, DraftStore], bool] | None = None) -> None:
        self.generator = generator
        self.trie_path = trie_path
        self.max_tenants = max_tenants
        self.on_load = on_load
        self.on_new = on_new
        self.on_unload = on_unload
        self._tries: OrderedDict[str, DraftStore] = OrderedDict()  # least recently used first
        self._budgets: dict[str, DraftBudget] = {}
        self._busy: dict[str, int] = {}  # requests in flight per tenant: never unloaded while any
        self._locks: dict[str, threading.Lock] = {}  # one per tenant: loading and unloading it
        self._stores: dict[str, TrieStore] = {}
        self._lock = threading.Lock()  # the tables above only

    # ------------------------------------------------------------------ requests

    def get(self, tenant: str | None) -> DraftStore:
        """The trie ``tenant`` drafts from and learns into (None: the default trie), loaded if it is not held."""
        if tenant is None:
            return self.generator.trie
        with self._lock:
            trie = self._tries.get(tenant)
            if trie is not None:
                self._tries.move_to_end(tenant)
                return trie
            own = self._locks.setdefault(tenant, threading.Lock())
        with own:
            with self._lock:
                trie = self._tries.get(tenant)  # loaded meanwhile by another request
                if trie is not None:
                    self._tries.move_to_end(tenant)
                    return trie
            self._make_room(tenant)
            trie = self._load(tenant)
            if self.on_new is not None:
                trie = self.on_new(tenant, trie)
            with self._lock:
                self._tries[tenant] = trie
            return trie

    @contextmanager
    def using(self, tenant: str | None) -> Iterator[DraftStore]:
        """``get(tenant)``, held in use until the block ends (a tenant in use is never unloaded)."""
        trie = self.hold(tenant)
        try:
            yield trie
        finally:
            self.release(tenant)

    def hold(self, tenant: str | None) -> DraftStore:
        """``get(tenant)`` held in use until :meth:`release` (for a request that outlives a block)."""
        if tenant is None:
            return self.generator.trie
        while True:
            trie = self.get(tenant)
            with self._lock:
                if self._tries.get(tenant) is trie:  # not unloaded between get and here
                    self._busy[tenant] = self._busy.get(tenant, 0) + 1
                    return trie

    def release(self, tenant: str | None) -> None:
        """End one use of ``tenant`` (see :meth:`hold`)."""
        if tenant is None:
            return
        with self._lock:
            left = self._busy.get(tenant, 0) - 1
            if left > 0:
                self._busy[tenant] = left
            else:
                self._busy.pop(tenant, None)

    def peek(self, tenant: str | None) -> DraftStore | None:
        """The trie of ``tenant`` if it is held now (None: not loaded); takes no slot and loads nothing."""
        if tenant is None:
            return self.generator.trie
        with self._lock:
            return self._tries.get(tenant)

    @contextmanager
    def reading(self, tenant: str | None) -> Iterator[DraftStore | None]:
        """A trie of ``tenant`` to read (list its documents): the held one, else its file opened for the block
        (no slot taken), else None (nothing saved for it)."""
        held = self.peek(tenant)
        if held is not None or tenant is None:
            yield held
            return
        own = self._own_lock(tenant)
        with own:
            held = self.peek(tenant)
            if held is not None:
                yield held
                return
            store = self.store(tenant)
            trie = store.load() if store is not None else None
            try:
                yield trie
            finally:
                if trie is not None:
                    trie.close()

    def budget(self, tenant: str | None) -> DraftBudget:
        """The draft budget of ``tenant``'s requests (None: the generator's): its own acceptance statistics over
        the generator's cost model."""
        shared = self.generator.budget
        if tenant is None:
            return shared
        with self._lock:
            budget = self._budgets.get(tenant)
            if budget is None:
                budget = self._budgets[tenant] = DraftBudget(shared.cost_model, shared.max_nodes, shared.adaptive)
            return budget

    # ------------------------------------------------------------------ loading and unloading

    def _own_lock(self, tenant: str) -> threading.Lock:
        with self._lock:
            return self._locks.setdefault(tenant, threading.Lock())

    def _make_room(self, tenant: str) -> None:
        """Unload least recently used idle tenants until ``tenant`` fits (403 when none can go)."""
        tried: set[str] = set()
        while True:
            with self._lock:
                if len(self._tries) < self.max_tenants:
                    return
                idle = [t for t in self._tries if not self._busy.get(t) and t not in tried]
            if self.on_unload is None or not idle:
                why = ("set --trie so idle tenants can be unloaded to their files" if self.on_unload is None
                       else "every held tenant has a request in flight")
                raise ApiError(403, f"this server holds tries for at most {self.max_tenants} tenants and tenant "
                                    f"{tenant!r} would be one more ({why}, or raise --max-tenants)",
                               code="too_many_tenants")
            victim = idle[0]
            tried.add(victim)
            self._unload(victim)

    def _unload(self, tenant: str) -> bool:
        """Unload ``tenant`` when it is idle and ``on_unload`` kept its content."""
        with self._own_lock(tenant):
            with self._lock:
                trie = self._tries.get(tenant)
                if trie is None or self._busy.get(tenant):
                    return False
                del self._tries[tenant]  # a request for it now waits on its lock, then loads it again
            kept = self.on_unload is not None and self.on_unload(tenant, trie)
            if not kept:
                with self._lock:
                    self._tries[tenant] = trie
                    self._tries.move_to_end(tenant, last=False)
                return False
            log.info("tenant %r unloaded to make room (least recently used)", tenant)
            return True

    def _load(self, tenant: str) -> DraftStore:
        store = self.store(tenant)
        try:
            trie = store.load() if store is not None else None
        except TrieFileError as error:  # another tokenizer's or config's file: left in place, never read
            raise ApiError(500, f"tenant {tenant!r}: {error}", code="trie_file_refused") from None
        if trie is None:
            return self.generator.empty_trie()
        if self.on_load is not None:
            self.on_load(trie)
        return trie

    def store(self, tenant: str) -> TrieStore | None:
        """Where ``tenant``'s trie is saved (None without a global trie path)."""
        if self.trie_path is None:
            return None
        with self._lock:
            if tenant not in self._stores:
                # the global path's lock (held by the server) guards the tenants' files next to it
                self._stores[tenant] = TrieStore(tenant_trie_path(self.trie_path, tenant),
                                                 *engine_identity(self.generator), lock=False)
            return self._stores[tenant]

    def tenants(self) -> list[str]:
        """The tenants whose tries are held now."""
        with self._lock:
            return sorted(self._tries)
