"""Lossless sampling: sample-then-match draws every token from exactly the distribution plain HF sampling uses.

Statistical tests compare the counts of the first three tokens of many lookahead samples with the exact
distribution of those tokens (enumerated with forward passes and HF's own logits processors) by a chi-square
goodness-of-fit test at significance ALPHA: a correct sampler fails it with probability ALPHA for a random seed
(1 in 1000; the seeds below are fixed, so the outcome is deterministic). A deliberately wrong sampler must fail it.
"""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch
from conftest import EOS_ID, hf_greedy, make_generator, random_prompt
from scipy.stats import chisquare

import lookahead.batch
from lookahead import reference
from lookahead.engine import LookaheadGenerator
from lookahead.sampling import SamplingParams, TokenChooser
from lookahead.verify import Acceptance, children_index

pytestmark = pytest.mark.usefixtures("single_thread")

ALPHA = 1e-3
TOKENS = 3  # length of the sequences whose distribution is tested
SAMPLES = 1500

SETTINGS = {
    "temperature+top_k": dict(temperature=0.1, top_k=4),
    "top_p": dict(temperature=0.1, top_p=0.6),
    "repetition_penalty+top_k": dict(temperature=0.15, top_k=5, repetition_penalty=1.8),
}


def step_distribution(model, prefix: list[int], params: SamplingParams) -> dict[int, float]:
    """Exact next-token distribution of plain sampling after ``prefix`` (non-zero entries)."""
    with torch.inference_mode():
        logits = model(torch.tensor([prefix])).logits[0, -1]  # [V]
    chooser = TokenChooser(params)
    probs = torch.softmax(chooser.process(logits, prefix), dim=-1)
    return {int(t): float(probs[t]) for t in torch.nonzero(probs > 0).flatten()}


def sequence_distribution(model, prompt: list[int], params: SamplingParams, length: int) -> dict[tuple, float]:
    """Exact distribution of the first ``length`` sampled tokens (or fewer, ending with EOS), by enumeration."""
    dist: dict[tuple, float] = {(): 1.0}
    for _ in range(length):
        nxt: dict[tuple, float] = {}
        for seq, p in dist.items():
            if seq and seq[-1] == EOS_ID:  # the sequence ended
                nxt[seq] = p
                continue
            for token, q in step_distribution(model, prompt + list(seq), params).items():
                nxt[seq + (token,)] = p * q
        dist = nxt
    return dist


def goodness_of_fit(counts: Counter, dist: dict[tuple, float], samples: int) -> float:
    """Chi-square p-value of observed sequence counts against the exact distribution (sparse bins pooled)."""
    assert set(counts) <= set(dist), f"sampled sequences outside the support: {set(counts) - set(dist)}"
    big = [seq for seq, p in dist.items() if p * samples >= 5]
    observed = [counts[s] for s in big]
    expected = [dist[s] * samples for s in big]
    if len(big) < len(dist):  # pool the sparse sequences into one bin
        observed.append(samples - sum(observed))
        expected.append(max(samples - sum(expected), 0.0))
    total = sum(expected)
    expected = [e * samples / total for e in expected]  # exact totals despite float rounding
    return float(chisquare(observed, expected).pvalue)


def sample_counts(gen: LookaheadGenerator, prompt: list[int], params: dict, samples: int) -> tuple[Counter, float]:
    """Counts of the first TOKENS tokens of ``samples`` lookahead samples, and the mean accepted draft length."""
    prompts = [prompt] * samples
    results = gen.generate(prompts, max_new_tokens=TOKENS, do_sample=True, seed=1234, batch_size=16, **params)
    counts = Counter(tuple(r.token_ids[:TOKENS]) for r in results)
    accepted = [a for r in results for a in r.stats.accepted_lengths]
    return counts, sum(accepted) / max(len(accepted), 1)


def prompt_for(setting: str) -> list[int]:
    prompt = random_prompt(7, 10)
    return prompt + prompt[:4] + prompt  # repeated tokens: the penalty matters, the prompt trie drafts


@pytest.mark.parametrize("setting", SETTINGS)
def test_sampled_sequences_follow_the_plain_sampling_distribution(setting):
    gen = make_generator()
    params = SETTINGS[setting]
    prompt = prompt_for(setting)
    dist = sequence_distribution(gen.model, prompt, SamplingParams(do_sample=True, **params).resolved(), TOKENS)
    counts, mean_accepted = sample_counts(gen, prompt, params, SAMPLES)
    assert mean_accepted > 0.3, "drafts must really be accepted for this test to mean anything"
    assert goodness_of_fit(counts, dist, SAMPLES) > ALPHA


