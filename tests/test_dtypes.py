"""What lossless means per dtype (DESIGN.md section 8), tested in bfloat16 and float16 on CPU.

float32 promises token identity with HF greedy ``generate`` (tests/test_engine_tiny.py, tests/test_exact_default.py).
In half precision a tree pass rounds differently from HF's one-token step, so two logits that tie within rounding
can swap. What must hold there, and is checked here on tiny random Llama and Qwen2 models over many short prompts
(random ones, repetitive ones, and ones whose continuation the trie already knows, so long drafts are verified):

(a) wherever the output differs from HF greedy on the same half-precision model, the prefixes before are equal and
    the difference starts at a near-tie (``lookahead.agreement.classify``);
(b) a teacher-forced pass over prompt + output puts every emitted token within rounding of the largest logit;
(c) the test of the test: an engine with a broken tree mask is caught (hard mismatches, margins out of tolerance);
(d) the agreement rate (prompts whose output is identical to HF's) is printed.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from conftest import EOS_ID, FLAT_CURVE, hf_greedy, make_model, make_tokenizer, random_prompt

from lookahead import agreement
from lookahead.agreement import HARD, IDENTICAL, NEAR_TIE
from lookahead.bench.cases import load_cases
from lookahead.config import LookaheadConfig
from lookahead.engine import LookaheadGenerator
from lookahead.models import load_model
from lookahead.prompts import case_messages

pytestmark = pytest.mark.usefixtures("single_thread")

HALF = {"bfloat16": torch.bfloat16, "float16": torch.float16}
ARCHS = ("llama", "qwen2")
N_PROMPTS = 24
NEW_TOKENS = 24


@functools.cache
def half_model(arch: str, dtype_name: str) -> torch.nn.Module:
    """A half-precision copy of the cached float32 tiny model (the cached one is never modified)."""
    return copy.deepcopy(make_model(arch, 0)).to(HALF[dtype_name]).eval()


def prompts(count: int = N_PROMPTS) -> list[list[int]]:
    """Short prompts: random ones (odd seeds) and ones that repeat a 5-token motif (even seeds)."""
    out = []
    for seed in range(count):
        prompt = random_prompt(seed, 10)
        out.append(prompt if seed % 2 else (prompt[:5] * 4)[:18])
    return out


def new_generator(model: torch.nn.Module) -> LookaheadGenerator:
    return LookaheadGenerator(model, make_tokenizer(), LookaheadConfig(), cost_curve=FLAT_CURVE)


def decode_all(model: torch.nn.Module, broken: bool = False
               ) -> list[tuple[list[int], list[int], list[int], int]]:
    """(prompt, lookahead output, HF greedy output, accepted draft tokens) for every prompt.

    Every third prompt first teaches the trie HF's own continuation, so long drafts are verified in tree passes.
    ``broken``: the engine's tree passes let every node see every other node of the tree (siblings, later nodes).
    """
    generator = new_generator(model)
    runs = []
    for index, prompt in enumerate(prompts()):
        reference = hf_greedy(model, prompt, NEW_TOKENS)
        if index % 3 == 0:
            generator.trie.insert(reference)
        with leaky_tree_mask(model, enabled=broken):
            result = generator.generate(prompt, max_new_tokens=NEW_TOKENS, eos_token_id=EOS_ID)
        runs.append((prompt, result.token_ids, reference, sum(result.stats.accepted_lengths)))
    return runs


@contextmanager
def leaky_tree_mask(model: torch.nn.Module, enabled: bool = True) -> Iterator[None]:
    """Break the engine: in every pass with a 4-D mask (tree passes; HF's own passes get 2-D masks) every node of
    the tree block sees the whole block."""
    if not enabled:
        yield
        return

    def leak(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 4:  # [B, 1, N, C + N] additive
            mask = mask.clone()
            mask[..., -mask.shape[-2]:] = 0
            kwargs["attention_mask"] = mask
        return args, kwargs

    handle = model.get_decoder().register_forward_pre_hook(leak, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def report(capsys, label: str, verdicts: list[agreement.Verdict]) -> None:
    counts = {kind: sum(v.kind == kind for v in verdicts) for kind in (IDENTICAL, NEAR_TIE, HARD)}
    with capsys.disabled():
        print(f"\n[agreement] {label}: {counts[IDENTICAL]}/{len(verdicts)} identical to HF greedy "
              f"({counts[IDENTICAL] / len(verdicts):.0%}), {counts[NEAR_TIE]} near-tie, {counts[HARD]} hard")


# ---------------------------------------------------------------------------------------------------- pure pieces


def test_first_divergence():
    assert agreement.first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert agreement.first_divergence([], []) is None
    assert agreement.first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert agreement.first_divergence([1, 2], [1, 2, 3]) == 2
    assert agreement.first_divergence([1, 2, 3], [1]) == 1
    assert agreement.first_divergence([4], [5, 6]) == 0


def test_first_text_divergence_over_decoded_prefixes():
    tok = make_tokenizer()
    tokens = tok("the cat sat", add_special_tokens=False)["input_ids"]
    decode = functools.partial(tok.decode, skip_special_tokens=True)
    assert agreement.first_text_divergence(decode, tokens, "the cat sat") is None
    position = agreement.first_text_divergence(decode, tokens, "the cot sat")
    assert "the cot sat".startswith(decode(tokens[:position]))
    assert not "the cot sat".startswith(decode(tokens[:position + 1]))
    assert agreement.first_text_divergence(decode, tokens, "the cat sat on") == len(tokens)  # text goes on
    assert agreement.first_text_divergence(decode, tokens, "the") == 1  # text stopped early


def test_rounding_tolerance_scales_with_eps_and_the_largest_logit():
    row = torch.tensor([[1.0, -20.0, 3.0], [0.5, 0.25, 0.0]])
    bf16 = agreement.rounding_tolerance(row, torch.bfloat16)
    assert bf16.tolist() == pytest.approx([agreement.TOLERANCE_EPS * 2 ** -7 * 20, agreement.TOLERANCE_EPS * 2 ** -8])
    assert agreement.rounding_tolerance(row, torch.float16)[0] == pytest.approx(bf16[0] / 8)
    assert agreement.rounding_tolerance(row, torch.float32)[0] < 1e-4


def test_position_logits_are_the_teacher_forced_next_token_logits():
    model = make_model("llama", 0)
    prompt, tokens = random_prompt(3, 6), random_prompt(4, 5)
    rows = agreement.position_logits(model, prompt, tokens)  # [5, V]
    with torch.inference_mode():
        full = model(input_ids=torch.tensor([prompt + tokens]), use_cache=False).logits[0].float()  # [11, V]
    assert rows.shape == (5, model.config.vocab_size)
    torch.testing.assert_close(rows, full[len(prompt) - 1:-1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(agreement.position_logits(model, prompt, tokens, last=2), rows[-2:])


def test_float32_differences_are_always_hard_even_at_a_tie():
    """float32 promises identity: a swap of the top-2 tokens is hard there, however small their gap."""
    model = make_model("llama", 0)
    prompt = random_prompt(5, 10)
    reference = hf_greedy(model, prompt, 8)
    assert agreement.classify(model, prompt, reference, reference).kind == IDENTICAL
    runner_up = int(agreement.position_logits(model, prompt, reference[:4], last=1)[0].topk(2).indices[1])
    verdict = agreement.classify(model, prompt, reference[:3] + [runner_up], reference)
    assert verdict.kind == HARD and verdict.position == 3 and not verdict.ok
    assert verdict.output_token == runner_up and verdict.reference_token == reference[3]
    assert verdict.gap == pytest.approx(verdict.top2_gap)  # the runner-up: its gap is the top-2 gap
    assert agreement.classify(model, prompt, reference[:3], reference).kind == HARD  # stopped early


def test_a_top2_swap_is_a_near_tie_in_half_precision_only_within_the_tolerance():
    model = half_model("llama", "bfloat16")
    prompt = random_prompt(6, 10)
    reference = hf_greedy(model, prompt, 12)
    for position in range(len(reference)):
        row = agreement.position_logits(model, prompt, reference[:position + 1], last=1)[0]
        second = int(row.topk(2).indices[1])
        swapped = reference[:position] + [second]
        verdict = agreement.classify(model, prompt, swapped, reference)
        assert verdict.position == position and verdict.reference_token == reference[position]
        assert verdict.kind == (NEAR_TIE if verdict.gap <= verdict.tolerance else HARD)
        worst = int(row.argmin())  # the least likely token is never a near-tie
        assert agreement.classify(model, prompt, reference[:position] + [worst], reference).kind == HARD


# ---------------------------------------------------------------------------------------------------- the guarantee


@pytest.mark.parametrize("dtype_name", list(HALF))
@pytest.mark.parametrize("arch", ARCHS)
def test_half_precision_output_equals_hf_up_to_the_first_near_tie(arch, dtype_name, capsys):
    model = half_model(arch, dtype_name)
    runs = decode_all(model)
    assert sum(accepted for *_, accepted in runs) > 4 * N_PROMPTS  # drafts were verified in tree passes
    verdicts = []
    for prompt, output, reference, _ in runs:
        verdict = agreement.classify(model, prompt, output, reference)
        verdicts.append(verdict)
        if verdict.kind != IDENTICAL:
            assert output[:verdict.position] == reference[:verdict.position]  # equal up to where they part
            assert verdict.kind == NEAR_TIE, f"{prompt}: {verdict.describe()}"  # (a)
        margin = agreement.worst_margin(model, prompt, output)
        assert margin.within, f"{prompt}: token {margin.position} is {margin.worst:.4g} below the maximum " \
                              f"(tolerance {margin.tolerance:.4g})"  # (b)
    report(capsys, f"{arch} {dtype_name}", verdicts)  # (d)
    assert sum(v.kind == IDENTICAL for v in verdicts) >= N_PROMPTS // 2  # sanity, not a promise


@pytest.mark.parametrize("dtype_name", list(HALF))
@pytest.mark.parametrize("arch", ARCHS)
def test_a_broken_tree_mask_is_caught(arch, dtype_name, capsys):
    """The test of the test: with every node seeing its whole tree, nearly every output differs from HF, the
    classifier calls most of those differences hard, and with the margin check (a later token beyond rounding of the
    maximum) at least 80% are caught (22 of 24 or more here; the healthy engine above has no hard mismatch at all).

    Not all: a tiny random model barely attends (its attention is nearly uniform), so a leaky mask moves its logits
    a little, and in bfloat16 the first token it changes is sometimes one whose top-2 logits really tie."""
    model = half_model(arch, dtype_name)
    runs = decode_all(model, broken=True)
    verdicts = [agreement.classify(model, prompt, output, reference) for prompt, output, reference, _ in runs]
    differing = [(run, v) for run, v in zip(runs, verdicts) if v.kind != IDENTICAL]
    assert len(differing) >= N_PROMPTS // 3
    caught = [verdict.kind == HARD or not agreement.worst_margin(model, prompt, output).within
              for (prompt, output, _, _), verdict in differing]
    assert sum(caught) >= 0.8 * len(differing), f"caught {sum(caught)} of {len(differing)}"
    assert sum(v.kind == HARD for _, v in differing) > len(differing) // 2
    report(capsys, f"{arch} {dtype_name}, broken tree mask", verdicts)


# ---------------------------------------------------------------------------------------------------- default model


@pytest.mark.slow
def test_default_model_bfloat16_mismatches_are_near_ties(capsys):
    """The embedded default model in bfloat16 on 3 RAG cases, cold and then with a warm trie (long drafts)."""
    model, tokenizer = load_model("default", dtype="bfloat16", device="cpu")
    assert model.dtype == torch.bfloat16
    generator = LookaheadGenerator(model, tokenizer)
    eos = model.generation_config.eos_token_id
    cases = load_cases("rag_qa", limit=3)
    references = {}
    verdicts, accepted = [], 0
    for round_index in range(2):
        for case in cases:
            ids = generator.encode(case_messages(case))
            if case["id"] not in references:
                references[case["id"]] = hf_greedy(model, ids, 32, eos_token_id=eos)
            result = generator.generate(ids, max_new_tokens=32)
            output = result.token_ids
            if round_index:
                accepted += sum(result.stats.accepted_lengths)
            verdict = agreement.classify(model, ids, output, references[case["id"]])
            assert verdict.ok, f"{case['id']} round {round_index + 1}: {verdict.describe()}"
            margin = agreement.worst_margin(model, ids, output)
            assert margin.within, f"{case['id']}: token {margin.position} is {margin.worst:.4g} below the maximum"
            verdicts.append(verdict)
    report(capsys, "default model bfloat16, 3 rag_qa cases x 2 rounds", verdicts)
    assert accepted > 0  # the warm trie drafted and the drafts were verified
