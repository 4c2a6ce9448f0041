"""Load test of ``lookahead serve --ray`` with 2 replicas of the default model sharing the trie hub (issue 13).

Starts a local Ray instance, the hub and a Ray Serve deployment of N replicas (one CPU and thread each), sends
--requests chat requests built from the RAG cases from --clients concurrent clients (every second one streamed;
a 429 is retried), then decodes each distinct case alone in this process and compares every answer. Last, a held-out
case is asked once and then again until another replica answers it: that answer's tokens per step and time show
what the hub carried over.

    .venv/bin/python scripts/ray_serve_load.py --replicas 2 --clients 16 --requests 32 --limit 8
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import replace
from typing import Any

import httpx
import ray
from lookahead_ray.cluster import connect
from lookahead_ray.hub import HUB_NAME, start_hub, stop_hub, trie_config
from lookahead_ray.serve import REPLICA_HEADER, run_serve
from lookahead_ray.spec import GeneratorSpec
from lookahead_server.app import ServeSettings
from lookahead_server.loadgen import Job, run_load
from ray import serve

from lookahead.argtypes import positive_int
from lookahead.bench.cases import load_cases
from lookahead.prompts import case_messages


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--replicas", type=positive_int, default=2)
    p.add_argument("--clients", type=positive_int, default=16)
    p.add_argument("--requests", type=positive_int, default=32)
    p.add_argument("--limit", type=positive_int, default=8, help="distinct cases in the load (one more is held out)")
    p.add_argument("--port", type=positive_int, default=8765)
    p.add_argument("--no-trie-sharing", action="store_true")
    return p.parse_args(argv)


def chat(url: str, case: dict[str, Any]) -> tuple[dict[str, Any], str, float]:
    start = time.perf_counter()
    reply = httpx.post(f"{url}/v1/chat/completions", timeout=600,
                       json={"messages": case_messages(case), "max_tokens": case["max_new_tokens"]})
    reply.raise_for_status()
    return reply.json(), reply.headers[REPLICA_HEADER.decode()], time.perf_counter() - start


def other_replica(url: str, case: dict[str, Any], tries: int = 30) -> None:
    """Ask ``case`` once, then until another replica answers; print both."""
    first, replica, seconds = chat(url, case)
    time.sleep(5)  # two sync intervals
    for _ in range(tries):
        again, other, again_seconds = chat(url, case)
        if other != replica:
            break
    same = again["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]
    for label, reply, pid, secs in (("first answer", first, replica, seconds), ("other replica", again, other,
                                                                                  again_seconds)):
        info = reply["lookahead"]
        print(f"{label}: replica {pid}, {reply['usage']['completion_tokens']} tokens, {info['steps']} steps, "
              f"{info['tokens_per_step']:.2f} tok/step, {secs:.2f}s")
    print(f"other replica reached: {other != replica}, same text: {same}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cases = load_cases("rag_qa", args.limit + 1)
    load_cases_, held_out = cases[:-1], cases[-1]
    spec = GeneratorSpec(model=args.model, dtype="float32", device="cpu", threads=1)
    settings = ServeSettings(model_name=args.model, max_batch_size=8, max_queue=64)
    connect(num_cpus=args.replicas)
    hub = None if args.no_trie_sharing else start_hub(trie_config(spec.config))
    try:
        start = time.perf_counter()
        url = run_serve(spec, settings, port=args.port, replicas=args.replicas,
                        hub_name=None if hub is None else HUB_NAME)
        print(f"{args.replicas} replicas up in {time.perf_counter() - start:.0f}s at {url}", flush=True)
        jobs = [Job("/v1/chat/completions", {"messages": case_messages(c), "max_tokens": c["max_new_tokens"],
                                             "stream": i % 2 == 0})
                for i, c in ((i, load_cases_[i % len(load_cases_)]) for i in range(args.requests))]
        report = asyncio.run(run_load(url, jobs, clients=args.clients))
        print(report.summary(), flush=True)
        other_replica(url, held_out)
    finally:
        serve.shutdown()
        if hub is not None:
            print(f"hub: {ray.get(hub.stats.remote())['nodes']} nodes")
            stop_hub(hub)
        ray.shutdown()
    local = replace(spec, threads=None).build()  # this process: its own threads
    alone = [local.generate(case_messages(c), max_new_tokens=c["max_new_tokens"]).text for c in load_cases_]
    wrong = [o.index for o in report.ok if o.text != alone[o.index % len(load_cases_)]]
    print(f"answers equal to the request decoded alone: {len(report.ok) - len(wrong)}/{len(report.ok)}; "
          f"errors: {len(report.errors)}")
    return 1 if wrong or report.errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
