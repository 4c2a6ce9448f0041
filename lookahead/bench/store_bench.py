"""``lookahead bench-store``: the draft store's size, speed and recall on real text; ``lookahead store stats``.

Real text: the Python standard library's source files (code and docstrings written by others, on every machine),
tokenized by the default model's tokenizer (cached as a .npy file). At each size the store learns that many tokens
as answers of 256 tokens (and, separately, as documents of 512 tokens with ids), then reports memory per token,
insert rate, ``Drafter.propose`` latency (a 48-node draft with the budget's ranking) on seen and unseen contexts,
the longest call the decode thread made while the store grew (inserts and drafts interleaved: compaction runs in the
background), save rate, open time, merging a 10k-token delta, removing one document of 1,000. ``--recall`` learns
10,000 distinct answers and drafts the first 100 again from their opening tokens.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from transformers import AutoTokenizer

from ..budget import CostCurve, DraftBudget
from ..config import LookaheadConfig
from ..drafter import Drafter, new_trie
from ..files import cache_dir
from ..models import default_model_dir, load_model
from ..store import DraftStore

ANSWER = 256
DOCUMENT = 512


def real_tokens(limit: int) -> np.ndarray:
    """At least ``limit`` tokens of the standard library's source (fewer if it has fewer), default tokenizer."""
    cache = cache_dir() / "bench-store-stdlib.npy"
    if cache.exists():
        toks = np.load(cache)
        if len(toks) >= limit:
            return toks
    if not (default_model_dir() / "tokenizer.json").exists():
        load_model("default")  # converts the embedded model once (its tokenizer comes with it)
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())  # the default model's, offline
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))
    pieces: list[np.ndarray] = []
    total = 0
    for start in range(0, len(files), 64):
        texts = [f.read_text(encoding="utf-8", errors="replace") for f in files[start:start + 64]]
        for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            pieces.append(np.asarray(ids, np.int32))
            total += len(ids)
        if total >= max(limit, 12_000_000):
            break
    toks = np.concatenate(pieces)
    np.save(cache, toks)
    return toks


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def _budget(config: LookaheadConfig) -> DraftBudget:
    return DraftBudget(CostCurve((1, 64), (1.0, 1.0)), config.decoding_length)  # flat: drafts all 48 nodes


