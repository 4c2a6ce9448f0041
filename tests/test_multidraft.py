"""Multi-draft completions on tiny random models: distinct, ranked, exact log-probabilities, greedy where promised."""

from __future__ import annotations

import pytest
import torch
from conftest import EOS_ID, FLAT_CURVE, VOCAB_SIZE, hf_greedy, make_model, make_tokenizer, random_prompt
from test_ensemble import seed_trie

from lookahead.config import LookaheadConfig
from lookahead.engine import LookaheadGenerator
from lookahead.multidraft import MultiDraftGenerator, MultiDraftResult

pytestmark = pytest.mark.usefixtures("single_thread")

N = 20


def make_multidraft(arch: str = "llama", seed: int = 0, config: LookaheadConfig | None = None
                    ) -> MultiDraftGenerator:
    return MultiDraftGenerator(make_model(arch, seed), make_tokenizer(), config=config, cost_curve=FLAT_CURVE)


def model_logprob(model, prompt: list[int], tokens: list[int]) -> float:
    """Sum of log p(token | prompt + previous tokens) from one plain forward pass over the whole sequence."""
    ids = torch.tensor([prompt + tokens])
    with torch.inference_mode():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)  # [L, V]
    rows = torch.arange(len(prompt) - 1, len(prompt) + len(tokens) - 1)
    return float(logp[rows, torch.tensor(tokens)].sum())


def check_result(result: MultiDraftResult, model, prompt: list[int], k: int, max_new_tokens: int) -> None:
    completions = result.completions
    assert len(completions) == k
    assert len({tuple(c.token_ids) for c in completions}) == k  # distinct
    ranked = completions[1:] if result.method == "tree" else completions
    scores = [c.logprob for c in ranked]
    assert scores == sorted(scores, reverse=True)
    tokenizer = make_tokenizer()
    for c in completions:
        assert 0 < len(c.token_ids) <= max_new_tokens
        assert c.logprob == pytest.approx(model_logprob(model, prompt, c.token_ids), abs=1e-4)
        assert c.mean_logprob == pytest.approx(c.logprob / len(c.token_ids))
        assert c.text == tokenizer.decode(c.token_ids, skip_special_tokens=True)
        assert c.finish_reason == ("eos" if c.token_ids[-1] == EOS_ID else "length")
        assert EOS_ID not in c.token_ids[:-1]


@pytest.mark.parametrize("warm", [False, True])
@pytest.mark.parametrize("arch, seed", [("llama", 0), ("qwen2", 1), ("qwen3", 2)])
def test_tree_completions(arch, seed, warm):
    model = make_model(arch, seed)
    prompt = random_prompt(40 + seed)
    ref = hf_greedy(model, prompt, N)
    gen = make_multidraft(arch, seed)
    if warm:
        seed_trie(gen.generator, ref + ref, seed)  # right and partly wrong continuations: branches to choose from
    result = gen.generate(prompt, k=3, max_new_tokens=N, eos_token_id=EOS_ID)
    assert result.completions[0].token_ids == ref  # the first completion is the greedy output
    check_result(result, model, prompt, 3, N)
    stats = result.stats
    assert stats.passes == 1 + len(stats.pass_tokens)
    # every pass extends every live completion: three completions for at most the passes of one plain greedy run
    assert stats.passes <= 1 + max(len(c.token_ids) for c in result.completions)


def test_tree_k1_is_greedy_and_k5_stays_distinct():
    model = make_model("llama", 1)
    prompt = random_prompt(77)
    ref = hf_greedy(model, prompt, N)
    gen = make_multidraft("llama", 1)
    only = gen.generate(prompt, k=1, max_new_tokens=N, eos_token_id=EOS_ID)
    assert [c.token_ids for c in only.completions] == [ref]
    result = gen.generate(prompt, k=5, max_new_tokens=N, eos_token_id=EOS_ID)  # the trie now knows the output
    assert result.completions[0].token_ids == ref
    check_result(result, model, prompt, 5, N)


def test_tree_wraps_an_existing_generator_and_learns_the_greedy_output():
    generator = LookaheadGenerator(make_model("qwen2", 0), make_tokenizer(), cost_curve=FLAT_CURVE)
    gen = MultiDraftGenerator(generator=generator)
    prompt = random_prompt(5)
    result = gen.generate(prompt, k=3, max_new_tokens=N, eos_token_id=EOS_ID)
    assert gen.trie is generator.trie and gen.trie.num_nodes() > 0
    again = generator.generate(prompt, max_new_tokens=N, eos_token_id=EOS_ID)
    assert again.token_ids == result.completions[0].token_ids
    assert again.stats.steps < len(again.token_ids)  # drafted from the learned greedy completion


@pytest.mark.parametrize("arch, seed", [("llama", 0), ("qwen2", 1)])
def test_superposed_k1_alpha0_is_greedy(arch, seed):
    model = make_model(arch, seed)
    prompt = random_prompt(60 + seed)
    ref = hf_greedy(model, prompt, N)
    for horizon in (1, 4, 50):
        result = make_multidraft(arch, seed).generate(prompt, k=1, method="superposed", alpha=0.0,
                                                      horizon=horizon, max_new_tokens=N, eos_token_id=EOS_ID)
        assert [c.token_ids for c in result.completions] == [ref]
        check_result(result, model, prompt, 1, N)


