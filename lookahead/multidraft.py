"""Several distinct completions of one prompt for little more than the cost of one (autocomplete suggestions).

Two methods, both on one DynamicCache: the prompt, then a block holding the tree of every completion's tokens (node
0 is the last prompt token), so each completion sees the prompt and its own tokens only.

- ``tree``: completion 0 is lookahead's greedy output (the trie drafts, one tree-masked pass verifies them). The
  verified tree holds alternatives for free: at every node of the greedy path the model's top-k tokens, and the
  draft branches that carry them with the part of those branches the model verified too. The ``k - 1``
  alternatives that lose the least log-probability where they leave the greedy path are kept; they continue
  greedily, drafted from the trie, in the same tree-masked pass as completion 0 each step.
- ``superposed`` (Superposed Decoding, arXiv 2405.18400): every step feeds one input, the embedding sum
  ``sum_i gamma_i E[x_i]`` of the k completions' last tokens (through the model's own input embeddings), and
  scores each completion's top-3k continuations by ``p_model^(1-alpha) * p_ngram^alpha`` with the trie as the
  n-gram model; the best k continue. After ``horizon`` tokens a reset runs the new tokens of all completions in
  one tree-masked pass: exact caches, exact log-probabilities and exact next-token distributions again.

Every completion reports the sum of its tokens' log-probabilities under the model at their real prefixes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .budget import CostCurve
from .config import LookaheadConfig
from .drafter import Drafter, DraftSource, Proposal
from .emitter import Emitter
from .engine import LookaheadGenerator
from .inputs import RequestOptions, check_positive_int
from .kvcache import compact_cache
from .outputs import Prompt
from .runner import ModelRunner
from .verify import greedy_accept

METHODS = ("tree", "superposed")


@dataclass
class Completion:
    """One completion: its text (stop string and what follows removed), token ids and model log-probability."""

    text: str
    token_ids: list[int]
    logprob: float  # sum over tokens of log p(token | prompt + previous tokens) under the model
    finish_reason: str  # "eos", "stop" or "length"

    @property
    def mean_logprob(self) -> float:
        return self.logprob / len(self.token_ids) if self.token_ids else 0.0


@dataclass
class MultiDraftStats:
    prompt_tokens: int = 0
    passes: int = 0  # forward passes of the model, the prefill included
    pass_tokens: list[int] = field(default_factory=list)  # nodes run per pass after the prefill
    time_total: float = 0.0

    def to_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "passes": self.passes, "pass_tokens": list(self.pass_tokens),
                "time_total": self.time_total}


@dataclass
class MultiDraftResult:
    """``completions`` are distinct. Method ``tree``: completion 0 is the greedy output, the others follow by
    log-probability, best first. Method ``superposed``: all by log-probability, best first."""

    completions: list[Completion]
    method: str
    stats: MultiDraftStats


# ---------------------------------------------------------------------------------------------------- the block


class _Block:
    """The cache after the prompt: ``prefix`` positions, then block nodes in cache order (node 0 = the last prompt
    token, cached by the prefill). Superposed nodes carry token 0: their input is an embedding."""

    def __init__(self, runner: ModelRunner, prompt_ids: list[int]) -> None:
        self.runner = runner
        self.cache = runner.new_cache()
        self.first_row = runner.logits(runner.prefill(self.cache, prompt_ids))[0]  # [V]
        self.prefix = len(prompt_ids) - 1
        self.tokens = [prompt_ids[-1]]
        self.parents = [-1]

    def extend(self, tokens: Sequence[int], parents: Sequence[int], inputs_embeds: torch.Tensor | None = None
               ) -> torch.Tensor:
        """Append and run new nodes (parents index the block, new nodes included); returns their logits [m, V]."""
        start = len(self.tokens)
        self.tokens.extend(tokens)
        self.parents.extend(parents)
        hidden = self.runner.run_nodes(self.cache, self.prefix, self.tokens, self.parents, start, inputs_embeds)
        return self.runner.logits(hidden)  # [m, V]

    def path(self, node: int) -> list[int]:
        """Block nodes from node 0 (excluded) down to ``node``."""
        out = []
        while node > 0:
            out.append(node)
            node = self.parents[node]
        return out[::-1]

    def compact(self, tips: Sequence[int]) -> dict[int, int]:
        """Keep node 0 and every ancestor of ``tips``; returns old -> new node index."""
        keep = {0}
        for tip in tips:
            keep.update(self.path(tip))
        order = sorted(keep)
        compact_cache(self.cache, self.prefix, order)
        remap = {old: new for new, old in enumerate(order)}
        self.tokens = [self.tokens[i] for i in order]
        self.parents = [-1] + [remap[self.parents[i]] for i in order[1:]]
        return remap


def _log_softmax(rows: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(rows.float(), dim=-1)  # [n, V]


# ---------------------------------------------------------------------------------------------------- tree method


@dataclass
class _Beam:
    """A completion being extended: its tokens (``emitter.generated``; the last one is pending, not in the cache
    yet), their log-probabilities, the block node of the token before the pending one (``tip``) and, for an
    alternative, the log-probability it lost where it left the greedy path."""

    emitter: Emitter
    logprobs: list[float]
    tip: int
    loss: float = 0.0
    last_accepted: int = 0

    @property
    def done(self) -> bool:
        return self.emitter.finish is not None

    def push(self, tokens: Sequence[int], logprobs: Sequence[float]) -> None:
        kept, _ = self.emitter.push(tokens)
        self.logprobs.extend(logprobs[: len(kept)])


@dataclass(frozen=True)
class _Candidate:
    """An alternative found in the verified tree: the greedy completion as it was before this step (``before``,
    ``base_logprobs``), then ``tokens``; ``tip`` is the block node of its last cached token."""

    loss: float
    before: Emitter
    base_logprobs: tuple[float, ...]
    tokens: tuple[int, ...]
    logprobs: tuple[float, ...]
    tip: int

    def beam(self) -> _Beam:
        beam = _Beam(self.before.fork(), list(self.base_logprobs), self.tip, self.loss)
        beam.push(self.tokens, self.logprobs)
        return beam


def _branches(logp: torch.Tensor, choice: list[int], row0: int, plan: Proposal, visited: list[int], k: int
              ) -> list[tuple[float, int, int, list[int]]]:
    """Alternatives at the visited nodes of one verified beam tree: ``(loss, node, token, continuation)``.

    At each visited (local) node the model's top-k tokens other than its choice are alternatives; when a draft
    child carries one, the part of its subtree the model verified (greedy inside it) follows for free.
    """
    children = {(p, t): i for i, (p, t) in enumerate(zip(plan.parents, plan.tokens)) if i}
    out = []
    for node in visited:
        row = logp[row0 + node]  # [V]
        best = choice[row0 + node]
        for token in row.topk(k).indices.tolist():
            if token == best:
                continue
            continuation: list[int] = []
            child = children.get((node, token))
            while child is not None:  # verified greedy continuation inside the draft branch
                continuation.append(child)
                child = children.get((child, choice[row0 + child]))
            out.append((float(row[best] - row[token]), node, token, continuation))
    return out


class MultiDraftGenerator:
    """k distinct completions of a prompt, ranked by model log-probability (see the module docstring).

    Wraps a :class:`LookaheadGenerator` (its model, trie, draft budget and prompt encoding), or builds one.
    """

    def __init__(self, model: PreTrainedModel | None = None, tokenizer: PreTrainedTokenizerBase | None = None,
                 config: LookaheadConfig | None = None, trie: DraftSource | None = None,
                 cost_curve: CostCurve | None = None, generator: LookaheadGenerator | None = None) -> None:
        if generator is None:
            if model is None or tokenizer is None:
                raise TypeError("pass a model and its tokenizer, or generator=LookaheadGenerator(...)")
            generator = LookaheadGenerator(model, tokenizer, config, trie, cost_curve=cost_curve)
        elif not isinstance(generator, LookaheadGenerator):
            raise TypeError(f"generator must be a LookaheadGenerator, got {type(generator).__name__}")
        self.generator = generator
        self.model = generator.model
        self.tokenizer = generator.tokenizer
        self.config = generator.config
        self._embed = self.model.get_input_embeddings()

    @property
    def trie(self) -> DraftSource:
        return self.generator.trie

    def generate(self, prompt: Prompt, options: RequestOptions | None = None, *, k: int = 3, method: str = "tree",
                 alpha: float = 0.54, horizon: int = 10, expansion: int = 3, **keywords: Any) -> MultiDraftResult:
        """``k`` distinct completions of ``prompt``.

        Args:
            k: number of completions (>= 1); fewer come back only when the model has fewer distinct ones.
            method: ``"tree"`` (completion 0 is the greedy output) or ``"superposed"``.
            options, keywords: as in :meth:`LookaheadGenerator.generate` (``max_new_tokens`` defaults to 64 here;
                ``eos_token_id``, ``stop`` and ``documents`` apply, sampling keywords do not).
            alpha: superposed: weight of the trie n-gram model in ``p_model^(1-alpha) * p_ngram^alpha``.
            horizon: superposed: tokens between two resets.
            expansion: superposed: each completion's ``expansion * k`` most likely next tokens are scored.
        """
        check_positive_int("k", k)
        check_positive_int("horizon", horizon)
        check_positive_int("expansion", expansion)
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
        gen = self.generator
        # positions: prompt + depth in the block, so max_new_tokens is capped by the context as in generate
        if options is None:
            keywords.setdefault("max_new_tokens", 64)
        request = gen.prepare(prompt, options, **keywords)
        prompt_ids = request.prompt_ids
        emitter = Emitter(self.tokenizer, request.eos, request.stop, request.max_new_tokens)
        budget = gen.budget if method == "tree" else None  # measured (or read) before the clock starts
        drafter = Drafter(self.trie, budget, self.config, request.request_id)
        stats = MultiDraftStats(prompt_tokens=len(prompt_ids))
        start = time.perf_counter()
        drafter.start(prompt_ids, request.document_ids, request.max_new_tokens,
                      derived_from=request.derived_from)
        completions: list[Completion] = []
        try:
            with torch.inference_mode(), gen.runner.kernels():
                block = _Block(gen.runner, prompt_ids)
                stats.passes = 1
                if method == "tree":
                    completions = self._tree(block, emitter, k, drafter, stats)
                else:
                    completions = self._superposed(block, prompt_ids, emitter, k, float(alpha), horizon,
                                                   expansion, drafter, stats)
        finally:
            drafter.finish(completions[0].token_ids if completions else None)
        stats.time_total = time.perf_counter() - start
        return MultiDraftResult(completions, method, stats)

    # ------------------------------------------------------------------ tree

    def _tree(self, block: _Block, emitter: Emitter, k: int, drafter: Drafter, stats: MultiDraftStats
              ) -> list[Completion]:
        greedy = _Beam(emitter, [], 0)
        alternatives: list[_Beam] = []
        first = _log_softmax(block.first_row[None])  # [1, V]
        token = int(block.first_row.argmax())
        if k > 1:
            root = Proposal([token], [-1], [], [], 0, 0)  # the prefill row: top-k first tokens
            found = [(loss, _Candidate(loss, emitter.fork(), (), (alt,), (float(first[0, alt]),), 0))
                     for loss, _, alt, _ in _branches(first, [token], 0, root, [0], k)]
            self._offer(alternatives, found, k)
        greedy.push([token], [float(first[0, token])])
        while True:
            beams = [b for b in [greedy, *alternatives] if not b.done]
            if not beams:
                break
            drafter.extend(greedy.emitter.generated)  # the greedy output drafts for every completion, at once
            plans = [drafter.propose(b.emitter.generated, last_accepted=b.last_accepted,
                                     truncate=max(1, self.config.decoding_length // len(beams))) for b in beams]
            tokens, parents, offsets = [], [], []
            for beam, plan in zip(beams, plans):
                offset = len(block.tokens) + len(tokens)  # the beam's pending token, then its draft
                offsets.append(offset)
                tokens.extend(plan.tokens)
                parents.extend([beam.tip] + plan.placed(offset, offset + 1))
            rows = block.extend(tokens, parents)  # [m, V]: one tree-masked pass for every completion
            stats.passes += 1
            stats.pass_tokens.append(len(tokens))
            logp = _log_softmax(rows)  # [m, V]
            choice = rows.argmax(-1).tolist()  # [m]
            first_row = len(block.tokens) - len(tokens)
            found = []
            for beam, plan, offset in zip(beams, plans, offsets):
                row0 = offset - first_row
                if beam is greedy and k > 1:
                    found = self._greedy_branches(beam, plan, logp, choice, row0, offset, k)
                self._advance(beam, plan, logp, choice, row0, offset, drafter)
            if found and not greedy.done:
                self._offer(alternatives, found, k)
            live = [b for b in [greedy, *alternatives] if not b.done]
            remap = block.compact([b.tip for b in live])
            for beam in live:
                beam.tip = remap[beam.tip]
        ranked = sorted(alternatives, key=lambda b: -sum(b.logprobs))
        return [_completion(b.emitter, b.logprobs) for b in [greedy, *ranked]]

    @staticmethod
    def _advance(beam: _Beam, plan: Proposal, logp: torch.Tensor, choice: list[int], row0: int, offset: int,
                 drafter: Drafter) -> None:
        """Greedy acceptance in the beam's verified tree; the beam takes the path and the bonus token."""
        acceptance = greedy_accept(plan.tokens, plan.parents, choice[row0: row0 + len(plan.tokens)])
        nodes = [0] + acceptance.path
        logprobs = [float(logp[row0 + parent, token]) for parent, token in zip(nodes, acceptance.tokens)]
        beam.push(acceptance.tokens, logprobs)
        beam.tip = offset + nodes[-1]
        drafter.observe(plan, acceptance.path)
        beam.last_accepted = len(acceptance.path)

    def _greedy_branches(self, greedy: _Beam, plan: Proposal, logp: torch.Tensor, choice: list[int], row0: int,
                         offset: int, k: int) -> list[tuple[float, _Candidate]]:
        """Alternatives along this step's greedy path, before the greedy beam takes it."""
        acceptance = greedy_accept(plan.tokens, plan.parents, choice[row0: row0 + len(plan.tokens)])
        visited = [0] + acceptance.path
        before, base = greedy.emitter.fork(), tuple(greedy.logprobs)
        found = []
        for loss, node, token, continuation in _branches(logp, choice, row0, plan, visited, k):
            chain = visited[: visited.index(node) + 1] + continuation  # its cached nodes (local), root first
            pending = choice[row0 + chain[-1]] if continuation else token
            tokens = [plan.tokens[i] for i in chain[1:]] + [pending]
            logprobs = [float(logp[row0 + parent, t]) for parent, t in zip(chain, tokens)]
            tip = offset + chain[-1]
            found.append((loss, _Candidate(loss, before, base, tuple(tokens), tuple(logprobs), tip)))
        return found

    @staticmethod
    def _offer(alternatives: list[_Beam], found: list[tuple[float, _Candidate]], k: int) -> None:
        """Keep the k - 1 alternatives that lose the least log-probability where they leave the greedy path."""
        for loss, candidate in sorted(found, key=lambda item: item[0]):
            if len(alternatives) < k - 1:
                alternatives.append(candidate.beam())
                continue
            worst = max(range(len(alternatives)), key=lambda i: alternatives[i].loss)
            if loss >= alternatives[worst].loss:
                break
            alternatives[worst] = candidate.beam()

    # ------------------------------------------------------------------ superposed

    def _superposed(self, block: _Block, prompt_ids: list[int], emitter: Emitter, k: int, alpha: float,
                    horizon: int, expansion: int, drafter: Drafter, stats: MultiDraftStats) -> list[Completion]:
        ngram = _NgramScorer(drafter.trie, drafter.request_id, self.config)
        drafts = [_Draft(emitter, [], 0, 0.0, block.first_row)]
        done: list[_Draft] = []
        while drafts:
            # exact step: each draft's own next-token distribution (prefill or reset pass)
            logps = _log_softmax(torch.stack([d.row for d in drafts]))  # [n, V]
            drafts = self._expand(drafts, logps, True, k - len(done), alpha, expansion * k, prompt_ids, ngram)
            done += [d for d in drafts if d.done]
            drafts = [d for d in drafts if not d.done]
            anchor = max(drafts, key=lambda d: d.score).node if drafts else 0
            for _ in range(horizon - 1):
                if not drafts:
                    break
                gamma = torch.softmax(torch.tensor([d.score for d in drafts]), dim=0)  # [n]
                last = torch.tensor([d.emitter.generated[-1] for d in drafts], device=block.first_row.device)
                embeds = (gamma[:, None].to(self._embed.weight) * self._embed(last)).sum(0, keepdim=True)  # [1, d]
                row = block.extend([0], [anchor], inputs_embeds=embeds)[0]  # [V]: one pass for every draft
                anchor = len(block.tokens) - 1  # the superposed chain goes on from here
                stats.passes += 1
                stats.pass_tokens.append(1)
                logp = _log_softmax(row[None])  # [1, V]
                drafts = self._expand(drafts, logp.expand(len(drafts), -1), False, k - len(done), alpha,
                                      expansion * k, prompt_ids, ngram)
                done += [d for d in drafts if d.done]
                drafts = [d for d in drafts if not d.done]
            self._reset(block, drafts, done, stats)
        done.sort(key=lambda d: -d.logprob)
        return [_completion(d.emitter, d.logprobs) for d in done]

    def _expand(self, drafts: list[_Draft], logps: torch.Tensor, exact: bool, keep: int, alpha: float, top: int,
                prompt_ids: list[int], ngram: _NgramScorer) -> list[_Draft]:
        """Score every draft's ``top`` most likely next tokens by ``(1 - alpha) log p + alpha log p_ngram`` and
        keep the best ``keep`` extensions. ``logps`` [n, V] is each draft's (or the shared superposed) log p."""
        top = min(top, logps.shape[-1])
        values, indices = logps.topk(top, dim=-1)  # [n, top]
        scored = []
        for i, draft in enumerate(drafts):
            tokens = indices[i].tolist()
            model = values[i].tolist()
            prior = ngram.logprobs(prompt_ids + draft.emitter.generated, tokens) if alpha else [0.0] * top
            for token, lp, lq in zip(tokens, model, prior):
                scored.append((draft.score + (1.0 - alpha) * lp + alpha * lq, i, token, lp))
        scored.sort(key=lambda item: -item[0])
        out = []
        for score, i, token, lp in scored[:keep]:
            parent = drafts[i]
            child = _Draft(parent.emitter.fork(), list(parent.logprobs), parent.node, score, None,
                           parent.processed)
            child.emitter.push([token])
            child.logprobs.append(lp if exact else None)
            out.append(child)
        return out

    @staticmethod
    def _reset(block: _Block, drafts: list[_Draft], done: list[_Draft], stats: MultiDraftStats) -> None:
        """One tree-masked pass over every draft's uncached tokens (finished drafts: all but the last): exact
        caches, the exact log-probability of every token and, for live drafts, the exact next-token row."""
        remap = block.compact([d.node for d in drafts + done])  # drops the superposed chain
        tokens: list[int] = []
        parents: list[int] = []
        made: dict[tuple[int, int], int] = {}
        routes = []
        for draft in drafts + done:
            draft.node = remap[draft.node]
            generated = draft.emitter.generated
            end = len(generated) if draft in drafts else len(generated) - 1
            node, route = draft.node, [draft.node]
            for token in generated[draft.processed:end]:
                key = (node, token)
                if key not in made:
                    made[key] = len(block.tokens) + len(tokens)
                    tokens.append(token)
                    parents.append(node)
                node = made[key]
                route.append(node)
            routes.append(route)
        if not tokens:
            return
        first = len(block.tokens)
        logp_rows = block.extend(tokens, parents)  # [m, V]
        stats.passes += 1
        stats.pass_tokens.append(len(tokens))
        logp = _log_softmax(logp_rows)
        for draft, route in zip(drafts + done, routes):
            generated = draft.emitter.generated
            for step, node in enumerate(route[1:], start=draft.processed):
                if step + 1 < len(generated):  # the token after this node, scored at its real prefix
                    draft.logprobs[step + 1] = float(logp[node - first, generated[step + 1]])
            if len(route) > 1:
                draft.node = route[-1]
                draft.processed += len(route) - 1
            if draft in drafts:
                draft.row = logp_rows[route[-1] - first] if len(route) > 1 else draft.row
            draft.logprob = float(sum(draft.logprobs))


