"""Throughput of batched lookahead against the same requests one by one and HF ``generate`` on a padded batch.

All methods decode the same prompts greedily in one process. Reported per method: new tokens over all rows, wall
seconds, tokens per second, and how many rows equal lookahead-alone token for token; in half precision the other rows
are classified as near-tie or hard (lookahead.agreement), in float32 every one is hard.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import reference
from ..agreement import HARD, IDENTICAL, NEAR_TIE, classify
from ..engine import LookaheadGenerator
from ..prompts import case_messages

BATCH_METHODS = ("lookahead-alone", "lookahead-batch", "hf-batch", "hf-alone")


@dataclass
class ThroughputResult:
    """One method over all requests."""

    method: str
    batch_size: int
    requests: int
    new_tokens: int
    seconds: float
    exact: int  # rows equal to lookahead-alone (which equals greedy decoding)
    near_tie: int = 0  # other rows that part from lookahead-alone at a near-tie of the dtype's rounding
    hard: int = 0  # other rows (all of them in float32)
    row_new_tokens: list[int] = field(default_factory=list)  # per request, in case order
    row_kinds: list[str | None] = field(default_factory=list)  # per request: None (exact), "near-tie" or "hard";
    # empty when lookahead-alone did not run
    host_ms_per_step: float | None = None  # lookahead methods: host time outside the model per step of the batch
    # (every row of a batch step sees that step's whole host time), averaged over the requests

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "tokens_per_second": self.tokens_per_second}


def throughput_rows(results: Sequence[ThroughputResult]) -> list[dict[str, Any]]:
    """The summary of each method (its ``to_dict`` without the per-request lists) with its speedups in tokens/s:
    ``speedup_vs_lookahead_alone`` and ``speedup_vs_hf_batch`` (when those methods ran)."""
    by_method = {r.method: r for r in results}
    rows = []
    for r in results:
        row = {k: v for k, v in r.to_dict().items() if k not in ("row_new_tokens", "row_kinds")}
        for base in ("lookahead-alone", "hf-batch"):
            other = by_method.get(base)
            if other and other.tokens_per_second:
                row[f"speedup_vs_{base.replace('-', '_')}"] = r.tokens_per_second / other.tokens_per_second
        rows.append(row)
    return rows


def request_rows(results: Sequence[ThroughputResult], case_ids: Sequence[str]) -> list[dict[str, Any]]:
    """One row per method and request: ``method``, ``case_id``, ``new_tokens``, ``exact`` (equal to lookahead-alone;
    None when it did not run) and ``agreement`` (``identical``, ``near-tie`` or ``hard``; None when not compared)."""
    rows = []
    for r in results:
        compared = len(r.row_kinds) == len(r.row_new_tokens)
        for index, (case_id, tokens) in enumerate(zip(case_ids, r.row_new_tokens)):
            kind = r.row_kinds[index] if compared else None
            rows.append({"method": r.method, "batch_size": r.batch_size, "case_id": case_id, "new_tokens": tokens,
                         "exact": kind is None if compared else None,
                         "agreement": (kind or IDENTICAL) if compared else None})
    return rows


def _hf_eos_and_pad(generator: LookaheadGenerator) -> tuple[list[int], int]:
    """The EOS ids the engine stops at (sorted; ``[0]`` when there are none) and the pad id HF batches pad with (the
    tokenizer's, else the first EOS id)."""
    eos = sorted(generator.prepare([1], max_new_tokens=1).eos) or [0]
    pad = generator.tokenizer.pad_token_id
    return eos, eos[0] if pad is None else pad


def run_throughput(generator: LookaheadGenerator, cases: Sequence[dict[str, Any]], batch_size: int,
                   methods: Sequence[str] = BATCH_METHODS) -> list[ThroughputResult]:
    """Decode every case with every method; lookahead-alone is the reference for exactness.

    Each lookahead method starts from an empty trie (first-time traffic): neither learns from the other's outputs.
    """
    unknown = [m for m in methods if m not in BATCH_METHODS]
    if unknown:
        raise ValueError(f"unknown batch method(s) {unknown}; allowed: {', '.join(BATCH_METHODS)}")
    prompts = [generator.encode(case_messages(case)) for case in cases]
    limits = [int(case["max_new_tokens"]) for case in cases]
    outputs: dict[str, list[list[int]]] = {}
    seconds: dict[str, float] = {}
    host: dict[str, float] = {}
    for method in methods:
        gc.collect()
        if method.startswith("lookahead"):
            generator.trie = generator.empty_trie()
        start = time.perf_counter()
        if method.startswith("lookahead"):
            if method == "lookahead-alone":
                done = [generator.generate(p, max_new_tokens=n) for p, n in zip(prompts, limits)]
            else:
                done = generator.run_many([generator.prepare(p, max_new_tokens=n) for p, n in zip(prompts, limits)],
                                          batch_size)
            outputs[method] = [r.token_ids for r in done]
            host[method] = 1000 * sum(r.stats.host_seconds_per_step for r in done) / max(1, len(done))
        else:  # hf-batch, hf-alone: HF greedy on left-padded batches
            eos, pad = _hf_eos_and_pad(generator)
            outputs[method] = reference.padded_batch(generator.model, prompts, limits,
                                                     batch_size=batch_size if method == "hf-batch" else 1,
                                                     eos_token_id=eos, pad_token_id=pad)
        seconds[method] = time.perf_counter() - start
    expected = outputs.get("lookahead-alone")
    results = []
    for method in methods:
        rows = outputs[method]
        kinds = [] if expected is None else [mismatch_kind(generator, prompt, row, want)
                                             for prompt, row, want in zip(prompts, rows, expected)]
        results.append(ThroughputResult(method, 1 if method.endswith("alone") else batch_size, len(rows),
                                        sum(len(r) for r in rows), seconds[method], kinds.count(None),
                                        kinds.count(NEAR_TIE), kinds.count(HARD), [len(r) for r in rows], kinds,
                                        host.get(method)))
    return results


def mismatch_kind(generator: LookaheadGenerator, prompt: list[int], row: list[int], expected: list[int]
                  ) -> str | None:
    """None when ``row`` equals ``expected``; else the classifier's ``"near-tie"`` or ``"hard"`` (one teacher-forced
    pass over the prompt and the expected prefix; in float32 a near-tie is a gap within float32 rounding)."""
    if row == expected:
        return None
    return classify(generator.model, prompt, row, expected).kind


def format_throughput(results: Sequence[ThroughputResult], mismatches: bool = False) -> str:
    """A Markdown table; speedups are tokens/s relative to lookahead-alone and to hf-batch. ``mismatches`` (half
    precision) adds the columns ``near-tie`` and ``hard``."""
    by_method = {r.method: r for r in results}
    header = ["method", "batch", "requests", "new tok", "sec", "tok/s", "vs lookahead-alone", "vs hf-batch", "exact",
              *(["near-tie", "hard"] if mismatches else []), "host ms/step"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def ratio(r: ThroughputResult, base: str) -> str:
        other = by_method.get(base)
        return f"{r.tokens_per_second / other.tokens_per_second:.2f}x" if other and other.tokens_per_second else "-"

    for r in results:
        lines.append("| " + " | ".join([r.method, str(r.batch_size), str(r.requests), str(r.new_tokens),
                                        f"{r.seconds:.1f}", f"{r.tokens_per_second:.1f}", ratio(r, "lookahead-alone"),
                                        ratio(r, "hf-batch"), f"{r.exact}/{r.requests}",
                                        *([str(r.near_tie), str(r.hard)] if mismatches else []),
                                        "-" if r.host_ms_per_step is None else f"{r.host_ms_per_step:.2f}"]) + " |")
    return "\n".join(lines)
