"""KV cache compaction: keep the prefix plus the accepted tree nodes, in path order."""

from __future__ import annotations

from collections.abc import Sequence
from copy import deepcopy

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class SpareLayer(DynamicLayer):
    """A :class:`DynamicLayer` that keeps room past its positions, so appending a pass's keys and values writes them
    in place instead of copying the whole layer (``DynamicLayer`` concatenates: a copy of the whole cache every pass,
    about 1 ms of the default model's 45 ms step at a 1,000-token context on CPU, more at longer contexts).

    ``keys`` and ``values`` stay what every caller sees: ``[batch, heads, positions, head_dim]`` views of the first
    positions of a larger buffer. Cropping or compacting them in place (views of the same buffer) keeps the room;
    a layer given tensors of its own (rows appended or selected) moves into a new buffer at its next update.
    """

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.key_buffer = self.value_buffer = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``key_states`` and ``value_states`` ``[batch, heads, n, head_dim]``; return all positions."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        held = self.keys.shape[-2] if self.keys.dim() == 4 else 0
        end = held + key_states.shape[-2]
        if not (_views_first_positions(self.keys, self.key_buffer, end)
                and _views_first_positions(self.values, self.value_buffer, end)):
            self.key_buffer = _roomier(self.keys, key_states, end)
            self.value_buffer = _roomier(self.values, value_states, end)
        self.key_buffer[..., held:end, :] = key_states
        self.value_buffer[..., held:end, :] = value_states
        self.keys = self.key_buffer[..., :end, :]
        self.values = self.value_buffer[..., :end, :]
        return self.keys, self.values


def _views_first_positions(states: torch.Tensor, buffer: torch.Tensor | None, end: int) -> bool:
    """Whether ``states`` is the first positions of ``buffer`` (every row and head) and ``buffer`` holds ``end``."""
    return (buffer is not None and states.dim() == 4 and states.data_ptr() == buffer.data_ptr()
            and states.shape[:2] == buffer.shape[:2] and states.stride() == buffer.stride()
            and buffer.shape[-2] >= end)


