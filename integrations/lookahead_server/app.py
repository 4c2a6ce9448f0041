"""The FastAPI app: OpenAI-compatible completions and chat completions over a :class:`Scheduler`.

Decisions that differ from OpenAI's API (also in docs/serving.md):

- ``temperature`` absent (or 0) means greedy decoding, not OpenAI's default of 1: greedy answers are lossless copies
  of plain greedy decoding and are what trie drafts speed up most. ``temperature > 0`` samples (lossless sampling)
  with exactly ``temperature`` and ``top_p`` (default 1; no top-k) and ``seed`` when given.
- ``max_tokens`` absent means ``min(--default-max-tokens, room left in the model's context)``; a request whose
  prompt plus ``max_tokens`` exceeds the context is refused (400) before it costs any compute.
- Fields this server cannot honour (``n``, ``logprobs``, penalties ...) are accepted only with their neutral value.
- ``documents: [str, ...]`` is an extra body field: texts that seed this request's local trie.
- Tenants (``tenant_header`` or ``tenant_keys``): each tenant drafts from a trie of its own (``tenants.py``).
- Each streamed chunk carries a ``lookahead`` object: ``tokens`` (new tokens), ``accepted`` (draft tokens accepted
  in the step that made it) and ``accepted_runs`` (``[{"start", "end", "source"}]``, character offsets into the
  chunk's text of the drafted part, ``source`` null until the engine reports where drafts came from).
- ``GET /`` serves a small page (``static/index.html``): paste documents, ask, watch the answer stream.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from lookahead.engine import GenerationStats, LookaheadGenerator, StreamChunk
from lookahead.inputs import RequestOptions, RequestTooLargeError
from lookahead.pacing import StreamChunking, apace
from lookahead.sampling import SamplingParams
from lookahead.scheduler import OutOfMemoryRequestError, QueueFullError, RequestHandle, Scheduler, SchedulerClosedError
from lookahead.store import DraftStore

from .documents import check_document_id, delete_document, document_ids, insert_documents, source_of
from .errors import ApiError, describe_validation_error, parse_json, validate_body
from .metrics import ServerMetrics, TenantMetrics
from .persistence import TrieStore, engine_identity
from .schemas import ChatCompletionRequest, CompletionRequest, DocumentsRequest, as_documents_body
from .tenants import Access, TenantTries

log = logging.getLogger("lookahead_server")

SchedulerFactory = Callable[[LookaheadGenerator, "ServeSettings"], Scheduler]
GenerationBody = CompletionRequest | ChatCompletionRequest  # the bodies that ask for a generation
_FINISH = {"eos": "stop", "stop": "stop", "length": "length"}  # engine reason -> OpenAI finish_reason
_END = object()
_CONTEXT_FALLBACK = 4096  # max_tokens limit when the model does not say how long its context is


@dataclass
class ServeSettings:
    """Server options (the ``lookahead serve`` flags).

    Attributes:
        model_name: the id reported by /v1/models and in responses; requests may name it or any of
            ``model_aliases`` (or leave ``model`` out).
        api_key: when set, every endpoint but /health needs ``Authorization: Bearer <api_key>``.
        max_batch_size: most requests decoded together.
        max_queue: most requests waiting for a batch slot; past it requests get 429.
        max_kv_bytes: most KV-cache bytes the running requests may reserve together (None: 90% of the free
            device memory at start on CUDA, no limit on CPU); a request that needs more alone gets 400.
        default_max_tokens: ``max_tokens`` of requests that do not give one (capped by the context left).
        max_tokens_limit: largest ``max_tokens`` accepted (None: the model's context length).
        max_body_bytes: largest request body (413 past it).
        max_request_tokens: most tokens of a generation request's prompt, prediction and documents together
            (``--max-request-tokens``, default 32768); past it a 413 names the limit and what was counted, and a
            long document is refused from a prefix, before all of it is tokenized.
        trie_path: load the trie from here at start, save it here periodically and at shutdown.
        trie_save_interval: seconds between saves (only when something changed); 0 saves at shutdown only.
        disconnect_poll: seconds between checks that a waiting client is still connected (a client that goes
            away is cancelled, streamed or not).
        tenant_header: a header naming the request's tenant (``lookahead serve --tenant-header NAME``); trust it
            only behind a gateway that sets it.
        tenant_keys: API key -> tenant (``--tenant-keys FILE``, read with :func:`tenants.read_tenant_keys`); each
            listed key is accepted and decides the tenant. Not together with ``tenant_header``.
        max_tenants: most tenants whose tries are held (``--max-tenants``); with ``trie_path`` the least recently used
            idle one is saved and unloaded to make room, without it a new tenant past the limit gets 403.
        stream_chunk: how streamed answers are cut (:class:`~lookahead.pacing.StreamChunking`): ``"run"`` (one
            chunk per accepted run, the fastest), ``"token"`` or ``"fixed:N"`` (N tokens per chunk at a steady
            cadence: chunk sizes and times no longer tell how much was drafted). None (default): ``"token"`` when
            requests have tenants, else ``"run"``.
    """

    model_name: str = "default"
    model_aliases: tuple[str, ...] = ()
    api_key: str | None = None
    max_batch_size: int = 8
    max_queue: int = 64
    max_kv_bytes: int | None = None
    default_max_tokens: int = 256
    max_tokens_limit: int | None = None
    max_body_bytes: int = 16 * 2**20
    max_request_tokens: int = 32768
    trie_path: str | None = None
    trie_save_interval: float = 300.0
    disconnect_poll: float = 0.1
    tenant_header: str | None = None
    tenant_keys: dict[str, str] | None = None
    max_tenants: int = 64
    stream_chunk: str | None = None

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue", "default_max_tokens", "max_body_bytes", "max_tenants",
                     "max_request_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.max_tokens_limit is not None and (not isinstance(self.max_tokens_limit, int)
                                                  or self.max_tokens_limit < 1):
            raise ValueError(f"max_tokens_limit must be an integer >= 1 or None, got {self.max_tokens_limit!r}")
        if self.max_kv_bytes is not None and (not isinstance(self.max_kv_bytes, int) or self.max_kv_bytes < 1):
            raise ValueError(f"max_kv_bytes must be an integer >= 1 or None, got {self.max_kv_bytes!r}")
        if self.trie_save_interval < 0 or self.disconnect_poll <= 0:
            raise ValueError("trie_save_interval must be >= 0 and disconnect_poll > 0")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key must not be empty")
        self.access()  # checks the tenant options
        self.chunking()  # checks stream_chunk

    def chunking(self) -> StreamChunking:
        """How streamed answers are cut; with tenants and no choice made, paced tokens (drafting hidden)."""
        if self.stream_chunk is None:
            return StreamChunking.parse("token" if self.tenant_header or self.tenant_keys else "run")
        return StreamChunking.parse(self.stream_chunk)

    def access(self) -> Access:
        """Who may call, and the tenant of each request."""
        return Access(self.api_key, self.tenant_header, self.tenant_keys)


def default_scheduler(generator: LookaheadGenerator, settings: ServeSettings) -> Scheduler:
    return Scheduler(generator, max_batch_size=settings.max_batch_size, max_queue=settings.max_queue,
                     max_kv_bytes=settings.max_kv_bytes)


class _ClientGone(Exception):
    """The HTTP client disconnected; its request was cancelled."""


class _Service:
    """Everything one app holds: the generator, the scheduler (from start-up on), metrics, the tenants' tries and
    their persistence."""

    def __init__(self, generator: LookaheadGenerator, settings: ServeSettings, factory: SchedulerFactory,
                 on_new_tenant: Callable[[str, DraftStore], DraftStore] | None = None,
                 on_unload_tenant: Callable[[str, DraftStore], bool] | None = None) -> None:
        self.generator = generator
        self.settings = settings
        self.factory = factory
        self.scheduler: Scheduler | None = None
        self.pool: ThreadPoolExecutor | None = None
        self.store = TrieStore(settings.trie_path, *engine_identity(generator)) if settings.trie_path else None
        self.access = settings.access()
        self.tenants = TenantTries(generator, settings.trie_path, settings.max_tenants, on_load=self._warn_config,
                                   on_new=on_new_tenant,
                                   on_unload=self._keep if settings.trie_path else on_unload_tenant)
        self.metrics = ServerMetrics(lambda: (self.generator, self.scheduler))
        self.handles: dict[RequestHandle, str | None] = {}  # running requests and their tenants
        self._tenant_metrics: dict[str, TenantMetrics] = {}
        self.created = int(time.time())
        self.documents_inserted = 0
        self._save_lock = threading.Lock()  # one save at a time
        self._changes_lock = threading.Lock()  # never held during a save: touching never waits for the disk
        self._changes: dict[str | None, int] = {}  # tenant (None: default) -> changes to its trie so far
        self._saved: dict[str | None, int] = {}  # tenant -> changes saved

    # ------------------------------------------------------------------ life cycle

    def start(self) -> None:
        if self.store is not None:
            trie = self.store.load()
            if trie is not None:
                self._warn_config(trie)
                self.generator.trie = trie  # before the scheduler exists: no batch holds the old trie
        self.scheduler = self.factory(self.generator, self.settings)
        waiting = self.scheduler.max_queue + self.scheduler.max_batch_size + 8
        # One thread per request waiting for its next chunk: the default executor (cores + 4) would let waits on
        # queued requests delay the chunks of running ones.
        self.pool = ThreadPoolExecutor(max_workers=waiting, thread_name_prefix="lookahead-wait")

    def _warn_config(self, trie: DraftStore) -> None:
        config = self.generator.config
        for name in ("branch_length", "max_query_length", "store_bytes"):
            if getattr(trie, name) != getattr(config, name):
                log.warning("the loaded trie has %s=%s, the engine is configured with %s; the file's value is kept",
                            name, getattr(trie, name), getattr(config, name))

    def stop(self) -> None:
        for handle in list(self.handles):
            handle.cancel()
        if self.scheduler is not None:
            self.scheduler.close()
        if self.store is not None:
            self.save(force=True)
            self.store.close()  # another process may write the path from now on
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)

    def touch(self, tenant: str | None) -> None:
        """Note a change to ``tenant``'s trie (a learned answer, documents added or deleted): the next save writes
        it."""
        with self._changes_lock:
            self._changes[tenant] = self._changes.get(tenant, 0) + 1

    def save(self, force: bool = False) -> bool:
        """Save every trie that changed since its last save (all of them with ``force``): the default one and each
        tenant's, each to its own file. False when nothing was written."""
        assert self.store is not None
        wrote = False
        with self._save_lock:
            with self._changes_lock:
                counts = dict(self._changes)
            for tenant in [None, *self.tenants.tenants()]:
                changes = counts.get(tenant, 0)
                if not force and changes == self._saved.get(tenant, 0):
                    continue
                store = self.store if tenant is None else self.tenants.store(tenant)
                trie = self.tenants.peek(tenant)  # None: unloaded meanwhile (saved then)
                if store is not None and trie is not None and self._save_one(store, trie):
                    self._saved[tenant] = changes
                    wrote = True
        return wrote

    def save_now(self, tenant: str | None) -> None:
        """Save ``tenant``'s trie now (after a deletion: the file must not hold the document any longer); a no-op
        without ``--trie`` or when the tenant is not held. Raises 500 when the file cannot be written."""
        store = self.store if tenant is None else self.tenants.store(tenant)
        trie = self.tenants.peek(tenant)
        if store is not None and trie is not None and not self._save_tracked(tenant, store, trie):
            raise ApiError(500, f"the document was removed from memory but {str(store.path)!r} could not be "
                                f"rewritten (see the server log): the file still holds it until the next save")

    def _keep(self, tenant: str, trie: DraftStore) -> bool:
        """Save a tenant's trie before it is unloaded (to make room for another); False when it could not be."""
        store = self.tenants.store(tenant)
        if store is None or not self._save_tracked(tenant, store, trie):
            return False
        trie.close()
        return True

    def _save_tracked(self, tenant: str | None, store: TrieStore, trie: DraftStore) -> bool:
        """Save one trie now (one save at a time) and count the changes it holds as saved; False when the write
        failed."""
        with self._save_lock:
            with self._changes_lock:
                changes = self._changes.get(tenant, 0)
            if not self._save_one(store, trie):
                return False
            self._saved[tenant] = changes
            return True

    def _save_one(self, store: TrieStore, trie: DraftStore) -> bool:
        try:
            store.save(trie)
        except OSError as error:
            self.metrics.trie_saves.labels("error").inc()
            log.error("could not save the trie to %s: %s", store.path, error)
            return False
        self.metrics.trie_saves.labels("ok").inc()
        return True

    async def autosave(self) -> None:
        interval = self.settings.trie_save_interval
        while True:
            await asyncio.sleep(interval)
            await asyncio.to_thread(self.save)

    # ------------------------------------------------------------------ requests

    def check_model(self, name: str | None) -> None:
        allowed = (self.settings.model_name, *self.settings.model_aliases)
        if name is not None and name not in allowed:
            raise ApiError(404, f"model {name!r} is not served here; available: {self.settings.model_name!r} "
                                f"(or leave 'model' out)", param="model", code="model_not_found")

    async def read_body(self, request: Request) -> Any:
        limit = self.settings.max_body_bytes
        too_big = ApiError(413, f"the request body is larger than {limit} bytes (the server's --max-body-mb)")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise too_big
        parts: list[bytes] = []
        size = 0
        try:
            async for part in request.stream():
                size += len(part)
                if size > limit:
                    raise too_big
                parts.append(part)
        except ClientDisconnect:
            raise _ClientGone() from None
        return parse_json(b"".join(parts))

    def _max_tokens(self, requested: int | None, prompt_tokens: int, param: str) -> int:
        context = self.generator.max_context
        limit = self.settings.max_tokens_limit or context or _CONTEXT_FALLBACK
        if requested is not None and requested > limit:
            raise ApiError(400, f"{param} must be at most {limit}, got {requested}", param=param)
        if context is not None:
            room = context - prompt_tokens
            if requested is None and room < 1 or requested is not None and requested > room:
                asked = f"{requested} for the completion" if requested is not None else "at least 1 new token"
                raise ApiError(400, f"this model's maximum context length is {context} tokens; the request has "
                                    f"{prompt_tokens} prompt tokens and asks {asked} ({prompt_tokens} + "
                                    f"{requested or 1} > {context}). Shorten the prompt or lower {param}.",
                               param=param, code="context_length_exceeded")
        else:
            room = limit
        return requested if requested is not None else min(self.settings.default_max_tokens, room, limit)

    @staticmethod
    def sampling(body: GenerationBody) -> SamplingParams:
        """Absent or zero temperature: greedy (a documented deviation from OpenAI's default of 1)."""
        if not body.temperature:
            return SamplingParams()
        top_p = 1.0 if body.top_p is None else body.top_p
        return SamplingParams(do_sample=True, temperature=body.temperature, top_p=top_p, top_k=0, seed=body.seed)

    def _submit_sync(self, prompt: Any, body: GenerationBody, requested: int | None, param: str,
                     tenant: str | None) -> tuple[RequestHandle, int]:
        if self.scheduler is None:
            raise ApiError(503, "the server is starting or shutting down; retry shortly")
        trie = self.tenants.hold(tenant)  # before any work: a tenant that cannot be held is refused
        try:
            handle, prompt_tokens = self._submit_held(prompt, body, requested, param, tenant, trie)
        except BaseException:
            self.tenants.release(tenant)
            raise
        self.handles[handle] = tenant
        return handle, prompt_tokens

    def _submit_held(self, prompt: Any, body: GenerationBody, requested: int | None, param: str,
                     tenant: str | None, trie: DraftStore) -> tuple[RequestHandle, int]:
        try:
            prompt_ids = self.generator.encode(prompt)
        except (ValueError, TypeError) as error:
            raise ApiError(400, str(error), param="messages" if isinstance(prompt, list) else "prompt") from None
        max_tokens = self._max_tokens(requested, len(prompt_ids), param)
        try:
            options = RequestOptions(max_new_tokens=max_tokens, stop=body.stop_list() or (),
                                     documents=body.documents or (), sampling=self.sampling(body),
                                     trie=trie if tenant is not None else None, prediction=body.prediction_text,
                                     budget=self.tenants.budget(tenant) if tenant is not None else None,
                                     derived_from=[source_of(i) for i in body.document_ids or () if i],
                                     document_names=body.document_ids,
                                     max_request_tokens=self.settings.max_request_tokens)
            handle = self.scheduler.submit(prompt_ids, options)
        except RequestTooLargeError as error:
            raise ApiError(413, f"{error} (the server's --max-request-tokens)", code="request_too_large") from None
        except QueueFullError as error:
            raise ApiError(429, str(error), code="queue_full", headers={"Retry-After": "1"}) from None
        except SchedulerClosedError as error:
            raise ApiError(503, f"{error}; retry shortly") from None
        except (ValueError, TypeError) as error:
            raise ApiError(400, str(error)) from None
        return handle, len(prompt_ids)

    async def submit(self, prompt: Any, body: GenerationBody, requested: int | None, param: str,
                     tenant: str | None) -> tuple[RequestHandle, int]:
        # in a thread: tokenizing the prompt and the documents can take a while; the event loop keeps serving
        return await asyncio.to_thread(self._submit_sync, prompt, body, requested, param, tenant)

    async def chunks(self, handle: RequestHandle, request: Request) -> AsyncIterator[StreamChunk]:
        """The handle's chunks; cancels it and raises _ClientGone when the client disconnects.

        The connection is checked every ``disconnect_poll`` seconds however fast chunks come: a non-streamed answer
        writes nothing until the end, so only this check notices a client that went away.
        """
        loop = asyncio.get_running_loop()
        it: Iterator[StreamChunk] = iter(handle)
        poll = self.settings.disconnect_poll
        next_check = loop.time() + poll
        while True:
            future = loop.run_in_executor(self.pool, next, it, _END)
            while True:
                done, _ = await asyncio.wait({future}, timeout=max(0.0, next_check - loop.time()))
                if loop.time() >= next_check:
                    next_check = loop.time() + poll
                    if await request.is_disconnected():
                        handle.cancel()
                        raise _ClientGone()
                if done:
                    break
            item = future.result()
            if item is _END:
                return
            yield item

    def tenant_metrics(self, tenant: str) -> TenantMetrics:
        """``tenant``'s own figures (what its requests see at /metrics)."""
        with self._changes_lock:
            found = self._tenant_metrics.get(tenant)
            if found is None:
                found = self._tenant_metrics[tenant] = TenantMetrics(tenant)
            return found

    def release(self, handle: RequestHandle) -> None:
        handle.cancel()  # a no-op for a finished request; frees the slot of an abandoned one
        if handle in self.handles:
            self.tenants.release(self.handles.pop(handle))

    def finished(self, endpoint: str, handle: RequestHandle, chunks: list[StreamChunk], started: float,
                 tenant: str | None) -> tuple[str, GenerationStats]:
        last = chunks[-1] if chunks else None
        if last is None or last.finish_reason is None or last.stats is None:
            raise RuntimeError("the generation ended without a finish reason")
        self.metrics.observe_finished(endpoint, handle.prompt_tokens, last.stats, last.finish_reason,
                                      time.perf_counter() - started)
        if tenant is not None:
            self.tenant_metrics(tenant).observe_finished(handle.prompt_tokens, last.stats, last.finish_reason)
        self.touch(tenant)  # its answer was learned
        return last.finish_reason, last.stats


def _usage(prompt_tokens: int, stats: GenerationStats) -> dict[str, Any]:
    """OpenAI's usage object; ``completion_tokens_details`` counts the prediction's draft tokens accepted and those
    verified and not accepted (both 0 without a prediction)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": stats.new_tokens,
            "total_tokens": prompt_tokens + stats.new_tokens,
            "completion_tokens_details": {"accepted_prediction_tokens": stats.accepted_prediction_tokens,
                                          "rejected_prediction_tokens": stats.rejected_prediction_tokens}}


def _lookahead_info(stats: GenerationStats, reason: str) -> dict[str, Any]:
    """Engine facts added to each response (clients ignore unknown fields); ``provenance`` lists, per document of the
    request, the accepted draft tokens copied from it and their spans (output token offsets, ``[start, end)``)."""
    return {"finish_reason": reason, "steps": stats.steps, "tokens_per_step": round(stats.tokens_per_step, 4),
            "draft_tokens": sum(stats.draft_sizes), "accepted_draft_tokens": sum(stats.accepted_lengths),
            "accepted_prediction_tokens": stats.accepted_prediction_tokens,
            "rejected_prediction_tokens": stats.rejected_prediction_tokens,
            "provenance": [use.to_dict() for use in stats.provenance],
            "seconds": round(stats.time_total, 6)}


def _chunk_info(chunk: StreamChunk, tokenizer: Any) -> dict[str, Any]:
    """What one streamed chunk says about drafting: its new tokens, the draft tokens accepted in the step that made
    it, and the accepted run as character offsets into its text with its ``source``: the request's document it was
    copied from (its id, or ``doc:<index>``), None when no document holds it (the prompt, past answers)."""
    info: dict[str, Any] = {"tokens": len(chunk.token_ids), "accepted": chunk.accepted, "accepted_runs": []}
    end = _drafted_chars(chunk, tokenizer) if chunk.accepted > 0 else 0
    if end > 0:
        info["accepted_runs"] = [{"start": 0, "end": end, "source": chunk.source}]
    return info


def _drafted_chars(chunk: StreamChunk, tokenizer: Any) -> int:
    """How many characters of the chunk's text its accepted draft tokens make: the step's run is the accepted draft
    plus the model's own next token. The whole text when the two do not line up (text held back at a stop string)."""
    drafted = tokenizer.decode(chunk.token_ids[:chunk.accepted], skip_special_tokens=True)
    if len(chunk.token_ids) == chunk.accepted + 1 and chunk.text.startswith(drafted):
        return len(drafted)
    return len(chunk.text)


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _out_of_memory(error: OutOfMemoryRequestError) -> ApiError:
    """503 with Retry-After: the request was evicted to let the others finish; it may succeed when retried."""
    return ApiError(503, str(error), code="out_of_memory", headers={"Retry-After": "1"})


def _error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)



