"""Batched decoding: every row of a batch equals that request run alone, greedy token for token (and HF greedy)."""

from __future__ import annotations

import pytest
import torch
from conftest import EOS_ID, hf_greedy, make_generator, random_prompt
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lookahead.budget import CostCurve
from lookahead.config import LookaheadConfig
from lookahead.engine import LookaheadGenerator
from lookahead.kvcache import append_rows, cache_length, compact_rows, select_rows
from lookahead.sampling import SamplingParams
from lookahead.tree import batch_inputs, build_tree

pytestmark = pytest.mark.usefixtures("single_thread")


def run_batch(gen: LookaheadGenerator, requests, remove_after: dict[int, int] | None = None) -> dict[int, list[int]]:
    """Decode prepared requests in one batch; ``remove_after[key] = step`` drops that row at that step."""
    batch = gen.new_batch()
    for key, request in enumerate(requests):
        batch.add(request, key)
    tokens: dict[int, list[int]] = {key: [] for key in range(len(requests))}
    step = 0
    while len(batch):
        for key, chunk in batch.step():
            tokens[key].extend(chunk.token_ids)
        step += 1
        for key, at in (remove_after or {}).items():
            if at == step:
                batch.remove(key)
    assert gen.trie.live_requests() == []
    return tokens


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("batch_size", [2, 3, 8])
def test_batched_rows_equal_hf_greedy(arch, batch_size):
    gen = make_generator(arch)
    model = gen.model
    prompts = [random_prompt(seed, 5 + 4 * seed) for seed in range(7)]
    prompts[3] = prompts[0] + prompts[0][:6] + prompts[0]  # repeats: drafts from the prompt get accepted
    refs = [hf_greedy(model, p, 24) for p in prompts]
    for round_ in range(2):  # cold trie, then warm with the first round's outputs
        results = gen.generate(prompts, max_new_tokens=24, batch_size=batch_size)
        assert [r.token_ids for r in results] == refs, f"round {round_}"
    assert max(r.stats.tokens_per_step for r in results) > 2  # the warm round really drafted and accepted


def test_rows_with_their_own_limits_stops_and_eos():
    gen = make_generator("qwen2")
    prompts = [random_prompt(seed, 8 + seed % 5) for seed in range(4, 9)]  # outputs that run to their limit
    solo = [gen.generate(p, max_new_tokens=n) for p, n in zip(prompts, [1, 5, 17, 30, 9])]
    texts = [r.text for r in solo]
    stop_row = 3
    assert len(texts[stop_row]) > 20 and len(solo[2].token_ids) > 6
    stop = texts[stop_row][10:13]  # a stop string inside row 3's output
    eos_row, eos_token = 2, solo[2].token_ids[6]  # treat one of row 2's tokens as its EOS
    requests = [
        gen.prepare(prompts[0], max_new_tokens=1),
        gen.prepare(prompts[1], max_new_tokens=5),
        gen.prepare(prompts[2], max_new_tokens=17, eos_token_id=eos_token),
        gen.prepare(prompts[3], max_new_tokens=30, stop=[stop]),
        gen.prepare(prompts[4], max_new_tokens=9),
    ]
    batch = gen.new_batch()
    for key, request in enumerate(requests):
        batch.add(request, key)
    chunks: dict[int, list] = {key: [] for key in range(5)}
    while len(batch):
        for key, chunk in batch.step():
            chunks[key].append(chunk)
    for key in range(5):
        alone = gen.generate(prompts[key], max_new_tokens=requests[key].max_new_tokens, stop=list(requests[key].stop),
                             eos_token_id=eos_token if key == eos_row else None)
        assert [t for c in chunks[key] for t in c.token_ids] == alone.token_ids
        assert "".join(c.text for c in chunks[key]) == alone.text
        assert chunks[key][-1].finish_reason == alone.finish_reason
    assert chunks[stop_row][-1].finish_reason == "stop"
    assert chunks[eos_row][-1].finish_reason == "eos"
    assert chunks[0][-1].finish_reason == "length" and len(chunks[0]) == 1


