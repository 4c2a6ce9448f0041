"""Draft tree -> tensors for one tree-masked forward pass. Pure functions, no model state.

A tree is given as ``tokens`` and ``parents`` with the root at index 0 (``parents[0] == -1``) and every parent
listed before its children. The root is the last emitted token, which is not in the KV cache yet.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numba as nb
import numpy as np
import torch


@dataclass(frozen=True)
class TreeBuffers:
    """Tensors describing one draft tree of ``n`` nodes (root included)."""

    input_ids: torch.Tensor  # [n] long: token of each node
    parents: torch.Tensor  # [n] long: parent index, -1 for the root
    depths: torch.Tensor  # [n] long: 0 for the root
    ancestor_mask: torch.Tensor  # [n, n] bool: [i, j] True iff j is i or an ancestor of i

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: torch.device | str) -> TreeBuffers:
        """The same tree on ``device``, moved in one upload (a no-op where it already is)."""
        device = torch.device(device)
        if self.input_ids.device == device:
            return self
        n = self.size
        packed = torch.cat([self.input_ids, self.parents, self.depths, self.ancestor_mask.long().flatten()])
        ids, parents, depths, mask = packed.to(device).split([n, n, n, n * n])  # [n], [n], [n], [n * n]
        return TreeBuffers(ids, parents, depths, mask.view(n, n).bool())


def validate_tree(tokens: Sequence[int], parents: Sequence[int]) -> None:
    """Raise ValueError unless ``parents`` describes a tree rooted at 0 with parents before children."""
    if len(tokens) == 0:
        raise ValueError("a draft tree needs at least its root token")
    if len(tokens) != len(parents):
        raise ValueError(f"tokens ({len(tokens)}) and parents ({len(parents)}) must have the same length")
    if parents[0] != -1:
        raise ValueError(f"node 0 must be the root (parent -1), got parent {parents[0]}")
    for i, p in enumerate(parents[1:], start=1):
        if not 0 <= p < i:
            raise ValueError(f"node {i} has parent {p}; parents must come before their children")


def node_depths(parents: Sequence[int]) -> list[int]:
    """Depth of every node (root 0), parents listed before children."""
    depths = [0] * len(parents)
    for i in range(1, len(parents)):
        depths[i] = depths[parents[i]] + 1
    return depths


@nb.njit(cache=True, nogil=True)
def _tree_arrays(parents):  # pragma: no cover - compiled
    """(first node whose parent does not come before it, or -1; depths ``[n]``; ancestor mask ``[n, n]``) of a
    tree whose node 0 is the root: each node sees what its parent sees, plus itself."""
    n = len(parents)
    depths = np.zeros(n, np.int64)
    mask = np.zeros((n, n), np.bool_)
    mask[0, 0] = True
    for i in range(1, n):
        p = parents[i]
        if p < 0 or p >= i:
            return i, depths, mask
        depths[i] = depths[p] + 1
        for j in range(p + 1):  # the parent's ancestors all come before it
            mask[i, j] = mask[p, j]
        mask[i, i] = True
    return -1, depths, mask


def build_tree(tokens: Sequence[int], parents: Sequence[int], device: torch.device | str = "cpu") -> TreeBuffers:
    """Flatten a draft tree into ids, depths and the ancestor mask (one compiled pass; checked as
    :func:`validate_tree` checks it)."""
    if len(tokens) == 0 or len(tokens) != len(parents) or parents[0] != -1:
        validate_tree(tokens, parents)  # raises, saying what is wrong
    parents_np = np.asarray(parents, np.int64)  # [n]
    bad, depths, mask = _tree_arrays(parents_np)  # [n], [n, n]
    if bad >= 0:
        raise ValueError(f"node {bad} has parent {parents[bad]}; parents must come before their children")
    return TreeBuffers(
        input_ids=torch.tensor(tokens, dtype=torch.long, device=device),
        parents=torch.from_numpy(parents_np).to(device),
        depths=torch.from_numpy(depths).to(device),
        ancestor_mask=torch.from_numpy(mask).to(device),
    )


def position_ids(tree: TreeBuffers, prefix_length: int) -> torch.Tensor:
    """Position of every node: prefix length + depth. Returns [1, n]."""
    return (tree.depths + prefix_length).unsqueeze(0)


def attention_mask(tree: TreeBuffers, prefix_length: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """4-D additive mask [1, 1, n, prefix_length + n]: the whole cached prefix plus the node's ancestors."""
    n = tree.size
    device = tree.ancestor_mask.device
    visible = torch.ones(n, prefix_length + n, dtype=torch.bool, device=device)  # [n, P + n]
    visible[:, prefix_length:] = tree.ancestor_mask
    additive = torch.zeros(n, prefix_length + n, dtype=dtype, device=device)
    additive.masked_fill_(~visible, torch.finfo(dtype).min)
    return additive[None, None]


