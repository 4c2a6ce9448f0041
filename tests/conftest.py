"""Shared fixtures: a tiny offline tokenizer and tiny randomly initialised causal LMs built from configs.

Nothing here downloads anything. The tokenizer is a character-level BPE over printable ASCII plus 196 two-character
merges and an end-of-sequence token (293 tokens), and every model shares its vocabulary, so any token a model emits
decodes to plain ASCII text.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import random
import string
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, decoders, models
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from lookahead import reference
from lookahead.budget import CostCurve
from lookahead.config import LookaheadConfig
from lookahead.engine import LookaheadGenerator

EOS_ID = 0
ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral")
#: further tiny models, tested by tests/test_architectures.py: name -> (model_type, config overrides, attention).
#: Sliding windows are small (6) so that prompts and outputs outgrow them; head scalings are far from 1, and the
#: soft-capped models get larger weights so that their logits reach the cap.
HYBRID = dict(sliding_window=6, layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=16,
              final_logit_softcapping=3.0, initializer_range=0.2)
MORE_ARCHITECTURES = {
    "gemma": ("gemma", dict(tie_word_embeddings=True), "sdpa"),
    "gemma2": ("gemma2", dict(HYBRID, attn_logit_softcapping=5.0), "eager"),  # transformers' gemma2 has no sdpa
    "gemma3_text": ("gemma3_text", HYBRID, "sdpa"),
    "phi3": ("phi3", {}, "sdpa"),
    "olmo2": ("olmo2", {}, "sdpa"),
    "qwen2_moe": ("qwen2_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                    shared_expert_intermediate_size=64), "sdpa"),
    "qwen3_moe": ("qwen3_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32), "sdpa"),
    "mixtral": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2), "sdpa"),
    "starcoder2": ("starcoder2", {}, "sdpa"),
    "smollm3": ("smollm3", dict(no_rope_layers=[1, 0]), "sdpa"),
    "granite": ("granite", dict(logits_scaling=0.25), "sdpa"),
    "cohere": ("cohere", dict(logit_scale=4.0, tie_word_embeddings=True), "sdpa"),
    "mistral_sliding": ("mistral", dict(sliding_window=6), "sdpa"),  # Mistral-7B-v0.1 style: every layer
    "qwen2_sliding": ("qwen2", dict(sliding_window=6, use_sliding_window=True, max_window_layers=1), "sdpa"),
    "phi3_sliding": ("phi3", dict(sliding_window=6), "sdpa"),
}
#: a pass of 64 tokens costs what a pass of 1 does: drafting always pays, so the budget drafts whatever it has
FLAT_CURVE = CostCurve((1, 64), (1.0, 1.0))

_MERGE_CHARS = "etaoinshrdlcu "


def _tokenizer_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    vocab = {"<eos>": EOS_ID}
    for ch in string.printable:
        if ch not in "\t\r\x0b\x0c":
            vocab[ch] = len(vocab)
    merges = []
    for a in _MERGE_CHARS:
        for b in _MERGE_CHARS:
            vocab[a + b] = len(vocab)
            merges.append((a, b))
    return vocab, merges


@functools.cache
def make_tokenizer() -> PreTrainedTokenizerFast:
    vocab, merges = _tokenizer_vocab()
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.decoder = decoders.Fuse()  # tokens are literal text: decoding concatenates them
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<eos>",
                                   clean_up_tokenization_spaces=False)


VOCAB_SIZE = len(_tokenizer_vocab()[0])

def tiny_config(arch: str, **overrides):
    """The config of a tiny model: ``arch`` is one of ARCHITECTURES, a name in MORE_ARCHITECTURES or a model_type."""
    model_type, variant, _ = MORE_ARCHITECTURES.get(arch, (arch, {}, "sdpa"))
    kwargs = dict(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512, eos_token_id=EOS_ID, pad_token_id=EOS_ID,
        bos_token_id=EOS_ID, tie_word_embeddings=False,
    )
    if arch == "mistral":
        kwargs["sliding_window"] = None
    kwargs.update(variant)
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


@functools.cache
def make_model(arch: str, seed: int = 0) -> PreTrainedModel:
    """A tiny float32 model with seeded random weights (cached: tests never modify it), with sdpa attention unless
    MORE_ARCHITECTURES names another.

    The seed is mixed with the architecture: llama and mistral build identical modules, and would otherwise get
    identical weights."""
    torch.manual_seed(1000 * (ARCHITECTURES + tuple(MORE_ARCHITECTURES)).index(arch) + seed)
    attention = MORE_ARCHITECTURES[arch][2] if arch in MORE_ARCHITECTURES else "sdpa"
    model = AutoModelForCausalLM.from_config(tiny_config(arch), attn_implementation=attention, dtype=torch.float32)
    return model.eval()


def hf_greedy(model: PreTrainedModel, prompt_ids: Sequence[int], max_new_tokens: int,
              eos_token_id: int | Sequence[int] = EOS_ID,
              **kwargs) -> list[int]:
    """New tokens of plain Hugging Face greedy decoding (:func:`lookahead.reference.greedy`): the reference every
    exactness test compares against."""
    return reference.greedy(model, prompt_ids, max_new_tokens, eos_token_id=eos_token_id, pad_token_id=EOS_ID,
                            **kwargs)


def random_prompt(seed: int, length: int = 12) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB_SIZE, (length,), generator=generator).tolist()


def make_generator(arch: str = "llama", seed: int = 0, config: LookaheadConfig | None = None, *,
                   model: PreTrainedModel | None = None, tokenizer: PreTrainedTokenizerFast | None = None,
                   cost_curve: CostCurve = FLAT_CURVE, **knobs) -> LookaheadGenerator:
    """A generator with a trie of its own over a tiny model (``model``, default ``make_model(arch, seed)``) and the
    tiny tokenizer (or ``tokenizer``), with ``config`` (or the :class:`LookaheadConfig` of ``knobs``) and a flat cost
    curve: drafting always pays, so the tiny model drafts whatever the trie offers."""
    if config is None:
        config = LookaheadConfig(**knobs)
    elif knobs:
        config = config.with_updates(**knobs)
    return LookaheadGenerator(model if model is not None else make_model(arch, seed), tokenizer or make_tokenizer(),
                              config, cost_curve=cost_curve)


def other_token(token: int, delta: int = 5) -> int:
    """Another non-EOS token id than ``token`` (``delta`` apart, wrapping around the vocabulary)."""
    return (token - 1 + delta) % (VOCAB_SIZE - 1) + 1


def wrong_copies(ref: Sequence[int], seed: int) -> list[list[int]]:
    """Partly wrong copies of ``ref``: a changed token, a changed tail and a random tail."""
    rng = random.Random(seed)
    changed = list(ref)
    k = len(changed) // 3
    changed[k] = other_token(changed[k], 7)
    cut = 2 * len(ref) // 3
    tail = list(ref[:cut]) + [other_token(t, 3) for t in ref[cut:]]
    random_tail = list(ref[:5]) + [rng.randrange(1, VOCAB_SIZE) for _ in range(len(ref) - 5)]
    return [changed, tail, random_tail]


def seed_trie(owner: Any, ref: Sequence[int], seed: int, right: bool = True) -> None:
    """Seed ``owner.trie`` with the true continuation ``ref`` once and wrong ones twice (so wrong branches often
    rank first): :func:`wrong_copies`, or with ``right=False`` no true one and copies wrong at every token."""
    if right:
        owner.trie.insert(list(ref))
        wrong = wrong_copies(ref, seed)
    else:
        wrong = [[other_token(t, 5 + i) for t in ref] for i in range(3)]
    for copy in wrong:
        owner.trie.insert(copy)
        owner.trie.insert(copy)


@pytest.fixture(scope="session")
def tok() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model() -> Callable[..., PreTrainedModel]:
    """``tiny_model(arch, seed)``: a cached tiny model of one of ARCHITECTURES."""
    return make_model


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    """Run tiny models on one intra-op thread: their matmuls are too small to gain from more, and on a busy 2-core
    machine extra threads only contend (tens of times slower). The previous setting is restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


#: a plain chat template ("role: content" lines, then "assistant: ") for tiny models saved to disk
PLAIN_CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant: "


def save_chat_model(path: Path, arch: str, seed: int) -> Path:
    """Save a tiny ``arch`` model (EOS and padding = ``EOS_ID``) and the test tokenizer with
    :data:`PLAIN_CHAT_TEMPLATE` to ``path``, like any local HF model; returns ``path``."""
    model = make_model(arch, seed=seed)
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.pad_token_id = EOS_ID
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = PLAIN_CHAT_TEMPLATE
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@functools.cache
def load_script(name: str) -> ModuleType:
    """Import ``scripts/<name>.py`` (not a package) as a module, once."""
    path = Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module
