"""Speculative ensemble (arXiv 2502.01662) on lookahead's draft-and-verify machinery.

Several causal LMs that share one tokenizer decode together from an ensemble distribution:

- ``weighted``: r = sum_k w_k p_k (probabilities, weights normalised to sum 1);
- ``contrastive``: r = softmax(l_expert - mu * l_amateur) (two models: the expert first, then the amateur).

Plain ensemble decoding (:meth:`EnsembleGenerator.generate_plain`) pays one forward pass per model per token. The
speculative path verifies trie drafts against r instead: every model runs the same tree pass (same tokens, positions
and 4-D mask, each with its own DynamicCache), r is formed at every node, and the walk accepts while the choice from
r (argmax, or a seeded draw for sampling) is a child; every cache is then compacted to the same accepted path. In
float32 the output equals plain ensemble decoding token for token (in half precision up to the first near-tie).

With ``proposer=i`` the cheap model ``i`` also proposes (the alternating scheme of the paper): it scores the draft
tree first and extends its own best path to ``proposal_depth`` tokens, one cheap pass per token; the other models
verify everything in one pass. When the walk accepts the proposer's last token, which the proposer never scored,
the verifiers' row after it becomes the next proposal and the proposer scores it in its next pass, so no pass is
wasted.
"""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from .budget import CostCurve, DraftBudget, cached_cost_curve, cost_cache_key, default_cache_dir
from .config import LookaheadConfig
from .drafter import Drafter, DraftSource, new_trie
from .emitter import Emitter
from .inputs import InputEncoder, RequestOptions
from .kvcache import compact_cache
from .outputs import GenerationResult, GenerationStats, Prompt, Request, StreamChunk, collect_chunks
from .runner import ModelRunner, check_model, cost_grid, time_tree_passes
from .sampling import SamplingParams, TokenChooser
from .verify import children_index, walk_accept

MODES = ("weighted", "contrastive")
NO_TOKEN = -1  # the walk's choice at a node that not every model has scored yet: never a child, ends the walk


# ---------------------------------------------------------------------------------------------------- the rule


@dataclass(frozen=True)
class EnsembleRule:
    """How per-model logits combine into the ensemble distribution r."""

    mode: str
    weights: tuple[float, ...] = ()  # weighted mode, normalised
    mu: float = 0.1  # contrastive mode

    def scores(self, rows: Sequence[torch.Tensor]) -> torch.Tensor:
        """Log-scores of r, [n, V], from one logits tensor [n, V] per model: argmax is the ensemble choice and
        softmax is r itself."""
        if self.mode == "contrastive":
            expert, amateur = rows
            return expert.float() - self.mu * amateur.float()  # [n, V]
        mixed = sum(w * torch.softmax(row.float(), dim=-1).double() for w, row in zip(self.weights, rows))  # [n, V]
        return mixed.float().log()  # float64 sum: the same r whatever the model order

    def proposal_scores(self, rows: dict[int, torch.Tensor]) -> torch.Tensor | None:
        """Best guess of r from the rows of some models only (a proposal, never a verdict), [V]; None when those
        rows say nothing useful (contrastive without the expert's row: the amateur alone is a poor guess of r)."""
        if self.mode == "contrastive":
            return rows.get(0)
        known = sorted(rows)
        total = sum(self.weights[k] for k in known)
        return EnsembleRule("weighted", tuple(self.weights[k] / total for k in known)).scores([rows[k] for k in known])


