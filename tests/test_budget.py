"""Tests for lookahead.budget: the cost curve, its measurement and cache, and the adaptive draft budget."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest
from conftest import FLAT_CURVE
from hypothesis import given, settings
from hypothesis import strategies as st

from lookahead import budget as budget_module
from lookahead.budget import (
    COST_FORMAT,
    COST_VERSION,
    AcceptanceModel,
    CostCurve,
    CostModel,
    DraftBudget,
    NodeFeatures,
    Ranking,
    cached_cost_curve,
    cost_cache_key,
    default_cache_dir,
    load_cost,
    measure_cost_curve,
    node_features,
)

# ---------------------------------------------------------------------------------------------------- CostCurve


def test_cost_interpolates_between_measured_sizes():
    curve = CostCurve((1, 2, 4, 8), (10.0, 12.0, 20.0, 24.0))
    assert curve.cost(1) == 10.0
    assert curve.cost(2) == 12.0
    assert curve.cost(3) == pytest.approx(16.0)
    assert curve.cost(4) == 20.0
    assert curve.cost(6) == pytest.approx(22.0)
    assert curve.cost(8) == 24.0


def test_cost_below_first_size_is_the_first_cost():
    curve = CostCurve((4, 8), (2.0, 3.0))
    assert curve.cost(0) == 2.0
    assert curve.cost(1) == 2.0
    assert curve.cost(4) == 2.0


def test_cost_extrapolates_linearly_with_last_slope():
    curve = CostCurve((1, 2, 4, 8), (10.0, 12.0, 20.0, 24.0))
    assert curve.cost(12) == pytest.approx(24.0 + 1.0 * 4)  # slope (24 - 20) / 4 = 1 per token
    assert curve.cost(16) == pytest.approx(32.0)


def test_cost_extrapolation_never_decreases():
    curve = CostCurve((1, 2), (5.0, 4.0))  # noisy, decreasing measurements
    assert curve.cost(2) == 4.0
    assert curve.cost(10) == 4.0


def test_single_point_curve_scales_linearly_beyond_it():
    curve = CostCurve((2,), (3.0,))
    assert curve.cost(1) == 3.0
    assert curve.cost(2) == 3.0
    assert curve.cost(4) == pytest.approx(6.0)


def test_flat_curve():
    curve = CostCurve((1, 64), (1.0, 1.0))
    assert [curve.cost(n) for n in (1, 2, 33, 64, 100)] == [1.0, 1.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    ("sizes", "seconds"),
    [
        ((), ()),
        ((1, 2), (1.0,)),
        ((2, 1), (1.0, 2.0)),  # not increasing
        ((1, 1), (1.0, 1.0)),  # repeated size
        ((0, 1), (1.0, 2.0)),  # size 0
        ((-1,), (1.0,)),
    ],
)
def test_cost_curve_validation(sizes, seconds):
    with pytest.raises(ValueError):
        CostCurve(sizes, seconds)


def test_relative_and_round_trip():
    curve = CostCurve((1, 4, 16), (0.04, 0.06, 0.08))
    rel = curve.relative()
    assert list(rel) == [1, 4, 16]
    assert rel[1] == 1.0 and rel[4] == pytest.approx(1.5) and rel[16] == pytest.approx(2.0)
    data = curve.to_dict()
    assert data["format"] == COST_FORMAT and data["version"] == COST_VERSION
    assert CostCurve.from_dict(json.loads(json.dumps(data))) == curve


@pytest.mark.parametrize("data", [{}, {"format": "other", "version": COST_VERSION, "sizes": [1], "seconds": [1.0]},
                                  {"format": COST_FORMAT, "version": 99, "sizes": [1], "seconds": [1.0]},
                                  [1, 2], "text", None])
def test_from_dict_rejects_foreign_data(data):
    with pytest.raises(ValueError):
        CostCurve.from_dict(data)


# ---------------------------------------------------------------------------------------------------- measurement


class FakeClock:
    """A perf_counter that only advances when a fake pass runs."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def test_measure_cost_curve_takes_the_fastest_sample_and_smooths_to_monotone(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(budget_module, "time", SimpleNamespace(perf_counter=clock.perf_counter))
    # per size: three noisy samples; size 4 is measured cheaper than size 2 (noise the curve must smooth away)
    samples = {1: [1.0, 9.0, 1.2], 2: [2.0, 2.2, 2.1], 4: [1.5, 1.6, 50.0], 8: [3.0, 3.0, 3.0]}
    calls: list[int] = []
    measured: dict[int, list[float]] = {n: list(v) for n, v in samples.items()}

    def run_pass(n: int) -> None:
        calls.append(n)
        if len(calls) <= 2:  # warm-up passes are not timed
            clock.now += 1000.0
            return
        clock.now += measured[n].pop(0)

    curve = measure_cost_curve(run_pass, sizes=(1, 2, 4, 8), repeats=3, warmup=1)
    assert calls[:2] == [1, 8]
    assert calls[2:] == [1, 2, 4, 8] * 3  # round-robin over sizes
    assert curve.sizes == (1, 2, 4, 8)
    assert curve.seconds == pytest.approx((1.0, 1.5, 1.5, 3.0))
    assert all(a <= b for a, b in zip(curve.seconds, curve.seconds[1:]))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(min_value=0.0, max_value=10.0), min_size=4, max_size=4))