def root_to_node_paths(parents: Sequence[int]) -> list[list[int]]:
    """For every node, the node indices from the root down to it (both included)."""
    paths: list[list[int]] = [[0]]
    for i in range(1, len(parents)):
        paths.append(paths[parents[i]] + [i])
    return paths


@dataclass(frozen=True)
class BatchInputs:
    """Model inputs of one batched tree pass: every row's tree padded to the largest one."""

    input_ids: torch.Tensor  # [B, N] long; padding nodes repeat the root token
    position_ids: torch.Tensor  # [B, N] long
    attention_mask: torch.Tensor  # [B, 1, N, C + N] additive


def batch_inputs(trees: Sequence[TreeBuffers], prefix_lengths: Sequence[int], cache_length: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> BatchInputs:
    """Stack per-row trees for one pass after a batch cache of ``cache_length`` positions.

    Row b's nodes see the row's valid prefix ``[0, prefix_lengths[b])`` and their ancestors in the tree block that
    starts at ``cache_length``; stale cache positions of shorter rows are hidden. Padding nodes see only themselves.
    The small per-row tensors are stacked where the trees are and go to ``device`` (default: the trees' device) in
    one upload; the mask, which grows with the context, is expanded there.
    """
    host = trees[0].input_ids.device
    device = torch.device(device) if device is not None else host
    width = max(t.size for t in trees)
    rows = len(trees)
    input_ids = torch.zeros(rows, width, dtype=torch.long, device=host)  # [B, N]
    positions = torch.zeros(rows, width, dtype=torch.long, device=host)  # [B, N]
    ancestors = torch.zeros(rows, width, width, dtype=torch.long, device=host)  # [B, N, N]
    diagonal = torch.arange(width, device=host)
    ancestors[:, diagonal, diagonal] = 1  # padding nodes see themselves
    for b, (tree, prefix) in enumerate(zip(trees, prefix_lengths)):
        n = tree.size
        input_ids[b, :n] = tree.input_ids
        input_ids[b, n:] = tree.input_ids[0]
        positions[b, :n] = tree.depths + prefix
        positions[b, n:] = prefix
        ancestors[b, :n, :n] = tree.ancestor_mask
    prefixes = torch.tensor(list(prefix_lengths), dtype=torch.long, device=host)  # [B]
    packed = torch.cat([input_ids.flatten(), positions.flatten(), prefixes, ancestors.flatten()]).to(device)
    input_ids, positions, prefixes, ancestors = packed.split([rows * width, rows * width, rows, rows * width * width])
    input_ids, positions = input_ids.view(rows, width), positions.view(rows, width)
    keys = torch.arange(cache_length, device=device)  # [C]
    cached = (keys[None, None, :] < prefixes[:, None, None]).expand(rows, width, cache_length)  # [B, N, C]
    visible = torch.cat([cached, ancestors.view(rows, width, width).bool()], dim=-1)  # [B, N, C + N]
    additive = torch.zeros(rows, width, cache_length + width, dtype=dtype, device=device)
    additive.masked_fill_(~visible, torch.finfo(dtype).min)
    return BatchInputs(input_ids, positions, additive[:, None])