def _roomier(states: torch.Tensor, new: torch.Tensor, end: int) -> torch.Tensor:
    """A buffer ``[batch, heads, capacity, head_dim]`` (capacity about 1.5x ``end``) holding ``states`` first."""
    batch, heads, _, dim = new.shape
    buffer = new.new_empty(batch, heads, end + end // 2 + 64, dim)
    if states.dim() == 4 and states.shape[-2]:
        buffer[..., :states.shape[-2], :] = states
    return buffer


def spare_cache(cache: DynamicCache) -> DynamicCache:
    """``cache`` (empty, every layer a plain ``DynamicLayer``) with :class:`SpareLayer` layers instead."""
    if cache.layer_class_to_replicate is DynamicLayer:
        cache.layer_class_to_replicate = SpareLayer
    cache.layers = [SpareLayer() if type(layer) is DynamicLayer and not layer.is_initialized else layer
                    for layer in cache.layers]
    return cache


def check_compactable(cache: DynamicCache) -> None:
    """Raise TypeError unless every layer is a plain growing DynamicLayer or :class:`SpareLayer` (no sliding window,
    no quantization)."""
    if not isinstance(cache, DynamicCache):
        raise TypeError(f"lookahead needs a transformers DynamicCache, got {type(cache).__name__}")
    for i, layer in enumerate(cache.layers):
        if type(layer) not in (DynamicLayer, SpareLayer):
            raise TypeError(
                f"cache layer {i} is a {type(layer).__name__}; lookahead supports full-attention DynamicLayer caches "
                "only (sliding-window and hybrid caches are not verified)"
            )


def compact_cache(cache: DynamicCache, prefix_length: int, keep: Sequence[int]) -> None:
    """Keep the first ``prefix_length`` positions plus tree nodes ``keep`` (indices into the last tree block).

    The cache must hold exactly ``prefix_length + tree_size`` positions. ``keep`` lists tree nodes in the order
    they must appear (root first, then the accepted path). Modifies ``cache`` in place.
    """
    keep = list(keep)
    if keep == list(range(len(keep))):  # accepted nodes already sit right after the prefix: just crop
        crop(cache, prefix_length + len(keep))
        return
    index = torch.tensor(keep, dtype=torch.long, device=cache.layers[0].keys.device) + prefix_length  # [k]
    end = prefix_length + len(keep)
    for layer in cache.layers:
        # gather first (a copy), then write in place: only the kept nodes move, the prefix is not copied
        layer.keys[..., prefix_length:end, :] = layer.keys.index_select(-2, index)  # [batch, heads, k, head_dim]
        layer.values[..., prefix_length:end, :] = layer.values.index_select(-2, index)
        layer.keys = layer.keys[..., :end, :]
        layer.values = layer.values[..., :end, :]


# ---------------------------------------------------------------------------------------------------------------
# Batched caches. Row b of a batch cache holds its own valid length ``lengths[b]``; positions past it (up to the
# cache length) are stale and masked out by the batched tree mask.


def cache_length(cache: DynamicCache) -> int:
    """Positions held by every layer of ``cache`` (valid or stale)."""
    return int(cache.layers[0].keys.shape[-2])


def crop(cache: DynamicCache, length: int) -> None:
    """Keep the first ``length`` positions of every layer (in place); a no-op where a layer holds no more."""
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None and layer.keys.numel() and layer.keys.shape[-2] > length:
            layer.keys = layer.keys[..., :length, :]
            layer.values = layer.values[..., :length, :]


def replicated(cache: DynamicCache, rows: int) -> DynamicCache:
    """A new cache holding ``rows`` copies of the single row of ``cache`` (which is left as it is)."""
    copy = deepcopy(cache)
    if rows > 1:
        append_rows(copy, *[cache] * (rows - 1))
    return copy


def append_rows(cache: DynamicCache, *others: DynamicCache) -> None:
    """Append the batch rows of every cache in ``others`` to ``cache`` (in place, one concatenation per layer and
    K/V), padding the shorter ones with zeros at the end.

    All or nothing: every layer's new tensors are allocated before any layer is replaced, so an out-of-memory
    error leaves ``cache`` as it was."""
    length = max(cache_length(c) for c in (cache, *others))
    joined = []
    for layer, *extras in zip(cache.layers, *(other.layers for other in others)):
        pair = []
        for name in ("keys", "values"):
            parts = [getattr(part, name) for part in (layer, *extras)]  # each [batch, heads, seq, head_dim]
            padded = [torch.nn.functional.pad(p, (0, 0, 0, length - p.shape[-2])) for p in parts]
            pair.append(torch.cat(padded, dim=0))
        joined.append(pair)
    for layer, (keys, values) in zip(cache.layers, joined):
        layer.keys, layer.values = keys, values


def select_rows(cache: DynamicCache, rows: Sequence[int], length: int) -> None:
    """Keep batch rows ``rows`` (in this order) and the first ``length`` positions, in place.

    All or nothing: every layer's new tensors are allocated before any layer is replaced (see
    :func:`keep_rows_in_place` for a way that allocates nothing)."""
    index = torch.tensor(list(rows), dtype=torch.long, device=cache.layers[0].keys.device)  # [k]
    kept = [(layer.keys.index_select(0, index)[..., :length, :], layer.values.index_select(0, index)[..., :length, :])
            for layer in cache.layers]
    for layer, (keys, values) in zip(cache.layers, kept):
        layer.keys, layer.values = keys, values


def keep_rows_in_place(cache: DynamicCache, rows: Sequence[int], length: int) -> None:
    """Like :func:`select_rows` for increasing ``rows``, without allocating: row ``rows[i]`` is copied onto row
    ``i`` (never onto a row still to be read, as ``rows[i] >= i``) and every layer becomes a view of its first
    ``len(rows)`` rows. The dropped rows' memory is freed when the next tree pass concatenates new positions."""
    rows = list(rows)
    if any(b <= a for a, b in zip(rows, rows[1:])):
        raise ValueError(f"rows must be increasing, got {rows}")
    with torch.inference_mode():  # the caches' tensors are inference tensors: updated in place only in this mode
        for layer in cache.layers:
            for name in ("keys", "values"):
                states = getattr(layer, name)  # [batch, heads, seq, head_dim]
                for target, source in enumerate(rows):
                    if target != source:
                        states[target].copy_(states[source])
                setattr(layer, name, states[:len(rows), ..., :length, :])


def compact_rows(cache: DynamicCache, tree_start: int, lengths: Sequence[int], keeps: Sequence[Sequence[int]]
                 ) -> list[int]:
    """Per batch row b, move tree nodes ``keeps[b]`` (indices into the tree block at ``tree_start``) to just after
    the row's valid prefix ``lengths[b]``; crop the cache to the longest new length. Returns the new lengths.

    (:meth:`lookahead.runner.ModelRunner.compact` sends one row whose prefix fills the cache to
    :func:`compact_cache` instead.)
    """
    new_lengths = [length + len(keep) for length, keep in zip(lengths, keeps)]
    end = max(new_lengths)
    rows = [b for b, keep in enumerate(keeps) for _ in keep]
    if rows:  # one gather and one scatter per layer and K/V for all rows: built from one upload of the indices
        moves = torch.tensor([rows,
                              [tree_start + node for keep in keeps for node in keep],
                              [lengths[b] + j for b, keep in enumerate(keeps) for j in range(len(keep))]],
                             dtype=torch.long, device=cache.layers[0].keys.device)  # [3, M]: row, source, target
        row, source, target = moves
        for layer in cache.layers:
            for name in ("keys", "values"):
                states = getattr(layer, name)  # [batch, heads, seq, head_dim]
                states[row, :, target] = states[row, :, source]  # gathered first (a copy), then written: [M, heads, d]
    for layer in cache.layers:
        layer.keys = layer.keys[..., :end, :]
        layer.values = layer.values[..., :end, :]
    return new_lengths