def test_rows_join_and_leave_mid_batch():
    gen = make_generator("llama", learn_outputs=False)
    prompts = [random_prompt(50 + seed, 6 + 2 * seed) for seed in range(6)]
    refs = [hf_greedy(gen.model, p, 20) for p in prompts]
    requests = [gen.prepare(p, max_new_tokens=20) for p in prompts[:3]]
    batch = gen.new_batch()
    for key, request in enumerate(requests):
        batch.add(request, key)
    out: dict[int, list[int]] = {key: [] for key in range(6)}
    step = 0
    while len(batch):
        for key, chunk in batch.step():
            out[key].extend(chunk.token_ids)
        step += 1
        if step == 2:
            batch.remove(1)  # a cancelled request leaves early
        if step in (3, 4, 5):  # late arrivals join a running batch
            batch.add(gen.prepare(prompts[step], max_new_tokens=20), step)
    assert out[1] == refs[1][:len(out[1])] and 0 < len(out[1]) < 20
    for key in (0, 2, 3, 4, 5):
        assert out[key] == refs[key], key
    assert gen.trie.live_requests() == []


def test_sampled_rows_in_a_batch_equal_the_same_seeded_request_alone():
    gen = make_generator("llama")
    prompts = [random_prompt(seed, 9) for seed in range(4)]
    params = dict(do_sample=True, temperature=0.3, top_k=8)
    alone = [gen.generate(p, max_new_tokens=16, seed=100 + i, **params).token_ids for i, p in enumerate(prompts)]
    together = gen.generate(prompts, max_new_tokens=16, seed=100, batch_size=4, **params)
    assert [r.token_ids for r in together] == alone
    greedy_row = gen.prepare(prompts[0], max_new_tokens=16)
    sampled_row = gen.prepare(prompts[1], max_new_tokens=16, sampling=SamplingParams(seed=101, **params))
    mixed = run_batch(gen, [greedy_row, sampled_row])
    assert mixed[0] == hf_greedy(gen.model, prompts[0], 16)
    assert mixed[1] == alone[1]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lengths=st.lists(st.integers(1, 30), min_size=1, max_size=5), batch_size=st.integers(1, 5),
       max_new_tokens=st.integers(1, 20), seed=st.integers(0, 1000))
