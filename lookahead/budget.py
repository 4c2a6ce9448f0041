"""Adaptive draft budget: how many draft nodes are worth verifying this step.

Speedup per step is ``(1 + expected accepted tokens) / cost(n)`` with ``n`` the number of tokens in the pass. The
cost curve ``c(n)`` is measured once per model and device (and cached on disk); the acceptance of each draft node is
estimated online from what was accepted before, binned by simple features of the node (its share of its parent's
count, its depth, the match length, how much the last step accepted, how often it was seen). Every step picks the
prefix of the most probable nodes that maximises expected tokens per second; when no draft beats a plain one-token
pass it drafts nothing, which keeps the worst case at plain decoding speed.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numba as nb
import numpy as np

from . import files

COST_FORMAT = "lookahead-cost-curve"
COST_VERSION = 1
DEFAULT_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
CostT = TypeVar("CostT", "CostCurve", "CostModel")


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

    @functools.lru_cache(maxsize=8192)  # noqa: B019 - curves are few, frozen and hashable; asked every step
    def cost(self, n: float) -> float:
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


MODEL_FORMAT = "lookahead-cost-model"
MODEL_VERSION = 1


def _interpolate(x: float, xs: Sequence[float], ys: Sequence[Any]) -> Any:
    """Piecewise-linear ``y(x)``: flat below the first point, extended with the last (non-negative) slope above;
    ``ys`` are floats or arrays (element-wise, the same arithmetic)."""
    return _interpolate_lazy(x, xs, ys.__getitem__)


def _interpolate_lazy(x: float, xs: Sequence[float], y_at: Callable[[int], Any]) -> Any:
    """:func:`_interpolate` with ``y_at(i)`` computing the ``i``-th value, asked only for the (at most two) points
    the result needs."""
    if len(xs) == 1 or x <= xs[0]:
        return y_at(0)
    for i in range(1, len(xs)):
        if x <= xs[i]:
            a, b, ya, yb = xs[i - 1], xs[i], y_at(i - 1), y_at(i)
            return ya + (yb - ya) * (x - a) / (b - a)
    a, b, ya, yb = xs[-2], xs[-1], y_at(len(xs) - 2), y_at(len(xs) - 1)
    return yb + np.maximum(yb - ya, 0.0) * (x - b) / (b - a)


@dataclass(frozen=True)
class CostModel:
    """Seconds of one pass, ``c(n, context, batch)``: ``batch`` rows of ``n`` tree nodes each (the root included)
    after ``context`` cached positions. Made of :class:`CostCurve` s over ``n`` measured at a few (batch, context)
    points; between points it interpolates linearly (context first, then batch). Past the largest measured batch
    ``b``, ``B`` rows of ``n`` cost what ``b`` rows of ``n * B / b`` do; past the longest measured context the
    cost grows with the last measured slope.
    """

    points: tuple[tuple[int, int, CostCurve], ...]  # (batch, context, curve), sorted

    def __post_init__(self) -> None:
        if not self.points:
            raise ValueError("a cost model needs at least one measured curve")
        keys = [(b, c) for b, c, _ in self.points]
        if keys != sorted(set(keys)) or keys[0][0] != 1 or any(b < 1 or c < 0 for b, c in keys):
            raise ValueError(f"cost model points must be distinct (batch >= 1, context >= 0), sorted, with batch 1 "
                             f"measured; got {keys}")

    @classmethod
    def of(cls, cost: CostCurve | CostModel) -> CostModel:
        """``cost`` as a model (a single curve is taken for batch 1 at any context)."""
        return cost if isinstance(cost, CostModel) else cls(((1, 0, cost),))

    @functools.cached_property
    def batches(self) -> tuple[int, ...]:
        return tuple(sorted({b for b, _, _ in self.points}))

    def curve(self, batch: int = 1) -> CostCurve:
        """The measured curve of ``batch`` rows at the shortest measured context."""
        return next(curve for b, _, curve in self.points if b == batch)

    @functools.cached_property
    def _by_batch(self) -> dict[int, tuple[list[int], list[CostCurve]]]:
        """Per batch, its measured contexts and their curves."""
        out: dict[int, tuple[list[int], list[CostCurve]]] = {}
        for b, c, curve in self.points:
            out.setdefault(b, ([], []))
            out[b][0].append(c)
            out[b][1].append(curve)
        return out

    def _at_batch(self, batch: int, n: float, context: float) -> float:
        contexts, curves = self._by_batch[batch]
        return _interpolate_lazy(context, contexts, lambda i: curves[i].cost(n))

    def cost(self, n: float, context: float = 0, batch: int = 1) -> float:
        """Interpolated seconds of a pass of ``batch`` rows of ``n`` nodes after ``context`` positions."""
        batches = self.batches
        if batch >= batches[-1]:
            return self._at_batch(batches[-1], n * batch / batches[-1], context)
        return _interpolate_lazy(batch, batches, lambda i: self._at_batch(batches[i], n, context))

    def cost_row(self, count: int, context: float = 0, batch: int = 1) -> np.ndarray:
        """``[cost(n, context, batch) for n in 1..count]`` as one array (the same arithmetic, element-wise)."""
        batches = self.batches
        if batch >= batches[-1]:
            return self._row_at_batch(batches[-1], count, context, batch)
        return _interpolate_lazy(batch, batches, lambda i: self._row_at_batch(batches[i], count, context, batches[i]))

    def _row_at_batch(self, measured: int, count: int, context: float, batch: int) -> np.ndarray:
        contexts, _ = self._by_batch[measured]
        return _interpolate_lazy(context, contexts, self._curve_rows(measured, count, batch).__getitem__)

    @functools.cached_property
    def _rows_made(self) -> dict[tuple[int, int, int], list[np.ndarray]]:
        """:meth:`_curve_rows` already computed (a dict on the instance: hashing the whole model per call, as a
        method cache would, costs more than the rows)."""
        return {}

    def _curve_rows(self, measured: int, count: int, batch: int) -> list[np.ndarray]:
        """Per context measured at batch ``measured``: its curve at ``n * batch / measured`` for n in 1..count."""
        key = (measured, count, batch)
        rows = self._rows_made.get(key)
        if rows is None:
            if len(self._rows_made) >= 1024:
                self._rows_made.clear()
            rows = self._rows_made[key] = self._make_rows(measured, count, batch)
        return rows

    def _make_rows(self, measured: int, count: int, batch: int) -> list[np.ndarray]:
        _, curves = self._by_batch[measured]
        if batch == measured:
            return [np.array([curve.cost(n) for n in range(1, count + 1)]) for curve in curves]
        return [np.array([curve.cost(n * batch / measured) for n in range(1, count + 1)]) for curve in curves]

    def relative(self) -> dict[int, float]:
        """c(n) / c(1) of one row at the shortest measured context."""
        return self.curve().relative()

    def to_dict(self) -> dict:
        return {"format": MODEL_FORMAT, "version": MODEL_VERSION,
                "points": [{"batch": b, "context": c, "curve": curve.to_dict()} for b, c, curve in self.points]}

    @classmethod
    def from_dict(cls, data: dict) -> CostModel:
        if not isinstance(data, dict) or data.get("format") != MODEL_FORMAT or data.get("version") != MODEL_VERSION:
            raise ValueError("not a lookahead cost model (format/version mismatch)")
        return cls(tuple((int(p["batch"]), int(p["context"]), CostCurve.from_dict(p["curve"]))
                         for p in data["points"]))


def load_cost(data: dict) -> CostCurve | CostModel:
    """A cost curve or cost model from its :meth:`to_dict` form."""
    if isinstance(data, dict) and data.get("format") == MODEL_FORMAT:
        return CostModel.from_dict(data)
    return CostCurve.from_dict(data)


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


def cached_cost_curve(key: str, measure: Callable[[], CostT], cache_dir: str | os.PathLike | None = None) -> CostT:
    """Load the curve (or cost model) cached under ``key`` or measure it and cache it atomically."""
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "cost"
    path = directory / f"{key}.json"
    try:
        return load_cost(json.loads(path.read_text()))  # type: ignore[return-value]
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
    follow: int = 0  # how many context tokens have followed one past output (see Drafter); 0 when not from outputs


def _bucket(value: float, edges: Sequence[float]) -> int:
    """Index of the first edge above ``value`` (``len(edges)`` when none is)."""
    return bisect.bisect_right(edges, value)


SHARE_EDGES = (0.3, 0.6, 0.95)
LAST_EDGES = (1, 2, 4, 8)
SCORE_EDGES = (1.5, 3.5, 8.0)


#: edges of the ``follow`` bins: a context that has followed a past output for 16+ tokens is most likely repeating it
FOLLOW_EDGES = (2, 4, 8, 16)

#: bins per level: base = (share bin, from outputs + follow bin), coarse = base + depth (capped at 4), fine = coarse +
#: (match length capped at 4, last accepted bin, score bin)
_ORIGINS = 2 + len(FOLLOW_EDGES)  # 0: not from outputs; 1 + follow bin: from outputs
_BASE_BINS = (len(SHARE_EDGES) + 1) * _ORIGINS
_DEPTHS = 5
_FINE_PER_COARSE = 5 * (len(LAST_EDGES) + 1) * (len(SCORE_EDGES) + 1)
_SHARE_E = np.array(SHARE_EDGES, np.float64)
_LAST_E = np.array(LAST_EDGES, np.float64)
_SCORE_E = np.array(SCORE_EDGES, np.float64)
_FOLLOW_E = np.array(FOLLOW_EDGES, np.float64)


@nb.njit(cache=True, nogil=True)
def _nb_bucket(value, edges):  # pragma: no cover - compiled
    c = 0
    for e in edges:
        if value >= e:
            c += 1
    return c


@nb.njit(cache=True, nogil=True)
def _bin_index(share, from_outputs, follow, depth, score, match_length, last_accepted, share_e, follow_e, last_e,
               score_e):  # pragma: no cover - compiled
    """(base, coarse, fine) bin indices of one node (see :meth:`AcceptanceModel.bins`)."""
    origin = 1 + _nb_bucket(follow, follow_e) if from_outputs else 0
    base = _nb_bucket(share, share_e) * (2 + len(follow_e)) + origin
    coarse = base * 5 + min(depth, 4)
    fine = ((coarse * 5 + min(match_length, 4)) * (len(last_e) + 1) + _nb_bucket(last_accepted, last_e)) \
        * (len(score_e) + 1) + _nb_bucket(score, score_e)
    return base, coarse, fine


@nb.njit(cache=True, nogil=True)
def _node_bins(parents, scores, global_counts, follow, match_length, last_accepted, share_e, follow_e, last_e,
               score_e):  # pragma: no cover - compiled
    """Per draft node: (base, coarse, fine) bin indices, depth, and whether its prior is the follow prior (see
    :func:`feature_values`; ``global_counts`` empty: no node is from past outputs)."""
    n = len(parents)
    mass = np.zeros(n + 1)
    for i in range(n):
        mass[parents[i] + 1] += scores[i]
    bins = np.empty((3, n), np.int64)
    depths = np.empty(n, np.int64)
    repeat = np.zeros(n, np.bool_)
    for i in range(n):
        p = parents[i]
        d = 1 if p < 0 else depths[p] + 1
        depths[i] = d
        out = len(global_counts) > 0 and global_counts[i] > 0
        share = scores[i] / mass[p + 1] if mass[p + 1] > 0 else 0.0
        f = follow + d - 1 if out and follow != 0 else 0
        b, c, fi = _bin_index(share, out, f, d, scores[i], match_length, last_accepted, share_e, follow_e, last_e,
                              score_e)
        bins[0, i] = b
        bins[1, i] = c
        bins[2, i] = fi
        repeat[i] = out and f >= follow_e[-1]
    return bins, depths, repeat


@nb.njit(cache=True, nogil=True)
def _rates(bins, repeat, succ, trials, prior, follow_prior, prior_strength, backoff_strength,
           exploration):  # pragma: no cover - compiled
    """P(node accepted | parent accepted) per node, from the three levels of binned counts."""
    n = bins.shape[1]
    out = np.empty(n)
    for i in range(n):
        rate = follow_prior if repeat[i] else prior
        b, c, f = bins[0, i], bins[1, i], bins[2, i]
        rate = (succ[0][b] + prior_strength * rate) / (trials[0][b] + prior_strength)
        rate = (succ[1][c] + backoff_strength * rate) / (trials[1][c] + backoff_strength)
        rate = (succ[2][f] + backoff_strength * rate) / (trials[2][f] + backoff_strength)
        if exploration != 0.0:
            rate = min(1.0, rate + exploration / (trials[2][f] + 1.0) ** 0.5)
        out[i] = rate
    return out


@nb.njit(cache=True, nogil=True)
def _ranked(parents, rates, depths):  # pragma: no cover - compiled
    """(order, reach): nodes by decreasing reach (the product of the rates on their path), then depth, then index."""
    n = len(parents)
    reach = np.empty(n)
    for i in range(n):
        p = parents[i]
        reach[i] = rates[i] if p < 0 else reach[p] * rates[i]
    by_depth = np.argsort(depths, kind="mergesort")  # stable: index order within a depth
    order = by_depth[np.argsort(-reach[by_depth], kind="mergesort")]
    return order, reach[order]


@nb.njit(cache=True, nogil=True)
def _rank(parents, scores, global_counts, follow, match_length, last_accepted, share_e, follow_e, last_e, score_e,
          succ, trials, prior, follow_prior, prior_strength, backoff_strength, exploration):  # pragma: no cover
    """:func:`_node_bins`, :func:`_rates` and :func:`_ranked` in one call (one dispatch a step)."""
    bins, depths, repeat = _node_bins(parents, scores, global_counts, follow, match_length, last_accepted, share_e,
                                      follow_e, last_e, score_e)
    rates = _rates(bins, repeat, succ, trials, prior, follow_prior, prior_strength, backoff_strength, exploration)
    return _ranked(parents, rates, depths)


@nb.njit(cache=True, nogil=True)
def _learn_draft(parents, scores, global_counts, follow, match_length, last_accepted, share_e, follow_e, last_e,
                 score_e, accepted, succ, trials, max_trials):  # pragma: no cover - compiled
    """:func:`_node_bins` and :func:`_learn` in one call; ``accepted`` lists the accepted nodes' indices."""
    bins, _, _ = _node_bins(parents, scores, global_counts, follow, match_length, last_accepted, share_e, follow_e,
                            last_e, score_e)
    taken = np.zeros(len(parents), np.bool_)
    for i in accepted:
        taken[i] = True
    _learn(bins, parents, taken, succ, trials, max_trials)