@pytest.mark.parametrize("alpha", [0.0, 0.54])
@pytest.mark.parametrize("arch, seed", [("llama", 0), ("mistral", 1)])
def test_superposed_completions(arch, seed, alpha):
    model = make_model(arch, seed)
    prompt = random_prompt(80 + seed, length=16)
    gen = make_multidraft(arch, seed)
    ref = hf_greedy(model, prompt, N)
    seed_trie(gen.generator, ref + ref, seed)  # the n-gram model has something to say
    result = gen.generate(prompt, k=3, method="superposed", alpha=alpha, horizon=6, max_new_tokens=N,
                          eos_token_id=EOS_ID)
    check_result(result, model, prompt, 3, N)
    longest = max(len(c.token_ids) for c in result.completions)
    passes = result.stats.passes
    assert passes <= 1 + longest + -(-longest // 6)  # one pass per token plus one reset per horizon


def test_superposed_ngram_prior_pulls_towards_the_trie():
    model = make_model("qwen3", 0)
    prompt = random_prompt(3, length=8)
    gen = make_multidraft("qwen3", 0)
    target = [(t * 7) % (VOCAB_SIZE - 1) + 1 for t in range(1, N + 1)]
    gen.trie.insert(prompt + target)  # a continuation the model itself would not choose
    plain = gen.generate(prompt, k=1, method="superposed", alpha=0.0, max_new_tokens=N, eos_token_id=EOS_ID)
    pulled = gen.generate(prompt, k=1, method="superposed", alpha=0.99, max_new_tokens=N, eos_token_id=EOS_ID,
                          expansion=VOCAB_SIZE)  # every token is a candidate: the n-gram prior decides
    assert pulled.completions[0].token_ids == target
    assert plain.completions[0].token_ids != target
    check_result(pulled, model, prompt, 1, N)


def test_stop_strings_cut_every_completion():
    gen = make_multidraft("llama", 0)
    prompt = random_prompt(9)
    free = gen.generate(prompt, k=3, max_new_tokens=N, eos_token_id=EOS_ID)
    text = free.completions[0].text
    stop = text[N // 2: N // 2 + 2]
    for method in ("tree", "superposed"):
        result = gen.generate(prompt, k=3, method=method, max_new_tokens=N, eos_token_id=EOS_ID, stop=[stop])
        for c in result.completions:
            assert stop not in c.text
            assert c.finish_reason in ("stop", "eos", "length")
        if method == "tree":
            assert result.completions[0].finish_reason == "stop"
            assert result.completions[0].text == text[: text.index(stop)]


@pytest.mark.parametrize("kwargs, match", [
    ({"k": 0}, "k must be"),
    ({"method": "beam"}, "method must be"),
    ({"alpha": 1.5}, "alpha must be"),
    ({"horizon": 0}, "horizon must be"),
    ({"max_new_tokens": 0}, "max_new_tokens must be"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_multidraft().generate(random_prompt(1), **kwargs)


def test_needs_a_model_or_a_generator():
    with pytest.raises(TypeError, match="model and its tokenizer"):
        MultiDraftGenerator()
    with pytest.raises(TypeError, match="LookaheadGenerator"):
        MultiDraftGenerator(generator=object())


# ---------------------------------------------------------------------------------------------------- LangChain n

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant> {% endif %}")


def test_langchain_llm_and_chat_return_n_completions():
    import copy

    from langchain_core.messages import HumanMessage
    from langchain_lookahead import ChatLookahead, LookaheadLLM

    generator = LookaheadGenerator(make_model("llama", 0), make_tokenizer(), cost_curve=FLAT_CURVE)
    llm = LookaheadLLM(generator=generator, chat_template=False, max_new_tokens=16)
    prompt = "the cat sat on the mat; "
    single = llm.invoke(prompt)
    result = llm.generate([prompt, "a dog ran; "], n=3)
    assert [len(g) for g in result.generations] == [3, 3]
    texts = [g.text for g in result.generations[0]]
    assert texts[0] == single and len(set(texts)) == 3  # the greedy text first, all distinct
    info = result.generations[0][1].generation_info
    assert info["logprob"] <= 0 and info["finish_reason"] in ("eos", "length", "stop")
    assert LookaheadLLM(generator=generator, chat_template=False, max_new_tokens=16, n=2).generate(
        [prompt]).generations[0][0].text == single
    with pytest.raises(ValueError, match="n > 1"):
        list(llm.stream(prompt, n=2))
    with pytest.raises(ValueError, match="use_lookahead"):
        LookaheadLLM(generator=generator, use_lookahead=False).generate([prompt], n=2)

    tokenizer = copy.deepcopy(make_tokenizer())
    tokenizer.chat_template = CHAT_TEMPLATE
    chat_generator = LookaheadGenerator(make_model("llama", 0), tokenizer, cost_curve=FLAT_CURVE)
    chat = ChatLookahead(generator=chat_generator, max_tokens=16)
    reply = chat.invoke([HumanMessage("hello there")])
    replies = chat.generate([[HumanMessage("hello there")]], n=3).generations[0]
    assert len(replies) == 3 and replies[0].message.content == reply.content
    assert len({r.message.content for r in replies}) == 3
    assert replies[2].message.usage_metadata["output_tokens"] >= 1
