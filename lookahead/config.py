"""One frozen dataclass of knobs, validated at construction."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any


@dataclass(frozen=True)
class LookaheadConfig:
    """Knobs of the lookahead engine.

    Attributes:
        branch_length: deepest draft path (tokens below the matched suffix); the trie stores windows of
            ``branch_length + 1`` tokens.
        decoding_length: most draft nodes verified in one pass (the tree size, not counting the root).
        max_query_length: longest context suffix matched against the trie.
        node_budget: most nodes kept by the oracle trie (:class:`lookahead.trie.TokenTrie`, tests); the engine's
            draft store is bounded by ``store_bytes``.
        decay: factor the oracle trie applies to global counts when it is over its node budget.
        store_bytes: memory of the draft store's past answers and documents (:class:`lookahead.store.DraftStore`);
            past it the oldest entries are evicted whole (the default remembers about 10M tokens).
        local_weight: weight of request-local counts (prompt, documents) in draft scores.
        global_weight: weight of global counts (past outputs) in draft scores.
        adaptive: pick the draft size each step from the cost model; False always drafts ``decoding_length`` nodes.
        learn_outputs: insert generated outputs into the global trie when a request ends.
        cost_cache: where measured cost curves are cached (None: the default cache directory).
        skinny_matmul: on CPU, compute the linear layers of small passes as ``W @ x.T`` (lookahead.kernels).
        prefill_chunk: the most prompt tokens prefilled in one slice while other rows decode; a longer prompt
            joins a running batch in slices, paced by ``prefill_share``.
        prefill_share: while such a prompt joins, the share of each decoding step's time its slices may take (the
            other rows slow down by about this much instead of stalling for the whole prefill).
        join_stall: while any prompt joins a running batch, the most its prefill slice may add to one decoding
            step, in plain steps (the cost model sizes the slices): a decoding row's longest gap stays about
            ``1 + join_stall`` steps. Smaller: smoother streams, a later first token for the joining request.
    """

    branch_length: int = 24
    decoding_length: int = 48
    max_query_length: int = 6
    node_budget: int = 200_000
    decay: float = 0.5
    store_bytes: int = 128 << 20
    local_weight: float = 1.0
    global_weight: float = 1.0
    adaptive: bool = True
    learn_outputs: bool = True
    cost_cache: str | None = None
    skinny_matmul: bool = True
    prefill_chunk: int = 512
    prefill_share: float = 0.15
    join_stall: float = 4.0

    def __post_init__(self) -> None:
        positive = ("branch_length", "max_query_length", "node_budget", "prefill_chunk")
        if isinstance(self.store_bytes, bool) or not isinstance(self.store_bytes, int) or self.store_bytes < 1 << 16:
            raise ValueError(f"LookaheadConfig.store_bytes must be an integer >= 65536, got {self.store_bytes!r}")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LookaheadConfig.{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.decoding_length, int) or isinstance(self.decoding_length, bool):
            raise ValueError(f"LookaheadConfig.decoding_length must be an integer, got {self.decoding_length!r}")
        if not 0 <= self.decoding_length <= 512:
            raise ValueError(f"LookaheadConfig.decoding_length must be in 0..512, got {self.decoding_length}")
        for name, high in (("prefill_share", 1), ("join_stall", 64)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= high:
                raise ValueError(f"LookaheadConfig.{name} must be in (0, {high}], got {value!r}")
        if not 0.0 < self.decay < 1.0:
            raise ValueError(f"LookaheadConfig.decay must be in (0, 1), got {self.decay!r}")
        for name in ("local_weight", "global_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"LookaheadConfig.{name} must be a number >= 0, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_updates(self, **changes: Any) -> LookaheadConfig:
        """A copy with some knobs changed (validated); unknown names raise a clear TypeError."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise TypeError(f"unknown LookaheadConfig knob(s) {unknown}; allowed: {sorted(known)}")
        return replace(self, **changes)
