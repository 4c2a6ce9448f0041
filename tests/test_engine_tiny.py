"""Exactness of lookahead decoding on tiny randomly initialised models, against Hugging Face greedy ``generate``.

Random models rarely agree with trie drafts on their own, so most tests also seed the trie with the reference
output (and with partly wrong copies of it): drafts are then accepted, branches compete and some are rejected, and
the output must still be identical token for token.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    ARCHITECTURES,
    EOS_ID,
    FLAT_CURVE,
    VOCAB_SIZE,
    hf_greedy,
    make_generator,
    make_model,
    make_tokenizer,
    random_prompt,
    seed_trie,
    tiny_config,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, GPT2Config

from lookahead.budget import CostCurve
from lookahead.config import LookaheadConfig
from lookahead.engine import SUPPORTED_ARCHITECTURES, GenerationResult, LookaheadGenerator, StreamChunk

pytestmark = pytest.mark.usefixtures("single_thread")

N = 32  # new tokens per exactness run
SEEDS = (0, 1, 2)
CONFIGS = {"adaptive": LookaheadConfig(), "fixed": LookaheadConfig(adaptive=False)}


def check_stats(result: GenerationResult, prompt_len: int) -> None:
    stats = result.stats
    assert stats.prompt_tokens == prompt_len
    assert stats.new_tokens == len(result.token_ids)
    assert stats.steps == 1 + len(stats.accepted_lengths) == 1 + len(stats.draft_sizes)
    assert all(0 <= a <= d for a, d in zip(stats.accepted_lengths, stats.draft_sizes))
    produced = 1 + sum(a + 1 for a in stats.accepted_lengths)  # the prefill token, then accepted + bonus per step
    assert produced >= stats.new_tokens
    if stats.accepted_lengths:  # the last step was needed: without it there were too few tokens
        assert produced - (stats.accepted_lengths[-1] + 1) < stats.new_tokens
    assert stats.tokens_per_step == pytest.approx(stats.new_tokens / stats.steps)
    assert 0.0 <= stats.time_prefill <= stats.time_forward <= stats.time_total
    data = stats.to_dict()
    assert data["new_tokens"] == stats.new_tokens and data["tokens_per_step"] == stats.tokens_per_step


def expected_finish(ref: list[int], max_new_tokens: int, eos: int = EOS_ID) -> str:
    return "eos" if ref and ref[-1] == eos else "length"


# ---------------------------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("config_name", sorted(CONFIGS))
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_matches_hf_generate(arch, seed, config_name):
    model = make_model(arch, seed)
    prompt = random_prompt(100 + seed)
    ref = hf_greedy(model, prompt, N)
    assert 0 < len(ref) <= N

    # cold trie: only the prompt and the output so far can draft
    gen = make_generator(arch, seed, CONFIGS[config_name])
    result = gen.generate(prompt, max_new_tokens=N, eos_token_id=EOS_ID)
    assert result.token_ids == ref
    assert result.text == make_tokenizer().decode(ref, skip_special_tokens=True)
    assert result.finish_reason == expected_finish(ref, N)
    check_stats(result, len(prompt))

    # warm trie: the true continuation and wrong ones compete
    gen = make_generator(arch, seed, CONFIGS[config_name])
    seed_trie(gen, ref, seed)
    result = gen.generate(prompt, max_new_tokens=N, eos_token_id=EOS_ID)
    assert result.token_ids == ref
    check_stats(result, len(prompt))
    stats = result.stats
    assert sum(stats.accepted_lengths) > 0
    assert stats.steps < len(ref)  # drafting saved passes
    assert any(d > a for d, a in zip(stats.draft_sizes, stats.accepted_lengths))  # and some drafts were wrong


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_eager_attention_matches_hf_generate(arch):
    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), attn_implementation="eager",
                                             dtype=torch.float32).eval()
    prompt = random_prompt(7)
    ref = hf_greedy(model, prompt, N)
    gen = make_generator(model=model)
    seed_trie(gen, ref, 1)
    result = gen.generate(prompt, max_new_tokens=N, eos_token_id=EOS_ID)
    assert result.token_ids == ref
    assert sum(result.stats.accepted_lengths) > 0


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    prompt=st.lists(st.integers(min_value=1, max_value=VOCAB_SIZE - 1), min_size=1, max_size=40),
    max_new_tokens=st.integers(min_value=1, max_value=24),
    warm=st.booleans(),
    seed=st.integers(min_value=0, max_value=1000),
)
def test_random_prompts_match_hf_generate(prompt, max_new_tokens, warm, seed):
    model = make_model("qwen2", 0)
    ref = hf_greedy(model, prompt, max_new_tokens)
    gen = make_generator("qwen2", 0)
    if warm:
        seed_trie(gen, ref + ref, seed)  # + ref: mutants long enough to branch even for short outputs
    result = gen.generate(prompt, max_new_tokens=max_new_tokens, eos_token_id=EOS_ID)
    assert result.token_ids == ref
    check_stats(result, len(prompt))


def test_output_learned_globally_speeds_up_a_repeat():
    gen = make_generator("llama", 1)
    prompt = random_prompt(11)
    first = gen.generate(prompt, max_new_tokens=N, eos_token_id=EOS_ID)
    second = gen.generate(prompt, max_new_tokens=N, eos_token_id=EOS_ID)
    assert first.token_ids == second.token_ids == hf_greedy(make_model("llama", 1), prompt, N)
    assert sum(second.stats.accepted_lengths) > sum(first.stats.accepted_lengths)
    assert second.stats.steps < first.stats.steps


def test_steep_cost_curve_never_drafts_and_stays_exact():
    gen = make_generator("llama", 2, cost_curve=CostCurve((1, 64), (1.0, 64.0)))
    prompt = random_prompt(12)
    ref = hf_greedy(make_model("llama", 2), prompt, N)
    seed_trie(gen, ref, 0)
    result = gen.generate(prompt, max_new_tokens=N, eos_token_id=EOS_ID)
    assert result.token_ids == ref
    assert set(result.stats.draft_sizes) == {0}
    assert result.stats.steps == len(ref)


def test_measured_cost_curve_is_cached_in_the_configured_directory(tmp_path):
    model = make_model("llama", 0)
    config = LookaheadConfig(decoding_length=8, cost_cache=str(tmp_path))
    gen = LookaheadGenerator(model, make_tokenizer(), config)  # no curve given: measured on first use
    curve = gen.budget.cost
    assert curve.sizes == (1, 2, 3, 4, 6, 8)  # up to decoding_length + 1 tokens
    assert all(s > 0 for s in curve.seconds)
    assert all(a <= b for a, b in zip(curve.seconds, curve.seconds[1:]))
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1
    again = LookaheadGenerator(model, make_tokenizer(), config)
    assert again.budget.cost == curve  # read back from the cache, not re-measured
    prompt = random_prompt(13)
    assert again.generate(prompt, max_new_tokens=12, eos_token_id=EOS_ID).token_ids == hf_greedy(model, prompt, 12)


@pytest.mark.parametrize("max_new_tokens", [1, 2, 3])
@pytest.mark.parametrize("warm", [False, True])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_few_new_tokens(arch, warm, max_new_tokens):
    model = make_model(arch, 1)
    prompt = random_prompt(21)
    ref = hf_greedy(model, prompt, max_new_tokens)
    gen = make_generator(arch, 1)
    if warm:
        seed_trie(gen, hf_greedy(model, prompt, 20), 2)
    result = gen.generate(prompt, max_new_tokens=max_new_tokens, eos_token_id=EOS_ID)
    assert result.token_ids == ref
    assert len(result.token_ids) == max_new_tokens
    assert result.finish_reason == "length"
    check_stats(result, len(prompt))
    assert result.stats.steps <= max_new_tokens


def test_batch_equals_per_prompt_generate():
    model = make_model("mistral", 0)
    prompts = [random_prompt(31), random_prompt(32, length=5), random_prompt(33, length=20)]
    gen = make_generator("mistral", 0)
    results = gen.generate(prompts, max_new_tokens=16, eos_token_id=EOS_ID)
    assert isinstance(results, list) and len(results) == 3
    for prompt, result in zip(prompts, results):
        assert isinstance(result, GenerationResult)
        assert result.token_ids == hf_greedy(model, prompt, 16)
        assert result.stats.prompt_tokens == len(prompt)


def test_batch_of_strings_and_string_prompt():
    tok = make_tokenizer()
    model = make_model("llama", 0)
    texts = ["the cat sat on the mat", "hello there", "a"]
    gen = make_generator("llama", 0)
    results = gen.generate(texts, max_new_tokens=12, eos_token_id=EOS_ID)
    assert len(results) == 3
    for text, result in zip(texts, results):
        ids = tok(text)["input_ids"]
        assert result.token_ids == hf_greedy(model, ids, 12)
        assert result.stats.prompt_tokens == len(ids)
    single = gen.generate(texts[0], max_new_tokens=12, eos_token_id=EOS_ID)
    assert isinstance(single, GenerationResult)
    assert single.token_ids == results[0].token_ids


def test_tensor_prompts():
    model = make_model("llama", 0)
    prompt = random_prompt(41)
    ref = hf_greedy(model, prompt, 10)
    gen = make_generator("llama", 0)
    assert gen.generate(torch.tensor(prompt), max_new_tokens=10, eos_token_id=EOS_ID).token_ids == ref
    assert gen.generate(torch.tensor([prompt]), max_new_tokens=10, eos_token_id=EOS_ID).token_ids == ref


def test_default_eos_comes_from_the_generation_config():
    model = make_model("qwen3", 2)
    prompt = random_prompt(42)
    gen = make_generator("qwen3", 2)
    assert gen.generate(prompt, max_new_tokens=N).token_ids == hf_greedy(model, prompt, N, eos_token_id=EOS_ID)


def test_prompt_near_the_context_limit_is_capped():
    model = make_model("llama", 0)
    prompt = random_prompt(43, length=500)
    gen = make_generator("llama", 0)
    result = gen.generate(prompt, max_new_tokens=40, eos_token_id=EOS_ID)
    assert len(result.token_ids) == 512 - 500
    assert result.token_ids == hf_greedy(model, prompt, 12)
    assert result.finish_reason == "length"


# ---------------------------------------------------------------------------------------------------- eos


def first_new_position(tokens: list[int], start: int) -> int:
    """First index >= start whose token does not occur earlier in ``tokens``."""
    for k in range(start, len(tokens)):
        if tokens[k] not in tokens[:k] and tokens[k] != EOS_ID:
            return k
    raise AssertionError(f"no fresh token after position {start} in {tokens}")


@pytest.mark.parametrize(("arch", "seed", "start"), [("llama", 0, 6), ("qwen2", 1, 6), ("qwen3", 2, 3),
                                                     ("mistral", 1, 5)])
def test_eos_inside_an_accepted_draft(arch, seed, start):
    model = make_model(arch, seed)
    prompt = random_prompt(50 + seed)
    full = hf_greedy(model, prompt, 40)
    assert EOS_ID not in full
    k = first_new_position(full, start)
    assert k <= 10  # within the first draft's reach (branch_length 12), with draft tokens after it
    eos = full[k]
    expected = hf_greedy(model, prompt, 40, eos_token_id=eos)
    assert expected == full[: k + 1]  # HF stops right after the first eos, which it includes

    gen = make_generator(arch, seed)
    gen.trie.insert(full)  # the draft runs past the eos
    drafts = []
    original = gen.trie.draft_ahead  # what the drafter calls each step

    def recording_draft(*args, **kwargs):
        draft, follow = original(*args, **kwargs)
        drafts.append(draft)
        return draft, follow

    gen.trie.draft_ahead = recording_draft
    chunks = list(gen.stream(prompt, max_new_tokens=40, eos_token_id=eos))
    tokens = [t for c in chunks for t in c.token_ids]
    assert tokens == expected
    last = chunks[-1]
    assert last.finish_reason == "eos"
    assert last.token_ids[-1] == eos
    # the eos node had children in a draft, and the model accepted draft tokens past it (which were dropped)
    assert any(
        any(d.parents[j] == i for j in range(len(d.tokens))) for d in drafts for i, t in enumerate(d.tokens) if t == eos
    )
    assert last.accepted + 1 > len(last.token_ids)
    assert last.stats is not None and last.stats.new_tokens == k + 1


def test_several_eos_ids():
    model = make_model("llama", 1)
    prompt = random_prompt(60)
    full = hf_greedy(model, prompt, 30)
    k1, k2 = first_new_position(full, 6), first_new_position(full, 3)
    eos = [full[k1], full[k2]]
    expected = hf_greedy(model, prompt, 30, eos_token_id=eos)
    assert expected == full[: min(k1, k2) + 1]
    gen = make_generator("llama", 1)
    gen.trie.insert(full)
    result = gen.generate(prompt, max_new_tokens=30, eos_token_id=eos)
    assert result.token_ids == expected
    assert result.finish_reason == "eos"


# ---------------------------------------------------------------------------------------------------- stop strings


def pick_stop(prompt_text: str, text: str, end: int, length: int = 3) -> str:
    """The substring of ``text[:end]`` that first occurs latest in prompt + text (so it cuts deep into the output)."""
    whole = prompt_text + text
    best = max((text[i : i + length] for i in range(end - length + 1)), key=whole.find)
    assert whole.find(best) >= len(prompt_text) + 3, (prompt_text, text)
    return best


@pytest.mark.parametrize(("arch", "seed", "warm"), [("llama", 0, False), ("llama", 0, True), ("qwen2", 2, True),
                                                    ("mistral", 1, False)])
def test_stop_strings_match_hf(arch, seed, warm):
    tok = make_tokenizer()
    model = make_model(arch, seed)
    prompt = random_prompt(70 + seed)
    full = hf_greedy(model, prompt, 40)
    text = tok.decode(full, skip_special_tokens=True)
    stop = pick_stop(tok.decode(prompt), text, end=len(tok.decode(full[:-2])))
    cut = text.find(stop)
    expected = hf_greedy(model, prompt, 40, stop_strings=[stop], tokenizer=tok)
    assert len(expected) < len(full)  # HF really stopped early
    assert stop in tok.decode(expected) and stop not in tok.decode(expected[:-1])

    gen = make_generator(arch, seed)
    if warm:
        seed_trie(gen, full, seed)
    result = gen.generate(prompt, max_new_tokens=40, eos_token_id=EOS_ID, stop=["never-there", stop])
    assert result.token_ids == expected
    assert result.finish_reason == "stop"
    assert result.text == text[:cut]
    check_stats(result, len(prompt))

    # streaming gives the same text, never showing any part of the stop string
    chunks = list(make_generator(arch, seed).stream(prompt, max_new_tokens=40, eos_token_id=EOS_ID, stop=[stop]))
    assert "".join(c.text for c in chunks) == text[:cut]
    assert [t for c in chunks for t in c.token_ids] == expected
    assert chunks[-1].finish_reason == "stop"


def test_stop_string_not_hit_runs_to_length():
    gen = make_generator("llama", 0)
    prompt = random_prompt(80)
    ref = hf_greedy(make_model("llama", 0), prompt, 20)
    result = gen.generate(prompt, max_new_tokens=20, eos_token_id=EOS_ID, stop=["\x00never"])
    assert result.token_ids == ref
    assert result.finish_reason == expected_finish(ref, 20)
    assert result.text == make_tokenizer().decode(ref, skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("warm", [False, True])
def test_stream_matches_generate(warm):
    tok = make_tokenizer()
    model = make_model("qwen3", 0)
    prompt = random_prompt(90)
    ref = hf_greedy(model, prompt, N)
    gen = make_generator("qwen3", 0, config=LookaheadConfig(learn_outputs=False))
    if warm:
        seed_trie(gen, ref, 3)
    chunks = list(gen.stream(prompt, max_new_tokens=N, eos_token_id=EOS_ID))
    result = gen.generate(prompt, max_new_tokens=N, eos_token_id=EOS_ID)
    assert all(isinstance(c, StreamChunk) for c in chunks)
    assert [t for c in chunks for t in c.token_ids] == result.token_ids == ref
    assert "".join(c.text for c in chunks) == result.text == tok.decode(ref, skip_special_tokens=True)
    *body, last = chunks
    assert last.finish_reason == result.finish_reason and last.stats is not None
    assert last.stats.new_tokens == len(ref)
    assert all(c.finish_reason is None and c.stats is None for c in body)
    assert chunks[0].token_ids == ref[:1] and chunks[0].accepted == 0  # the prefill's token comes first, alone
    for c in body[1:]:
        assert len(c.token_ids) == c.accepted + 1  # accepted draft tokens plus the bonus token
    assert len(chunks) == last.stats.steps
    if warm:
        assert any(len(c.token_ids) > 1 for c in chunks)


def test_stream_is_lazy_and_can_stop_early():
    gen = make_generator("llama", 0)
    prompt = random_prompt(91)
    stream = gen.stream(prompt, max_new_tokens=N, eos_token_id=EOS_ID)
    first = next(stream)
    assert first.token_ids == hf_greedy(make_model("llama", 0), prompt, 1)
    stream.close()  # abandoning a stream releases its request-local counts
    assert gen.trie.live_requests() == []


# ---------------------------------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def gen() -> LookaheadGenerator:
    return make_generator("llama", 0)


@pytest.mark.parametrize("prompt", ["", "   ", [], torch.tensor([], dtype=torch.long)])
def test_empty_prompt(gen, prompt):
    with pytest.raises(ValueError, match="empty"):
        gen.generate(prompt, max_new_tokens=4)


@pytest.mark.parametrize("max_new_tokens", [0, -1, 1.5, True, None, "3"])
def test_bad_max_new_tokens(gen, max_new_tokens):
    with pytest.raises(ValueError, match="max_new_tokens"):
        gen.generate("hello", max_new_tokens=max_new_tokens)
    with pytest.raises(ValueError, match="max_new_tokens"):
        list(gen.stream("hello", max_new_tokens=max_new_tokens))


@pytest.mark.parametrize("documents", [["ok", 3], "abc", [b"bytes"], 5])
def test_bad_documents(gen, documents):
    with pytest.raises(TypeError, match="documents"):
        gen.generate("hello", max_new_tokens=4, documents=documents)


def test_bad_stop(gen):
    with pytest.raises(TypeError, match="stop"):
        gen.generate("hello", max_new_tokens=4, stop="abc")
    with pytest.raises(TypeError, match="stop"):
        gen.generate("hello", max_new_tokens=4, stop=["a", 1])


@pytest.mark.parametrize("length", [512, 600])
def test_prompt_longer_than_the_context(gen, length):
    with pytest.raises(ValueError, match="context"):
        gen.generate(random_prompt(1, length=length), max_new_tokens=4)


@pytest.mark.parametrize("prompt", [[1, VOCAB_SIZE], [-1, 2]])
def test_token_ids_out_of_range(gen, prompt):
    with pytest.raises(ValueError, match="token ids"):
        gen.generate(prompt, max_new_tokens=4)


@pytest.mark.parametrize("prompt", [3.5, {"role": "user"}, torch.zeros(3), torch.zeros(2, 3, dtype=torch.long)])
def test_bad_prompt_types(gen, prompt):
    with pytest.raises((TypeError, ValueError)):
        gen.generate(prompt, max_new_tokens=4)


def test_chat_messages_without_template(gen):
    with pytest.raises(ValueError, match="chat template"):
        gen.generate([{"role": "user", "content": "hi"}], max_new_tokens=4)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"do_sample": True, "temperature": -1.0}, "temperature"),
    ({"do_sample": True, "top_p": 0.0}, "top_p"),
    ({"do_sample": True, "top_p": 1.5}, "top_p"),
    ({"do_sample": True, "top_k": -3}, "top_k"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"do_sample": "yes"}, "do_sample"),
    ({"do_sample": True, "seed": -1}, "seed"),
    ({"do_sample": True, "temperature": float("nan")}, "temperature"),
])
def test_bad_sampling_parameters(gen, kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        gen.generate("hello", max_new_tokens=4, **kwargs)


def test_errors_leave_no_request_state(gen):
    for bad in ({"max_new_tokens": 0}, {"documents": "x"}, {"temperature": -1.0}):
        with pytest.raises((TypeError, ValueError)):
            gen.generate("hello", **{"max_new_tokens": 4, **bad})
    assert gen.trie.live_requests() == []


def test_unsupported_architecture():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB_SIZE, n_embd=32, n_layer=2, n_head=4, n_positions=128)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    with pytest.raises(ValueError, match="supported: llama, qwen2, qwen3, mistral") as info:
        LookaheadGenerator(model, make_tokenizer(), cost_curve=FLAT_CURVE)
    assert "'gpt2'" in str(info.value)
    assert SUPPORTED_ARCHITECTURES == (
        "llama", "qwen2", "qwen3", "mistral", "mixtral", "phi3", "gemma", "gemma2", "gemma3_text", "olmo2",
        "qwen2_moe", "qwen3_moe", "starcoder2", "smollm3", "granite", "cohere",
    )


def test_not_a_model():
    with pytest.raises(TypeError, match="causal LM"):
        LookaheadGenerator(object(), make_tokenizer())


def test_qwen2_config_with_sliding_window_disabled_is_accepted():
    torch.manual_seed(0)
    config = tiny_config("qwen2", sliding_window=16, use_sliding_window=False)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    prompt = random_prompt(99)
    gen = make_generator(model=model)
    assert gen.generate(prompt, max_new_tokens=8, eos_token_id=EOS_ID).token_ids == hf_greedy(model, prompt, 8)


# ---------------------------------------------------------------------------------------------------- documents


def test_documents_seed_the_request_local_trie_and_are_released():
    tok = make_tokenizer()
    gen = make_generator("llama", 2)
    prompt = random_prompt(95)
    documents = ["zyxw vuts rqpo", "QWERTY~|}{"]
    doc_ids = [tok(d, add_special_tokens=False)["input_ids"] for d in documents]
    seen_local = []
    original = gen.trie.draft_ahead  # what the drafter calls each step

    def recording_draft(context, decoding_length, request_id, *args):
        assert request_id is not None
        seen_local.append([gen.trie.count(ids[:3], request_id=request_id) for ids in doc_ids])
        return original(context, decoding_length, request_id, *args)

    gen.trie.draft_ahead = recording_draft
    result = gen.generate(prompt, max_new_tokens=20, eos_token_id=EOS_ID, documents=documents)
    assert result.token_ids == hf_greedy(make_model("llama", 2), prompt, 20)
    assert seen_local and all(counts == [1.0, 1.0] for counts in seen_local)  # local while the request ran

    # released: no local counts anywhere, document n-grams gone (they were never global)
    assert gen.trie.live_requests() == []
    for ids in doc_ids:
        assert gen.trie.count(ids[:2]) == 0.0
    assert gen.trie.count(prompt[:3]) == 0.0  # the prompt was request-local too
    # the output stays in the global trie
    out = result.token_ids
    assert gen.trie.count(out[:3]) > 0
    assert gen.trie.count(out[-4:]) > 0


def test_documents_draft_what_they_contain():
    """A document holding the model's continuation makes the model accept long drafts from it."""
    tok = make_tokenizer()
    model = make_model("llama", 0)
    prompt = random_prompt(202)
    ref = hf_greedy(model, prompt, N)
    # the longest prefix of the output that the tokenizer gives back from its text: the document's token ids
    k = max(k for k in range(N + 1) if tok(tok.decode(ref[:k]), add_special_tokens=False)["input_ids"] == ref[:k])
    assert k >= 16
    doc = tok.decode(ref[:k])
    gen = make_generator("llama", 0, config=LookaheadConfig(learn_outputs=False))
    cold = gen.generate(prompt, max_new_tokens=N, eos_token_id=EOS_ID)
    warm = gen.generate(prompt, max_new_tokens=N, eos_token_id=EOS_ID, documents=["unrelated text", doc])
    assert cold.token_ids == warm.token_ids == ref
    assert sum(warm.stats.accepted_lengths) >= k - 2
    assert sum(warm.stats.accepted_lengths) > sum(cold.stats.accepted_lengths)
    assert warm.stats.steps < cold.stats.steps
    assert gen.trie.num_nodes() == 0  # learn_outputs=False: nothing outlives the requests