def test_measure_cost_curve_is_always_non_decreasing(costs):
    clock = FakeClock()
    table = dict(zip((1, 2, 3, 4), costs))
    original = budget_module.time
    budget_module.time = SimpleNamespace(perf_counter=clock.perf_counter)
    try:
        def run_pass(n: int) -> None:
            clock.now += table[n]

        curve = measure_cost_curve(run_pass, sizes=(1, 2, 3, 4), repeats=1, warmup=0)
    finally:
        budget_module.time = original
    assert all(a <= b for a, b in zip(curve.seconds, curve.seconds[1:]))
    assert curve.seconds == pytest.approx(tuple(min(costs[i:]) for i in range(4)))  # noise only adds time


def test_measure_cost_curve_with_real_timer():
    curve = measure_cost_curve(lambda n: sum(range(n * 100)), sizes=(1, 8), repeats=2, warmup=0)
    assert curve.sizes == (1, 8)
    assert 0 < curve.seconds[0] <= curve.seconds[1]


# ---------------------------------------------------------------------------------------------------- cache


def counting_measure(curve: CostCurve):
    calls = []

    def measure() -> CostCurve:
        calls.append(1)
        return curve

    return measure, calls


def test_cached_cost_curve_writes_once_and_reads_back(tmp_path):
    curve = CostCurve((1, 2, 4), (0.1, 0.2, 0.25))
    measure, calls = counting_measure(curve)
    assert cached_cost_curve("abc", measure, tmp_path) == curve
    assert len(calls) == 1
    path = tmp_path / "abc.json"
    assert json.loads(path.read_text()) == curve.to_dict()
    assert [p.name for p in tmp_path.iterdir()] == ["abc.json"]  # no temporary file left behind

    other, other_calls = counting_measure(CostCurve((1,), (9.0,)))
    assert cached_cost_curve("abc", other, tmp_path) == curve  # read back, not re-measured
    assert other_calls == []
    assert cached_cost_curve("xyz", other, tmp_path) == CostCurve((1,), (9.0,))  # another key measures
    assert len(other_calls) == 1


@pytest.mark.parametrize("content", ["not json {", "", json.dumps({"format": "x"}), json.dumps([1, 2]),
                                     json.dumps({"format": COST_FORMAT, "version": COST_VERSION, "sizes": [2, 1],
                                                 "seconds": [1, 2]})])
def test_cached_cost_curve_ignores_a_corrupt_file(tmp_path, content):
    (tmp_path / "k.json").write_text(content)
    curve = CostCurve((1, 2), (1.0, 2.0))
    measure, calls = counting_measure(curve)
    assert cached_cost_curve("k", measure, tmp_path) == curve
    assert len(calls) == 1
    assert CostCurve.from_dict(json.loads((tmp_path / "k.json").read_text())) == curve  # repaired