@nb.njit(cache=True, nogil=True)
def _best_count(reach, lengths, top, costs):  # pragma: no cover - compiled
    """The common node count ``n`` in ``0..top`` that maximises ``(rows + expected accepted) / costs[n]`` (the
    first best: fewer nodes on a tie). ``reach`` holds each row's ranked reaches one row after another, at most
    ``top`` of each (``lengths``: every row's full count), in order; ``expected`` adds them up prefix by prefix."""
    rows = len(lengths)
    expected = np.zeros(top + 1)  # [top + 1]: expected accepted tokens of the pass with n nodes per row
    at = 0
    for r in range(rows):
        take = min(top, lengths[r])
        total = 0.0
        for i in range(take):
            total += reach[at + i]
            expected[i + 1] += total
        for i in range(take + 1, top + 1):
            expected[i] += total
        at += take
    best, best_rate = 0, -1.0
    for n in range(top + 1):
        rate = (rows + expected[n]) / costs[n]
        if rate > best_rate:
            best, best_rate = n, rate
    return best


@nb.njit(cache=True, nogil=True)
def _learn(bins, parents, accepted, succ, trials, max_trials):  # pragma: no cover - compiled
    """Count one trial per node whose parent was accepted (or is the root), in every level's bin, in node order."""
    for i in range(len(parents)):
        p = parents[i]
        if p >= 0 and not accepted[p]:
            continue
        for level in range(3):
            k = bins[level, i]
            if accepted[i]:
                succ[level][k] += 1.0
            trials[level][k] += 1.0
            if trials[level][k] > max_trials:  # forget slowly so the estimate follows the traffic
                succ[level][k] *= 0.5
                trials[level][k] *= 0.5


