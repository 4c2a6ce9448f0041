"""What a ``lookahead summarize`` run cost: per document and in total, as JSON and as a plain-text table."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..agreement import NEAR_TIE
from .summarizer import RequestStats


@dataclass
class DocumentReport:
    """What summarizing one document cost."""

    name: str
    source: str
    summary_file: str
    chunks: int
    requests: list[RequestStats] = field(default_factory=list)
    resumed: bool = False  # finished by an earlier run: read back from its record

    @property
    def new_tokens(self) -> int:
        return sum(r.new_tokens for r in self.requests)

    @property
    def steps(self) -> int:
        return sum(r.steps for r in self.requests)

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.requests)


@dataclass
class SummaryRun:
    """The outcome of :func:`~lookahead.summarize.summarize_documents`."""

    documents: list[DocumentReport]
    out_dir: Path
    cost_curve_pass_seconds: float | None = None

    def totals(self) -> dict[str, Any]:
        requests = [r for d in self.documents for r in d.requests]
        fresh = [r for d in self.documents if not d.resumed for r in d.requests]
        new_tokens = sum(r.new_tokens for r in requests)
        steps = sum(r.steps for r in requests)
        seconds = sum(r.seconds for r in requests)
        estimate = sum(r.estimated_plain_seconds for r in requests)
        data: dict[str, Any] = {
            "documents": len(self.documents), "summarized_now": sum(not d.resumed for d in self.documents),
            "resumed": sum(d.resumed for d in self.documents), "requests": len(requests), "new_tokens": new_tokens,
            "steps": steps, "tokens_per_step": new_tokens / steps if steps else 0.0, "seconds": seconds,
            "tokens_per_second": new_tokens / seconds if seconds else 0.0,
            "estimated_speedup": estimate / seconds if seconds else 0.0,
        }
        measured = [r for r in fresh if r.baseline_seconds is not None]
        if measured:
            base = sum(r.baseline_seconds or 0.0 for r in measured)
            mine = sum(r.seconds for r in measured)
            data["measured_speedup"] = base / mine if mine else 0.0
            data["identical_to_baseline"] = all(r.exact for r in measured)
            data["near_tie_mismatches"] = sum(1 for r in measured if not r.exact and r.mismatch == NEAR_TIE)
            data["hard_mismatches"] = sum(1 for r in measured if not r.exact and r.mismatch != NEAR_TIE)
        return data

    @property
    def failed(self) -> bool:
        """A request of this run differs from its ``--baseline`` beyond the dtype's rounding (a hard mismatch)."""
        return bool(self.totals().get("hard_mismatches"))

    def to_dict(self) -> dict[str, Any]:
        docs = []
        for d in self.documents:
            item = {k: v for k, v in asdict(d).items() if k != "requests"}
            item.update(new_tokens=d.new_tokens, steps=d.steps, seconds=d.seconds,
                        tokens_per_step=d.new_tokens / d.steps if d.steps else 0.0)
            item["requests"] = [asdict(r) for r in d.requests]
            docs.append(item)
        return {"totals": self.totals(), "documents": docs}

    def format(self) -> str:
        """A plain-text table and the totals."""
        lines = [f"{'document':40s} {'chunks':>6s} {'tokens':>7s} {'steps':>6s} {'tok/step':>8s} {'seconds':>8s}"]
        for d in self.documents:
            tps = d.new_tokens / d.steps if d.steps else 0.0
            mark = " (earlier run)" if d.resumed else ""
            lines.append(f"{d.name[:40]:40s} {d.chunks:6d} {d.new_tokens:7d} {d.steps:6d} {tps:8.2f} "
                         f"{d.seconds:8.2f}{mark}")
        t = self.totals()
        lines.append(f"total: {t['documents']} documents ({t['summarized_now']} now, {t['resumed']} from an earlier "
                     f"run), {t['new_tokens']} tokens in {t['seconds']:.1f}s, {t['tokens_per_step']:.2f} tokens/step, "
                     f"{t['tokens_per_second']:.1f} tokens/s")
        lines.append(f"estimated speedup over plain greedy decoding: x{t['estimated_speedup']:.2f} "
                     "(tokens/step and this machine's measured cost of a 1-token pass)")
        if "measured_speedup" in t:
            if t["hard_mismatches"]:
                same = f"DIFFERENT ({t['hard_mismatches']} hard mismatch(es); FAILED)"
            elif t["near_tie_mismatches"]:
                same = (f"equal up to a near-tie in {t['near_tie_mismatches']} request(s) (two logits equal within "
                        "half-precision rounding: what the dtype promises)")
            else:
                same = "identical"
            lines.append(f"measured speedup over HF greedy generate (this run): x{t['measured_speedup']:.2f}, "
                         f"outputs {same}")
        return "\n".join(lines)