def test_cached_cost_curve_survives_an_unwritable_cache(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache directory should be")
    curve = CostCurve((1,), (1.0,))
    measure, calls = counting_measure(curve)
    assert cached_cost_curve("k", measure, blocker / "cost") == curve
    assert len(calls) == 1


def test_cached_cost_curve_default_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("LOOKAHEAD_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    curve = CostCurve((1,), (2.0,))
    measure, _ = counting_measure(curve)
    cached_cost_curve("dflt", measure)
    assert (tmp_path / "cost" / "dflt.json").is_file()


def test_cost_cache_key_is_stable_and_distinct():
    assert cost_cache_key("m", 1, "cpu") == cost_cache_key("m", 1, "cpu")
    assert cost_cache_key("m", 1, "cpu") != cost_cache_key("m", 2, "cpu")
    assert len(cost_cache_key("x")) == 16


# ---------------------------------------------------------------------------------------------------- budget

STEEP = CostCurve((1, 64), (1.0, 64.0))  # c(n) = n: a pass costs what n plain steps do
# c(2) = 1.5: one draft node pays only if it is accepted with probability above 0.5 (the prior)
SLOPED = CostCurve((1, 2, 64), (1.0, 1.5, 32.5))

CHAIN = [-1, 0, 1, 2]  # a single branch of four draft nodes
CHAIN_SCORES = [4.0, 4.0, 4.0, 4.0]


def learn(budget: DraftBudget, parents, scores, accepted, times: int, match_length=2, last_accepted=0) -> None:
    for _ in range(times):
        budget.observe(parents, scores, match_length, last_accepted, accepted)


def test_steep_curve_never_drafts():
    budget = DraftBudget(STEEP, max_nodes=16)
    assert budget.select(CHAIN, CHAIN_SCORES, 2, 0) == []
    learn(budget, CHAIN, CHAIN_SCORES, [0, 1, 2, 3], times=200)  # even after perfect acceptance
    assert budget.acceptance.probability(node_features(CHAIN, CHAIN_SCORES)[0], 2, 0) > 0.95
    assert budget.select(CHAIN, CHAIN_SCORES, 2, 0) == []


def test_flat_curve_drafts_everything_worth_anything():
    budget = DraftBudget(FLAT_CURVE, max_nodes=16)
    assert budget.select(CHAIN, CHAIN_SCORES, 2, 0) == [0, 1, 2, 3]
    learn(budget, CHAIN, CHAIN_SCORES, [0, 1, 2, 3], times=50)
    assert budget.select(CHAIN, CHAIN_SCORES, 2, 0) == [0, 1, 2, 3]


def test_max_nodes_caps_the_selection():
    budget = DraftBudget(FLAT_CURVE, max_nodes=2)
    assert budget.select(CHAIN, CHAIN_SCORES, 2, 0) == [0, 1]
    assert DraftBudget(FLAT_CURVE, max_nodes=0).select(CHAIN, CHAIN_SCORES, 2, 0) == []


def test_empty_draft_selects_nothing():
    assert DraftBudget(FLAT_CURVE, max_nodes=8).select([], [], 0, 0) == []
    assert DraftBudget(FLAT_CURVE, max_nodes=8, adaptive=False).select([], [], 0, 0) == []


def test_budget_learns_when_drafting_pays():
    budget = DraftBudget(SLOPED, max_nodes=16)
    assert budget.select(CHAIN, CHAIN_SCORES, 2, 0) == []  # prior 0.5: one node breaks even, does not pay
    learn(budget, CHAIN, CHAIN_SCORES, [0, 1, 2, 3], times=100)  # every node accepted, again and again
    chosen = budget.select(CHAIN, CHAIN_SCORES, 2, 0)
    assert chosen[:2] == [0, 1] and len(chosen) >= 2

    learn(budget, CHAIN, CHAIN_SCORES, [], times=1000)  # then nothing is accepted any more
    assert budget.select(CHAIN, CHAIN_SCORES, 2, 0) == []


def test_non_adaptive_returns_all_nodes_up_to_max():
    budget = DraftBudget(STEEP, max_nodes=3, adaptive=False)
    assert budget.select(CHAIN, CHAIN_SCORES, 2, 0) == [0, 1, 2]
    wide = [-1, -1, 0, 1, 2]
    assert DraftBudget(STEEP, max_nodes=10, adaptive=False).select(wide, [1.0] * 5, 1, 0) == [0, 1, 2, 3, 4]
    # observing does not change a non-adaptive budget
    learn(budget, CHAIN, CHAIN_SCORES, [], times=10)
    assert budget.acceptance.total_trials == 0.0


@st.composite
def drafts(draw):
    n = draw(st.integers(min_value=1, max_value=20))
    parents = [draw(st.integers(min_value=-1, max_value=i - 1)) for i in range(n)]
    scores = [draw(st.floats(min_value=0.5, max_value=20.0)) for _ in range(n)]
    return parents, scores


@settings(max_examples=100, deadline=None)
@given(drafts(), st.integers(min_value=0, max_value=10_000), st.sampled_from([FLAT_CURVE, SLOPED, STEEP]),
       st.integers(min_value=1, max_value=20))
def test_select_keeps_parents_before_children(draft, seed, curve, max_nodes):
    parents, scores = draft
    rng = random.Random(seed)
    budget = DraftBudget(curve, max_nodes=max_nodes)
    for _ in range(rng.randrange(0, 30)):  # some random history
        accepted = [i for i in range(len(parents)) if rng.random() < 0.7]
        budget.observe(parents, scores, rng.randrange(1, 5), rng.randrange(0, 4), accepted)
    chosen = budget.select(parents, scores, rng.randrange(1, 5), rng.randrange(0, 4))
    assert chosen == sorted(set(chosen))
    assert len(chosen) <= max_nodes
    assert all(0 <= i < len(parents) for i in chosen)
    chosen_set = set(chosen)
    assert all(parents[i] < 0 or parents[i] in chosen_set for i in chosen)
    if curve is STEEP:
        assert chosen == []


def test_observe_counts_only_nodes_whose_parent_was_accepted():
    budget = DraftBudget(FLAT_CURVE, max_nodes=8, acceptance=AcceptanceModel(prior=0.5))
    feats = node_features(CHAIN, CHAIN_SCORES)
    model = budget.acceptance

    def trials(i: int) -> tuple[float, float]:
        """(successes, trials) of node i's depth bin."""
        return model.counts(feats[i], 2, 0, level=1)

    assert model.probability(feats[0], 2, 0) == pytest.approx(0.5)
    budget.observe(CHAIN, CHAIN_SCORES, 2, 0, [])  # node 0 rejected; nodes below it were never tried
    assert model.probability(feats[0], 2, 0) < 0.5
    assert [trials(i) for i in range(4)] == [(0.0, 1.0), (0.0, 0.0), (0.0, 0.0), (0.0, 0.0)]
    budget.observe(CHAIN, CHAIN_SCORES, 2, 0, [0])  # node 0 accepted, node 1 rejected, node 2 not tried
    assert [trials(i) for i in range(4)] == [(1.0, 2.0), (0.0, 1.0), (0.0, 0.0), (0.0, 0.0)]
    before = model.probability(feats[2], 2, 0)
    learn(budget, CHAIN, CHAIN_SCORES, [0, 1, 2], times=5)
    assert model.probability(feats[2], 2, 0) > before


def test_untried_depths_lean_on_shallower_nodes_of_the_same_kind():
    """One-node drafts that keep being accepted raise the estimate of deeper nodes never drafted yet (the budget
    cannot stay stuck at one node), and a context that follows a past output for long is its own bin."""
    model = AcceptanceModel(prior=0.3)
    shallow = NodeFeatures(share=1.0, depth=1, score=5.0, from_outputs=True, follow=20)
    deep = NodeFeatures(share=1.0, depth=3, score=5.0, from_outputs=True, follow=22)
    fresh = NodeFeatures(share=1.0, depth=3, score=5.0, from_outputs=True, follow=0)
    for _ in range(30):
        model.observe(shallow, 4, 1, True)
    assert model.probability(deep, 4, 1) > 0.8
    assert model.probability(fresh, 4, 1) == pytest.approx(0.3)
    assert node_features([-1, 0], [1.0, 1.0], [1.0, 0.0], follow=5)[0].follow == 5
    assert node_features([-1, 0], [1.0, 1.0], [1.0, 1.0], follow=5)[1].follow == 6
    assert node_features([-1, 0], [1.0, 1.0], [1.0, 0.0], follow=5)[1].follow == 0  # not from outputs


def test_acceptance_model_estimate_and_forgetting():
    model = AcceptanceModel(prior=0.5, prior_strength=2.0, backoff_strength=4.0, max_trials=10.0)
    node = NodeFeatures(share=1.0, depth=1, score=5.0)
    assert model.probability(node, 1, 0) == pytest.approx(0.5)
    for _ in range(8):
        model.observe(node, 1, 0, True)
    # base: (8 + 1) / (8 + 2) = 0.9; coarse: (8 + 4 * 0.9) / (8 + 4); fine: (8 + 4 * coarse) / (8 + 4)
    coarse_rate = (8 + 4 * 0.9) / 12
    assert model.probability(node, 1, 0) == pytest.approx((8 + 4 * coarse_rate) / 12)
    for _ in range(3):
        model.observe(node, 1, 0, True)
    assert model.counts(node, 1, 0)[1] <= 10.0  # halved once it passed max_trials
    # a node in another bin still sees only the prior, backed off through its coarse bin
    other = NodeFeatures(share=0.1, depth=3, score=1.0)
    assert model.probability(other, 1, 0) == pytest.approx(0.5)


def test_node_features():
    feats = node_features([-1, -1, 0, 0, 2], [3.0, 1.0, 2.0, 6.0, 0.0])
    assert [f.depth for f in feats] == [1, 1, 2, 2, 3]
    assert [f.share for f in feats] == [pytest.approx(0.75), pytest.approx(0.25), pytest.approx(0.25),
                                        pytest.approx(0.75), 0.0]
    assert [f.score for f in feats] == [3.0, 1.0, 2.0, 6.0, 0.0]


# ---------------------------------------------------------------------------------------------------- CostModel


def test_cost_model_interpolates_over_context_and_batch():
    short = CostCurve((1, 2, 8), (1.0, 2.0, 8.0))
    long = CostCurve((1, 2, 8), (3.0, 4.0, 10.0))
    wide = CostCurve((1, 2, 8), (2.0, 3.0, 9.0))
    model = CostModel(((1, 100, short), (1, 1100, long), (4, 100, wide), (4, 1100, wide)))
    assert model.cost(2, context=100) == 2.0
    assert model.cost(2, context=600) == pytest.approx(3.0)  # halfway between the contexts
    assert model.cost(2, context=0) == 2.0  # flat below the shortest context
    assert model.cost(2, context=2100) == pytest.approx(6.0)  # the last slope beyond the longest
    assert model.cost(1, context=100, batch=2) == pytest.approx(1.0 + (2.0 - 1.0) / 3)
    assert model.cost(1, context=100, batch=8) == pytest.approx(wide.cost(2))  # 8 rows of 1 = 4 rows of 2
    assert CostModel.from_dict(json.loads(json.dumps(model.to_dict()))) == model
    assert load_cost(model.to_dict()) == model and load_cost(short.to_dict()) == short
    single = CostModel.of(short)  # one curve: B rows of n cost c(B * n) at any context
    assert single.cost(2, context=5000, batch=4) == short.cost(8)
    with pytest.raises(ValueError, match="batch 1"):
        CostModel(((4, 0, short),))


def test_joint_sizes_share_one_pass_between_rows():
    """Rows are padded to the largest tree: one node count N for the pass, each row keeps its best min(N, len)."""
    gentle = CostCurve((1, 64), (1.0, 2.0))
    budget = DraftBudget(CostModel(((1, 0, gentle), (2, 0, gentle))), max_nodes=16)  # two rows cost one
    sure = Ranking([0, 1, 2], [0.99, 0.98, 0.97])
    hopeless = Ranking([0, 1], [0.01, 0.0])
    alone = budget.sizes([sure])
    assert alone == [3]
    assert budget.sizes([sure, hopeless]) == [min(alone[0], 3), 2]  # the hopeless row rides along for free
    assert budget.sizes([hopeless, hopeless]) == [0, 0]
    assert budget.sizes([]) == []
    assert DraftBudget(SLOPED, max_nodes=16).sizes([sure, hopeless]) == [0, 0]  # priced c(2 n): not worth it
    assert DraftBudget(SLOPED, max_nodes=16, adaptive=False).sizes([sure, hopeless]) == [3, 2]
    assert budget.sizes([sure], max_nodes=1) == [1]


def test_a_long_followed_past_output_starts_from_its_own_prior():
    """Before any trial, a node deep in a repeated past answer (followed for 16+ tokens) is priced at the follow
    prior, every other node at the plain prior; trials then move both."""
    model = AcceptanceModel(prior=0.3, follow_prior=0.85)
    repeat = NodeFeatures(share=1.0, depth=2, score=2.0, from_outputs=True, follow=16)
    shorter = NodeFeatures(share=1.0, depth=2, score=2.0, from_outputs=True, follow=15)
    local = NodeFeatures(share=1.0, depth=2, score=2.0, from_outputs=False, follow=30)
    assert model.probability(repeat, 2, 0) == pytest.approx(0.85)
    assert model.probability(shorter, 2, 0) == pytest.approx(0.3)
    assert model.probability(local, 2, 0) == pytest.approx(0.3)
    for _ in range(20):
        model.observe(repeat, 2, 0, accepted=False)
    assert model.probability(repeat, 2, 0) < 0.3
    assert AcceptanceModel(prior=0.4).probability(repeat, 2, 0) == pytest.approx(0.4)  # default: the plain prior


def _reference_rank(budget: DraftBudget, parents, scores, match_length, last_accepted, global_counts, follow):
    """The ranking written out in plain Python, one node at a time (what the compiled kernels must equal)."""
    feats = node_features(parents, scores, global_counts, follow)
    reach: list[float] = []
    for p, feat in zip(parents, feats):
        rate = budget.acceptance.probability(feat, match_length, last_accepted)
        reach.append(rate if p < 0 else reach[p] * rate)
    order = sorted(range(len(parents)), key=lambda i: (-reach[i], feats[i].depth, i))
    return order, [reach[i] for i in order]


def _reference_sizes(budget: DraftBudget, rankings, context, limit):
    """The joint size choice written out as a loop over node counts (scalar cost model calls)."""
    top = min(limit, max(len(r.order) for r in rankings))
    rows = len(rankings)
    cost = budget.cost_model.cost
    best_n, best_rate = 0, rows / cost(1, context, rows)
    for n in range(1, top + 1):
        expected = sum(sum(r.reach[:n]) for r in rankings)
        rate = (rows + expected) / cost(n + 1, context, rows)
        if rate > best_rate + 1e-12:
            best_n, best_rate = n, rate
    return best_n


def _random_draft(rng: random.Random, size: int):
    parents = [-1] + [rng.randrange(-1, i) for i in range(1, size)]
    scores = [float(rng.choice([0, 1, 2, 3, 5, 9, 20])) for _ in range(size)]
    global_counts = [float(rng.choice([0, 0, 1, 4])) for _ in range(size)]
    return parents, scores, global_counts


def test_compiled_ranking_and_sizes_equal_the_reference_loops():
    """The budget's compiled ranking, learning and size choice equal plain Python loops over the same features, on
    random drafts, after random verification outcomes, with a cost model over batches and contexts."""
    rng = random.Random(7)
    model = CostModel(((1, 0, CostCurve((1, 8, 64), (1.0, 1.6, 6.0))), (1, 512, CostCurve((1, 8, 64), (1.4, 2.2, 8.0))),
                       (4, 0, CostCurve((1, 8, 64), (1.3, 3.0, 14.0)))))
    budget = DraftBudget(model, max_nodes=32, acceptance=AcceptanceModel(prior=0.3, exploration=0.1, follow_prior=0.85))
    for _ in range(300):
        parents, scores, global_counts = _random_draft(rng, rng.randrange(1, 40))
        match_length, last_accepted, follow = rng.randrange(0, 6), rng.randrange(0, 10), rng.choice([0, 0, 3, 17])
        ranking = budget.rank(parents, scores, match_length, last_accepted, global_counts, follow)
        order, reach = _reference_rank(budget, parents, scores, match_length, last_accepted, global_counts, follow)
        assert ranking.order == order
        assert ranking.reach == pytest.approx(reach, rel=1e-12)
        rows = rng.choice([1, 1, 2, 3, 6])
        rankings = [ranking] * rows
        context, limit = rng.choice([0, 100, 700]), rng.choice([4, 16, 32])
        assert budget.sizes(rankings, context, limit)[0] == min(len(parents), _reference_sizes(budget, rankings,
                                                                                                  context, limit))
        accepted, node = [], -1
        while rng.random() < 0.7:
            children = [i for i, p in enumerate(parents) if p == node]
            if not children:
                break
            node = rng.choice(children)
            accepted.append(node)
        budget.observe(parents, scores, match_length, last_accepted, accepted, global_counts, follow)
    assert budget.acceptance.total_trials > 300