@dataclass(eq=False)
class _Draft:
    """A superposed-decoding draft: tokens in ``emitter.generated`` (the first ``processed`` are in the cache,
    the last of them at block node ``node``), their log-probabilities (None until a reset scores them), the
    ranking score, and the exact logits row after its last token when it has one."""

    emitter: Emitter
    logprobs: list
    node: int
    score: float
    row: torch.Tensor | None
    processed: int = 0
    logprob: float = 0.0

    @property
    def done(self) -> bool:
        return self.emitter.finish is not None


class _NgramScorer:
    """The trie as an interpolated n-gram model: ``p(token | context)`` mixes the orders 1..max_query_length of
    context whose counts are known (weight proportional to the order); log p is floored, and is 0 (no opinion)
    when no order of the context was ever seen."""

    FLOOR = 1e-4

    def __init__(self, trie: DraftSource, request_id: str, config: LookaheadConfig) -> None:
        self.trie = trie
        self.request_id = request_id
        self.local_weight = config.local_weight
        self.global_weight = config.global_weight
        self.max_order = config.max_query_length

    def count(self, ngram: Sequence[int]) -> float:
        return (self.local_weight * self.trie.count(ngram, self.request_id)
                + self.global_weight * self.trie.count(ngram))

    def logprobs(self, context: Sequence[int], tokens: Sequence[int]) -> list[float]:
        mixed = [0.0] * len(tokens)
        total = 0.0
        for order in range(1, min(self.max_order, len(context)) + 1):
            prefix = list(context[-order:])
            seen = self.count(prefix)
            if seen <= 0:
                continue
            total += order
            for i, token in enumerate(tokens):
                mixed[i] += order * min(1.0, self.count(prefix + [token]) / seen)
        if total == 0.0:
            return [0.0] * len(tokens)
        return [math.log(max(m / total, self.FLOOR)) for m in mixed]


def _completion(emitter: Emitter, logprobs: Sequence[float | None]) -> Completion:
    assert emitter.finish is not None and all(lp is not None for lp in logprobs)
    return Completion(emitter.text, list(emitter.generated), float(sum(logprobs)), emitter.finish)

