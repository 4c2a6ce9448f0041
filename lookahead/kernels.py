"""CPU kernel choices for small verification passes: skinny matrix products and grouped-query attention.

On CPU, ``F.linear`` with 2..16 rows goes through a GEMM that repacks the whole weight matrix on every call, so a
2-token pass of a small model costs about 1.7x a 1-token pass although both are bound by reading the weights once.
A compiled loop (numba) that reads each float32 weight row once for all rows of the pass makes a 4-token pass of the
default model cost about 1.3x a 1-token one and a 1-token pass itself about 16% cheaper (one thread, 1,024-token
context); other dtypes compute ``W @ x.T``, which
reads the weight in its stored layout. This module installs that choice on the ``nn.Linear`` layers of a model; it is
active only inside :func:`skinny_linear` on the calling thread, so every other use of the model (HF ``generate``
included) runs the stock code. It changes the summation order only, not the maths.

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

import numba as nb
import numpy as np
import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

MAX_ROWS = 16
LOOP_ROWS = 12  # the compiled loop's limit: past it, the rows of x no longer stay in cache and the GEMM is faster
PARALLEL_MIN = 1 << 15  # weights with fewer elements are multiplied on one thread (splitting costs more than it saves)
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
    """``x @ weight.T`` for [rows, in] x [out, in] -> [rows, out] without repacking ``weight``.

    float32 with at most ``LOOP_ROWS`` rows goes through a compiled loop that reads each weight row once for every
    row of ``x`` (large weights split over torch's threads where numba has a thread-safe threading layer); the rest
    through ``weight @ x.T`` (>= 2 columns)."""
    rows = x.shape[0]
    if rows <= LOOP_ROWS and x.dtype == torch.float32 and weight.dtype == torch.float32 and weight.is_contiguous():
        out = torch.empty(rows, weight.shape[0], dtype=torch.float32)  # [rows, out]
        args = (x.detach().contiguous().numpy(), weight.detach().numpy(), out.numpy())
        threads = min(torch.get_num_threads(), nb.config.NUMBA_NUM_THREADS)
        if threads > 1 and weight.numel() >= PARALLEL_MIN and _parallel_is_safe():
            if getattr(_state, "numba_threads", 0) != threads:  # numba's count is per thread; setting it costs
                nb.set_num_threads(threads)  # a few microseconds, and a pass makes ~200 of these calls
                _state.numba_threads = threads
            _rows_times_weight_parallel(*args, threads)
        else:
            _rows_times_weight(*args, 0, weight.shape[0])
        return out
    columns = x.T if rows > 1 else torch.cat([x, x]).T  # [in, max(rows, 2)]
    # back to row-major: later ops (flash attention needs a contiguous head dim) are slow on a transposed view
    return torch.matmul(weight, columns).T[:rows].contiguous()


@nb.njit(fastmath={"reassoc", "contract"}, nogil=True, cache=True)
def _rows_times_weight(x, weight, out, first, end):  # pragma: no cover - compiled
    """``out[:, first:end] = x @ weight[first:end].T`` for x [n, d], weight [m, d], out [n, m] (float32): each weight
    row is read once from memory and multiplied with up to four rows of ``x`` at a time (those stay in cache)."""
    n, d = x.shape
    for o in range(first, end):
        r = 0
        while r + 4 <= n:
            a0 = np.float32(0.0)
            a1 = np.float32(0.0)
            a2 = np.float32(0.0)
            a3 = np.float32(0.0)
            for i in range(d):
                w = weight[o, i]
                a0 += w * x[r, i]
                a1 += w * x[r + 1, i]
                a2 += w * x[r + 2, i]
                a3 += w * x[r + 3, i]
            out[r, o] = a0
            out[r + 1, o] = a1
            out[r + 2, o] = a2
            out[r + 3, o] = a3
            r += 4
        while r < n:
            a0 = np.float32(0.0)
            for i in range(d):
                a0 += weight[o, i] * x[r, i]
            out[r, o] = a0
            r += 1


@nb.njit(fastmath={"reassoc", "contract"}, nogil=True, cache=True, parallel=True)
def _rows_times_weight_parallel(x, weight, out, parts):  # pragma: no cover - compiled
    """:func:`_rows_times_weight` over ``parts`` slices of the weight rows at once."""
    m = weight.shape[0]
    step = (m + parts - 1) // parts
    for p in nb.prange(parts):
        _rows_times_weight(x, weight, out, p * step, min(m, (p + 1) * step))


_parallel_safe: bool | None = None


def _warm_up() -> None:
    """Compile (or load from numba's cache) the product loops now, so a model's first pass does not; the parallel one
    (and numba's thread pool) only where torch runs on several threads and will use it."""
    tiny = np.zeros((1, 4), np.float32)
    _rows_times_weight(tiny, tiny, np.zeros((1, 1), np.float32), 0, 1)
    if torch.get_num_threads() > 1:
        _parallel_is_safe()


def _parallel_is_safe() -> bool:
    """Whether numba's threading layer takes parallel calls from several threads at once (OpenMP or TBB; its
    fallback, the workqueue layer, aborts the process on concurrent launches). Decided once, on a tiny call."""
    global _parallel_safe
    if _parallel_safe is None:
        threads = torch.get_num_threads()  # starting numba's OpenMP pool resets the process's OpenMP thread count
        try:
            tiny = np.zeros((1, 4), np.float32)
            _rows_times_weight_parallel(tiny, tiny, np.zeros((1, 1), np.float32), 1)
            _parallel_safe = nb.threading_layer() in ("omp", "tbb")
        except Exception:  # noqa: BLE001 - no usable threading layer: one thread
            _parallel_safe = False
        finally:
            torch.set_num_threads(threads)
    return _parallel_safe


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
    _warm_up()
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