_EMPTY_F = np.zeros(0, np.float64)
_warm = False


def _warm_up() -> None:
    """Compile (or load from numba's cache) the budget's loops now, so the first decode step does not."""
    global _warm
    if _warm:
        return
    parents, scores = np.array([-1, 0], np.int64), np.array([2.0, 1.0])
    bins, depths, repeat = _node_bins(parents, scores, np.array([1.0, 0.0]), 3.0, 2, 1.0, _SHARE_E, _FOLLOW_E,
                                      _LAST_E, _SCORE_E)
    _node_bins(parents, scores, _EMPTY_F, 0.0, 0, 0.0, _SHARE_E, _FOLLOW_E, _LAST_E, _SCORE_E)
    sizes = (_BASE_BINS, _BASE_BINS * _DEPTHS, _BASE_BINS * _DEPTHS * _FINE_PER_COARSE)
    succ, trials = tuple(np.zeros(n) for n in sizes), tuple(np.zeros(n) for n in sizes)
    _ranked(parents, _rates(bins, repeat, succ, trials, 0.5, 0.5, 2.0, 4.0, 0.1), depths)
    _learn(bins, parents, np.array([True, False]), succ, trials, 400.0)
    _best_count(np.array([0.5]), np.array([1], np.int64), 1, np.array([1.0, 1.5]))
    _rank(parents, scores, np.array([1.0, 0.0]), 3.0, 2, 1.0, _SHARE_E, _FOLLOW_E, _LAST_E, _SCORE_E, succ, trials,
          0.5, 0.5, 2.0, 4.0, 0.1)
    _learn_draft(parents, scores, np.array([1.0, 0.0]), 3.0, 2, 1.0, _SHARE_E, _FOLLOW_E, _LAST_E, _SCORE_E,
                 np.array([0], np.int64), succ, trials, 400.0)
    _learn_draft(parents, scores, _EMPTY_F, 3.0, 2, 1.0, _SHARE_E, _FOLLOW_E, _LAST_E, _SCORE_E,
                 np.zeros(0, np.int64), succ, trials, 400.0)
    _rank(parents, scores, _EMPTY_F, 3.0, 2, 1.0, _SHARE_E, _FOLLOW_E, _LAST_E, _SCORE_E, succ, trials,
          0.5, 0.5, 2.0, 4.0, 0.1)
    _warm = True


