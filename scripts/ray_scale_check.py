"""Documents per second of ``summarize --ray`` with 2 workers against 1 (one thread each; issue 13's scaling figure).

Writes the documents of shipped cases (``--cases``, default the summarize cases) to a temporary folder and summarizes
them on Ray with 1, then 2 workers (trie sharing off unless ``--sharing``), each run into a fresh output
folder. Reports the wall time of each run (actor start-up and model loading included) and the steady rate: documents
over the busiest worker's decoding time. Also checks that both runs wrote byte-identical summaries.

    .venv/bin/python scripts/ray_scale_check.py [--cases summarize,rag_qa] [--limit 12] [--max-new-tokens 64]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import ray
import ray.data
from lookahead_ray.cluster import connect
from lookahead_ray.hub import HUB_NAME, start_hub, stop_hub, trie_config
from lookahead_ray.spec import GeneratorSpec
from lookahead_ray.summarize import PoolOptions, SummarizeOptions, documents_dataset, report_of, summarize_dataset

from lookahead.argtypes import positive_int
from lookahead.bench.cases import load_cases
from lookahead.summarize import collect_documents


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--cases", default="summarize",
                   help="comma-separated shipped case names whose cases become the documents (one per case: its "
                        "documents joined)")
    p.add_argument("--limit", type=positive_int, default=None, help="first N cases of each")
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts to compare")
    p.add_argument("--sharing", action="store_true",
                   help="share the trie through a hub (a fresh one per run), as `summarize --ray` does by default; "
                        "without it each worker learns alone")
    return p.parse_args(argv)


def write_corpus(folder: Path, names: list[str], limit: int | None) -> Path:
    for name in names:
        for case in load_cases(name, limit):
            (folder / f"{case['id']}.txt").write_text("\n\n".join(case["documents"]), encoding="utf-8")
    return folder


def run_pool(docs: list, out: Path, spec: GeneratorSpec, options: SummarizeOptions, workers: int,
             sharing: bool = False) -> tuple[float, dict[int, float]]:
    """Wall seconds of one run, and the decoding seconds of each worker process (each worker's documents, new
    tokens and decoding rate are printed). ``sharing``: through a fresh hub, stopped after the run."""
    start = time.perf_counter()
    hub = start_hub(trie_config(spec.config)) if sharing else None
    try:
        rows = summarize_dataset(documents_dataset(docs), out, spec, options,
                                 PoolOptions(workers=workers, hub_name=HUB_NAME if sharing else None)).materialize()
    finally:
        if hub is not None:
            stop_hub(hub)
    busy: dict[int, float] = defaultdict(float)
    done: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0])  # pid -> [documents, new tokens, steps]
    for row in rows.iter_rows():
        report = report_of(row)
        pid = int(row["pid"])
        busy[pid] += report.seconds
        done[pid][0] += 1
        done[pid][1] += report.new_tokens
        done[pid][2] += report.steps
    for pid, (count, tokens, steps) in sorted(done.items()):
        print(f"  worker {pid}: {count} documents, {tokens} new tokens, {steps} steps, {busy[pid]:.1f}s decoding, "
              f"{tokens / busy[pid]:.1f} tok/s, {busy[pid] / steps * 1000:.0f} ms/step", flush=True)
    return time.perf_counter() - start, busy


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    spec = GeneratorSpec(model=args.model, dtype="float32", device="cpu", threads=1)
    options = SummarizeOptions(max_new_tokens=args.max_new_tokens)
    connect(num_cpus=2)
    ray.data.DataContext.get_current().enable_progress_bars = False
    rows, outputs = [], []
    with tempfile.TemporaryDirectory(prefix="lookahead-scale-") as tmp:
        folder = Path(tmp) / "docs"
        folder.mkdir()
        docs = collect_documents([write_corpus(folder, args.cases.split(","), args.limit)])
        for count in (int(n) for n in args.workers.split(",")):
            out = Path(tmp) / f"out-{count}"
            wall, busy = run_pool(docs, out, spec, options, count, args.sharing)
            outputs.append(sorted((p.name, p.read_bytes()) for p in out.glob("*.summary.txt")))
            rows.append((count, len(busy), wall, len(docs) / wall, len(docs) / max(busy.values())))
            print(f"{count} worker(s): {wall:.0f}s", flush=True)
    base = rows[0]
    print(f"\n{len(docs)} documents ({args.cases}), --max-new-tokens {args.max_new_tokens}, one thread per worker, "
          f"trie sharing {'on' if args.sharing else 'off'}")
    print("| workers | processes used | wall s | docs/s (wall) | docs/s (busiest worker) | vs first (wall) | "
          "vs first (busiest) |")
    print("|---|---|---|---|---|---|---|")
    for count, used, wall, rate, steady in rows:
        print(f"| {count} | {used} | {wall:.1f} | {rate:.3f} | {steady:.3f} | {rate / base[3]:.2f}x | "
              f"{steady / base[4]:.2f}x |")
    same = all(o == outputs[0] for o in outputs)
    print(f"summaries byte-identical across runs: {same}")
    ray.shutdown()
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
