"""Model passes over a tree block that grows on top of a cached prefix, for decoders that need full logits.

The cache holds ``prefix_length`` positions, then the block: tree nodes in node order (node 0 is the block root,
``parents[0] == -1``, parents before children). :func:`run_nodes` runs the nodes ``start..n-1`` of such a tree
when the nodes ``0..start-1`` are already cached, with the 4-D mask, positions and tree tensors of
:mod:`lookahead.tree`; :func:`lookahead.kvcache.compact_cache` then keeps the accepted nodes. A root that is already
cached (``start == 1``) is how one model of an ensemble, or one completion of a multi-draft run, continues from a
token that another pass has processed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache

from .kernels import skinny_matmul
from .tree import attention_mask, build_tree, position_ids


def sees_whole_block(parents: Sequence[int], start: int) -> bool:
    """True when the only new node (``start == n - 1``) has every cached block node as an ancestor (a chain)."""
    if start != len(parents) - 1:
        return False
    node, seen = parents[start], 0
    while node >= 0:
        seen += 1
        node = parents[node]
    return seen == start


def run_nodes(decoder: torch.nn.Module, cache: DynamicCache, prefix_length: int, tokens: Sequence[int],
              parents: Sequence[int], start: int = 0, inputs_embeds: torch.Tensor | None = None,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Run nodes ``start..n-1`` of the tree; nodes ``0..start-1`` sit in ``cache`` right after the prefix.

    Args:
        decoder: the model's decoder (``model.get_decoder()``), called with a 4-D mask unless the pass is causal.
        cache: holds exactly ``prefix_length + start`` positions; grows by ``n - start``.
        tokens, parents: the whole tree (node 0 = block root); tokens of new nodes are ignored with ``inputs_embeds``.
        inputs_embeds: [n - start, d] input embeddings of the new nodes instead of their tokens.

    Returns the last hidden state of the new nodes, [n - start, d].
    """
    n = len(tokens)
    if not 0 <= start < n:
        raise ValueError(f"run_nodes: start must be in 0..{n - 1}, got {start}")
    device = next(decoder.parameters()).device
    inputs: dict[str, torch.Tensor] = {}
    if inputs_embeds is not None:
        inputs["inputs_embeds"] = inputs_embeds[None]  # [1, m, d]
    else:
        inputs["input_ids"] = torch.tensor([list(tokens[start:])], device=device)  # [1, m]
    if start == 0 and n == 1 or sees_whole_block(parents, start):  # causal: the default mask is the tree mask
        positions = torch.tensor([[prefix_length + n - 1]], device=device)  # [1, 1]
        hidden = decoder(**inputs, position_ids=positions, past_key_values=cache, use_cache=True).last_hidden_state
        return hidden[0]  # [1, d]
    tree = build_tree(tokens, parents, device=device)
    hidden = decoder(
        **inputs,
        position_ids=position_ids(tree, prefix_length)[:, start:],  # [1, m]
        attention_mask=attention_mask(tree, prefix_length, dtype)[:, :, start:],  # [1, 1, m, P + n]
        past_key_values=cache, use_cache=True,
    ).last_hidden_state  # [1, m, d]
    return hidden[0]  # [m, d]


def prefill(decoder: torch.nn.Module, cache: DynamicCache, token_ids: Sequence[int]) -> torch.Tensor:
    """Run a whole prompt (causal) into an empty cache; returns the last row of the hidden state, [1, d]."""
    device = next(decoder.parameters()).device
    hidden = decoder(input_ids=torch.tensor([list(token_ids)], device=device), past_key_values=cache,
                     use_cache=True).last_hidden_state  # [1, P, d]
    return hidden[0, -1:]  # [1, d]


def logits_rows(lm_head_weight: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """Float32 logits ``hidden @ W.T``: [n, d] -> [n, V] (on CPU as ``W @ hidden.T``, see lookahead.kernels)."""
    if hidden.device.type != "cpu":
        return torch.nn.functional.linear(hidden, lm_head_weight).float()  # [n, V]
    return skinny_matmul(hidden, lm_head_weight).float()  # [n, V]
