"""Does one trie shared through the hub carry answers across workers? (issue 13's sharing figures)

Runs the RAG cases on Ray workers of the default model (one thread each) in three set-ups, each with fresh workers:

- ``hub``: the cases split over two workers (case i on worker i % 2), a sync, then every case asked again on the
  *other* worker; plain HF greedy decoding of each case is timed there too (the vanilla baseline);
- ``nohub``: the same with sharing off (each worker learns alone);
- ``one``: one worker runs every case twice (what ``lookahead bench --rounds 2`` does in one process).

and prints the second round's tokens per step and speed against vanilla, and whether every output equals vanilla.

    .venv/bin/python scripts/ray_share_check.py --limit 10 [--json out/ray_share.json]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import ray
from lookahead_ray.cluster import connect
from lookahead_ray.hub import HUB_NAME, start_hub, stop_hub, trie_config
from lookahead_ray.spec import GeneratorSpec
from lookahead_ray.worker import start_workers

from lookahead.argtypes import positive_int
from lookahead.bench.cases import load_cases
from lookahead.prompts import case_messages


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--cases", default="rag_qa")
    p.add_argument("--limit", type=positive_int, default=None, help="first N cases")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads per worker")
    p.add_argument("--setups", default="hub,nohub,one", help="comma-separated: hub, nohub, one")
    p.add_argument("--json", help="write the figures to this JSON file")
    return p.parse_args(argv)


def run_round(workers: list[Any], cases: list[dict[str, Any]], shift: int, method: str = "generate"
              ) -> list[dict[str, Any]]:
    """Case i on worker (i + shift) % len(workers), all workers busy at once; results in case order."""
    refs = [getattr(workers[(i + shift) % len(workers)], method).remote(case_messages(c), c["max_new_tokens"])
            for i, c in enumerate(cases)]
    return ray.get(refs)


def sync_all(workers: list[Any]) -> None:
    """Every worker pushes, then every worker pulls what the others pushed."""
    ray.get([w.sync_now.remote() for w in workers])
    ray.get([w.sync_now.remote() for w in workers])


def totals(results: list[dict[str, Any]]) -> dict[str, float]:
    tokens = sum(r["new_tokens"] for r in results)
    steps = sum(r["steps"] for r in results)
    seconds = sum(r["seconds"] for r in results)
    return {"tokens": tokens, "steps": steps, "seconds": seconds, "tokens_per_step": tokens / steps,
            "tokens_per_second": tokens / seconds}


def setup_workers(spec: GeneratorSpec, count: int, hub: bool) -> list[Any]:
    """``count`` fresh workers; the first alone, so that it measures (and caches) the cost model for the others."""
    name = HUB_NAME if hub else None
    first = start_workers(1, spec, name, sync_interval=3600)
    return first + (start_workers(count - 1, spec, name, sync_interval=3600) if count > 1 else [])


def run_setup(setup: str, spec: GeneratorSpec, cases: list[dict[str, Any]]) -> dict[str, Any]:
    hub = start_hub(trie_config(spec.config)) if setup == "hub" else None
    workers = setup_workers(spec, 1 if setup == "one" else 2, hub is not None)
    try:
        first = run_round(workers, cases, 0)
        sync_all(workers)
        second = run_round(workers, cases, 1)  # the other worker (one worker: the same)
        plain = run_round(workers, cases, 1, "plain") if setup == "hub" else None
    finally:
        for w in workers:
            ray.kill(w)
        if hub is not None:
            stop_hub(hub)
    out = {"setup": setup, "round1": totals(first), "round2": totals(second),
           "round2_steps": [r["steps"] for r in second], "round2_tokens": [r["token_ids"] for r in second]}
    if plain is not None:
        out["vanilla_seconds"] = sum(r["seconds"] for r in plain)
        out["vanilla_tokens"] = [r["token_ids"] for r in plain]
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cases = load_cases(args.cases, args.limit)
    spec = GeneratorSpec(model=args.model, dtype="float32", device="cpu", threads=args.threads)
    connect(num_cpus=2)
    results = {}
    for setup in args.setups.split(","):
        start = time.perf_counter()
        results[setup] = run_setup(setup, spec, cases)
        print(f"{setup}: done in {time.perf_counter() - start:.0f}s", flush=True)
    vanilla = results.get("hub", {}).get("vanilla_seconds")
    reference = results.get("hub", {}).get("vanilla_tokens")
    one = results.get("one", {}).get("round2", {}).get("tokens_per_step")
    print(f"\n{len(cases)} {args.cases} cases, {args.threads} thread(s) per worker")
    print("| setup | round 1 tok/step | round 2 tok/step | round 2 tok/s | vs vanilla | vs one process | exact |")
    print("|---|---|---|---|---|---|---|")
    for setup, r in results.items():
        t2 = r["round2"]
        speed = f"{vanilla / t2['seconds']:.2f}x" if vanilla else "-"
        share = f"{t2['tokens_per_step'] / one:.0%}" if one else "-"
        exact = (f"{sum(a == b for a, b in zip(r['round2_tokens'], reference))}/{len(cases)}" if reference else "-")
        print(f"| {setup} | {r['round1']['tokens_per_step']:.2f} | {t2['tokens_per_step']:.2f} | "
              f"{t2['tokens_per_second']:.1f} | {speed} | {share} | {exact} |")
    for setup, r in results.items():
        print(f"{setup}: round 2 steps per case: {r['round2_steps']}")
    if vanilla:
        tokens = results["hub"]["round2"]["tokens"]
        print(f"vanilla (HF greedy, same workers): {tokens / vanilla:.1f} tok/s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({k: {n: v for n, v in r.items() if not n.endswith("_tokens")} for k, r in results.items()},
                      f, indent=1)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