def propose_latency(store: DraftStore, config: LookaheadConfig, contexts: list[np.ndarray]) -> tuple[float, float]:
    """p50 and p99 microseconds of ``Drafter.propose`` (a fresh request per context, 8 output tokens)."""
    times = []
    budget = _budget(config)
    for ctx in contexts:
        drafter = Drafter(store, budget, config)
        drafter.begin(ctx[:-8].tolist(), max_new_tokens=256)
        generated = ctx[-8:].tolist()
        t0 = time.perf_counter()
        drafter.propose(generated, max_nodes=config.decoding_length)
        times.append((time.perf_counter() - t0) * 1e6)
        drafter.finish()
    times = times[len(times) // 10:]  # the first calls warm the caches
    return _pct(times, 50), _pct(times, 99)


def fill(store: DraftStore, toks: np.ndarray, n: int, documents: bool, probe: list[np.ndarray]
         ) -> dict[str, float]:
    """Learn ``n`` tokens (answers or documents with ids) from a thread of their own, as a server's document
    endpoint or learning would, while this thread drafts ``probe`` contexts one after another as a decode thread
    does; report the insert rate and the longest draft call (garbage collection, merges, sealing and back-pressure
    all run beside it)."""
    size = DOCUMENT if documents else ANSWER

    def load() -> None:
        for i, start in enumerate(range(0, n, size)):
            piece = toks[start:start + size]
            if documents:
                store.insert_source(f"doc:{i}", piece)
            else:
                store.insert(piece)
        store.flush()  # the background compaction's remaining work, counted in the rate

    t_start = time.perf_counter()
    loader = threading.Thread(target=load)
    loader.start()
    longest, k = 0.0, 0
    while loader.is_alive():
        t0 = time.perf_counter()
        store.draft(probe[k % len(probe)], 48)
        longest = max(longest, time.perf_counter() - t0)
        k += 1
        time.sleep(0.001)  # a decode step's model pass
    loader.join()
    total = time.perf_counter() - t_start
    return {"insert_tok_s": n / total, "decode_thread_max_ms": longest * 1e3, "drafts_during_load": k}


def removal_stall(store: DraftStore, source: str, probe: list[np.ndarray]) -> tuple[float, float]:
    """(ms the removal of ``source`` took in its own thread, longest draft ms on this thread meanwhile)."""
    took: list[float] = []

    def remove() -> None:
        t0 = time.perf_counter()
        store.remove_source(source)
        took.append((time.perf_counter() - t0) * 1e3)

    remover = threading.Thread(target=remove)
    longest, k = 0.0, 0
    remover.start()
    while remover.is_alive() or k == 0:
        t0 = time.perf_counter()
        store.draft(probe[k % len(probe)], 48)
        longest = max(longest, time.perf_counter() - t0)
        k += 1
    remover.join()
    return took[0], longest * 1e3


def measure(toks: np.ndarray, n: int, documents: bool, config: LookaheadConfig) -> dict[str, Any]:
    """Every figure for one store of ``n`` tokens."""
    held_out = toks[-200_000:]
    body = toks[: len(toks) - len(held_out)]
    n = min(n, len(body))
    rng = np.random.default_rng(0)
    seen = [body[s: s + 64] for s in rng.integers(0, n - 64, 300)]
    unseen = [held_out[s: s + 64] for s in rng.integers(0, len(held_out) - 64, 300)]
    gc.collect()
    store = new_trie(config)
    row: dict[str, Any] = {"tokens": n, "kind": "documents" if documents else "outputs"}
    row.update(fill(store, body, n, documents, unseen))
    stats = store.stats()
    row["bytes_per_token"] = stats["bytes"] / max(1, stats["tokens"])
    row["segments"] = len(stats["segments"])
    row["seen_p50_us"], row["seen_p99_us"] = propose_latency(store, config, seen)
    row["unseen_p50_us"], row["unseen_p99_us"] = propose_latency(store, config, unseen)
    with tempfile.TemporaryDirectory(prefix="lookahead-bench-store-") as folder:
        path = Path(folder) / "store.bin"
        t0 = time.perf_counter()
        store.save(path)
        dt = time.perf_counter() - t0
        row["save_mb_s"] = os.path.getsize(path) / 1e6 / dt
        t0 = time.perf_counter()
        opened = DraftStore.load(path)
        row["open_ms"] = (time.perf_counter() - t0) * 1e3
        assert opened.num_tokens() == store.num_tokens()
        del opened
    other = DraftStore(**store.config())
    for start in range(0, 10_000, ANSWER):
        other.insert(held_out[start:start + ANSWER])
    delta = other.export_delta()
    t0 = time.perf_counter()
    store.merge(delta)
    row["merge_10k_ms"] = (time.perf_counter() - t0) * 1e3
    if documents:
        row["remove_doc_ms"], row["remove_stall_ms"] = removal_stall(store, f"doc:{n // DOCUMENT // 2}", unseen)
    store.close()
    return row


def recall(toks: np.ndarray, config: LookaheadConfig, answers: int = 10_000, length: int = 100) -> float:
    """Share of the first 100 of ``answers`` distinct answers drafted again, following the best path from their
    first 8 tokens as a request repeating them would (a Drafter step by step, every accepted token taken)."""
    store = new_trie(config)
    learned = [toks[i * length:(i + 1) * length] for i in range(answers)]
    for answer in learned:
        store.insert(answer)
    store.flush()
    budget = _budget(config)
    drafted = total = 0
    for answer in learned[:100]:
        drafter = Drafter(store, budget, config)
        drafter.begin([], max_new_tokens=length)
        out = answer[:8].tolist()
        while len(out) < length:
            proposal = drafter.propose(out[:], max_nodes=config.decoding_length)
            node, got = 0, 0
            children: dict[tuple[int, int], int] = {(p, t): i for i, (p, t) in
                                                    enumerate(zip(proposal.parents, proposal.tokens)) if i}
            while len(out) < length and (node, int(answer[len(out)])) in children:
                node = children[(node, int(answer[len(out)]))]
                out.append(int(answer[len(out)]))
                got += 1
            drafted += got
            if len(out) < length:
                out.append(int(answer[len(out)]))  # the model's own token
        total += length - 8
        drafter.finish()
    store.close()
    return drafted / total


def _fmt(row: dict[str, Any]) -> str:
    cells = [f"{row['tokens']:,}", row["kind"], f"{row['insert_tok_s'] / 1e3:.0f}k", f"{row['bytes_per_token']:.1f}",
             f"{row['seen_p50_us']:.0f} / {row['seen_p99_us']:.0f}",
             f"{row['unseen_p50_us']:.0f} / {row['unseen_p99_us']:.0f}", f"{row['decode_thread_max_ms']:.2f}",
             f"{row['save_mb_s']:.0f}", f"{row['open_ms']:.1f}", f"{row['merge_10k_ms']:.1f}",
             f"{row['remove_doc_ms']:.1f} / {row['remove_stall_ms']:.2f}" if "remove_doc_ms" in row else "-",
             str(row["segments"])]
    return "| " + " | ".join(cells) + " |"


HEADER = ("| tokens | kind | insert tok/s | bytes/token | propose p50/p99 us (seen) | propose p50/p99 us (unseen) | "
          "decode-thread max ms | save MB/s | open ms | merge 10k ms | remove doc ms / decode stall ms | segments |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|")


def _size(text: str) -> int:
    text = text.strip().lower()
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1:], 1)
    value = float(text[:-1] if text[-1:] in "km" else text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"sizes must be positive token counts like 100k or 1m, got {text!r}")
    return int(value * scale)