def test_random_batches_equal_hf_greedy(lengths, batch_size, max_new_tokens, seed):
    gen = make_generator("qwen2", seed=1)
    prompts = [random_prompt(seed + i, n) for i, n in enumerate(lengths)]
    results = gen.generate(prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    for prompt, result in zip(prompts, results):
        assert result.token_ids == hf_greedy(gen.model, prompt, max_new_tokens)


def test_bad_batch_size():
    gen = make_generator()
    with pytest.raises(ValueError, match="batch_size"):
        gen.generate(["a b", "c d"], max_new_tokens=2, batch_size=0)


def test_a_key_twice_is_refused():
    gen = make_generator()
    batch = gen.new_batch()
    batch.add(gen.prepare("abc", max_new_tokens=2), "k")
    with pytest.raises(ValueError, match="already"):
        batch.add(gen.prepare("abd", max_new_tokens=2), "k")
    batch.close()
    assert gen.trie.live_requests() == []


# ----------------------------------------------------------------------------- pure pieces


def test_batch_inputs_hide_stale_positions_and_padding():
    trees = [build_tree([5, 6, 7], [-1, 0, 0]), build_tree([9], [-1])]
    inputs = batch_inputs(trees, prefix_lengths=[4, 2], cache_length=4)
    assert inputs.input_ids.tolist() == [[5, 6, 7], [9, 9, 9]]
    assert inputs.position_ids.tolist() == [[4, 5, 5], [2, 2, 2]]
    visible = inputs.attention_mask[:, 0] == 0  # [B, N, C + N]
    assert visible.shape == (2, 3, 7)
    assert visible[0].tolist() == [
        [True] * 4 + [True, False, False],
        [True] * 4 + [True, True, False],
        [True] * 4 + [True, False, True],
    ]
    assert visible[1].tolist() == [
        [True, True, False, False] + [True, False, False],  # stale cache positions 2, 3 are hidden
        [True, True, False, False] + [False, True, False],  # padding sees itself only
        [True, True, False, False] + [False, False, True],
    ]


def _cache(rows: int, length: int, offset: float = 0.0):
    from transformers import DynamicCache

    cache = DynamicCache()
    states = torch.arange(rows * length, dtype=torch.float32).view(rows, 1, length, 1) + offset  # [B, H, L, D]
    cache.update(states, states + 1000, 0)
    return cache


def test_append_rows_of_several_caches_at_once():
    cache = _cache(1, 2)
    append_rows(cache, _cache(1, 3, offset=100), _cache(2, 1, offset=200))
    assert cache.layers[0].keys[:, 0, :, 0].tolist() == [[0, 1, 0], [100, 101, 102], [200, 0, 0], [201, 0, 0]]
    assert cache.layers[0].values[1, 0, 2, 0].item() == 1102


def test_append_select_and_compact_rows():
    cache = _cache(1, 3)
    append_rows(cache, _cache(1, 5, offset=100))
    assert cache_length(cache) == 5
    keys = cache.layers[0].keys[:, 0, :, 0]
    assert keys.tolist() == [[0, 1, 2, 0, 0], [100, 101, 102, 103, 104]]
    # row 0 valid 3, row 1 valid 5; a tree block of 2 positions follows at 5
    block = torch.tensor([[50.0, 51.0], [150.0, 151.0]]).view(2, 1, 2, 1)
    cache.update(block, block + 1000, 0)
    lengths = compact_rows(cache, tree_start=5, lengths=[3, 5], keeps=[[0, 1], [1]])
    assert lengths == [5, 6]
    assert cache.layers[0].keys[:, 0, :, 0].tolist() == [[0, 1, 2, 50, 51, 50], [100, 101, 102, 103, 104, 151]]
    assert cache.layers[0].values[1, 0, 5, 0].item() == 1151
    select_rows(cache, [1], 6)
    assert cache.layers[0].keys[:, 0, :, 0].tolist() == [[100, 101, 102, 103, 104, 151]]


def test_eos_only_prompt_row():
    gen = make_generator()
    results = gen.generate([[EOS_ID, 5, 6], [7, 8, 9, 10]], max_new_tokens=6, batch_size=2)
    assert [r.token_ids for r in results] == [hf_greedy(gen.model, p, 6) for p in ([EOS_ID, 5, 6], [7, 8, 9, 10])]


# ---------------------------------------------------------------------------------------------------- joining


def test_a_long_prompt_joins_a_running_batch_in_slices_and_stays_exact():
    gen = make_generator("llama", prefill_chunk=8, prefill_share=0.5)
    short, long = random_prompt(1, 6), random_prompt(2, 61)
    refs = {0: hf_greedy(gen.model, short, 40), 1: hf_greedy(gen.model, long, 12)}
    batch = gen.new_batch()
    batch.add(gen.prepare(short, max_new_tokens=40), 0)
    tokens: dict[int, list[int]] = {0: [], 1: []}
    steps_of_row0, slices = 0, []
    for step in range(200):
        if step == 2:
            batch.add(gen.prepare(long, max_new_tokens=12), 1)
        joining = [row for row in batch.new if row.key == 1]
        before = joining[0].prefilled if joining else None
        events = batch.step()
        if joining and joining[0].prefilled != before:
            slices.append(joining[0].prefilled - before)
        for key, chunk in events:
            tokens[key].extend(chunk.token_ids)
            steps_of_row0 += key == 0
        if not len(batch):
            break
    assert tokens == refs  # float32: slices of the prefill change nothing
    assert len(slices) >= 2 and sum(slices) == len(long)  # joined over several steps, in slices
    assert gen.trie.live_requests() == []


def _join_slices(gen, prompt, max_new_tokens=12):
    """Decode a short row, let ``prompt`` join it at step 2; returns (tokens per key, the joining row's slices,
    per slice: its estimate against the step's allowance)."""
    short = random_prompt(1, 6)
    batch = gen.new_batch()
    batch.add(gen.prepare(short, max_new_tokens=40), 0)
    tokens: dict[int, list[int]] = {0: [], 1: []}
    slices: list[int] = []
    for step in range(300):
        if step == 2:
            batch.add(gen.prepare(prompt, max_new_tokens=max_new_tokens), 1)
        joining = [row for row in batch.new if row.key == 1]
        before = joining[0].prefilled if joining else None
        for key, chunk in batch.step():
            tokens[key].extend(chunk.token_ids)
        if joining and joining[0].prefilled != before:
            slices.append(joining[0].prefilled - before)
        if not len(batch):
            break
    refs = {0: hf_greedy(gen.model, short, 40), 1: hf_greedy(gen.model, prompt, max_new_tokens)}
    return tokens, refs, slices


def test_a_short_prompt_joins_in_slices_the_cost_model_sizes():
    """Beside a decoding row, even a prompt within ``prefill_chunk`` is prefilled in slices when the cost model says
    the whole of it would cost more than ``join_stall`` steps (a steep curve: each token costs a pass more); a flat
    curve (every size costs one pass) lets it in at once. Exact either way (float32)."""
    prompt = random_prompt(3, 40)
    steep = make_generator("llama", cost_curve=CostCurve((1, 64), (1.0, 64.0)), join_stall=1.0)
    tokens, refs, slices = _join_slices(steep, prompt)
    assert tokens == refs
    assert len(slices) >= 2 and sum(slices) == len(prompt), slices
    flat = make_generator("llama", join_stall=1.0)
    tokens, refs, slices = _join_slices(flat, prompt)
    assert tokens == refs
    assert slices == [len(prompt)]


def test_join_stall_is_checked():
    with pytest.raises(ValueError, match="join_stall must be in"):
        LookaheadConfig(join_stall=0)
    with pytest.raises(ValueError, match="join_stall must be in"):
        LookaheadConfig(join_stall=True)


def test_a_step_that_fails_costs_one_row(monkeypatch):
    """A tree pass that runs out of memory after the cache grew fails the newest row (finish_reason "error") and
    the other goes on exact; a prefill slice that fails fails its row alone."""
    gen = make_generator("llama", prefill_chunk=8)
    prompts = [random_prompt(seed, 7 + seed) for seed in range(3)]
    refs = [hf_greedy(gen.model, p, 20) for p in prompts]
    batch = gen.new_batch()
    for key, prompt in enumerate(prompts[:2]):
        batch.add(gen.prepare(prompt, max_new_tokens=20), key)
    original_pass, original_prefill = gen.runner.tree_pass, gen.runner.prefill
    failures = {"pass": 1, "prefill": 1}

    def failing_pass(cache, trees, layout):
        hidden = original_pass(cache, trees, layout)  # the cache has grown by the trees: then it fails
        if failures["pass"] and len(trees) == 2:
            failures["pass"] -= 1
            raise torch.OutOfMemoryError("injected")
        return hidden

    def failing_prefill(cache, token_ids, start=0):
        hidden = original_prefill(cache, token_ids, start)
        if start > 0 and failures["prefill"]:
            failures["prefill"] -= 1
            raise torch.OutOfMemoryError("injected")
        return hidden

    monkeypatch.setattr(gen.runner, "tree_pass", failing_pass)
    monkeypatch.setattr(gen.runner, "prefill", failing_prefill)
    tokens: dict[int, list[int]] = {0: [], 1: [], 2: []}
    reasons: dict[int, str] = {}
    for step in range(300):
        if step == 3:
            batch.add(gen.prepare(prompts[2] * 3, max_new_tokens=20), 2)  # longer than prefill_chunk: sliced
        for key, chunk in batch.step():
            tokens[key].extend(chunk.token_ids)
            if chunk.finish_reason is not None:
                reasons[key] = chunk.finish_reason
                assert (chunk.error is not None) == (chunk.finish_reason == "error")
        if not len(batch):
            break
    assert failures == {"pass": 0, "prefill": 0}
    assert reasons == {0: "length", 1: "error", 2: "error"}
    assert tokens[0] == refs[0] and tokens[1] == refs[1][:len(tokens[1])] and len(tokens[1]) < 20
