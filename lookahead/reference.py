"""Plain Hugging Face decoding: the one baseline every exactness check compares against.

In float32, greedy output of the lookahead engine must equal :func:`greedy` token for token; seeded sampled output
must equal :func:`sample` with the same seed; batched lookahead must equal :func:`padded_batch` row by row (in half
precision up to the first near-tie, see :mod:`lookahead.agreement`). Nothing here drafts:
every function is ``model.generate`` with the engine's stopping rules (EOS, ``max_new_tokens``, stop strings).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal, overload

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

__all__ = ["greedy", "sample", "padded_batch"]

EosIds = int | Sequence[int] | None


def _default_pad(eos_token_id: EosIds, pad_token_id: int | None) -> int | None:
    """``pad_token_id`` if given, else the (first) EOS id; None when neither is known (HF's own default then)."""
    if pad_token_id is not None or eos_token_id is None:
        return pad_token_id
    if isinstance(eos_token_id, int):
        return eos_token_id
    return eos_token_id[0] if len(eos_token_id) else 0


class _StopText(StoppingCriteria):
    """Stops as soon as the decoded new text (special tokens skipped) contains one of ``stops``."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: Sequence[str], prompt_length: int) -> None:
        self.tokenizer = tokenizer
        self.stops = list(stops)
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        # input_ids: [1, P + T]; one row (the reference decodes one prompt at a time)
        text = self.tokenizer.decode(input_ids[0, self.prompt_length:], skip_special_tokens=True)
        done = any(s in text for s in self.stops)
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)  # [1]


def _generate(model: PreTrainedModel, prompt_ids: Sequence[int], max_new_tokens: int, *, do_sample: bool,
              eos_token_id: EosIds, pad_token_id: int | None, stop: Iterable[str],
              tokenizer: PreTrainedTokenizerBase | None, **generate_kwargs: Any) -> Any:
    """One ``model.generate`` call on one prompt (every position attended); returns what ``generate`` returns."""
    prompt = list(prompt_ids)
    stops = [s for s in stop if s]
    if stops:
        if tokenizer is None:
            raise ValueError("stop strings need the tokenizer (tokenizer=...)")
        generate_kwargs["stopping_criteria"] = StoppingCriteriaList([_StopText(tokenizer, stops, len(prompt))])
    if tokenizer is not None:
        generate_kwargs["tokenizer"] = tokenizer  # HF's own ``stop_strings`` need it too
    if eos_token_id is not None:
        generate_kwargs["eos_token_id"] = eos_token_id
    pad = _default_pad(eos_token_id, pad_token_id)
    if pad is not None:
        generate_kwargs["pad_token_id"] = pad
    input_ids = torch.tensor([prompt], device=model.device)  # [1, P]
    with torch.inference_mode():
        return model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                              do_sample=do_sample, **generate_kwargs)


def greedy(model: PreTrainedModel, prompt_ids: Sequence[int], max_new_tokens: int, *, eos_token_id: EosIds = None,
           pad_token_id: int | None = None, prompt_lookup_num_tokens: int | None = None, stop: Iterable[str] = (),
           tokenizer: PreTrainedTokenizerBase | None = None, **generate_kwargs: Any) -> list[int]:
    """New token ids of HF ``generate(do_sample=False)`` on one prompt.

    Args:
        eos_token_id: one id or several (None: the model's generation config decides).
        pad_token_id: default the (first) EOS id; it never changes one row's output.
        prompt_lookup_num_tokens: HF prompt lookup decoding with this many draft tokens (same output, other speed).
        stop: strings that end decoding as soon as the decoded new text contains one (the tokens up to and
            including the one that completed it are returned, as the engine's token ids are); needs ``tokenizer``.
        tokenizer: decodes for ``stop``; also passed to ``generate`` (HF's ``stop_strings`` need it).
        generate_kwargs: passed to ``generate`` unchanged.
    """
    if prompt_lookup_num_tokens is not None:
        generate_kwargs["prompt_lookup_num_tokens"] = prompt_lookup_num_tokens
    out = _generate(model, prompt_ids, max_new_tokens, do_sample=False, eos_token_id=eos_token_id,
                    pad_token_id=pad_token_id, stop=stop, tokenizer=tokenizer, **generate_kwargs)  # [1, P + T]
    return out[0, len(prompt_ids):].tolist()


@overload
def sample(model: PreTrainedModel, prompt_ids: Sequence[int], max_new_tokens: int, *, seed: int | None,
           eos_token_id: EosIds = ..., pad_token_id: int | None = ..., stop: Iterable[str] = ...,
           tokenizer: PreTrainedTokenizerBase | None = ..., with_logprob: Literal[False] = ...,
           **generate_kwargs: Any) -> list[int]: ...


@overload
def sample(model: PreTrainedModel, prompt_ids: Sequence[int], max_new_tokens: int, *, seed: int | None,
           eos_token_id: EosIds = ..., pad_token_id: int | None = ..., stop: Iterable[str] = ...,
           tokenizer: PreTrainedTokenizerBase | None = ..., with_logprob: Literal[True],
           **generate_kwargs: Any) -> tuple[list[int], float]: ...


def sample(model: PreTrainedModel, prompt_ids: Sequence[int], max_new_tokens: int, *, seed: int | None,
           eos_token_id: EosIds = None, pad_token_id: int | None = None, stop: Iterable[str] = (),
           tokenizer: PreTrainedTokenizerBase | None = None, with_logprob: bool = False,
           **generate_kwargs: Any) -> list[int] | tuple[list[int], float]:
    """New token ids of HF ``generate(do_sample=True)`` after ``torch.manual_seed(seed)``.

    The global torch generator is seeded and left as the draws leave it (wrap the call in
    ``torch.random.fork_rng`` to keep the caller's state); ``seed=None`` draws from it unseeded. Sampling keywords
    (``temperature``, ``top_p``, ``top_k``, ...) go to ``generate`` through ``generate_kwargs``; unset ones take the
    generation config's values. ``eos_token_id``, ``pad_token_id``, ``stop`` and ``tokenizer`` as in :func:`greedy`.

    With ``with_logprob`` returns ``(tokens, logprob)``: the sum of the tokens' log-probabilities under the model
    (the raw logits, at their real prefixes, before any sampling warper).
    """
    if with_logprob:
        generate_kwargs.update(output_logits=True, return_dict_in_generate=True)
    if seed is not None:
        torch.manual_seed(seed)
    out = _generate(model, prompt_ids, max_new_tokens, do_sample=True, eos_token_id=eos_token_id,
                    pad_token_id=pad_token_id, stop=stop, tokenizer=tokenizer, **generate_kwargs)
    if not with_logprob:
        return out[0, len(prompt_ids):].tolist()  # out: [1, P + T]
    tokens = out.sequences[0, len(prompt_ids):]  # [T]
    with torch.inference_mode():
        logp = torch.log_softmax(torch.stack(out.logits)[:, 0].float(), dim=-1)  # [T, V]
        logprob = float(logp.gather(-1, tokens[:, None]).sum())
    return tokens.tolist(), logprob


def padded_batch(model: PreTrainedModel, prompts: Sequence[Sequence[int]], max_new_tokens: Sequence[int], *,
                 batch_size: int, eos_token_id: int | Sequence[int], pad_token_id: int | None = None
                 ) -> list[list[int]]:
    """HF greedy ``generate`` on left-padded batches of ``batch_size`` prompts; one list of new ids per prompt.

    Each batch runs to its largest ``max_new_tokens``; every row is then cut to its own limit and after its first
    EOS (included), so a row reads as if it had been decoded alone with its own limit.

    Args:
        max_new_tokens: one limit per prompt.
        eos_token_id: one id or several (at least one: rows are cut at them).
        pad_token_id: the left padding (default: the first EOS id).
    """
    eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    pad = eos[0] if pad_token_id is None else pad_token_id
    outputs: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        group = [list(p) for p in prompts[start:start + batch_size]]
        limits = max_new_tokens[start:start + batch_size]
        width = max(len(p) for p in group)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in group], device=model.device)  # [b, W]
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group], device=model.device)  # [b, W]
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=max(limits), do_sample=False,
                                 eos_token_id=eos, pad_token_id=pad)  # [b, W + T]
        for row, limit in zip(out[:, width:].tolist(), limits):
            row = row[:limit]
            ends = [i for i, t in enumerate(row) if t in eos]
            outputs.append(row[:ends[0] + 1] if ends else row)
    return outputs
