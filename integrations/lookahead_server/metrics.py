"""Prometheus metrics of the server (``/metrics``), on a registry of its own (several apps can live in one process).

Counters and histograms are updated by the endpoints; live values (queue depth, active batch, trie size, scheduler
counters, throughput) are read from the scheduler and the trie at scrape time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
_TPS_BUCKETS = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0)


class ServerMetrics:
    """All metrics of one app. ``live`` returns ``(generator, scheduler)`` (the scheduler may still be None)."""

    def __init__(self, live: Callable[[], tuple[Any, Any]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http_requests = Counter("lookahead_http_requests", "HTTP requests by endpoint and status code",
                                     ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("lookahead_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.completion_tokens = Counter("lookahead_completion_tokens", "generated tokens of finished requests",
                                         registry=r)
        self.request_steps = Counter("lookahead_request_steps",
                                     "forward passes of finished requests (prefill included)", registry=r)
        self.finished = Counter("lookahead_completions", "finished generations by finish reason",
                                ["finish_reason"], registry=r)
        self.latency = Histogram("lookahead_request_duration_seconds",
                                 "time from admission of the HTTP request to its last token", ["endpoint"],
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.tokens_per_step = Histogram("lookahead_request_tokens_per_step",
                                         "generated tokens per forward pass, per finished request",
                                         buckets=_TPS_BUCKETS, registry=r)
        self.documents = Counter("lookahead_documents_inserted", "documents inserted into the global trie "
                                 "through /v1/documents", registry=r)
        self.document_tokens = Counter("lookahead_document_tokens_inserted", "tokens of those documents", registry=r)
        self.trie_saves = Counter("lookahead_trie_saves", "trie snapshots written to --trie", ["result"], registry=r)
        self._lock = threading.Lock()
        self.total_completion_tokens = 0
        self.total_steps = 0
        r.register(_LiveCollector(live, self))

    def observe_finished(self, endpoint: str, prompt_tokens: int, stats: Any, finish_reason: str,
                         seconds: float) -> None:
        with self._lock:
            self.total_completion_tokens += stats.new_tokens
            self.total_steps += stats.steps
        self.prompt_tokens.inc(prompt_tokens)
        self.completion_tokens.inc(stats.new_tokens)
        self.request_steps.inc(stats.steps)
        self.finished.labels(finish_reason).inc()
        self.latency.labels(endpoint).observe(seconds)
        if stats.steps:
            self.tokens_per_step.observe(stats.new_tokens / stats.steps)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _LiveCollector(Collector):
    def __init__(self, live: Callable[[], tuple[Any, Any]], metrics: ServerMetrics) -> None:
        self.live = live
        self.metrics = metrics
        self.started = time.time()

    def describe(self) -> list[Metric]:
        return []  # collected on every scrape (auto-describe would call collect() at registration)

    def collect(self) -> Iterator[Metric]:
        generator, scheduler = self.live()
        yield GaugeMetricFamily("lookahead_uptime_seconds", "seconds since the server started",
                                value=time.time() - self.started)
        if generator is not None:
            yield GaugeMetricFamily("lookahead_trie_nodes", "nodes in the shared trie", value=len(generator.trie))
        tokens, steps = self.metrics.total_completion_tokens, self.metrics.total_steps
        yield GaugeMetricFamily("lookahead_tokens_per_step", "generated tokens per forward pass over all finished "
                                "requests (prefill included)", value=tokens / steps if steps else 0.0)
        if scheduler is None:
            return
        stats = scheduler.stats
        yield GaugeMetricFamily("lookahead_queue_depth", "requests waiting for a batch slot", value=scheduler.queued)
        yield GaugeMetricFamily("lookahead_active_batch", "requests being decoded now", value=scheduler.active)
        yield GaugeMetricFamily("lookahead_max_batch_size", "most requests decoded together",
                                value=scheduler.max_batch_size)
        yield GaugeMetricFamily("lookahead_max_queue", "most requests waiting", value=scheduler.max_queue)
        outcomes = CounterMetricFamily("lookahead_scheduler_requests", "requests seen by the scheduler by outcome",
                                       labels=["outcome"])
        for outcome in ("submitted", "finished", "cancelled", "rejected", "failed"):
            outcomes.add_metric([outcome], getattr(stats, f"requests_{outcome}"))
        yield outcomes
        yield CounterMetricFamily("lookahead_out_of_memory_evictions", "requests evicted (HTTP 503) because a "
                                  "batched step ran out of device memory", value=stats.requests_out_of_memory)
        yield GaugeMetricFamily("lookahead_kv_cache_reserved_bytes", "KV-cache bytes reserved by the requests "
                                "being decoded", value=stats.kv_bytes_reserved)
        if scheduler.max_kv_bytes is not None:
            yield GaugeMetricFamily("lookahead_kv_cache_limit_bytes", "most KV-cache bytes the running requests "
                                    "may reserve together (--max-kv-gib)", value=scheduler.max_kv_bytes)
        yield CounterMetricFamily("lookahead_generated_tokens", "tokens generated by the scheduler",
                                  value=stats.tokens_generated)
        yield CounterMetricFamily("lookahead_decoding_steps", "batched decoding passes (prefills excluded)",
                                  value=stats.decoding_steps)
        yield CounterMetricFamily("lookahead_busy_seconds", "seconds the decoding worker was busy",
                                  value=stats.busy_seconds)
        busy = stats.busy_seconds
        yield GaugeMetricFamily("lookahead_tokens_per_second", "generated tokens per second of decoding work "
                                "(all requests of a batch together)",
                                value=stats.tokens_generated / busy if busy else 0.0)


class TenantMetrics:
    """One tenant's own figures, all that ``/metrics`` shows a request of that tenant: its finished generations,
    tokens and documents (the server-wide figures, other tenants' included, need the server's key)."""

    def __init__(self, tenant: str) -> None:
        self.tenant = tenant
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.finished = Counter("lookahead_tenant_completions", "this tenant's finished generations by finish reason",
                                ["tenant", "finish_reason"], registry=r)
        self.prompt_tokens = Counter("lookahead_tenant_prompt_tokens", "prompt tokens of this tenant's finished "
                                     "requests", ["tenant"], registry=r)
        self.completion_tokens = Counter("lookahead_tenant_completion_tokens", "tokens generated for this tenant",
                                         ["tenant"], registry=r)
        self.documents = Counter("lookahead_tenant_documents_inserted", "documents this tenant inserted through "
                                 "/v1/documents", ["tenant"], registry=r)
        self.document_tokens = Counter("lookahead_tenant_document_tokens_inserted", "tokens of those documents",
                                       ["tenant"], registry=r)

    def observe_finished(self, prompt_tokens: int, stats: Any, finish_reason: str) -> None:
        self.finished.labels(self.tenant, finish_reason).inc()
        self.prompt_tokens.labels(self.tenant).inc(prompt_tokens)
        self.completion_tokens.labels(self.tenant).inc(stats.new_tokens)

    def observe_documents(self, count: int, tokens: int) -> None:
        self.documents.labels(self.tenant).inc(count)
        self.document_tokens.labels(self.tenant).inc(tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
