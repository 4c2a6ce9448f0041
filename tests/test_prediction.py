"""Predicted outputs (``prediction=``) and per-request tries (``trie=``): the drafter's pure pieces on literal inputs,
and exactness on tiny float32 models: with a right, wrong, shifted or partly right prediction the output equals
plain greedy decoding token for token, and the accepted/rejected prediction counts add up."""

from __future__ import annotations

import pytest
from conftest import (
    EOS_ID,
    FLAT_CURVE,
    VOCAB_SIZE,
    hf_greedy,
    make_generator,
    make_model,
    make_tokenizer,
    other_token,
    random_prompt,
)

from lookahead.budget import CostCurve, Ranking
from lookahead.config import LookaheadConfig
from lookahead.drafter import (
    PredictionRate,
    align_prediction,
    as_text,
    chain_trials,
    trie_part,
    with_chain,
    with_predicted_reach,
)
from lookahead.engine import LookaheadGenerator
from lookahead.trie import Draft

pytestmark = pytest.mark.usefixtures("single_thread")

N = 40
#: a CPU-like curve: a pass of 48 nodes costs 2.5 plain passes, so a wrong prediction must be priced down
STEEP_CURVE = CostCurve((1, 4, 16, 64), (1.0, 1.1, 1.5, 3.0))


# ---------------------------------------------------------------------------------------------------- alignment


def test_the_expected_position_wins_when_its_token_agrees():
    prediction = as_text([5, 6, 7, 5, 6, 8])
    assert align_prediction(prediction, [5], expected=1) == 1
    assert align_prediction(prediction, [9, 5, 6], expected=5) == 5  # after the second "5 6"
    assert align_prediction(prediction, [9, 5, 6], expected=2) == 2


def test_elsewhere_the_longest_suffix_nearest_the_expected_position_decides():
    prediction = as_text([1, 2, 3, 9, 1, 2, 3, 4, 7])
    assert align_prediction(prediction, [8, 1, 2, 3], expected=0) == 3  # "1 2 3" twice: the one nearest 0
    assert align_prediction(prediction, [8, 1, 2, 3], expected=8) == 7
    assert align_prediction(prediction, [9, 1, 2, 3], expected=0) == 7  # the longer suffix "9 1 2 3"
    assert align_prediction(prediction, [5, 6], expected=2) is None  # nowhere
    assert align_prediction(prediction, [4, 7], expected=0) is None  # found, but nothing follows it
    assert align_prediction(prediction, [3], expected=0) is None  # one token is trusted at the expected place only
    assert align_prediction("", [3], expected=0) is None


