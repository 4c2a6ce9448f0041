"""CPU kernel choices for small verification passes: skinny matrix products and grouped-query attention.

On CPU, ``F.linear`` with 2..16 rows goes through a GEMM that repacks the whole weight matrix on every call, so a
2-token pass of a small model costs about 1.7x a 1-token pass although both are bound by reading the weights once.
Computing the same product as ``W @ x.T`` reads the weight in its stored layout and makes a 1..4-token pass cost about
the same as a 1-token one. This module installs that choice on the ``nn.Linear`` layers of a model; it is active only
inside :func:`skinny_linear` on the calling thread, so every other use of the model (HF ``generate`` included) runs
the stock code. It changes the summation order only, not the maths.

Tree passes carry a 4-D mask, and with a mask transformers' SDPA path copies every key and value head
``num_key_value_groups`` times (``repeat_kv``) for grouped-query models: on CPU that copy of the whole cache, in every
layer of every pass, costs more than the attention itself. :func:`install_gqa_attention` lets SDPA read the grouped
heads directly (``enable_gqa``) for masked CPU calls inside :func:`skinny_linear`; every other call goes to the stock
function unchanged.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

MAX_ROWS = 16
_state = threading.local()


@contextmanager
def skinny_linear(enabled: bool = True) -> Iterator[None]:
    """Within this block, on this thread, installed linear layers use the skinny product for <= MAX_ROWS rows."""
    previous = skinny_enabled()
    _state.enabled = enabled
    try:
        yield
    finally:
        _state.enabled = previous


def skinny_enabled() -> bool:
    """Whether :func:`skinny_linear` is on in the calling thread (off in a thread that never turned it on)."""
    return getattr(_state, "enabled", False)


def skinny_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` for [rows, in] x [out, in] -> [rows, out], computed as ``weight @ x.T`` (>= 2 columns)."""
    rows = x.shape[0]
    columns = x.T if rows > 1 else torch.cat([x, x]).T  # [in, max(rows, 2)]
    # back to row-major: later ops (flash attention needs a contiguous head dim) are slow on a transposed view
    return torch.matmul(weight, columns).T[:rows].contiguous()


def _linear_forward(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if skinny_enabled() and x.device.type == "cpu" and x.shape[-1] == module.in_features:
        rows = x.numel() // x.shape[-1]
        if 0 < rows <= MAX_ROWS:
            out = skinny_matmul(x.reshape(rows, x.shape[-1]), module.weight)  # [rows, out]
            if module.bias is not None:
                out = out + module.bias
            return out.reshape(*x.shape[:-1], module.out_features)
    return F.linear(x, module.weight, module.bias)


def install_skinny_linear(model: torch.nn.Module) -> int:
    """Give every plain ``nn.Linear`` of ``model`` the switchable forward (and install the grouped-query attention);
    returns how many layers were changed."""
    install_gqa_attention()
    count = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear and "forward" not in module.__dict__:
            module.forward = partial(_linear_forward, module)
            count += 1
    return count


def _sdpa_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                  is_causal: bool | None = None, **kwargs: object) -> tuple[torch.Tensor, None]:
    """transformers' ``sdpa`` attention, with SDPA's own grouped-query support for masked CPU calls when enabled.

    query [b, heads, q, d], key and value [b, kv_heads, k, d], attention_mask [b, 1, q, k] -> ([b, q, heads, d], None).
    """
    if (skinny_enabled() and query.device.type == "cpu" and attention_mask is not None
            and getattr(module, "num_key_value_groups", 1) > 1 and not dropout
            and all(kwargs.get(name) is None for name in ("position_bias", "cache", "softcap"))
            and not kwargs.get("output_attentions", False)):
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling,
                                             enable_gqa=True)  # [b, heads, q, d]
        return out.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def install_gqa_attention() -> None:
    """Register :func:`_sdpa_forward` as transformers' ``sdpa`` attention (idempotent; stock outside skinny_linear)."""
    if AttentionInterface._global_mapping.get("sdpa") is not _sdpa_forward:
        AttentionInterface.register("sdpa", _sdpa_forward)