def make_rule(num_models: int, mode: str, weights: Sequence[float] | None, mu: float) -> EnsembleRule:
    """Validate the ensemble settings and build the rule."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "contrastive":
        if num_models != 2:
            raise ValueError(f"contrastive mode takes exactly two models (expert, amateur), got {num_models}")
        if weights is not None:
            raise ValueError("weights apply to mode='weighted' only; contrastive mode uses mu")
        if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not 0.0 <= mu < 1e6:
            raise ValueError(f"mu must be a number >= 0, got {mu!r}")
        return EnsembleRule("contrastive", mu=float(mu))
    if weights is None:
        weights = [1.0] * num_models
    weights = list(weights)
    if len(weights) != num_models:
        raise ValueError(f"weights must have one entry per model ({num_models}), got {len(weights)}")
    if any(isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0 or w == float("inf") for w in weights):
        raise ValueError(f"weights must be positive finite numbers, got {weights}")
    total = float(sum(weights))
    return EnsembleRule("weighted", tuple(float(w) / total for w in weights))


def check_members(models: Sequence[PreTrainedModel]) -> None:
    """Refuse an ensemble whose members do not share one vocabulary, device and dtype."""
    if len(models) < 2:
        raise ValueError(f"an ensemble needs at least two models, got {len(models)}")
    for model in models:
        check_model(model)
    sizes = [int(m.get_output_embeddings().weight.shape[0]) for m in models]
    if len(set(sizes)) != 1:
        raise ValueError(f"ensemble members must share one vocabulary: their LM heads have {sizes} logits")
    declared = [int(m.config.vocab_size) for m in models]
    if len(set(declared)) != 1:
        raise ValueError(f"ensemble members must share one vocabulary: vocab_size {declared}")
    devices = {str(next(m.parameters()).device) for m in models}
    dtypes = {m.dtype for m in models}
    if len(devices) != 1 or len(dtypes) != 1:
        raise ValueError(f"ensemble members must sit on one device with one dtype, got {devices} / {dtypes}")


def truncated_copy(model: PreTrainedModel, num_layers: int) -> PreTrainedModel:
    """A cheap member built from ``model``: its first ``num_layers`` decoder layers, then its own final norm and LM
    head. Every module is shared with ``model`` (no weight is copied or downloaded)."""
    total = int(model.config.num_hidden_layers)
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers <= total:
        raise ValueError(f"num_layers must be in 1..{total}, got {num_layers!r}")
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None):
        config.layer_types = list(config.layer_types)[:num_layers]
    with torch.device("meta"):  # the skeleton only: every module is replaced by the original's below
        small = type(model)(config)
    decoder, small_decoder = model.get_decoder(), small.get_decoder()
    for name, child in decoder.named_children():
        setattr(small_decoder, name, torch.nn.ModuleList(list(child)[:num_layers]) if name == "layers" else child)
    for name, child in model.named_children():
        if child is not decoder:
            setattr(small, name, child)
    small.config._attn_implementation = model.config._attn_implementation
    small.generation_config = copy.deepcopy(model.generation_config)
    leftovers = [n for n, t in itertools.chain(small.named_parameters(), small.named_buffers()) if t.is_meta]
    if leftovers:
        raise ValueError(f"truncated_copy: {type(model).__name__} has modules it cannot share: {leftovers[:3]}")
    return small.eval()


# ---------------------------------------------------------------------------------------------------- generator


@dataclass
class _Member:
    """One model of the ensemble and its decoding state for the current request."""

    runner: ModelRunner
    cache: DynamicCache | None = None
    done: int = 0  # tokens of the sequence held in the cache
    next_row: torch.Tensor | None = None  # [V] logits after the whole sequence, when done == len(sequence)


@dataclass
class _Tree:
    """This cycle's tree: node 0 is the last confirmed token; ``rows[k][node]`` are model k's logits after a node."""

    tokens: list[int]
    parents: list[int]
    rows: list[dict[int, torch.Tensor]] = field(default_factory=list)

    def add(self, token: int, parent: int) -> int:
        self.tokens.append(token)
        self.parents.append(parent)
        return len(self.tokens) - 1


class EnsembleGenerator:
    """Lossless speculative decoding of an ensemble of causal LMs that share a tokenizer.

    Args:
        models: two or more stock HF causal LMs (same vocabulary, device and dtype); contrastive: (expert, amateur).
        tokenizer: their shared tokenizer.
        mode: ``"weighted"`` or ``"contrastive"``.
        weights: per-model weights of the weighted mode (default equal); normalised.
        mu: amateur strength of the contrastive mode.
        config: drafting knobs (:class:`LookaheadConfig`).
        trie: a shared :class:`TokenTrie` (default: a new one).
        cost_curve: seconds of one tree pass of every model per node count (default: measured once and cached).
        proposer: index of a cheap model that also proposes tokens (alternating scheme); None: trie drafts only.
        proposal_depth: how deep the proposer extends its best path each cycle.
    """

    def __init__(self, models: Sequence[PreTrainedModel], tokenizer: PreTrainedTokenizerBase,
                 mode: str = "weighted", weights: Sequence[float] | None = None, mu: float = 0.1,
                 config: LookaheadConfig | None = None, trie: DraftSource | None = None,
                 cost_curve: CostCurve | None = None, proposer: int | None = None, proposal_depth: int = 3) -> None:
        models = list(models)
        check_members(models)
        self.rule = make_rule(len(models), mode, weights, mu)
        if proposer is not None and (isinstance(proposer, bool) or proposer not in range(len(models))):
            raise ValueError(f"proposer must be a model index in 0..{len(models) - 1} or None, got {proposer!r}")
        if isinstance(proposal_depth, bool) or not isinstance(proposal_depth, int) or proposal_depth < 1:
            raise ValueError(f"proposal_depth must be an integer >= 1, got {proposal_depth!r}")
        self.models = models
        self.tokenizer = tokenizer
        self.proposer = proposer
        self.proposal_depth = proposal_depth
        self.config = config or LookaheadConfig()
        self.trie = trie or new_trie(self.config)
        self.runners = [ModelRunner(m, skinny=self.config.skinny_matmul) for m in models]
        self.device = self.runners[0].device
        contexts = [int(getattr(m.config, "max_position_embeddings", 0) or 0) for m in models]
        self.max_context = min((c for c in contexts if c), default=None)
        # the first model provides the EOS defaults
        self.inputs = InputEncoder(tokenizer, int(models[0].config.vocab_size), models[0].generation_config,
                                   self.max_context)
        self._cost_curve = cost_curve
        self._budget: DraftBudget | None = None

    @property
    def mode(self) -> str:
        return self.rule.mode

    def _members(self) -> list[_Member]:
        return [_Member(runner) for runner in self.runners]

    # ------------------------------------------------------------------ cost model

    @property
    def budget(self) -> DraftBudget:
        """Draft budget over the summed cost of one tree pass of every model (measured or read on first use)."""
        if self._budget is None:
            curve = self._cost_curve or self.measure_cost_curve()
            self._budget = DraftBudget(curve, self.config.decoding_length, adaptive=self.config.adaptive)
        return self._budget

    def measure_cost_curve(self, prefix_length: int = 384, use_cache: bool = True) -> CostCurve:
        """Time one tree pass of every model (with its logits) for 1..64 nodes; cached per ensemble and machine."""
        sizes, prefix_length = cost_grid(self.config.decoding_length, prefix_length, self.max_context)
        vocab = int(self.models[0].config.vocab_size)

        def measure() -> CostCurve:
            return time_tree_passes(self.runners, sizes, prefix_length, repeats=3, with_logits=True)

        if not use_cache:
            return measure()
        parts = [(getattr(m.config, "_name_or_path", ""), m.config.model_type, m.config.hidden_size,
                  m.config.num_hidden_layers) for m in self.models]
        key = cost_cache_key("ensemble-v3", parts, vocab, self.models[0].dtype, self.device, torch.get_num_threads(),
                             sizes, prefix_length, torch.__version__, self.config.skinny_matmul)
        directory = self.config.cost_cache or default_cache_dir() / "ensemble-cost"
        return cached_cost_curve(key, measure, directory)

    # ------------------------------------------------------------------ public API

    def generate(self, prompt: Prompt, options: RequestOptions | None = None, **keywords: Any) -> GenerationResult:
        """Speculative ensemble decoding of one prompt (options as in :meth:`LookaheadGenerator.generate`)."""
        return collect_chunks(self.stream(prompt, options, **keywords))

    def generate_plain(self, prompt: Prompt, options: RequestOptions | None = None, **keywords: Any
                       ) -> GenerationResult:
        """Plain ensemble decoding, the reference: one forward pass per model per token, the choice from r."""
        return collect_chunks(self.stream(prompt, options, speculative=False, **keywords))

    def stream(self, prompt: Prompt, options: RequestOptions | None = None, *, speculative: bool = True,
               **keywords: Any) -> Iterator[StreamChunk]:
        """Yield every accepted run of tokens; options are checked right away, before any model work.

        An ensemble has no single generation config: unset sampling settings are neutral, not a model's defaults.
        """
        request = self.inputs.prepare(prompt, options, **keywords)
        chooser = TokenChooser(request.options.sampling.resolved(None), device=self.device)
        emitter = Emitter(self.tokenizer, request.eos, request.stop, request.max_new_tokens)
        if speculative:
            return self._run(request, emitter, chooser)
        return self._run_plain(request.prompt_ids, emitter, chooser)

    # ------------------------------------------------------------------ shared pieces

    def _choose(self, rows: Sequence[torch.Tensor], chooser: TokenChooser, history: Sequence[int]) -> int:
        """The ensemble's next token from one logits row [V] per model."""
        scores = self.rule.scores([row[None] for row in rows])[0]  # [V]
        return int(scores.argmax()) if chooser.plain_greedy else chooser(scores, history)

    def _prefill(self, members: list[_Member], prompt_ids: list[int]) -> None:
        for member in members:
            member.cache = member.runner.new_cache()
            member.next_row = member.runner.logits(member.runner.prefill(member.cache, prompt_ids))[0]
            member.done = len(prompt_ids)

    # ------------------------------------------------------------------ plain ensemble decoding

    def _run_plain(self, prompt_ids: list[int], emitter: Emitter, chooser: TokenChooser) -> Iterator[StreamChunk]:
        stats = GenerationStats(prompt_tokens=len(prompt_ids))
        members = self._members()
        sequence = list(prompt_ids)
        start = time.perf_counter()
        with torch.inference_mode(), self.runners[0].kernels():
            self._prefill(members, prompt_ids)
            stats.time_prefill = stats.time_forward = time.perf_counter() - start
            stats.steps = 1
            while True:
                token = self._choose([m.next_row for m in members], chooser, sequence)
                sequence.append(token)
                run, delta = emitter.push([token])
                stats.new_tokens = len(emitter.generated)
                if emitter.finish:
                    stats.time_total = time.perf_counter() - start
                    yield StreamChunk(run, delta, 0, emitter.finish, stats)
                    return
                yield StreamChunk(run, delta, 0)
                t0 = time.perf_counter()
                for member in members:  # one full forward pass per model per token
                    hidden = member.runner.run_nodes(member.cache, member.done, [token], [-1])
                    member.next_row = member.runner.logits(hidden)[0]
                    member.done += 1
                stats.time_forward += time.perf_counter() - t0
                stats.steps += 1

    # ------------------------------------------------------------------ speculative ensemble decoding

    def _run(self, request: Request, emitter: Emitter, chooser: TokenChooser) -> Iterator[StreamChunk]:
        drafter = Drafter(self.trie, self.budget, self.config, request.request_id)
        prompt_ids = request.prompt_ids
        stats = GenerationStats(prompt_tokens=len(prompt_ids))
        members = self._members()
        sequence = list(prompt_ids)
        start = time.perf_counter()
        try:
            drafter.start(prompt_ids, request.document_ids, emitter.max_new_tokens,
                          derived_from=request.derived_from)
            with torch.inference_mode(), self.runners[0].kernels():
                t0 = time.perf_counter()
                self._prefill(members, prompt_ids)
                new_tokens = [self._choose([m.next_row for m in members], chooser, sequence)]
                for member in members:
                    member.next_row = None  # the first token is not in any cache yet
                stats.time_prefill = stats.time_forward = time.perf_counter() - t0
                stats.steps, accepted, last_accepted = 1, 0, 0
                while True:
                    sequence.extend(new_tokens)
                    run, delta = emitter.push(new_tokens)
                    stats.new_tokens = len(emitter.generated)
                    if emitter.finish:
                        stats.time_trie = drafter.trie_seconds
                        stats.time_total = time.perf_counter() - start
                        yield StreamChunk(run, delta, accepted, emitter.finish, stats)
                        return
                    yield StreamChunk(run, delta, accepted)
                    drafter.extend(emitter.generated)  # the output drafts at once
                    new_tokens, accepted = self._cycle(members, sequence, emitter.generated, chooser, drafter,
                                                       last_accepted, stats)
                    last_accepted = accepted
                    stats.steps += 1
                    stats.time_trie = drafter.trie_seconds
        finally:
            drafter.finish(emitter.generated if emitter.finish is not None else None)

    def _score(self, member: _Member, k: int, tree: _Tree, start: int, prefix_length: int) -> None:
        """Model ``k`` runs tree nodes ``start..`` (nodes before ``start`` are in its cache) and stores their rows."""
        hidden = member.runner.run_nodes(member.cache, prefix_length, tree.tokens, tree.parents, start)  # [m, d]
        for offset, row in enumerate(member.runner.logits(hidden)):  # [m, V]
            tree.rows[k][start + offset] = row

    def _cycle(self, members: list[_Member], sequence: list[int], generated: list[int], chooser: TokenChooser,
               drafter: Drafter, last_accepted: int, stats: GenerationStats) -> tuple[list[int], int]:
        """Draft, score with every model, accept against r and compact every cache. Returns the new tokens (the
        accepted path, then the bonus token when every model has scored the last node) and the accepted count."""
        prefix = len(sequence) - 1  # node 0 (the last confirmed token) sits at this position of every cache
        tree = _Tree([sequence[-1]], [-1], [{} for _ in members])
        starts = []
        for k, member in enumerate(members):
            starts.append(member.done - prefix)  # 1: the root is cached and its row is known, 0: it is not
            if member.next_row is not None:
                tree.rows[k][0] = member.next_row
        verifiers = [k for k in range(len(members)) if k != self.proposer]
        attach, after = 0, []
        if self.proposer is not None and all(0 in tree.rows[k] for k in verifiers):
            guess = self.rule.proposal_scores({k: tree.rows[k][0] for k in verifiers})
            if guess is not None:  # the verifiers' bonus is the next proposal
                token = int(guess.argmax())
                attach, after = tree.add(token, 0), [token]
        proposal = drafter.propose(generated, after=after, last_accepted=last_accepted)
        first = len(tree.tokens)  # the draft's node i sits at tree node first + i - 1
        for token, parent in zip(proposal.tokens[1:], proposal.placed(attach, first)):
            tree.add(token, parent)

        t0 = time.perf_counter()
        if self.proposer is not None:
            self._score(members[self.proposer], self.proposer, tree, starts[self.proposer], prefix)
            self._propose(members, tree, prefix, min(self.proposal_depth, drafter.max_new_tokens - len(generated)))
        for k in verifiers:
            self._score(members[k], k, tree, starts[k], prefix)
        stats.time_forward += time.perf_counter() - t0

        def choose(node: int, path_tokens: list[int]) -> int:
            if any(node not in rows for rows in tree.rows):
                return NO_TOKEN  # the proposer's last token: the verifiers' row after it proposes next cycle
            return self._choose([rows[node] for rows in tree.rows], chooser, sequence + path_tokens)

        acceptance = walk_accept(tree.tokens, tree.parents, choose)
        path = acceptance.path
        for k, member in enumerate(members):
            keep = [0] + [v for v in path if v in tree.rows[k]]
            compact_cache(member.cache, prefix, keep)
            member.done = prefix + len(keep)
            member.next_row = tree.rows[k][path[-1]] if acceptance.bonus == NO_TOKEN and path[-1] in tree.rows[k] \
                else None
        if attach == 0 or (path and path[0] == attach):
            drafter.observe(proposal, [v - first + 1 for v in path if first <= v < first + proposal.size - 1])
        stats.draft_sizes.append(len(tree.tokens) - 1)
        stats.accepted_lengths.append(len(path))
        tokens = acceptance.tokens if acceptance.bonus != NO_TOKEN else acceptance.tokens[:-1]
        return tokens, len(path)

    def _propose(self, members: list[_Member], tree: _Tree, prefix: int, depth: int) -> None:
        """The proposer walks its best path through the tree (r where every model has scored a node, else its own
        argmax) and extends it with its own tokens, one cheap pass each, until the path is ``depth`` deep. The last
        token it adds is left unscored: the verifiers score it, and the proposer in its next cycle."""
        k = self.proposer
        assert k is not None
        children = children_index(tree.tokens, tree.parents)
        node = 0
        for level in range(depth):
            rows = {j: r[node] for j, r in enumerate(tree.rows) if node in r}
            token = int(self._choose(list(rows.values()), _GREEDY, []) if len(rows) == len(members)
                         else rows[k].argmax())
            child = children.get((node, token))
            if child is None:
                child = tree.add(token, node)
                children[(node, token)] = child
                if level + 1 < depth:
                    self._score(members[k], k, tree, child, prefix)
            node = child


_GREEDY = TokenChooser(SamplingParams().resolved(None))