def test_the_chain_follows_the_trie_draft_then_grows_below_it():
    draft = Draft(tokens=[4, 5, 6, 7], parents=[-1, 0, 0, 2], scores=[3.0, 2.0, 1.0, 1.0], match_length=2,
                  global_counts=[0.0, 1.0, 0.0, 0.0])
    grown, on_chain = with_chain(draft, [4, 6, 8, 9])
    assert grown.tokens == [4, 5, 6, 7, 8, 9]
    assert grown.parents == [-1, 0, 0, 2, 2, 4]
    assert grown.scores == [3.0, 2.0, 1.0, 1.0, 4.0, 4.0]  # new nodes score above every trie node
    assert grown.global_counts == [0.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert on_chain == [True, False, True, False, True, True]
    same, flags = with_chain(draft, [4, 6, 7])
    assert same is draft and flags == [True, False, True, True]
    fresh, flags = with_chain(draft, [9])
    assert fresh.parents[-1] == -1 and flags == [False] * 4 + [True]


def test_prediction_trials_and_the_trie_part_the_budget_learns():
    # tree: root 0; 1 (pred) -> 2 (pred) -> 3 (pred); 4 (trie, under 1); 5 (trie, under 3); 6 (trie, root); 7 (under 6)
    parents = [0, 1, 2, 1, 3, 0, 6]
    predicted = [True, True, True, False, False, False, False]
    assert chain_trials(parents, predicted, [1, 2]) == (2, 3)  # 1 and 2 accepted, 3 tried and rejected
    assert chain_trials(parents, predicted, [6]) == (0, 1)
    kept, kept_parents, kept_accepted = trie_part(parents, predicted, [1, 4])
    assert kept == [3, 5, 6]  # draft indices (tree index - 1) of 4, 6, 7; 5 sits below the rejected node 3
    assert kept_parents == [-1, -1, 1]  # 4 was tried below the accepted 1: a child of the root
    assert kept_accepted == [0]


def test_prediction_nodes_are_ranked_by_their_own_rate():
    parents = [-1, 0, -1, 2]  # prediction chain 0 -> 1; a trie branch 2 -> 3
    predicted = [True, True, False, False]
    ranking = Ranking(order=[2, 3, 0, 1], reach=[0.5, 0.25, 0.1, 0.01])
    ranked = with_predicted_reach(ranking, parents, predicted, rate=0.9)
    assert ranked.order == [0, 1, 2, 3]
    assert ranked.reach == pytest.approx([0.9, 0.81, 0.5, 0.25])
    plain = with_predicted_reach(ranking, parents, predicted, rate=0.9, adaptive=False)
    assert plain.order == [0, 1, 2, 3] and plain.reach == [1.0] * 4


def test_a_prediction_node_the_trie_also_drafted_keeps_the_higher_acceptance():
    parents = [-1, 0, 1]  # the trie drafted 0 -> 1; the prediction agrees on both and hangs 2 below
    predicted = [True, True, True]
    ranking = Ranking(order=[0, 1, 2], reach=[0.99, 0.5, 0.5])  # the trie is sure of 0, not of 1
    ranked = with_predicted_reach(ranking, parents, predicted, rate=0.9, trie_nodes=2)
    assert ranked.reach == pytest.approx([0.99, 0.99 * 0.9, 0.99 * 0.9 * 0.9])


def test_the_prediction_rate_learns_and_forgets():
    rate = PredictionRate(prior=0.9, strength=4.0, window=8.0)
    assert rate.rate(True) == pytest.approx(0.9)
    rate.observe(True, 0, 4)
    pooled = 3.6 / 8  # both kinds together, from the prior
    assert rate.rate(True) == pytest.approx(4 * pooled / 8)
    assert rate.rate(False) == pytest.approx(pooled)  # no trials of its own: the pooled rate
    rate.observe(True, 6, 6)  # past the window: halved
    assert rate.counts[True] == [3.0, 5.0]


# ---------------------------------------------------------------------------------------------------- exactness


def predictions(ref: list[int]) -> dict[str, list[int]]:
    """A right prediction and wrong ones: partly right, shifted, a deletion, an insertion, all wrong."""
    third = len(ref) // 3
    return {
        "right": list(ref),
        "partly": ref[:third] + [other_token(t) for t in ref[third:2 * third]] + ref[2 * third:],
        "shifted": ref[4:],
        "deletion": ref[:third] + ref[third + 3:],
        "insertion": ref[:third] + [other_token(ref[third], 9), other_token(ref[third], 11)] + ref[third:],
        "wrong": [other_token(t, 3) for t in ref],
    }


@pytest.mark.parametrize("curve", [FLAT_CURVE, STEEP_CURVE], ids=["flat", "steep"])
@pytest.mark.parametrize("adaptive", [True, False], ids=["adaptive", "fixed"])
@pytest.mark.parametrize("arch,seed", [("llama", 0), ("qwen2", 1)])
def test_output_with_a_prediction_equals_greedy(arch, seed, adaptive, curve):
    prompt = random_prompt(200 + seed)
    ref = hf_greedy(make_model(arch, seed), prompt, N)
    gen = make_generator(arch, seed, adaptive=adaptive, learn_outputs=False, cost_curve=curve)
    for name, prediction in predictions(ref).items():
        result = gen.generate(prompt, max_new_tokens=N, eos_token_id=EOS_ID, prediction=prediction)
        assert result.token_ids == ref, name
        stats = result.stats
        drafted = sum(stats.draft_sizes)
        assert stats.accepted_prediction_tokens <= sum(stats.accepted_lengths), name
        assert stats.accepted_prediction_tokens + stats.rejected_prediction_tokens <= drafted, name
        if name == "right":  # every accepted draft token was predicted; only the steps' own tokens were not
            assert stats.accepted_prediction_tokens == sum(stats.accepted_lengths) >= len(ref) // 2
            assert stats.rejected_prediction_tokens == 0
    assert len(gen.trie) == 0  # nothing learned (learn_outputs=False), every request released


def test_a_right_prediction_decodes_in_one_step_and_a_text_prediction_works():
    prompt = random_prompt(210)
    ref = hf_greedy(make_model("llama", 0), prompt, N)
    assert len(ref) == N
    gen = make_generator(learn_outputs=False)
    result = gen.generate(prompt, max_new_tokens=N, prediction=ref)
    assert result.stats.steps == 2 and result.stats.accepted_lengths == [N - 1]
    text = make_tokenizer().decode(ref)
    by_text = gen.generate(prompt, max_new_tokens=N, prediction=text)
    assert by_text.token_ids == ref
    assert by_text.stats.accepted_prediction_tokens > 0


def test_a_wrong_prediction_counts_rejected_tokens():
    prompt = random_prompt(211)
    ref = hf_greedy(make_model("llama", 0), prompt, N)
    gen = make_generator(adaptive=False, learn_outputs=False)
    wrong = [ref[0]] + [other_token(t, 3) for t in ref[1:]]
    result = gen.generate(prompt, max_new_tokens=N, prediction=wrong)
    assert result.token_ids == ref
    assert result.stats.accepted_prediction_tokens == 0
    assert result.stats.rejected_prediction_tokens > 0


def test_sampled_output_does_not_depend_on_the_prediction():
    prompt = random_prompt(212)
    gen = make_generator(learn_outputs=False)
    plain = gen.generate(prompt, max_new_tokens=N, do_sample=True, temperature=0.8, seed=7)
    guided = gen.generate(prompt, max_new_tokens=N, do_sample=True, temperature=0.8, seed=7,
                          prediction=plain.token_ids)
    wrong = gen.generate(prompt, max_new_tokens=N, do_sample=True, temperature=0.8, seed=7,
                         prediction=[other_token(t) for t in plain.token_ids])
    assert guided.token_ids == wrong.token_ids == plain.token_ids
    assert guided.stats.accepted_prediction_tokens > 0


def test_a_batch_takes_one_prediction_per_prompt():
    model = make_model("llama", 0)
    prompts = [random_prompt(220 + i) for i in range(3)]
    refs = [hf_greedy(model, p, N) for p in prompts]
    gen = make_generator(learn_outputs=False)
    results = gen.generate(prompts, max_new_tokens=N, batch_size=3, prediction=[refs[0], None, refs[2][5:]])
    assert [r.token_ids for r in results] == refs
    assert results[0].stats.accepted_prediction_tokens == len(refs[0]) - 1
    assert results[1].stats.accepted_prediction_tokens == 0


@pytest.mark.parametrize("prediction,error,match", [
    (3.5, TypeError, "prediction must be a string or a list of token ids"),
    ([1, VOCAB_SIZE], ValueError, "prediction token ids must be in"),
    ([1, "a"], TypeError, "prediction must be a string or a list of token ids"),
])
def test_bad_predictions_are_clear_errors(prediction, error, match):
    with pytest.raises(error, match=match):
        make_generator(learn_outputs=False).generate(random_prompt(1), max_new_tokens=2, prediction=prediction)


def test_a_list_of_prompts_needs_a_list_of_predictions():
    with pytest.raises(ValueError, match="a list of 2 predictions"):
        make_generator(learn_outputs=False).generate([random_prompt(1), random_prompt(2)], max_new_tokens=2,
                                                     prediction="abc")


# ---------------------------------------------------------------------------------------------------- trie=


def test_a_request_drafts_from_and_learns_into_its_own_trie():
    prompt = random_prompt(230)
    ref = hf_greedy(make_model("llama", 0), prompt, N)
    gen = LookaheadGenerator(make_model("llama", 0), make_tokenizer(), LookaheadConfig(), cost_curve=FLAT_CURVE)
    own = gen.empty_trie()
    own.insert(prompt + ref)
    warm = gen.generate(prompt, max_new_tokens=N, trie=own)
    assert warm.token_ids == ref and sum(warm.stats.accepted_lengths) > N // 2
    assert len(gen.trie) == 0  # the generator's trie was neither read nor taught
    assert own.count(ref[:8]) == 2  # the answer was learned into the request's trie
    cold = gen.generate(prompt, max_new_tokens=N)
    assert cold.token_ids == ref and sum(cold.stats.accepted_lengths) < sum(warm.stats.accepted_lengths)
    with pytest.raises(TypeError, match="trie must be a lookahead.store.DraftStore"):
        gen.generate(prompt, max_new_tokens=2, trie={})