def test_learn_outputs_false_keeps_the_trie_empty():
    gen = make_generator("llama", 0, config=LookaheadConfig(learn_outputs=False))
    result = gen.generate(random_prompt(96), max_new_tokens=16, eos_token_id=EOS_ID)
    assert gen.trie.count(result.token_ids[:2]) == 0.0
    assert gen.trie.num_nodes() == 0


# ---------------------------------------------------------------------------------------------------- stats


@pytest.mark.parametrize("warm", [False, True])
def test_generation_stats_are_consistent(warm):
    model = make_model("mistral", 2)
    prompt = random_prompt(97)
    ref = hf_greedy(model, prompt, N)
    gen = make_generator("mistral", 2, config=LookaheadConfig(decoding_length=8, branch_length=4))
    if warm:
        seed_trie(gen, ref, 4)
    result = gen.generate(prompt, max_new_tokens=N, eos_token_id=EOS_ID)
    assert result.token_ids == ref
    check_stats(result, len(prompt))
    stats = result.stats
    assert all(d <= 8 for d in stats.draft_sizes)
    assert all(a <= 4 for a in stats.accepted_lengths)
    assert stats.tokens_per_second > 0
    if warm:
        assert stats.tokens_per_step > 1.0
        assert stats.steps < len(ref)