def cmd_bench_store(args: argparse.Namespace) -> int:
    sizes = [_size(s) for s in args.sizes.split(",")]
    config = LookaheadConfig()
    toks = real_tokens(max(sizes) + 200_000)
    if max(sizes) + 200_000 > len(toks):
        print(f"note: the text has {len(toks):,} tokens; sizes are cut to fit", file=sys.stderr)
    rows = []
    print(HEADER, flush=True)
    for n in sizes:
        for documents in (False, True):
            row = measure(toks, n, documents, config)
            rows.append(row)
            print(_fmt(row), flush=True)
    result: dict[str, Any] = {"rows": rows}
    if args.recall:
        result["recall"] = recall(toks, config)
        print(f"\nrecall: the first 100 of 10,000 answers drafted again for {100 * result['recall']:.1f}% of their "
              "length (from their first 8 tokens)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1), encoding="utf-8")
    return 0


def cmd_store_stats(args: argparse.Namespace) -> int:
    store = DraftStore.load(args.path, background=False)
    stats = store.stats()
    stats["origin"] = store.origin
    stats["meta"] = store.meta
    print(json.dumps(stats, indent=1))
    return 0


def add_parsers(sub: Any, add_model_args: Any = None, build: Any = None) -> None:
    bench = sub.add_parser("bench-store", help="the draft store's memory, speed and recall on real text")
    bench.add_argument("--sizes", default="100k,1m", help="token counts to measure at (default: 100k,1m; 10m "
                       "takes minutes)")
    bench.add_argument("--recall", action="store_true", help="also learn 10,000 answers and redraft 100 of them")
    bench.add_argument("--json", default=None, help="write every figure to this file")
    bench.set_defaults(func=cmd_bench_store)
    store = sub.add_parser("store", help="look into a saved draft store ('lookahead store stats PATH')")
    actions = store.add_subparsers(dest="store_command", required=True)
    stats = actions.add_parser("stats", help="what a saved draft store holds: tokens, entries, bytes, segments")
    stats.add_argument("path", help="a file written by DraftStore.save (e.g. lookahead serve --trie PATH)")
    stats.set_defaults(func=cmd_store_stats)
