"""Run benchmark methods on the same prompts, interleaved case by case, in one process."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .. import reference
from ..agreement import HARD, classify
from ..engine import LookaheadGenerator
from ..ensemble import EnsembleGenerator, truncated_copy
from ..multidraft import MultiDraftGenerator
from ..outputs import GenerationResult
from ..prompts import case_messages
from ..runner import synchronize
from .sources import case_provenance

#: lookahead given the case's ``prediction`` (the expected output, e.g. an edit's original text), with a trie of its
#: own (what plain lookahead learns from a case's output never drafts for it)
PREDICTED = "lookahead-predicted"
#: the same engine with drafting off (``decoding_length=0``): nodraft vs vanilla is the engine's own gain over HF,
#: lookahead vs nodraft is drafting's
NODRAFT = "nodraft"
METHODS = ("vanilla", "pld", NODRAFT, "lookahead", PREDICTED, "ensemble", "ensemble-plain", "multidraft", "superposed",
           "k-sampling")
PLD_TOKENS = 10  # draft tokens of HF prompt lookup decoding (the pld method)
#: the method each one is timed against (its own baseline)
BASELINES = {"pld": "vanilla", NODRAFT: "vanilla", "lookahead": "vanilla", PREDICTED: "vanilla",
             "ensemble": "ensemble-plain", "multidraft": "k-sampling", "superposed": "k-sampling"}
#: the method whose output each one must equal token for token (multidraft: its first completion); superposed and
#: k-sampling have none (not greedy, or sampled)
REFERENCES = {"vanilla": "vanilla", "pld": "vanilla", NODRAFT: "vanilla", "lookahead": "vanilla", PREDICTED: "vanilla",
              "ensemble": "ensemble-plain", "ensemble-plain": "ensemble-plain", "multidraft": "vanilla"}
#: methods whose mismatches can be classified as near-tie or hard: greedy on the model itself, compared with
#: vanilla (an ensemble decodes from combined logits: any mismatch of its own is counted hard)
CLASSIFIED = {"pld", NODRAFT, "lookahead", PREDICTED, "multidraft"}
#: the methods that report provenance (accepted drafts attributed to the case's documents)
TRIE_METHODS = ("lookahead", PREDICTED)
#: the methods of a warm round (the store has learned the earlier rounds; vanilla and nodraft are its baselines)
WARM_METHODS = ("vanilla", NODRAFT, "lookahead")
#: the methods decoded by a lookahead engine (its stats: prefill, host time per step, store time)
ENGINE_METHODS = (NODRAFT, *TRIE_METHODS)


def turns_of(case: dict[str, Any]) -> int:
    """How many turns a case asks: the length of its ``turns`` (a conversation), else 1."""
    return len(case.get("turns") or ()) or 1


def turn_case(case: dict[str, Any], turn: int, answers: Sequence[str]) -> dict[str, Any]:
    """The case of turn ``turn`` (0-based) of a conversation: its chat ``messages``, the user's turns so far each
    followed by ``answers`` (the method's own earlier answers, as Spec-Bench asks the second turn), and ``turn``
    (1-based). A case without ``turns`` is its own single turn, unchanged."""
    if not case.get("turns"):
        return case
    messages: list[dict[str, str]] = []
    for text, answer in zip(case["turns"][:turn], answers):
        messages += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
    messages.append({"role": "user", "content": case["turns"][turn]})
    return {**case, "messages": messages, "turn": turn + 1}


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
    turn: int | None = None  # a conversation's turn (1-based; Spec-Bench); None for a case of one prompt
    exact: bool | None = None  # token-for-token equal to vanilla (None when vanilla was not run)
    mismatch: str | None = None  # when not exact: "near-tie" or "hard" (lookahead.agreement, with the dtype's epsilon)
    verdict: dict[str, Any] | None = field(default=None, repr=False)  # where and by how much (agreement.Verdict)
    trie_seconds: float = 0.0
    draft_tokens: int = 0
    completions: int = 1  # multidraft, superposed, k-sampling: k (new_tokens counts the tokens of all of them)
    logprob_best: float | None = None  # mean log-prob per token of the best completion (by that mean)
    logprob_all: float | None = None  # mean over the completions of their mean log-prob per token
    #: seconds to the first new token (the prompt's pass): the engine's own figure (lookahead, ensemble), the end of
    #: HF generate's first forward (vanilla; pld: that pass also checks its first draft); None when not measured
    prefill_seconds: float | None = None
    host_seconds_per_step: float | None = None  # lookahead: host time outside the model forward per decoding step
    #: lookahead-predicted on a case with a prediction: prediction draft tokens accepted, and verified but not
    #: accepted (OpenAI's accepted/rejected_prediction_tokens); None otherwise
    accepted_prediction_tokens: int | None = None
    rejected_prediction_tokens: int | None = None
    #: lookahead methods on a case with documents (sources.case_provenance): per document its index, the accepted
    #: draft tokens copied from it, their share of new_tokens and spans; None otherwise
    provenance: list[dict[str, Any]] | None = field(default=None, repr=False)
    question_document: int | None = None  # index of the document the question is about (None: unknown)
    top_document: int | None = None  # the document most tokens were copied from (None: none, or a tie)
    top_is_question_document: bool | None = None

    @property
    def tokens_per_step(self) -> float:
        return self.new_tokens / self.steps if self.steps else 0.0

    @property
    def decode_seconds(self) -> float | None:
        """Seconds after the prefill (None when the prefill was not measured)."""
        return None if self.prefill_seconds is None else max(self.seconds - self.prefill_seconds, 0.0)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["tokens_per_step"] = self.tokens_per_step
        data["decode_seconds"] = self.decode_seconds
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


class FirstPassTimer:
    """Seconds from :meth:`arm` to the end of the model's next forward pass: the prefill of HF ``generate`` (a
    forward hook on the model, so the LM head is included; on CUDA it waits for the pass to finish)."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.device = device
        self.seconds: float | None = None
        self._start: float | None = None
        self._handle = model.register_forward_hook(self._hook)

    def arm(self, start: float) -> None:
        """Time the next pass from ``start`` (a ``time.perf_counter()`` reading)."""
        self._start, self.seconds = start, None

    def disarm(self) -> float | None:
        """Stop timing; the seconds measured since :meth:`arm` (None when no pass ran)."""
        self._start = None
        return self.seconds

    def _hook(self, *_: Any) -> None:
        if self._start is not None and self.seconds is None:
            synchronize(self.device)
            self.seconds = time.perf_counter() - self._start

    def close(self) -> None:
        self._handle.remove()


