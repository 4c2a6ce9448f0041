"""Adaptive draft budget: how many draft nodes are worth verifying this step.

Speedup per step is ``(1 + expected accepted tokens) / cost(n)`` with ``n`` the number of tokens in the pass. The
cost curve ``c(n)`` is measured once per model and device (and cached on disk); the acceptance of each draft node is
estimated online from what was accepted before, binned by simple features of the node (its share of its parent's
count, its depth, the match length, how much the last step accepted, how often it was seen). Every step picks the
prefix of the most probable nodes that maximises expected tokens per second; when no draft beats a plain one-token
pass it drafts nothing, which keeps the worst case at plain decoding speed.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import files

COST_FORMAT = "lookahead-cost-curve"
COST_VERSION = 1
DEFAULT_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


@dataclass(frozen=True)
class CostCurve:
    """Seconds of one forward pass of ``n`` tokens, measured at a few sizes and interpolated linearly."""

    sizes: tuple[int, ...]
    seconds: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.sizes) != len(self.seconds) or not self.sizes:
            raise ValueError("a cost curve needs as many seconds as sizes, at least one")
        if list(self.sizes) != sorted(set(self.sizes)) or self.sizes[0] < 1:
            raise ValueError(f"cost curve sizes must be increasing positive integers, got {self.sizes}")

    def cost(self, n: int) -> float:
        """Interpolated seconds for an ``n``-token pass (linear beyond the measured range)."""
        sizes, secs = self.sizes, self.seconds
        if len(sizes) == 1:
            return secs[0] * max(n, 1) / sizes[0] if n > sizes[0] else secs[0]
        if n <= sizes[0]:
            return secs[0]
        for (a, ca), (b, cb) in zip(zip(sizes, secs), zip(sizes[1:], secs[1:])):
            if n <= b:
                return ca + (cb - ca) * (n - a) / (b - a)
        a, b, ca, cb = sizes[-2], sizes[-1], secs[-2], secs[-1]
        return cb + max(cb - ca, 0.0) * (n - b) / (b - a)

    def relative(self) -> dict[int, float]:
        """c(n) / c(1) at the measured sizes."""
        return {n: s / self.seconds[0] for n, s in zip(self.sizes, self.seconds)}

    def to_dict(self) -> dict:
        return {"format": COST_FORMAT, "version": COST_VERSION, "sizes": list(self.sizes),
                "seconds": list(self.seconds)}

    @classmethod
    def from_dict(cls, data: dict) -> CostCurve:
        if not isinstance(data, dict) or data.get("format") != COST_FORMAT or data.get("version") != COST_VERSION:
            raise ValueError("not a lookahead cost curve (format/version mismatch)")
        return cls(tuple(int(s) for s in data["sizes"]), tuple(float(c) for c in data["seconds"]))


def measure_cost_curve(run_pass: Callable[[int], None], sizes: Sequence[int] = DEFAULT_SIZES, repeats: int = 3,
                       warmup: int = 1) -> CostCurve:
    """Time ``run_pass(n)`` for every size: the fastest of ``repeats`` runs (the least disturbed by other work).

    Sizes are measured round-robin, so a slow spell of the machine hits all sizes alike instead of one.
    """
    for _ in range(warmup):
        run_pass(sizes[0])
        run_pass(sizes[-1])
    samples: dict[int, list[float]] = {n: [] for n in sizes}
    for _ in range(repeats):
        for n in sizes:
            start = time.perf_counter()
            run_pass(n)
            samples[n].append(time.perf_counter() - start)
    seconds = [min(samples[n]) for n in sizes]
    # a pass never costs more than a measured pass of more tokens: noise only adds time, so trust the lower figure
    for i in range(len(seconds) - 2, -1, -1):
        seconds[i] = min(seconds[i], seconds[i + 1])
    return CostCurve(tuple(sizes), tuple(seconds))


def default_cache_dir() -> Path:
    """Root of the lookahead cache (:func:`lookahead.files.cache_dir`); measured cost curves go under ``cost/``."""
    return files.cache_dir()


def cost_cache_key(*parts: object) -> str:
    """A short stable key naming the model, device, dtype and thread count a curve was measured for."""
    return hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()[:16]


def cached_cost_curve(key: str, measure: Callable[[], CostCurve], cache_dir: str | os.PathLike | None = None
                      ) -> CostCurve:
    """Load the curve cached under ``key`` or measure it and cache it atomically."""
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "cost"
    path = directory / f"{key}.json"
    try:
        return CostCurve.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        pass  # missing or unreadable: measure again
    curve = measure()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        files.atomic_write_text(path, json.dumps(curve.to_dict()), fsync=False)
    except OSError:
        pass  # a read-only cache only costs a re-measurement next time
    return curve


@dataclass(frozen=True)
class NodeFeatures:
    """What the acceptance model knows about one draft node before verification."""

    share: float  # node score / sum of its siblings' scores (incl. itself)
    depth: int  # 1 for children of the root
    score: float  # mixed trie count
    from_outputs: bool = False  # seen in a past output (global count > 0), not only in this request's text


def _bucket(value: float, edges: Sequence[float]) -> int:
    for i, edge in enumerate(edges):
        if value < edge:
            return i
    return len(edges)


class AcceptanceModel:
    """Online estimate of P(node accepted | its parent accepted), from binned counts with a coarse-bin back-off."""

    def __init__(self, prior: float = 0.5, prior_strength: float = 2.0, backoff_strength: float = 4.0,
                 max_trials: float = 400.0, exploration: float = 0.0) -> None:
        self.prior = prior
        self.exploration = exploration
        self.prior_strength = prior_strength
        self.backoff_strength = backoff_strength
        self.max_trials = max_trials
        self._fine: dict[tuple, list[float]] = {}  # key -> [successes, trials]
        self._coarse: dict[tuple, list[float]] = {}

    @staticmethod
    def keys(node: NodeFeatures, match_length: int, last_accepted: int) -> tuple[tuple, tuple]:
        coarse = (_bucket(node.share, (0.3, 0.6, 0.95)), min(node.depth, 4), node.from_outputs)
        fine = coarse + (min(match_length, 4), _bucket(last_accepted, (1, 2, 4, 8)),
                         _bucket(node.score, (1.5, 3.5, 8.0)))
        return coarse, fine

    def _rate(self, table: dict, key: tuple, prior: float, strength: float) -> float:
        succ, trials = table.get(key, (0.0, 0.0))
        return (succ + strength * prior) / (trials + strength)

    def probability(self, node: NodeFeatures, match_length: int, last_accepted: int) -> float:
        coarse, fine = self.keys(node, match_length, last_accepted)
        p_coarse = self._rate(self._coarse, coarse, self.prior, self.prior_strength)
        rate = self._rate(self._fine, fine, p_coarse, self.backoff_strength)
        if self.exploration:  # optimism for rarely tried bins, so a changed regime is noticed
            trials = self._fine.get(fine, (0.0, 0.0))[1]
            rate = min(1.0, rate + self.exploration / (trials + 1.0) ** 0.5)
        return rate

    def observe(self, node: NodeFeatures, match_length: int, last_accepted: int, accepted: bool) -> None:
        for table, key in zip((self._coarse, self._fine), self.keys(node, match_length, last_accepted)):
            entry = table.setdefault(key, [0.0, 0.0])
            entry[0] += float(accepted)
            entry[1] += 1.0
            if entry[1] > self.max_trials:  # forget slowly so the estimate follows the traffic
                entry[0] *= 0.5
                entry[1] *= 0.5


def node_features(parents: Sequence[int], scores: Sequence[float], global_counts: Sequence[float] | None = None
                  ) -> list[NodeFeatures]:
    """Features of every draft node; ``parents`` index into the draft, -1 means a child of the root."""
    from_outputs = [g > 0 for g in global_counts] if global_counts else [False] * len(parents)
    sibling_mass: dict[int, float] = {}
    for p, s in zip(parents, scores):
        sibling_mass[p] = sibling_mass.get(p, 0.0) + s
    depths: list[int] = []
    for p in parents:
        depths.append(1 if p < 0 else depths[p] + 1)
    return [
        NodeFeatures(share=(s / sibling_mass[p]) if sibling_mass[p] > 0 else 0.0, depth=d, score=s, from_outputs=o)
        for p, s, d, o in zip(parents, scores, depths, from_outputs)
    ]


class DraftBudget:
    """Chooses each step which draft nodes to verify, and learns from what was accepted."""

    def __init__(self, cost: CostCurve, max_nodes: int, adaptive: bool = True,
                 acceptance: AcceptanceModel | None = None) -> None:
        self.cost = cost
        self.max_nodes = max_nodes
        self.adaptive = adaptive
        self.acceptance = acceptance or AcceptanceModel(prior=0.3, exploration=0.1)

    def select(self, parents: Sequence[int], scores: Sequence[float], match_length: int, last_accepted: int,
               global_counts: Sequence[float] | None = None, max_nodes: int | None = None, batch_rows: int = 1
               ) -> list[int]:
        """Indices of the draft nodes to verify (parents before children), possibly none.

        ``max_nodes`` lowers the size limit for this call; ``batch_rows`` > 1 prices the pass as if every row of a
        batch drafted as many nodes as this one (the pass then holds ``batch_rows`` trees).
        """
        limit = self.max_nodes if max_nodes is None else min(max_nodes, self.max_nodes)
        if not parents or limit == 0:
            return []
        if not self.adaptive:
            return list(range(min(len(parents), limit)))
        features = node_features(parents, scores, global_counts)
        reach: list[float] = []  # P(node is on the accepted path)
        for p, feat in zip(parents, features):
            parent_reach = 1.0 if p < 0 else reach[p]
            reach.append(parent_reach * self.acceptance.probability(feat, match_length, last_accepted))
        order = sorted(range(len(parents)), key=lambda i: (-reach[i], features[i].depth, i))
        best_count, best_rate, expected = 0, 1.0 / self.cost.cost(batch_rows), 0.0
        for count, i in enumerate(order[:limit], start=1):
            expected += reach[i]
            rate = (1.0 + expected) / self.cost.cost(batch_rows * (count + 1))
            if rate > best_rate:
                best_count, best_rate = count, rate
        return sorted(order[:best_count])

    def observe(self, parents: Sequence[int], scores: Sequence[float], match_length: int, last_accepted: int,
                accepted: Sequence[int], global_counts: Sequence[float] | None = None) -> None:
        """Learn from one verified draft: every node whose parent was accepted was a trial.

        ``parents`` and ``scores`` describe the verified nodes only (parent -1: child of the root); ``accepted``
        lists the accepted nodes as indices into them.
        """
        if not self.adaptive or not parents:
            return
        features = node_features(parents, scores, global_counts)
        accepted_set = set(accepted)
        for i, (p, feat) in enumerate(zip(parents, features)):
            if p < 0 or p in accepted_set:
                self.acceptance.observe(feat, match_length, last_accepted, i in accepted_set)
