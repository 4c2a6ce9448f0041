"""Shared fixtures: a tiny offline tokenizer and tiny randomly initialised causal LMs built from configs.

Nothing here downloads anything. The tokenizer is a character-level BPE over printable ASCII plus 196 two-character
merges and an end-of-sequence token (293 tokens), and every model shares its vocabulary, so any token a model emits
decodes to plain ASCII text.
"""

from __future__ import annotations

import functools
import string
from collections.abc import Callable, Iterator, Sequence

import pytest
import torch
from tokenizers import Tokenizer, decoders, models
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from lookahead import reference
from lookahead.budget import CostCurve

EOS_ID = 0
ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral")
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

_CONFIGS = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "mistral": MistralConfig}


def tiny_config(arch: str, **overrides):
    kwargs = dict(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512, eos_token_id=EOS_ID, pad_token_id=EOS_ID,
        bos_token_id=EOS_ID, tie_word_embeddings=False,
    )
    if arch == "mistral":
        kwargs["sliding_window"] = None
    kwargs.update(overrides)
    return _CONFIGS[arch](**kwargs)


@functools.cache
def make_model(arch: str, seed: int = 0) -> PreTrainedModel:
    """A tiny float32 sdpa model with seeded random weights (cached: tests never modify it).

    The seed is mixed with the architecture: llama and mistral build identical modules, and would otherwise get
    identical weights."""
    torch.manual_seed(1000 * ARCHITECTURES.index(arch) + seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), attn_implementation="sdpa", dtype=torch.float32)
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