def _as_arrays(parents: Sequence[int], scores: Sequence[float], global_counts: Sequence[float] | None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (np.asarray(parents, np.int64), np.asarray(scores, np.float64),
            np.asarray(global_counts, np.float64) if global_counts else _EMPTY_F)


class AcceptanceModel:
    """Online estimate of P(node accepted | its parent accepted), from binned counts backed off over three levels.

    ``base`` bins know the node's share of its siblings, whether it comes from past outputs and how long the
    context has followed one; ``coarse`` adds the depth, ``fine`` the match length, last accepted length and score.
    A bin with few trials leans on the level above, so a depth never drafted yet starts from what shallower nodes
    of the same kind showed (one-node drafts teach the estimate of deeper ones: drafting cannot stay stuck at one
    node where deeper drafts would pay), and ``exploration`` adds optimism to rarely tried fine bins.

    The counts live in dense arrays (one cell per bin) read and updated by compiled loops, so ranking a 48-node
    draft and learning from its verification take microseconds.
    """

    def __init__(self, prior: float = 0.5, prior_strength: float = 2.0, backoff_strength: float = 4.0,
                 max_trials: float = 400.0, exploration: float = 0.0, follow_prior: float | None = None) -> None:
        self.prior = float(prior)  # floats: the compiled loops take one signature
        #: the prior of nodes from past outputs whose context has followed one for 16+ tokens (a repeated answer):
        #: likely from the first one, so a new process or worker drafts a repeat deep at once
        self.follow_prior = self.prior if follow_prior is None else float(follow_prior)
        self.exploration = float(exploration)
        self.prior_strength = float(prior_strength)
        self.backoff_strength = float(backoff_strength)
        self.max_trials = float(max_trials)
        _warm_up()
        sizes = (_BASE_BINS, _BASE_BINS * _DEPTHS, _BASE_BINS * _DEPTHS * _FINE_PER_COARSE)
        self._succ = tuple(np.zeros(n) for n in sizes)  # per level: successes per bin
        self._trials = tuple(np.zeros(n) for n in sizes)  # per level: trials per bin

    @staticmethod
    def bins(share: float, from_outputs: bool, follow: int, depth: int, score: float, match_length: int,
             last_accepted: int) -> tuple[int, int, int]:
        """The (base, coarse, fine) bin indices of a node from its feature values."""
        return tuple(int(b) for b in _bin_index(float(share), bool(from_outputs), float(follow), int(depth),
                                                 float(score), int(match_length), float(last_accepted), _SHARE_E,
                                                 _FOLLOW_E, _LAST_E, _SCORE_E))  # type: ignore[return-value]

    def node_bins(self, parents: np.ndarray, scores: np.ndarray, global_counts: np.ndarray, follow: int,
                  match_length: int, last_accepted: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per draft node of one draft: bins ``[3, n]``, depths ``[n]`` and which nodes take the follow prior."""
        return _node_bins(parents, scores, global_counts, float(follow), int(match_length), float(last_accepted),
                          _SHARE_E, _FOLLOW_E, _LAST_E, _SCORE_E)

    def ranked(self, parents: np.ndarray, scores: np.ndarray, global_counts: np.ndarray, follow: int,
               match_length: int, last_accepted: int) -> tuple[np.ndarray, np.ndarray]:
        """(order, reach) of a draft's nodes: :meth:`node_bins`, :meth:`rates` and the reach ranking in one
        compiled call."""
        return _rank(parents, scores, global_counts, float(follow), int(match_length), float(last_accepted),
                     _SHARE_E, _FOLLOW_E, _LAST_E, _SCORE_E, self._succ, self._trials, self.prior, self.follow_prior,
                     self.prior_strength, self.backoff_strength, self.exploration)

    def learn_draft(self, parents: np.ndarray, scores: np.ndarray, global_counts: np.ndarray, follow: int,
                    match_length: int, last_accepted: int, accepted: np.ndarray) -> None:
        """Count the trials of one verified draft (``accepted``: indices of its accepted nodes): :meth:`node_bins`
        and :meth:`learn` in one compiled call."""
        _learn_draft(parents, scores, global_counts, float(follow), int(match_length), float(last_accepted),
                     _SHARE_E, _FOLLOW_E, _LAST_E, _SCORE_E, accepted, self._succ, self._trials, self.max_trials)

    def rates(self, bins: np.ndarray, repeat: np.ndarray) -> np.ndarray:
        """P(accepted | parent accepted) of nodes with these bins (see :meth:`node_bins`)."""
        return _rates(bins, repeat, self._succ, self._trials, self.prior, self.follow_prior, self.prior_strength,
                      self.backoff_strength, self.exploration)

    def node_column(self, node: NodeFeatures, match_length: int, last_accepted: int) -> np.ndarray:
        """One node's bins as a ``[3, 1]`` column (the shape :meth:`rates` and :meth:`learn` take)."""
        return np.array(self.bins(node.share, node.from_outputs, node.follow, node.depth, node.score, match_length,
                                  last_accepted), np.int64).reshape(3, 1)

    def probability(self, node: NodeFeatures, match_length: int, last_accepted: int) -> float:
        """P(accepted | parent accepted) of one node."""
        bins = self.node_column(node, match_length, last_accepted)
        repeat = np.array([node.from_outputs and node.follow >= FOLLOW_EDGES[-1]])
        return float(self.rates(bins, repeat)[0])

    def learn(self, bins: np.ndarray, parents: np.ndarray, accepted: np.ndarray) -> None:
        """Count the trials of one verified draft (``accepted``: a mask over its nodes)."""
        _learn(bins, parents, accepted, self._succ, self._trials, self.max_trials)

    def observe(self, node: NodeFeatures, match_length: int, last_accepted: int, accepted: bool) -> None:
        """Count one trial of one node."""
        self.learn(self.node_column(node, match_length, last_accepted), np.array([-1], np.int64), np.array([accepted]))

    @property
    def total_trials(self) -> float:
        """Trials counted so far (base level; halved as the counts age)."""
        return float(self._trials[0].sum())

    def counts(self, node: NodeFeatures, match_length: int, last_accepted: int, level: int = 2
               ) -> tuple[float, float]:
        """(successes, trials) counted in the node's bin of ``level`` (0 base, 1 coarse: with depth, 2 fine)."""
        k = int(self.node_column(node, match_length, last_accepted)[level, 0])
        return float(self._succ[level][k]), float(self._trials[level][k])


def node_features(parents: Sequence[int], scores: Sequence[float], global_counts: Sequence[float] | None = None,
                  follow: int = 0) -> list[NodeFeatures]:
    """Features of every draft node; ``parents`` index into the draft, -1 means a child of the root.

    ``follow`` is how many tokens the context has followed a past output; a node from past outputs at depth ``d``
    is priced as if the context had followed it for ``follow + d - 1`` (its ancestors were accepted when it is)."""
    return [NodeFeatures(share=share, depth=depth, score=s, from_outputs=out, follow=f)
            for share, depth, s, out, f in zip(*feature_values(parents, scores, global_counts, follow))]


def feature_values(parents: Sequence[int], scores: Sequence[float], global_counts: Sequence[float] | None = None,
                   follow: int = 0) -> tuple[list[float], list[int], Sequence[float], list[bool], list[int]]:
    """The fields of :func:`node_features` as lists (shares, depths, scores, from outputs, follows), without
    making an object per node (the ranking runs every step for every row)."""
    from_outputs = [g > 0 for g in global_counts] if global_counts else [False] * len(parents)
    sibling_mass: dict[int, float] = {}
    for p, s in zip(parents, scores):
        sibling_mass[p] = sibling_mass.get(p, 0.0) + s
    depths: list[int] = []
    for p in parents:
        depths.append(1 if p < 0 else depths[p] + 1)
    shares = [(s / sibling_mass[p]) if sibling_mass[p] > 0 else 0.0 for p, s in zip(parents, scores)]
    follows = [(follow + d - 1) if o and follow else 0 for d, o in zip(depths, from_outputs)]
    return shares, depths, scores, from_outputs, follows


@dataclass(frozen=True)
class Ranking:
    """One row's draft nodes ranked for verification: ``order`` by decreasing ``reach`` (P(node is on the accepted
    path)); a parent always comes before its children."""

    order: list[int]  # draft node indices
    reach: list[float]  # reach[k] belongs to order[k]

    def expected(self, count: int) -> float:
        """Expected accepted draft tokens when the first ``count`` ranked nodes are verified."""
        return sum(self.reach[:count])

    def chosen(self, count: int) -> list[int]:
        """The first ``count`` ranked nodes, in draft order (parents before children)."""
        return sorted(self.order[:count])


class DraftBudget:
    """Chooses each step which draft nodes to verify, and learns from what was accepted.

    ``cost`` prices a pass: a :class:`CostModel` (seconds by nodes per row, context and batch) or a single
    :class:`CostCurve` (then a batch of ``B`` rows of ``n`` nodes costs ``c(B * n)`` at any context).
    """

    def __init__(self, cost: CostCurve | CostModel, max_nodes: int, adaptive: bool = True,
                 acceptance: AcceptanceModel | None = None) -> None:
        self.cost_model = CostModel.of(cost)
        self.max_nodes = max_nodes
        self.adaptive = adaptive
        self.acceptance = acceptance or AcceptanceModel(prior=0.3, exploration=0.1, follow_prior=0.85)

    @property
    def cost(self) -> CostCurve:
        """The curve at batch 1 and the shortest measured context (what reports print)."""
        return self.cost_model.curve()

    def rank(self, parents: Sequence[int], scores: Sequence[float], match_length: int, last_accepted: int,
             global_counts: Sequence[float] | None = None, follow: int = 0) -> Ranking:
        """Every draft node with its estimated reach, most promising first (all reach 1.0 when not adaptive)."""
        if not self.adaptive:
            return Ranking(list(range(len(parents))), [1.0] * len(parents))
        if not parents:
            return Ranking([], [])
        order, reach = self.acceptance.ranked(*_as_arrays(parents, scores, global_counts), follow, match_length,
                                              last_accepted)
        return Ranking(order.tolist(), reach.tolist())

    def sizes(self, rankings: Sequence[Ranking], context: int = 0, max_nodes: int | None = None) -> list[int]:
        """How many ranked nodes each row of one pass verifies: one joint choice for the whole pass.

        Rows are padded to the largest tree, so the pass costs ``c(N + 1, context, B)`` for a common node count
        ``N``; every row verifies its best ``min(N, len)`` nodes, and ``N`` maximises expected tokens per second
        of the shared pass, ``(B + sum of expected accepted) / cost``. ``N = 0`` (no drafting) is a plain step.
        ``context`` is the cache length the pass attends to; ``max_nodes`` lowers the per-row limit.
        """
        limit = self.max_nodes if max_nodes is None else min(max_nodes, self.max_nodes)
        lengths = [len(r.order) for r in rankings]
        if not rankings or limit <= 0:
            return [0] * len(rankings)
        top = min(limit, max(lengths))
        if not self.adaptive:
            return [min(top, n) for n in lengths]
        rows = len(rankings)
        reach = rankings[0].reach if rows == 1 else [p for r in rankings for p in r.reach[:top]]
        best_n = int(_best_count(np.asarray(reach, np.float64), np.asarray(lengths, np.int64), top,
                                 self.cost_model.cost_row(top + 1, context, rows)))
        return [min(best_n, n) for n in lengths]

    def select(self, parents: Sequence[int], scores: Sequence[float], match_length: int, last_accepted: int,
               global_counts: Sequence[float] | None = None, max_nodes: int | None = None, batch_rows: int = 1,
               follow: int = 0, context: int = 0) -> list[int]:
        """Indices of the draft nodes to verify (parents before children), possibly none: one row's choice.

        ``max_nodes`` lowers the size limit for this call; ``batch_rows`` > 1 prices the pass as if every row of a
        batch drafted as many nodes as this one (the pass then holds ``batch_rows`` trees).
        """
        if not parents:
            return []
        ranking = self.rank(parents, scores, match_length, last_accepted, global_counts, follow)
        count = self.sizes([ranking] * batch_rows, context, max_nodes)[0]
        return ranking.chosen(count)

    def observe(self, parents: Sequence[int], scores: Sequence[float], match_length: int, last_accepted: int,
                accepted: Sequence[int], global_counts: Sequence[float] | None = None, follow: int = 0) -> None:
        """Learn from one verified draft: every node whose parent was accepted was a trial.

        ``parents`` and ``scores`` describe the verified nodes only (parent -1: child of the root); ``accepted``
        lists the accepted nodes as indices into them.
        """
        if not self.adaptive or not parents:
            return
        self.acceptance.learn_draft(*_as_arrays(parents, scores, global_counts), follow, match_length,
                                    last_accepted, np.asarray(list(accepted), np.int64))