def mean_logprobs(completions: Sequence[tuple[list[int], float]]) -> tuple[float, float]:
    """(best, average) mean log-prob per token over completions given as (tokens, summed log-prob)."""
    means = [lp / len(tokens) for tokens, lp in completions if tokens]
    return max(means), sum(means) / len(means)


@dataclass
class EnsembleSettings:
    """The ``ensemble`` methods' members: the model, then a copy truncated to its first ``amateur_layers``."""

    mode: str = "contrastive"
    amateur_layers: int = 8
    mu: float = 0.1
    weights: tuple[float, ...] | None = None
    proposer: bool = False  # the truncated copy also proposes tokens (alternating scheme)
    proposal_depth: int = 3


class BenchRunner:
    """Holds the model, the tokenizer and one lookahead generator (its trie persists across cases and rounds).

    The ensemble, multi-draft and lookahead-predicted methods get generators of their own (own tries: what one
    method learns never drafts for another), built on the same model when first needed; lookahead-predicted's trie
    starts as a copy of lookahead's (what the warm-up cases taught it).
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, generator: LookaheadGenerator,
                 ensemble: EnsembleSettings | None = None, k: int = 3, seed: int = 0) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.generator = generator
        self.special = generator.inputs.special_ids()  # the EOS and pad ids the engine stops at
        self.counter = PassCounter(model.get_decoder())
        self.first_pass = FirstPassTimer(model, generator.device)
        self.ensemble_settings = ensemble or EnsembleSettings()
        self.k = k
        self.seed = seed
        self._ensemble: EnsembleGenerator | None = None
        self._multidraft: MultiDraftGenerator | None = None
        self._predicted: LookaheadGenerator | None = None
        self._nodraft: LookaheadGenerator | None = None

    @property
    def ensemble(self) -> EnsembleGenerator:
        """The :class:`EnsembleGenerator` of the ensemble methods (its cost curve measured on first use)."""
        if self._ensemble is None:
            s = self.ensemble_settings
            members = [self.model, truncated_copy(self.model, s.amateur_layers)]
            kwargs: dict[str, Any] = {"mu": s.mu} if s.mode == "contrastive" else {"weights": s.weights}
            self._ensemble = EnsembleGenerator(members, self.tokenizer, mode=s.mode, config=self.generator.config,
                                               proposer=1 if s.proposer else None, proposal_depth=s.proposal_depth,
                                               **kwargs)
            self._ensemble.budget  # noqa: B018 - measure (or load) the cost curve before timing anything
        return self._ensemble

    @property
    def multidraft(self) -> MultiDraftGenerator:
        """The :class:`MultiDraftGenerator` of the multi-draft methods (the model's cost curve, its own trie)."""
        if self._multidraft is None:
            own = LookaheadGenerator(self.model, self.tokenizer, self.generator.config,
                                     cost_curve=self.generator.budget.cost)
            self._multidraft = MultiDraftGenerator(generator=own)
        return self._multidraft

    @property
    def predicted(self) -> LookaheadGenerator:
        """The generator of lookahead-predicted: the model's cost curve, a copy of lookahead's trie as it is now."""
        if self._predicted is None:
            trie = self.generator.empty_trie()
            trie.merge(self.generator.trie.export_delta())
            self._predicted = LookaheadGenerator(self.model, self.tokenizer, self.generator.config, trie=trie,
                                                 cost_curve=self.generator.budget.cost)
        return self._predicted

    @property
    def nodraft(self) -> LookaheadGenerator:
        """The generator of ``nodraft``: the same engine and cost curve with drafting off (``decoding_length=0``)
        and a trie of its own that learns nothing."""
        if self._nodraft is None:
            config = self.generator.config.with_updates(decoding_length=0, learn_outputs=False)
            self._nodraft = LookaheadGenerator(self.model, self.tokenizer, config,
                                               cost_curve=self.generator.budget.cost)
        return self._nodraft

    def prompt_ids(self, case: dict[str, Any]) -> list[int]:
        return self.generator.encode(case_messages(case))

    def run_method(self, method: str, case: dict[str, Any], round_index: int) -> CaseResult:
        ids = self.prompt_ids(case)
        limit = case["max_new_tokens"]
        gc.collect()
        self.counter.count = 0
        trie_seconds, drafted = 0.0, 0
        prefill: float | None = None
        host: float | None = None
        start = time.perf_counter()
        if method in ("vanilla", "pld"):
            self.first_pass.arm(start)
            tokens = reference.greedy(self.model, ids, limit, **self.special.generate_kwargs(),
                                      prompt_lookup_num_tokens=PLD_TOKENS if method == "pld" else None)
            prefill = self.first_pass.disarm()
        elif method in ENGINE_METHODS:
            result = self.run_lookahead(method, ids, limit, case.get("prediction"))
            seconds = time.perf_counter() - start
            return self.lookahead_result(method, case, round_index, ids, seconds, result)
        elif method in ("ensemble", "ensemble-plain"):
            run = self.ensemble.generate if method == "ensemble" else self.ensemble.generate_plain
            result = run(ids, max_new_tokens=limit)
            tokens = result.token_ids
            trie_seconds, drafted = result.stats.time_trie, sum(result.stats.draft_sizes)
            prefill = result.stats.time_prefill
        elif method in ("multidraft", "superposed", "k-sampling"):
            if method == "k-sampling":
                outputs = [reference.sample(self.model, ids, limit, seed=self.seed + i,
                                            **self.special.generate_kwargs(),
                                            with_logprob=True) for i in range(self.k)]
            else:
                drafts = self.multidraft.generate(ids, k=self.k, max_new_tokens=limit,
                                                  method="tree" if method == "multidraft" else "superposed")
                outputs = [(c.token_ids, c.logprob) for c in drafts.completions]
            seconds = time.perf_counter() - start
            best, average = mean_logprobs(outputs)
            return CaseResult(round=round_index, case_id=case["id"], task=case["task"], method=method,
                              prompt_tokens=len(ids), new_tokens=sum(len(t) for t, _ in outputs), seconds=seconds,
                              steps=self.counter.count, token_ids=outputs[0][0], turn=case.get("turn"),
                              completions=len(outputs), logprob_best=best, logprob_all=average)
        else:
            raise ValueError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")
        seconds = time.perf_counter() - start
        return CaseResult(round=round_index, case_id=case["id"], task=case["task"], method=method,
                          prompt_tokens=len(ids), new_tokens=len(tokens), seconds=seconds, steps=self.counter.count,
                          token_ids=tokens, turn=case.get("turn"), trie_seconds=trie_seconds, draft_tokens=drafted,
                          prefill_seconds=prefill, host_seconds_per_step=host)

    def run_lookahead(self, method: str, ids: list[int], limit: int, prediction: str | None) -> GenerationResult:
        """One engine method on a prompt: ``lookahead`` never sees the prediction, lookahead-predicted gets it,
        ``nodraft`` drafts nothing."""
        if method == NODRAFT:
            return self.nodraft.generate(ids, max_new_tokens=limit)  # type: ignore[return-value]
        if method == PREDICTED:
            return self.predicted.generate(ids, max_new_tokens=limit, prediction=prediction)  # type: ignore[return-value]
        return self.generator.generate(ids, max_new_tokens=limit)  # type: ignore[return-value]

    def lookahead_result(self, method: str, case: dict[str, Any], round_index: int, ids: list[int], seconds: float,
                         result: GenerationResult) -> CaseResult:
        """The :class:`CaseResult` of a lookahead method: its stats, prediction counts (when the case has a
        prediction and the method used it) and provenance over the case's documents (computed after the clock)."""
        stats = result.stats
        row = CaseResult(round=round_index, case_id=case["id"], task=case["task"], method=method,
                         prompt_tokens=len(ids), new_tokens=len(result.token_ids), seconds=seconds,
                         steps=self.counter.count, token_ids=result.token_ids, turn=case.get("turn"),
                         trie_seconds=stats.time_trie,
                         draft_tokens=sum(stats.draft_sizes), prefill_seconds=stats.time_prefill,
                         host_seconds_per_step=stats.host_seconds_per_step)
        if method == PREDICTED and case.get("prediction") is not None:
            row.accepted_prediction_tokens = stats.accepted_prediction_tokens
            row.rejected_prediction_tokens = stats.rejected_prediction_tokens
        if case["documents"] and method in TRIE_METHODS:
            documents = [self.generator.inputs.encode_document(doc) for doc in case["documents"]]
            for name, value in case_provenance(documents, case, result.token_ids, stats.accepted_lengths).items():
                setattr(row, name, value)
        return row

    def answer_text(self, token_ids: Sequence[int]) -> str:
        """An answer as the next turn of a conversation quotes it: decoded, special tokens dropped, stripped."""
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True).strip()

    def warm(self, cases: Sequence[dict[str, Any]], progress: Callable[[str], None] | None = None) -> None:
        """Generate the warm-up cases (every turn) with lookahead so their outputs land in the global trie
        (untimed)."""
        for case in cases:
            answers: list[str] = []
            for turn in range(turns_of(case)):
                result = self.generator.generate(self.prompt_ids(turn_case(case, turn, answers)),
                                                 max_new_tokens=case["max_new_tokens"])
                answers.append(self.answer_text(result.token_ids))  # type: ignore[union-attr]
            if progress:
                progress(case["id"])

    def run(self, cases: Sequence[dict[str, Any]], methods: Sequence[str], rounds: int = 1,
            progress: Callable[[str], None] | None = None, first_round: int = 1) -> list[CaseResult]:
        """Every round runs every case with every method, interleaved case by case (and turn by turn); rounds are
        numbered from ``first_round``."""
        if any(m.startswith("ensemble") for m in methods):
            self.ensemble  # noqa: B018 - build the ensemble and measure its cost curve before timing
        if "multidraft" in methods or "superposed" in methods:
            self.multidraft  # noqa: B018
        if PREDICTED in methods:
            self.predicted  # noqa: B018 - copy lookahead's trie after the warm-up, before any case runs
        if NODRAFT in methods:
            self.nodraft  # noqa: B018
        results: list[CaseResult] = []
        for round_index in range(first_round, first_round + rounds):
            for case in cases:
                results.extend(self.run_case(case, methods, round_index))
                if progress:
                    progress(f"round {round_index} {case['id']}")
        return results

    def run_case(self, case: dict[str, Any], methods: Sequence[str], round_index: int) -> list[CaseResult]:
        """Every method on every turn of one case, turn by turn: a conversation's later turn follows each method's
        own earlier answers; each turn is checked against its reference's same turn."""
        answers: dict[str, list[str]] = {method: [] for method in methods}
        results: list[CaseResult] = []
        for turn in range(turns_of(case)):
            asked = {method: turn_case(case, turn, answers[method]) for method in methods}
            per_turn = [self.run_method(method, asked[method], round_index) for method in methods]
            self.check_exact(per_turn, asked)
            for r in per_turn:
                answers[r.method].append(self.answer_text(r.token_ids))
            results.extend(per_turn)
        return results

    def check_exact(self, results: Sequence[CaseResult], asked: dict[str, dict[str, Any]]) -> None:
        """Set ``exact`` (and classify a mismatch) of each result against its reference's result in ``results``."""
        by_method = {r.method: r for r in results}
        for r in results:
            reference = by_method.get(REFERENCES.get(r.method, ""))
            r.exact = None if reference is None else r.token_ids == reference.token_ids
            if r.exact is False:
                self.classify(r, reference, asked[r.method])  # type: ignore[arg-type]

    def classify(self, result: CaseResult, reference: CaseResult, case: dict[str, Any]) -> None:
        """Mark a result that differs from its reference as a near-tie or a hard mismatch (docs/architecture.md,
        "What lossless means per dtype"): one teacher-forced pass of the model over the prompt and the reference's
        prefix."""
        if result.method not in CLASSIFIED:
            result.mismatch = HARD
            return
        verdict = classify(self.model, self.prompt_ids(case), result.token_ids, reference.token_ids)
        result.mismatch, result.verdict = verdict.kind, verdict.to_dict()

    def close(self) -> None:
        self.counter.close()
        self.first_pass.close()
