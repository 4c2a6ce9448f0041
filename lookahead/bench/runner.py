"""Run benchmark methods on the same prompts, interleaved case by case, in one process."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..engine import LookaheadGenerator
from ..prompts import case_messages

METHODS = ("vanilla", "pld", "lookahead")
PLD_TOKENS = 10


@dataclass
class CaseResult:
    """One method on one case in one round."""

    round: int
    case_id: str
    task: str
    method: str
    prompt_tokens: int
    new_tokens: int
    seconds: float
    steps: int  # forward passes of the decoder, the prefill included
    token_ids: list[int] = field(repr=False)
    exact: bool | None = None  # token-for-token equal to vanilla (None when vanilla was not run)
    trie_seconds: float = 0.0
    draft_tokens: int = 0

    @property
    def tokens_per_step(self) -> float:
        return self.new_tokens / self.steps if self.steps else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["tokens_per_step"] = self.tokens_per_step
        return data


class PassCounter:
    """Counts forward passes of a module (hook), so every method reports tokens per step the same way."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.count = 0
        self._handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, *_: Any) -> None:
        self.count += 1

    def close(self) -> None:
        self._handle.remove()


def hf_generate(model: PreTrainedModel, prompt_ids: list[int], max_new_tokens: int, eos: Any,
                pld: bool = False) -> list[int]:
    """HF ``generate`` greedy (``pld``: with prompt lookup decoding); returns the new token ids."""
    input_ids = torch.tensor([prompt_ids], device=model.device)
    kwargs: dict[str, Any] = {"prompt_lookup_num_tokens": PLD_TOKENS} if pld else {}
    with torch.inference_mode():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=eos, pad_token_id=eos if isinstance(eos, int) else eos[0],
                             **kwargs)
    return out[0, len(prompt_ids):].tolist()


class BenchRunner:
    """Holds the model, the tokenizer and one lookahead generator (its trie persists across cases and rounds)."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, generator: LookaheadGenerator
                 ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.generator = generator
        eos = model.generation_config.eos_token_id
        self.eos = eos if eos is not None else tokenizer.eos_token_id
        self.counter = PassCounter(model.get_decoder())

    def prompt_ids(self, case: dict[str, Any]) -> list[int]:
        return self.generator.encode(case_messages(case))

    def run_method(self, method: str, case: dict[str, Any], round_index: int) -> CaseResult:
        ids = self.prompt_ids(case)
        limit = case["max_new_tokens"]
        gc.collect()
        self.counter.count = 0
        trie_seconds, drafted = 0.0, 0
        start = time.perf_counter()
        if method == "vanilla":
            tokens = hf_generate(self.model, ids, limit, self.eos)
        elif method == "pld":
            tokens = hf_generate(self.model, ids, limit, self.eos, pld=True)
        elif method == "lookahead":
            result = self.generator.generate(ids, max_new_tokens=limit)
            tokens = result.token_ids
            trie_seconds, drafted = result.stats.time_trie, sum(result.stats.draft_sizes)
        else:
            raise ValueError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")
        seconds = time.perf_counter() - start
        return CaseResult(round=round_index, case_id=case["id"], task=case["task"], method=method,
                          prompt_tokens=len(ids), new_tokens=len(tokens), seconds=seconds, steps=self.counter.count,
                          token_ids=tokens, trie_seconds=trie_seconds, draft_tokens=drafted)

    def warm(self, cases: Sequence[dict[str, Any]], progress: Callable[[str], None] | None = None) -> None:
        """Generate the warm-up cases with lookahead so their outputs land in the global trie (untimed)."""
        for case in cases:
            self.generator.generate(self.prompt_ids(case), max_new_tokens=case["max_new_tokens"])
            if progress:
                progress(case["id"])

    def run(self, cases: Sequence[dict[str, Any]], methods: Sequence[str], rounds: int = 1,
            progress: Callable[[str], None] | None = None) -> list[CaseResult]:
        """Every round runs every case with every method, interleaved case by case."""
        results: list[CaseResult] = []
        for round_index in range(1, rounds + 1):
            for case in cases:
                per_case = [self.run_method(method, case, round_index) for method in methods]
                reference = next((r for r in per_case if r.method == "vanilla"), None)
                for r in per_case:
                    r.exact = None if reference is None else r.token_ids == reference.token_ids
                results.extend(per_case)
                if progress:
                    progress(f"round {round_index} {case['id']}")
        return results

    def close(self) -> None:
        self.counter.close()
