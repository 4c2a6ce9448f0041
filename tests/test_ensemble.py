"""Speculative ensemble on tiny random models: identical to plain ensemble decoding, token for token."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    EOS_ID,
    FLAT_CURVE,
    VOCAB_SIZE,
    make_model,
    make_tokenizer,
    random_prompt,
    save_chat_model,
    seed_trie,
    tiny_config,
)
from transformers import AutoModelForCausalLM

from lookahead.config import LookaheadConfig
from lookahead.ensemble import EnsembleGenerator, EnsembleRule, make_rule, truncated_copy

pytestmark = pytest.mark.usefixtures("single_thread")

N = 24


def members(*specs: tuple[str, int]):
    return [make_model(arch, seed) for arch, seed in specs]


def make_ensemble(models, **kwargs) -> EnsembleGenerator:
    kwargs.setdefault("cost_curve", FLAT_CURVE)
    return EnsembleGenerator(models, make_tokenizer(), **kwargs)


def reference(models, prompt: list[int], n: int, rule: EnsembleRule) -> list[int]:
    """Ensemble decoding with no cache at all: every model re-reads the whole sequence for every token."""
    sequence = list(prompt)
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(n):
            ids = torch.tensor([sequence])
            rows = [m(input_ids=ids).logits[0, -1:] for m in models]  # [1, V] each
            token = int(rule.scores(rows)[0].argmax())
            out.append(token)
            sequence.append(token)
            if token == EOS_ID:
                break
    return out


ENSEMBLES = {
    "weighted-2": (lambda: members(("llama", 0), ("qwen2", 1)), {"mode": "weighted", "weights": [0.7, 0.3]}),
    "weighted-3": (lambda: members(("llama", 0), ("qwen2", 1), ("qwen3", 2)),
                   {"mode": "weighted", "weights": [3.0, 1.0, 2.0]}),
    "contrastive": (lambda: members(("llama", 1), ("qwen2", 0)), {"mode": "contrastive", "mu": 0.1}),
}


@pytest.mark.parametrize("proposer", [None, 1])
@pytest.mark.parametrize("trie_state", ["empty", "warm", "all-wrong"])
@pytest.mark.parametrize("name", sorted(ENSEMBLES))
def test_speculative_equals_plain_ensemble(name, trie_state, proposer):
    build, settings = ENSEMBLES[name]
    models = build()
    prompt = random_prompt(7)
    gen = make_ensemble(models, proposer=proposer, **settings)
    plain = gen.generate_plain(prompt, max_new_tokens=N, eos_token_id=EOS_ID)
    assert plain.token_ids == reference(models, prompt, N, gen.rule)
    assert plain.stats.steps == len(plain.token_ids)  # one pass per model per token (the prefill included)
    if trie_state != "empty":
        seed_trie(gen, plain.token_ids, 3, right=trie_state == "warm")
    result = gen.generate(prompt, max_new_tokens=N, eos_token_id=EOS_ID)
    assert result.token_ids == plain.token_ids
    assert result.text == plain.text and result.finish_reason == plain.finish_reason
    stats = result.stats
    assert stats.steps == 1 + len(stats.accepted_lengths) == 1 + len(stats.draft_sizes)
    if trie_state == "warm":
        assert stats.steps < len(result.token_ids)  # drafts were accepted
        assert any(d > a for d, a in zip(stats.draft_sizes, stats.accepted_lengths))  # and some rejected
    if trie_state == "all-wrong" and proposer is None:  # only the prompt and the output so far can draft right
        unexplained, position = 0, 1
        for accepted in stats.accepted_lengths:
            context = list(prompt) + result.token_ids[:position]
            if accepted and (context[-1], result.token_ids[position]) not in set(zip(context, context[1:])):
                unexplained += accepted  # not a repeat of the text so far: drafted by a wrong copy by chance
            position += accepted + 1
        assert unexplained < len(result.token_ids) // 4


def test_fixed_draft_size_and_longer_run_stay_exact():
    models = members(("llama", 2), ("mistral", 0))
    prompt = random_prompt(11, length=20)
    gen = make_ensemble(models, weights=[1.0, 2.0], config=LookaheadConfig(adaptive=False, decoding_length=12))
    plain = gen.generate_plain(prompt, max_new_tokens=48, eos_token_id=EOS_ID)
    seed_trie(gen, plain.token_ids, 5)
    assert gen.generate(prompt, max_new_tokens=48, eos_token_id=EOS_ID).token_ids == plain.token_ids
    again = gen.generate(prompt, max_new_tokens=48, eos_token_id=EOS_ID)  # the output is now learned globally
    assert again.token_ids == plain.token_ids


@pytest.mark.parametrize("depth", [1, 2, 5])
def test_alternating_proposer_is_exact_and_proposes(depth):
    models = members(("llama", 0), ("llama", 0))  # identical members: the proposer is always right
    gen = make_ensemble(models, weights=[0.5, 0.5], proposer=1, proposal_depth=depth)
    prompt = random_prompt(3)
    plain = gen.generate_plain(prompt, max_new_tokens=N, eos_token_id=EOS_ID)
    result = gen.generate(prompt, max_new_tokens=N, eos_token_id=EOS_ID)
    assert result.token_ids == plain.token_ids
    if depth > 1 and len(plain.token_ids) == N:
        assert result.stats.steps < len(plain.token_ids)  # the proposer's tokens were accepted


def test_swapping_a_symmetric_ensemble_changes_nothing():
    a, b = members(("llama", 0), ("qwen2", 1))
    prompt = random_prompt(21)
    ab = make_ensemble([a, b]).generate(prompt, max_new_tokens=N, eos_token_id=EOS_ID).token_ids
    ba = make_ensemble([b, a]).generate(prompt, max_new_tokens=N, eos_token_id=EOS_ID).token_ids
    assert ab == ba
    weighted = make_ensemble([a, b], weights=[0.8, 0.2]).generate(prompt, max_new_tokens=N, eos_token_id=EOS_ID)
    swapped = make_ensemble([b, a], weights=[0.2, 0.8]).generate(prompt, max_new_tokens=N, eos_token_id=EOS_ID)
    assert weighted.token_ids == swapped.token_ids  # weights follow their models


def test_asymmetric_ensembles_keep_their_roles():
    a, b = members(("llama", 1), ("qwen2", 0))
    prompts = [random_prompt(s) for s in (1, 2, 3)]
    differs = False
    for prompt in prompts:
        ab = make_ensemble([a, b], mode="contrastive", mu=0.5)
        ba = make_ensemble([b, a], mode="contrastive", mu=0.5)
        out_ab = ab.generate(prompt, max_new_tokens=N, eos_token_id=EOS_ID).token_ids
        out_ba = ba.generate(prompt, max_new_tokens=N, eos_token_id=EOS_ID).token_ids
        assert out_ab == reference([a, b], prompt, N, EnsembleRule("contrastive", mu=0.5))  # a is the expert
        assert out_ba == reference([b, a], prompt, N, EnsembleRule("contrastive", mu=0.5))  # b is the expert
        differs |= out_ab != out_ba
    assert differs
    weighted = make_ensemble([a, b], weights=[0.9, 0.1]).generate(prompts[0], max_new_tokens=N, eos_token_id=EOS_ID)
    swapped = make_ensemble([b, a], weights=[0.9, 0.1]).generate(prompts[0], max_new_tokens=N, eos_token_id=EOS_ID)
    assert weighted.token_ids == reference([a, b], prompts[0], N, make_rule(2, "weighted", [0.9, 0.1], 0.1))
    assert swapped.token_ids == reference([b, a], prompts[0], N, make_rule(2, "weighted", [0.9, 0.1], 0.1))


def test_sampling_equals_plain_sampling_with_the_same_seed():
    models = members(("llama", 0), ("qwen2", 1))
    gen = make_ensemble(models, weights=[0.6, 0.4], proposer=1)
    prompt = random_prompt(5)
    kwargs = dict(max_new_tokens=N, eos_token_id=EOS_ID, do_sample=True, temperature=0.7, top_k=20, seed=123)
    plain = gen.generate_plain(prompt, **kwargs)
    seed_trie(gen, plain.token_ids, 1)
    assert gen.generate(prompt, **kwargs).token_ids == plain.token_ids
    other = gen.generate_plain(prompt, **{**kwargs, "seed": 124})
    assert other.token_ids != plain.token_ids  # the seed matters: the draws are random


def test_stop_strings_and_max_new_tokens():
    models = members(("llama", 0), ("qwen2", 1))
    gen = make_ensemble(models)
    prompt = random_prompt(9)
    plain = gen.generate_plain(prompt, max_new_tokens=N, eos_token_id=EOS_ID)
    text = plain.text
    stop = text[len(text) // 2: len(text) // 2 + 2] if len(text) > 4 else None
    seed_trie(gen, plain.token_ids, 2)
    for kwargs in ({"max_new_tokens": 3}, {"max_new_tokens": N, "stop": [stop] if stop else None}):
        expected = gen.generate_plain(prompt, eos_token_id=EOS_ID, **kwargs)
        got = gen.generate(prompt, eos_token_id=EOS_ID, **kwargs)
        assert got.token_ids == expected.token_ids and got.text == expected.text
        assert got.finish_reason == expected.finish_reason
    chunks = list(gen.stream(prompt, max_new_tokens=N, eos_token_id=EOS_ID))
    assert [t for c in chunks for t in c.token_ids] == plain.token_ids
    assert chunks[-1].stats is not None and chunks[-1].finish_reason == plain.finish_reason


def test_truncated_copy_shares_weights_and_equals_a_shallow_model():
    model = make_model("qwen3", 0)
    small = truncated_copy(model, 1)
    assert small.config.num_hidden_layers == 1 and model.config.num_hidden_layers == 2
    assert small.get_decoder().layers[0] is model.get_decoder().layers[0]
    assert small.get_output_embeddings() is model.get_output_embeddings()
    shallow = AutoModelForCausalLM.from_config(tiny_config("qwen3", num_hidden_layers=1), attn_implementation="sdpa")
    shallow.load_state_dict(model.state_dict(), strict=False)
    ids = torch.tensor([random_prompt(4)])
    with torch.inference_mode():
        assert torch.allclose(small(input_ids=ids).logits, shallow.eval()(input_ids=ids).logits, atol=1e-6)
    gen = make_ensemble([model, small], mode="contrastive", proposer=1)  # the cheap amateur proposes
    prompt = random_prompt(8)
    plain = gen.generate_plain(prompt, max_new_tokens=N, eos_token_id=EOS_ID)
    assert gen.generate(prompt, max_new_tokens=N, eos_token_id=EOS_ID).token_ids == plain.token_ids
    with pytest.raises(ValueError, match="num_layers"):
        truncated_copy(model, 3)


def test_mismatched_vocabularies_are_refused():
    torch.manual_seed(0)
    other = AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=VOCAB_SIZE + 7),
                                             attn_implementation="sdpa").eval()
    with pytest.raises(ValueError, match="share one vocabulary"):
        make_ensemble([make_model("llama", 0), other])


@pytest.mark.parametrize("kwargs, match", [
    ({"mode": "product"}, "mode must be one of"),
    ({"weights": [1.0]}, "one entry per model"),
    ({"weights": [1.0, -1.0]}, "positive"),
    ({"mode": "contrastive", "weights": [1.0, 1.0]}, "weights apply"),
    ({"mode": "contrastive", "mu": -1}, "mu must be"),
    ({"proposer": 2}, "proposer must be"),
    ({"proposal_depth": 0}, "proposal_depth"),
])
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_ensemble(members(("llama", 0), ("qwen2", 1)), **kwargs)


def test_contrastive_needs_two_models_and_an_ensemble_at_least_two():
    with pytest.raises(ValueError, match="exactly two"):
        make_ensemble(members(("llama", 0), ("qwen2", 1), ("qwen3", 0)), mode="contrastive")
    with pytest.raises(ValueError, match="at least two"):
        make_ensemble(members(("llama", 0)))


def test_measured_cost_curve_is_cached(tmp_path):
    models = members(("llama", 0), ("qwen2", 1))
    config = LookaheadConfig(decoding_length=3, cost_cache=str(tmp_path))
    gen = EnsembleGenerator(models, make_tokenizer(), config=config)
    curve = gen.measure_cost_curve(prefix_length=16)
    assert curve.sizes == (1, 2, 3, 4) and len(list(tmp_path.iterdir())) == 1
    assert gen.measure_cost_curve(prefix_length=16) == curve  # read back


# ---------------------------------------------------------------------------------------------------- bench


CASES = [
    {"id": "q1", "task": "rag_qa", "question": "what is it", "documents": ["the cat sat on the mat", "a dog"],
     "max_new_tokens": 12},
    {"id": "q2", "task": "rag_qa", "question": "who sat", "documents": ["the cat sat on the mat"],
     "max_new_tokens": 10},
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny qwen2 + tokenizer with a chat template, saved like any local HF model."""
    return save_chat_model(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2", seed=4)


def test_bench_runs_the_ensemble_and_multidraft_methods(tiny_dir):
    from transformers import AutoTokenizer

    from lookahead.bench.report import format_own_baselines, format_table, summarize
    from lookahead.bench.runner import BenchRunner, EnsembleSettings
    from lookahead.engine import LookaheadGenerator

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="sdpa").eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    generator = LookaheadGenerator(model, tokenizer, LookaheadConfig(cost_cache=str(tiny_dir / "cost")),
                                   cost_curve=FLAT_CURVE)
    runner = BenchRunner(model, tokenizer, generator, ensemble=EnsembleSettings(amateur_layers=1, proposer=True), k=3)
    methods = ["vanilla", "ensemble-plain", "ensemble", "multidraft", "superposed", "k-sampling"]
    results = runner.run(CASES, methods, rounds=2)
    runner.close()
    by = {(r.round, r.case_id, r.method): r for r in results}
    for (round_index, case_id, method), r in by.items():
        if method in ("ensemble", "ensemble-plain", "multidraft", "vanilla"):
            assert r.exact is True, (round_index, case_id, method)  # ensemble: vs ensemble-plain; multidraft: vanilla
        else:
            assert r.exact is None
        if method in ("multidraft", "superposed", "k-sampling"):
            assert r.completions == 3 and r.logprob_all <= 0 and r.logprob_best >= r.logprob_all
    assert by[(1, "q1", "ensemble")].token_ids == by[(1, "q1", "ensemble-plain")].token_ids
    assert by[(1, "q1", "multidraft")].token_ids == by[(1, "q1", "vanilla")].token_ids
    rows = summarize(results)
    own = {(r["round"], r["method"]): r for r in rows}
    assert own[(1, "ensemble")]["baseline"] == "ensemble-plain" and own[(1, "ensemble")]["speedup_vs_baseline"] > 0
    assert own[(2, "multidraft")]["baseline"] == "k-sampling" and "logprob_best" in own[(2, "multidraft")]
    table = format_own_baselines(rows)
    assert "vs ensemble-plain" in table and "vs k-sampling" in table and "| 1 | rag_qa | superposed | 3 |" in table
    assert "| 1 | rag_qa | ensemble |" in format_table(rows)
    assert format_own_baselines([r for r in rows if r["method"] == "vanilla"]) == ""


def test_cli_bench_ensemble_methods(tiny_dir, tmp_path, capsys, monkeypatch):
    import json

    from lookahead.cli import main

    monkeypatch.setenv("LOOKAHEAD_CACHE", str(tmp_path / "cache"))
    cases = tmp_path / "cases.jsonl"
    cases.write_text("\n".join(json.dumps(c) for c in CASES) + "\n")
    out = tmp_path / "out.json"
    code = main(["bench", str(cases), "--model", str(tiny_dir), "--methods", "ensemble-plain,ensemble,multidraft",
                 "--amateur-layers", "1", "--ensemble-mode", "weighted", "--decoding-length", "4", "--k", "2",
                 "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "vs ensemble-plain" in printed and "| 1 | rag_qa | multidraft | 2 |" in printed
    data = json.loads(out.read_text())
    assert [r["exact"] for r in data["results"] if r["method"] == "ensemble"] == [True, True]