def biased_walk_accept(tokens, parents, choose) -> Acceptance:
    """A WRONG sampler: takes any drafted child whose token the model could sample, without drawing for it."""
    children = children_index(tokens, parents)
    node, path, path_tokens = 0, [], []
    while True:
        kids = [c for (p, _), c in children.items() if p == node]
        if kids and len(path) < 2:
            child = kids[0]
            path.append(child)
            path_tokens.append(int(tokens[child]))
            node = child
            continue
        choice = int(choose(node, path_tokens))
        child = children.get((node, choice))
        if child is None:
            return Acceptance(path=path, tokens=path_tokens + [choice], bonus=choice)
        path.append(child)
        path_tokens.append(int(tokens[child]))
        node = child


def test_the_test_rejects_a_wrong_sampler(monkeypatch):
    gen = make_generator()
    params = SETTINGS["temperature+top_k"]
    prompt = prompt_for("temperature+top_k")
    dist = sequence_distribution(gen.model, prompt, SamplingParams(do_sample=True, **params).resolved(), TOKENS)
    monkeypatch.setattr(lookahead.batch, "walk_accept", biased_walk_accept)
    counts, _ = sample_counts(gen, prompt, params, SAMPLES)
    support = set(dist)
    outside = sum(n for seq, n in counts.items() if seq not in support)
    assert outside > 0 or goodness_of_fit(counts, dist, SAMPLES) < ALPHA


def test_the_test_rejects_a_wrong_temperature():
    gen = make_generator()
    prompt = prompt_for("temperature+top_k")
    dist = sequence_distribution(gen.model, prompt, SamplingParams(do_sample=True, temperature=0.1,
                                                                   top_k=4).resolved(), TOKENS)
    counts, _ = sample_counts(gen, prompt, dict(temperature=0.2, top_k=4), SAMPLES)
    assert goodness_of_fit(counts, dist, SAMPLES) < ALPHA


@pytest.mark.parametrize("params", [dict(temperature=0.7, top_k=20), dict(temperature=1.0, top_p=0.9),
                                    dict(temperature=0.5, repetition_penalty=1.3)])
def test_seeded_sampling_equals_seeded_hf_sampling(params):
    """One random draw per emitted token, from the same processed distribution: the same seed gives HF's tokens."""
    gen = make_generator(seed=3)
    for i in range(3):
        prompt = random_prompt(20 + i, 12)
        prompt = prompt + prompt  # drafts from the prompt
        ref = reference.sample(gen.model, prompt, 24, seed=99 + i, top_k=params.get("top_k", 0),
                               **{k: v for k, v in params.items() if k != "top_k"}, pad_token_id=0, eos_token_id=0)
        result = gen.generate(prompt, max_new_tokens=24, do_sample=True, seed=99 + i, **params)
        assert result.token_ids == ref
        again = gen.generate(prompt, max_new_tokens=24, do_sample=True, seed=99 + i, **params)
        assert again.token_ids == ref  # reproducible with a warm trie too


@pytest.mark.parametrize("kwargs", [dict(do_sample=True, temperature=0.0), dict(do_sample=False, temperature=0.7)])
def test_greedy_settings_stay_token_identical(kwargs):
    gen = make_generator()
    for seed in range(3):
        prompt = random_prompt(seed, 15)
        assert gen.generate(prompt, max_new_tokens=20, **kwargs).token_ids == hf_greedy(gen.model, prompt, 20)


def test_greedy_with_repetition_penalty_equals_hf():
    gen = make_generator()
    for seed in range(3):
        prompt = random_prompt(seed, 15)
        prompt = prompt + prompt
        ref = hf_greedy(gen.model, prompt, 20, repetition_penalty=1.4)
        assert gen.generate(prompt, max_new_tokens=20, repetition_penalty=1.4).token_ids == ref


def test_unset_parameters_come_from_the_generation_config():
    gen = make_generator()
    previous = gen.model.generation_config.top_k
    gen.model.generation_config.top_k = 7
    try:
        request = gen.prepare("abc", sampling=SamplingParams(do_sample=True))
        assert request.sampling.top_k == 7 and request.sampling.temperature == 1.0
        assert gen.prepare("abc", sampling=SamplingParams(do_sample=True, top_k=0)).sampling.top_k == 0
    finally:
        gen.model.generation_config.top_k = previous


def test_unseeded_sampling_varies():
    gen = make_generator()
    prompt = random_prompt(1, 10)
    outputs = {tuple(gen.generate(prompt, max_new_tokens=8, do_sample=True).token_ids) for _ in range(6)}
    assert len(outputs) > 1


def test_sequence_space_is_enumerated_exactly():
    gen = make_generator()
    dist = sequence_distribution(gen.model, random_prompt(3, 8), SamplingParams(do_sample=True, temperature=0.1,
                                                                               top_k=3).resolved(), 2)
    assert len(dist) == 9 and abs(sum(dist.values()) - 1) < 1e-5
    assert all(len(seq) == 2 for seq in itertools.islice(dist, 3))
