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
from collections.abc import Callable, Mapping
from pathlib import Path

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

    def _header_tenant(self, headers: Mapping[str, str]) -> str | None:
        """With the server's own key, the tenant header (when configured) still names the tenant."""
        if self.tenant_header is None:
            return None
        return Access(tenant_header=self.tenant_header).tenant(headers)


class TenantTries:
    """The default trie (the generator's) and one trie per tenant, made or loaded from its file on first use.

    Args:
        generator: owns the default trie and makes empty ones (its knobs).
        trie_path: the global trie file; tenant ``NAME``'s is :func:`tenant_trie_path` of it (None: memory only).
        max_tenants: most tenants held; a new one past it is refused (403).
        on_load: called with each trie read from a file (to warn about knobs that differ).
        on_new: called with a tenant and its trie when the trie is first made or loaded; the trie it returns is the
            tenant's (a replica of ``lookahead serve --ray`` starts the tenant's hub sync there).
    """

    def __init__(self, generator: LookaheadGenerator, trie_path: str | None = None, max_tenants: int = 64,
                 on_load: Callable[[DraftStore], None] | None = None,
                 on_new: Callable[[str, DraftStore], DraftStore] | None = None) -> None:
        self.generator = generator
        self.trie_path = trie_path
        self.max_tenants = max_tenants
        self.on_load = on_load
        self.on_new = on_new
        self._tries: dict[str, DraftStore] = {}
        self._stores: dict[str, TrieStore] = {}
        self._lock = threading.Lock()

    def get(self, tenant: str | None) -> DraftStore:
        """The trie ``tenant`` drafts from (None: the default trie)."""
        if tenant is None:
            return self.generator.trie
        with self._lock:
            trie = self._tries.get(tenant)
            if trie is None:
                if len(self._tries) >= self.max_tenants:
                    raise ApiError(403, f"this server holds tries for at most {self.max_tenants} tenants and "
                                        f"tenant {tenant!r} would be one more (raise max_tenants)",
                                   code="too_many_tenants")
                trie = self._load(tenant)
                if self.on_new is not None:
                    trie = self.on_new(tenant, trie)
                self._tries[tenant] = trie
            return trie

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
        if tenant not in self._stores:
            # the global path's lock (held by the server) guards the tenants' files next to it
            self._stores[tenant] = TrieStore(tenant_trie_path(self.trie_path, tenant),
                                             *engine_identity(self.generator), lock=False)
        return self._stores[tenant]

    def tenants(self) -> list[str]:
        """The tenants whose tries are held now."""
        with self._lock:
            return sorted(self._tries)
