"""Summaries, the printed table, JSON results and the plot of a benchmark run."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..agreement import HARD, NEAR_TIE
from ..files import atomic_write_text
from .runner import BASELINES, ENGINE_METHODS, NODRAFT, REFERENCES, CaseResult


def decode_seconds(items: Sequence[CaseResult]) -> float | None:
    """Seconds after the prefill summed over ``items``; None unless every one measured its prefill."""
    parts = [r.decode_seconds for r in items]
    return None if not parts or any(p is None for p in parts) else sum(parts)  # type: ignore[misc]


def decode_fields(items: Sequence[CaseResult], groups: dict[tuple[int, str, str], list[CaseResult]],
                  round_index: int, task: str) -> dict[str, Any]:
    """``prefill_seconds``, ``decode_seconds``, ``decode_tokens_per_second`` and ``speedup_vs_<base>_decode`` (the
    base's decode seconds over these) of one summary row; empty when the prefill was not measured."""
    decode = decode_seconds(items)
    if decode is None:
        return {}
    fields: dict[str, Any] = {
        "prefill_seconds": sum(r.prefill_seconds or 0.0 for r in items), "decode_seconds": decode,
        "decode_tokens_per_second": sum(r.new_tokens for r in items) / decode if decode else 0.0,
    }
    for base in ("vanilla", "pld", NODRAFT):
        base_decode = decode_seconds(groups.get((round_index, task, base), []))
        if base_decode is not None and decode:
            fields[f"speedup_vs_{base}_decode"] = base_decode / decode
    return fields


def prediction_fields(items: Sequence[CaseResult]) -> dict[str, int]:
    """``accepted_prediction_tokens`` and ``rejected_prediction_tokens`` summed over the results that used a
    prediction (empty when none did)."""
    used = [r for r in items if r.accepted_prediction_tokens is not None]
    if not used:
        return {}
    return {"accepted_prediction_tokens": sum(r.accepted_prediction_tokens or 0 for r in used),
            "rejected_prediction_tokens": sum(r.rejected_prediction_tokens or 0 for r in used)}


def provenance_fields(items: Sequence[CaseResult]) -> dict[str, Any]:
    """Provenance of one summary row (empty when no result has any): ``provenance_cases``; ``copied_share``, the
    share of all new tokens that were accepted drafts copied from a document; over the cases whose question's
    document is known (``question_document_cases``), ``question_document_share`` (the share copied from that
    document) and ``question_document_top`` (in how many it was the top source)."""
    traced = [r for r in items if r.provenance is not None]
    if not traced:
        return {}
    new_tokens = sum(r.new_tokens for r in traced)
    copied = sum(doc["tokens"] for r in traced for doc in r.provenance or [])
    asked = [r for r in traced if r.question_document is not None]
    asked_tokens = sum(r.new_tokens for r in asked)
    from_asked = sum((r.provenance or [])[r.question_document]["tokens"] for r in asked)  # type: ignore[index]
    return {"provenance_cases": len(traced), "copied_share": copied / new_tokens if new_tokens else 0.0,
            "question_document_cases": len(asked),
            "question_document_share": from_asked / asked_tokens if asked_tokens else 0.0,
            "question_document_top": sum(1 for r in asked if r.top_is_question_document)}


def summarize(results: Sequence[CaseResult]) -> list[dict[str, Any]]:
    """One row per (round, task, method): totals, tokens/s, speedups vs vanilla, pld and nodraft (overall, and
    ``_decode``:
    over the seconds after the prefill), tokens/step, exactness (``exact`` of ``compared`` cases identical to the
    reference; ``near_tie`` and ``hard`` classify the others) and, for lookahead, ``host_ms_per_step`` (host time
    outside the model forward per decoding step, averaged over the cases); where used, the prediction token counts
    (:func:`prediction_fields`) and provenance (:func:`provenance_fields`)."""
    groups: dict[tuple[int, str, str], list[CaseResult]] = defaultdict(list)
    for r in results:
        groups[(r.round, r.task, r.method)].append(r)
    rows = []
    for (round_index, task, method), items in groups.items():
        seconds = sum(r.seconds for r in items)
        new_tokens = sum(r.new_tokens for r in items)
        steps = sum(r.steps for r in items)
        row: dict[str, Any] = {
            "round": round_index, "task": task, "method": method, "cases": len(items), "new_tokens": new_tokens,
            "seconds": seconds, "tokens_per_second": new_tokens / seconds if seconds else 0.0,
            "tokens_per_step": new_tokens / steps if steps else 0.0,
            "exact": sum(1 for r in items if r.exact), "compared": sum(1 for r in items if r.exact is not None),
            "near_tie": sum(1 for r in items if r.mismatch == NEAR_TIE),
            "hard": sum(1 for r in items if r.mismatch == HARD),
            "trie_share": sum(r.trie_seconds for r in items) / seconds if seconds else 0.0,
        }
        for base in ("vanilla", "pld", NODRAFT):
            base_items = groups.get((round_index, task, base))
            if base_items:
                row[f"speedup_vs_{base}"] = sum(r.seconds for r in base_items) / seconds if seconds else 0.0
        row.update(decode_fields(items, groups, round_index, task))
        row.update(prediction_fields(items))
        row.update(provenance_fields(items))
        host = [r.host_seconds_per_step for r in items if r.host_seconds_per_step is not None]
        if host:
            row["host_ms_per_step"] = 1000 * sum(host) / len(host)
        own = groups.get((round_index, task, BASELINES.get(method, "")))
        if own:
            row["baseline"] = BASELINES[method]
            row["speedup_vs_baseline"] = sum(r.seconds for r in own) / seconds if seconds else 0.0
        scored = [r for r in items if r.logprob_best is not None and r.logprob_all is not None]
        if scored:
            row["completions"] = max(r.completions for r in scored)
            row["logprob_best"] = sum(r.logprob_best for r in scored) / len(scored)  # type: ignore[misc]
            row["logprob_all"] = sum(r.logprob_all for r in scored) / len(scored)  # type: ignore[misc]
        rows.append(row)
    return rows


def _mismatch_cells(r: dict[str, Any]) -> list[str]:
    return [str(r["near_tie"]), str(r["hard"])] if r["compared"] else ["-", "-"]


def _prediction_cells(r: dict[str, Any]) -> list[str]:
    if "accepted_prediction_tokens" not in r:
        return ["-", "-"]
    return [str(r["accepted_prediction_tokens"]), str(r["rejected_prediction_tokens"])]


def _speedup_cell(row: dict[str, Any], key: str) -> str:
    return f"{row[key]:.2f}x" if key in row else "-"


def factor_rows(rows: Sequence[dict[str, Any]], method: str = "lookahead") -> list[dict[str, Any]]:
    """Per (round, task) where vanilla, nodraft and ``method`` ran: ``engine`` (nodraft vs vanilla: the engine's
    own gain over HF), ``drafting`` (``method`` vs nodraft: drafting's own gain) and ``total`` (``method`` vs
    vanilla, their product)."""
    by_key = {(r["round"], r["task"], r["method"]): r for r in rows}
    factors = []
    for (round_index, task, name), row in by_key.items():
        nodraft = by_key.get((round_index, task, NODRAFT))
        if name != method or nodraft is None or "speedup_vs_vanilla" not in nodraft:
            continue
        factors.append({"round": round_index, "task": task, "method": method,
                        "engine": nodraft["speedup_vs_vanilla"], "drafting": row.get("speedup_vs_nodraft", 0.0),
                        "total": row.get("speedup_vs_vanilla", 0.0)})
    return factors


def format_factors(rows: Sequence[dict[str, Any]], method: str = "lookahead") -> str:
    """A Markdown table of the two factors of ``method``'s speedup (:func:`factor_rows`); '' when nodraft, vanilla
    or ``method`` did not run."""
    factors = factor_rows(rows, method)
    if not factors:
        return ""
    lines = [f"| round | task | engine: nodraft vs vanilla | drafting: {method} vs nodraft | {method} vs vanilla |",
             "|---|---|---|---|---|"]
    lines += [f"| {f['round']} | {f['task']} | {f['engine']:.2f}x | {f['drafting']:.2f}x | {f['total']:.2f}x |"
              for f in factors]
    return "\n".join(lines)


def format_table(rows: Sequence[dict[str, Any]], mismatches: bool = False) -> str:
    """A Markdown table of the summary rows. ``mismatches`` (half precision) adds the columns ``near-tie`` and
    ``hard``: how the cases that are not ``exact`` differ (lookahead.agreement). ``vs vanilla (decode)``: the
    speedup over the seconds after the prefill; ``host ms/step``: lookahead's host time outside the model forward per
    decoding step. When a method used predictions, ``pred acc`` and ``pred rej`` give the prediction draft tokens
    accepted, and verified but not accepted; when nodraft ran, ``vs nodraft`` is the speedup over the same engine
    with drafting off (drafting's own gain)."""
    predicted = any("accepted_prediction_tokens" in r for r in rows)
    nodraft = any("speedup_vs_nodraft" in r for r in rows)
    header = ["round", "task", "method", "cases", "new tok", "sec", "tok/s", "vs vanilla", "vs vanilla (decode)",
              "vs pld", *(["vs nodraft"] if nodraft else []), "tok/step", "exact",
              *(["near-tie", "hard"] if mismatches else []), *(["pred acc", "pred rej"] if predicted else []),
              "trie %", "host ms/step"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [
            str(r["round"]), r["task"], r["method"], str(r["cases"]), str(r["new_tokens"]), f"{r['seconds']:.1f}",
            f"{r['tokens_per_second']:.1f}",
            f"{r['speedup_vs_vanilla']:.2f}x" if "speedup_vs_vanilla" in r else "-",
            f"{r['speedup_vs_vanilla_decode']:.2f}x" if "speedup_vs_vanilla_decode" in r else "-",
            f"{r['speedup_vs_pld']:.2f}x" if "speedup_vs_pld" in r else "-",
            *([_speedup_cell(r, "speedup_vs_nodraft")] if nodraft else []),
            f"{r['tokens_per_step']:.2f}",
            f"{r['exact']}/{r['compared']}" if r["compared"] else "-",
            *(_mismatch_cells(r) if mismatches else []),
            *(_prediction_cells(r) if predicted else []),
            f"{100 * r['trie_share']:.1f}" if r["method"] in ENGINE_METHODS else "-",
            f"{r['host_ms_per_step']:.2f}" if "host_ms_per_step" in r else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_provenance(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of provenance per row that has it ('' if none): the share of new tokens copied from the
    documents, the share copied from the question's document, and in how many cases that document was the top
    source; then one line per row, e.g. ``top source = the question's document in 12 of 15 cases``."""
    traced = [r for r in rows if "provenance_cases" in r]
    if not traced:
        return ""
    header = ["round", "task", "method", "cases", "copied from documents %", "from the question's document %",
              "top = question's document"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in traced:
        top = f"{r['question_document_top']}/{r['question_document_cases']}" if r["question_document_cases"] else "-"
        lines.append("| " + " | ".join([str(r["round"]), r["task"], r["method"], str(r["provenance_cases"]),
                                        f"{100 * r['copied_share']:.1f}", f"{100 * r['question_document_share']:.1f}",
                                        top]) + " |")
    lines += [f"{r['method']} (round {r['round']}, {r['task']}): top source = the question's document in "
              f"{r['question_document_top']} of {r['question_document_cases']} cases"
              for r in traced if r["question_document_cases"]]
    return "\n".join(lines)


def format_own_baselines(rows: Sequence[dict[str, Any]], mismatches: bool = False) -> str:
    """A Markdown table of the ensemble and multi-draft methods against their own baselines ('' if none ran):
    speedup, exactness (``mismatches``: also near-tie and hard) and, for k completions, the mean log-prob per token
    of the best one and of all k."""
    own = {"ensemble-plain", "k-sampling"}
    picked = [r for r in rows if r["method"] in own or r.get("baseline") in own]
    if not picked:
        return ""
    header = ["round", "task", "method", "k", "new tok", "sec", "tok/s", "vs own base", "tok/step", "exact",
              *(["near-tie", "hard"] if mismatches else []), "logprob/tok best", "logprob/tok all k"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in picked:
        cells = [
            str(r["round"]), r["task"], r["method"], str(r.get("completions", 1)), str(r["new_tokens"]),
            f"{r['seconds']:.1f}", f"{r['tokens_per_second']:.1f}",
            f"{r['speedup_vs_baseline']:.2f}x vs {r['baseline']}" if "speedup_vs_baseline" in r else "-",
            f"{r['tokens_per_step']:.2f}",
            f"{r['exact']}/{r['compared']}" if r["compared"] else "-",
            *(_mismatch_cells(r) if mismatches else []),
            f"{r['logprob_best']:.3f}" if "logprob_best" in r else "-",
            f"{r['logprob_all']:.3f}" if "logprob_all" in r else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def exactness_messages(results: Sequence[CaseResult], dtype: str) -> tuple[list[str], bool]:
    """Lines that say which outputs differ from their reference, and whether the run failed: only hard mismatches
    fail (a near-tie, two logits equal within the dtype's rounding, is what every dtype allows;
    docs/architecture.md)."""
    hard = [r for r in results if r.exact is False and r.mismatch != NEAR_TIE]
    ties = [f"{r.case_id}/{r.method}" for r in results if r.exact is False and r.mismatch == NEAR_TIE]
    lines = []
    if ties:
        lines.append(f"note: {len(ties)} output(s) equal vanilla up to a near-tie (two logits equal within {dtype} "
                     f"rounding; what {dtype} promises): {ties}")
    if hard:
        what = "vanilla" if all(REFERENCES.get(r.method) == "vanilla" for r in hard) else "its reference"
        names = [f"{r.case_id}/{r.method}" for r in hard]
        if dtype == "float32":
            lines.append(f"WARNING: output differs from {what} on {names}")
        else:
            lines.append(f"FAILED: output differs from {what} beyond {dtype} rounding (hard mismatch) on {names}")
    return lines, bool(hard)


def write_json(path: str | os.PathLike, meta: dict[str, Any], results: Sequence[CaseResult | dict[str, Any]],
               rows: Sequence[dict[str, Any]]) -> None:
    """Write ``{"meta", "summary": rows, "results"}`` atomically (temp file + rename); ``results`` are case results
    or rows that already are dicts (the batched throughput's per-request rows)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "summary": list(rows),
               "results": [r if isinstance(r, dict) else r.to_dict() for r in results]}
    atomic_write_text(target, json.dumps(payload, indent=1), fsync=False)


def plot(path: str | os.PathLike, results: Sequence[CaseResult]) -> None:
    """PNG: speedup over vanilla per case (top) and tokens per step per case (bottom), per method and round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vanilla = {(r.round, r.case_id): r.seconds for r in results if r.method == "vanilla"}
    series: dict[str, list[CaseResult]] = defaultdict(list)
    for r in results:
        series[f"{r.method} (round {r.round})"].append(r)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(12, 7), sharex=True)
    for label, items in series.items():
        xs = list(range(len(items)))
        if not label.startswith("vanilla") and vanilla:
            top.plot(xs, [vanilla.get((r.round, r.case_id), 0.0) / r.seconds for r in items], marker="o", ms=3,
                     label=label)
        bottom.plot(xs, [r.tokens_per_step for r in items], marker="o", ms=3, label=label)
    top.axhline(1.0, color="grey", lw=0.8, ls="--")
    top.set_ylabel("speedup vs vanilla")
    bottom.set_ylabel("tokens per step")
    bottom.set_xlabel("case")
    top.legend(fontsize=8)
    bottom.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