def _inline_hashes(page: str, tag: str) -> list[str]:
    """CSP source expressions (``'sha256-...'``) of every inline ``<tag>`` block of ``page``."""
    hashes = []
    for block in re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.S):
        digest = base64.b64encode(hashlib.sha256(block.encode("utf-8")).digest()).decode("ascii")
        hashes.append(f"'sha256-{digest}'")
    return hashes


def page_security_headers(page: str) -> dict[str, str]:
    """Headers that keep the page's own script and style the only ones it runs (a Content-Security-Policy naming
    their hashes), its requests to this server, and the page out of other sites' frames."""
    policy = "; ".join([
        "default-src 'none'", f"script-src {' '.join(_inline_hashes(page, 'script'))}",
        f"style-src {' '.join(_inline_hashes(page, 'style'))}", "connect-src 'self'", "img-src 'self' data:",
        "base-uri 'none'", "form-action 'none'", "frame-ancestors 'none'"])
    return {"Content-Security-Policy": policy, "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
            "Referrer-Policy": "no-referrer"}

def create_app(generator: LookaheadGenerator, settings: ServeSettings | None = None,
               scheduler_factory: SchedulerFactory | None = None,
               on_new_tenant: Callable[[str, DraftStore], DraftStore] | None = None,
               on_deleted: Callable[[str | None], bool] | None = None,
               on_unload_tenant: Callable[[str, DraftStore], bool] | None = None) -> FastAPI:
    """The OpenAI-compatible app over ``generator``.

    The scheduler is made by ``scheduler_factory(generator, settings)`` at start-up (after the trie is loaded from
    ``settings.trie_path``) and closed at shutdown, when the trie is saved; run the app with uvicorn or use it as
    ``with TestClient(app)`` so its lifespan runs. ``on_new_tenant(tenant, trie)`` is called when a tenant's trie is
    first made or loaded and returns the trie to use (see :class:`~lookahead_server.tenants.TenantTries`).
    ``on_deleted(tenant)`` is called after a document was deleted and saved here, before the DELETE answers (a
    replica of ``lookahead serve --ray`` pushes the removal to the hub, which saves it); False says the removal
    could not be made durable there (the answer says ``"durable": false``). ``on_unload_tenant(tenant, trie)``
    keeps an idle tenant's trie elsewhere so that it may be unloaded past ``max_tenants`` (True when kept; without
    ``trie_path`` only: with it, the trie is saved to its file).
    """
    settings = settings or ServeSettings()
    service = _Service(generator, settings, scheduler_factory or default_scheduler, on_new_tenant, on_unload_tenant)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(service.start)
        saver = None
        if service.store is not None and settings.trie_save_interval > 0:
            saver = asyncio.create_task(service.autosave())
        try:
            yield
        finally:
            if saver is not None:
                saver.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await saver
            await asyncio.to_thread(service.stop)

    app = FastAPI(title="lookahead", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    async def _api_error(_: Request, error: Exception) -> Response:
        assert isinstance(error, ApiError)
        return _error_response(error)

    async def _validation_error(_: Request, error: Exception) -> Response:
        assert isinstance(error, RequestValidationError)
        return _error_response(describe_validation_error(DocumentsRequest, list(error.errors())))

    async def _http_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, StarletteHTTPException)
        if error.status_code == 404:
            message = (f"no endpoint {request.url.path}; endpoints: /v1/completions, /v1/chat/completions, "
                       f"/v1/models, /v1/documents, /v1/documents/{{id}}, /health, /metrics, / (the page)")
        elif error.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(error.detail)
        return _error_response(ApiError(error.status_code, message, headers=getattr(error, "headers", None)))

    async def _unexpected(_: Request, error: Exception) -> Response:
        log.exception("unexpected error", exc_info=error)
        return _error_response(ApiError(500, f"internal server error: {type(error).__name__}: {error}"))

    async def _client_gone(_: Request, error: Exception) -> Response:
        return Response(status_code=499)  # nobody reads it

    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(_ClientGone, _client_gone)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    app.add_middleware(_CountRequests, metrics=service.metrics)

    async def authorize(request: Request) -> None:
        request.state.tenant = service.access.tenant(request.headers)

    def tenant(request: Request) -> str | None:
        return request.state.tenant  # type: ignore[no-any-return]

    api = APIRouter(dependencies=[Depends(authorize)])
    page = resources.files(__package__).joinpath("static/index.html").read_text(encoding="utf-8")
    page_headers = {"Cache-Control": "no-cache", **page_security_headers(page)}
    chunking = settings.chunking()

    @app.get("/")
    async def index() -> Response:
        return HTMLResponse(page, headers=page_headers)

    @app.get("/health")
    async def health(request: Request) -> Response:
        """Up or starting, for anyone; the queue and the default trie's size only with the server's key (or on a
        server open to all)."""
        scheduler = service.scheduler
        if scheduler is None:
            return JSONResponse({"status": "starting"}, status_code=503)
        if not service.access.sees_internals(request.headers):
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "ok", "model": settings.model_name, "queued": scheduler.queued,
                             "active": scheduler.active, "trie_nodes": len(service.generator.trie)})

    @api.get("/metrics")
    async def metrics(request: Request) -> Response:
        """Server-wide figures; a tenant's request sees its own tenant's only."""
        from prometheus_client import CONTENT_TYPE_LATEST

        who = tenant(request)
        text = service.metrics.render() if who is None else service.tenant_metrics(who).render()
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    @api.get("/v1/models")
    async def models() -> Response:
        card = {"id": settings.model_name, "object": "model", "created": service.created, "owned_by": "lookahead"}
        return JSONResponse({"object": "list", "data": [card]})

    @api.post("/v1/documents")
    async def documents(request: Request) -> Response:
        body = validate_body(DocumentsRequest, as_documents_body(await service.read_body(request)))
        who = tenant(request)

        def insert() -> tuple[int, int]:
            with service.tenants.using(who) as trie:  # a tenant's first use may read its file
                return insert_documents(trie, service.generator.tokenizer, body.documents, body.ids), len(trie)

        tokens, size = await asyncio.to_thread(insert)
        service.touch(who)
        service.documents_inserted += len(body.documents)
        service.metrics.documents.inc(len(body.documents))
        service.metrics.document_tokens.inc(tokens)
        if who is not None:
            service.tenant_metrics(who).observe_documents(len(body.documents), tokens)
        answer: dict[str, Any] = {"object": "documents.insert", "documents": len(body.documents), "tokens": tokens,
                                  "trie_nodes": size}
        if body.ids is not None:
            answer["ids"] = body.ids
        return JSONResponse(answer)

    @api.get("/v1/documents")
    async def list_documents(request: Request) -> Response:
        who = tenant(request)

        def listed() -> list[str]:
            with service.tenants.reading(who) as trie:  # takes no tenant slot: read from its file if not held
                return document_ids(trie) if trie is not None else []

        ids = await asyncio.to_thread(listed)
        return JSONResponse({"object": "list", "data": [{"id": i, "object": "document"} for i in ids]})

    @api.delete("/v1/documents/{doc_id}")
    async def delete(doc_id: str, request: Request) -> Response:
        try:
            check_document_id(doc_id)
        except ValueError as error:
            raise ApiError(400, str(error), param="id") from None
        who = tenant(request)

        def remove() -> tuple[int | None, int]:
            with service.tenants.using(who) as trie:
                return delete_document(trie, doc_id), len(trie)

        removed, size = await asyncio.to_thread(remove)
        durable = True
        if removed is not None:
            await asyncio.to_thread(service.save_now, who)  # durable before the answer: a crash cannot bring it back
        if on_deleted is not None:  # even for an id unknown here: another replica may hold answers learned with it
            durable = bool(await asyncio.to_thread(on_deleted, who))
        if removed is None:
            raise ApiError(404, f"no document with id {doc_id!r}: never sent to /v1/documents with that id, already "
                                f"deleted, or pruned from the trie (GET /v1/documents lists the ids held)",
                           param="id", code="document_not_found")
        service.touch(who)
        return JSONResponse({"id": doc_id, "object": "document.deleted", "deleted": True, "removed": removed,
                             "trie_nodes": size, "durable": durable})

    @api.post("/v1/completions")
    async def completions(request: Request) -> Response:
        started = time.perf_counter()
        body = validate_body(CompletionRequest, await service.read_body(request))
        service.check_model(body.model)
        handle, prompt_tokens = await service.submit(body.prompt_text(), body, body.max_tokens, "max_tokens",
                                                     tenant(request))
        return await _respond(request, handle, body, prompt_tokens, started, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        started = time.perf_counter()
        body = validate_body(ChatCompletionRequest, await service.read_body(request))
        service.check_model(body.model)
        param = "max_tokens" if body.max_tokens is not None else "max_completion_tokens"
        handle, prompt_tokens = await service.submit(body.template_messages(), body, body.requested_max_tokens,
                                                     param, tenant(request))
        return await _respond(request, handle, body, prompt_tokens, started, chat=True)

    async def _respond(request: Request, handle: RequestHandle, body: GenerationBody, prompt_tokens: int,
                       started: float, chat: bool) -> Response:
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{handle.id}"
        created = int(time.time())
        endpoint = "/v1/chat/completions" if chat else "/v1/completions"
        if body.stream:
            stream = _stream(request, handle, body, rid, created, prompt_tokens, started, chat, endpoint)
            return StreamingResponse(stream, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        chunks: list[StreamChunk] = []
        try:
            async for chunk in service.chunks(handle, request):
                chunks.append(chunk)
        except _ClientGone:
            return Response(status_code=499)
        except SchedulerClosedError as error:
            raise ApiError(503, f"{error}; retry shortly") from None
        except OutOfMemoryRequestError as error:
            raise _out_of_memory(error) from None
        except Exception as error:
            raise ApiError(500, f"generation failed: {type(error).__name__}: {error}") from error
        finally:
            service.release(handle)
        reason, stats = service.finished(endpoint, handle, chunks, started, tenant(request))
        text = "".join(c.text for c in chunks)
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": _FINISH[reason]}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return JSONResponse({
            "id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": settings.model_name, "choices": [choice], "usage": _usage(prompt_tokens, stats),
            "lookahead": _lookahead_info(stats, reason),
        })

    async def _stream(request: Request, handle: RequestHandle, body: GenerationBody, rid: str, created: int,
                      prompt_tokens: int, started: float, chat: bool, endpoint: str) -> AsyncIterator[str]:
        head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                "model": settings.model_name}

        def piece(text: str | None, finish: str | None = None, chunk: StreamChunk | None = None) -> dict[str, Any]:
            if chat:
                delta = {} if text is None else {"content": text}
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            if chunk is None:
                return {**head, "choices": [choice]}
            return {**head, "choices": [choice], "lookahead": _chunk_info(chunk, service.generator.tokenizer)}

        chunks: list[StreamChunk] = []
        try:
            if chat:
                first = piece("")
                first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
                yield _sse(first)
            paced = apace(service.chunks(handle, request), chunking, service.generator.tokenizer,
                          body.stop_list() or ())
            async for chunk in paced:
                chunks.append(chunk)
                if chunk.text:
                    yield _sse(piece(chunk.text, chunk=chunk))
            reason, stats = service.finished(endpoint, handle, chunks, started, tenant(request))
            yield _sse({**piece(None, _FINISH[reason]), "lookahead": _lookahead_info(stats, reason)})
            if body.include_usage:
                yield _sse({**head, "choices": [], "usage": _usage(prompt_tokens, stats)})
            yield "data: [DONE]\n\n"
        except _ClientGone:
            return
        except OutOfMemoryRequestError as error:  # the status line is sent: report in the stream
            log.warning("request %s evicted: %s", handle.id, error)
            yield _sse(_out_of_memory(error).body())
        except Exception as error:  # noqa: BLE001 - the status line is sent: report in the stream
            log.exception("streamed generation failed", exc_info=error)
            status = 503 if isinstance(error, SchedulerClosedError) else 500
            yield _sse(ApiError(status, f"generation failed: {type(error).__name__}: {error}").body())
        finally:
            service.release(handle)

    app.include_router(api)
    return app


class _CountRequests:
    """ASGI middleware counting HTTP requests by endpoint and status (unknown paths count as 'other')."""

    _PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/documents", "/health", "/metrics", "/")

    def __init__(self, app: Any, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        path = scope.get("path", "")
        endpoint = path if path in self._PATHS else "/v1/documents/{id}" if path.startswith("/v1/documents/") \
            else "other"
        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.http_requests.labels(endpoint, str(status)).inc()
