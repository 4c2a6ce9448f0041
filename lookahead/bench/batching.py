"""Throughput of batched lookahead against the same requests one by one and HF ``generate`` on a padded batch.

All methods decode the same prompts greedily in one process. Reported per method: new tokens over all rows, wall
seconds, tokens per second, and how many rows equal lookahead-alone token for token.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

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

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "tokens_per_second": self.tokens_per_second}


def hf_padded_batch(generator: LookaheadGenerator, prompts: Sequence[list[int]], max_new_tokens: Sequence[int],
                    batch_size: int) -> list[list[int]]:
    """HF greedy ``generate`` on left-padded batches of ``batch_size`` prompts (each batch runs to its largest
    ``max_new_tokens``; rows are cut to their own limit and EOS afterwards)."""
    model = generator.model
    eos = sorted(generator.prepare([1], max_new_tokens=1).eos) or [0]
    pad = generator.tokenizer.pad_token_id
    pad = eos[0] if pad is None else pad
    outputs: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        group = prompts[start:start + batch_size]
        limits = max_new_tokens[start:start + batch_size]
        width = max(len(p) for p in group)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in group], device=generator.device)  # [b, W]
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group], device=generator.device)
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=max(limits), do_sample=False,
                                 eos_token_id=eos, pad_token_id=pad)
        for row, limit in zip(out[:, width:].tolist(), limits):
            row = row[:limit]
            ends = [i for i, t in enumerate(row) if t in eos]
            outputs.append(row[:ends[0] + 1] if ends else row)
    return outputs


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
    for method in methods:
        gc.collect()
        if method.startswith("lookahead"):
            generator.trie = generator.empty_trie()
        start = time.perf_counter()
        if method == "lookahead-alone":
            outputs[method] = [generator.generate(p, max_new_tokens=n).token_ids for p, n in zip(prompts, limits)]
        elif method == "lookahead-batch":
            requests = [generator.prepare(p, max_new_tokens=n) for p, n in zip(prompts, limits)]
            outputs[method] = [r.token_ids for r in generator._run_many(requests, batch_size, False)]
        elif method == "hf-batch":
            outputs[method] = hf_padded_batch(generator, prompts, limits, batch_size)
        else:  # hf-alone
            outputs[method] = hf_padded_batch(generator, prompts, limits, 1)
        seconds[method] = time.perf_counter() - start
    reference = outputs.get("lookahead-alone")
    results = []
    for method in methods:
        rows = outputs[method]
        exact = sum(a == b for a, b in zip(rows, reference)) if reference is not None else 0
        results.append(ThroughputResult(method, 1 if method.endswith("alone") else batch_size, len(rows),
                                        sum(len(r) for r in rows), seconds[method], exact))
    return results


def format_throughput(results: Sequence[ThroughputResult]) -> str:
    """A Markdown table; speedups are tokens/s relative to lookahead-alone and to hf-batch."""
    by_method = {r.method: r for r in results}
    header = ["method", "batch", "requests", "new tok", "sec", "tok/s", "vs lookahead-alone", "vs hf-batch", "exact"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def ratio(r: ThroughputResult, base: str) -> str:
        other = by_method.get(base)
        return f"{r.tokens_per_second / other.tokens_per_second:.2f}x" if other and other.tokens_per_second else "-"

    for r in results:
        lines.append("| " + " | ".join([r.method, str(r.batch_size), str(r.requests), str(r.new_tokens),
                                        f"{r.seconds:.1f}", f"{r.tokens_per_second:.1f}", ratio(r, "lookahead-alone"),
                                        ratio(r, "hf-batch"), f"{r.exact}/{r.requests}"]) + " |")
    return "\n".join(lines)
