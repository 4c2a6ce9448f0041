"""Decoding parameters and the per-node token choice used by greedy and sampled verification.

Sampling uses Hugging Face's own logits processors (repetition penalty, temperature, top-k, top-p) in the order HF
``generate`` applies them, so each emitted token is drawn from exactly the distribution plain HF sampling uses for
the same prefix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. ``None`` fields take the model's generation config value (as HF does).

    Attributes:
        do_sample: draw tokens at random; False (or ``temperature == 0``) is greedy.
        temperature: > 0 when sampling; 0 means greedy.
        top_k: keep the k most likely tokens (0: off).
        top_p: keep the smallest set of tokens whose probability reaches top_p (1.0: off).
        repetition_penalty: HF/CTRL penalty on tokens already in the prompt or output (1.0: off); also applies to
            greedy decoding, as in HF.
        seed: seeds this request's random generator (reproducible sampling); None draws a fresh seed.
    """

    do_sample: bool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.do_sample, bool):
            raise TypeError(f"do_sample must be True or False, got {self.do_sample!r}")
        _check_number("temperature", self.temperature, low=0.0)
        _check_number("top_p", self.top_p, low=0.0, high=1.0, low_open=True)
        _check_number("repetition_penalty", self.repetition_penalty, low=0.0, low_open=True)
        if self.top_k is not None and (not isinstance(self.top_k, int) or isinstance(self.top_k, bool)
                                       or self.top_k < 0):
            raise ValueError(f"top_k must be an integer >= 0 (0 turns it off), got {self.top_k!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be an integer in 0..2**63-1, got {self.seed!r}")

    def resolved(self, generation_config: Any = None) -> SamplingParams:
        """Fill ``None`` fields from an HF generation config (or the neutral values when it has none)."""

        def pick(name: str, neutral: Any) -> Any:
            value = getattr(self, name)
            if value is None:
                value = getattr(generation_config, name, None)
            return neutral if value is None else value

        return SamplingParams(do_sample=self.do_sample, temperature=float(pick("temperature", 1.0)),
                              top_k=int(pick("top_k", 0)), top_p=float(pick("top_p", 1.0)),
                              repetition_penalty=float(pick("repetition_penalty", 1.0)), seed=self.seed)

    @property
    def is_greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0


def _check_number(name: str, value: Any, low: float, high: float | None = None, low_open: bool = False) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < low or (low_open and value == low) or (high is not None and value > high):
        bracket = "(" if low_open else "["
        upper = f"{high}]" if high is not None else "inf)"
        raise ValueError(f"{name} must be in {bracket}{low}, {upper}, got {value!r}")


class TokenChooser:
    """Chooses the next token from one row of logits and the sequence it follows (prompt + output so far).

    Greedy: argmax of the (penalised) logits. Sampling: one draw from softmax of the processed logits with this
    request's own ``torch.Generator``.
    """

    def __init__(self, params: SamplingParams, device: torch.device | str = "cpu") -> None:
        if params.temperature is None:
            raise ValueError("TokenChooser needs resolved SamplingParams (call params.resolved(...))")
        self.params = params
        self.greedy = params.is_greedy
        processors: list[Any] = []
        if params.repetition_penalty not in (None, 1.0):
            processors.append(RepetitionPenaltyLogitsProcessor(penalty=params.repetition_penalty))
        if not self.greedy:
            if params.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k:
                processors.append(TopKLogitsWarper(top_k=params.top_k))
            if params.top_p is not None and params.top_p < 1.0:
                processors.append(TopPLogitsWarper(top_p=params.top_p))
        self.processors = LogitsProcessorList(processors)
        self.needs_history = bool(processors) and params.repetition_penalty not in (None, 1.0)
        self.generator: torch.Generator | None = None
        if not self.greedy:
            self.generator = torch.Generator(device=device)
            if params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(params.seed)

    @property
    def plain_greedy(self) -> bool:
        """True when the choice is the raw argmax (no processor changes it): the fast path applies."""
        return self.greedy and not self.processors

    def process(self, logits: torch.Tensor, history: Sequence[int]) -> torch.Tensor:
        """Processed scores [V] of one row of logits [V] after ``history``."""
        scores = logits.float()[None]  # [1, V]
        if self.processors:
            ids = torch.tensor([list(history)], dtype=torch.long, device=logits.device)  # [1, L]
            scores = self.processors(ids, scores)
        return scores[0]

    def __call__(self, logits: torch.Tensor, history: Sequence[int]) -> int:
        scores = self.process(logits, history)  # [V]
        if self.greedy:
            return int(scores.argmax())
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))
