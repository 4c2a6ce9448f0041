"""KV cache compaction: keep the prefix plus the accepted tree nodes, in path order."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def check_compactable(cache: DynamicCache) -> None:
    """Raise TypeError unless every layer is a plain growing DynamicLayer (no sliding window, no quantization)."""
    if not isinstance(cache, DynamicCache):
        raise TypeError(f"lookahead needs a transformers DynamicCache, got {type(cache).__name__}")
    for i, layer in enumerate(cache.layers):
        if type(layer) is not DynamicLayer:
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
        end = prefix_length + len(keep)
        for layer in cache.layers:
            layer.keys = layer.keys[..., :end, :]
            layer.values = layer.values[..., :end, :]
        return
    index = torch.tensor(keep, dtype=torch.long, device=cache.layers[0].keys.device) + prefix_length  # [k]
    end = prefix_length + len(keep)
    for layer in cache.layers:
        # gather first (a copy), then write in place: only the kept nodes move, the prefix is not copied
        layer.keys[..., prefix_length:end, :] = layer.keys.index_select(-2, index)  # [batch, heads, k, head_dim]
        layer.values[..., prefix_length:end, :] = layer.values.index_select(-2, index)
        layer.keys = layer.keys[..., :end, :]
        layer.values = layer.values[..., :end, :]
