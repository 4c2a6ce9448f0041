"""A CPU kernel choice for the skinny matrix products of small verification passes.

On CPU, ``F.linear`` with 2..16 rows goes through a GEMM that repacks the whole weight matrix on every call, so a
2-token pass of a small model costs about 1.7x a 1-token pass although both are bound by reading the weights once.
Computing the same product as ``W @ x.T`` reads the weight in its stored layout and makes a 1..4-token pass cost about
the same as a 1-token one. This module installs that choice on the ``nn.Linear`` layers of a model; it is active only
inside :func:`skinny_linear` on the calling thread, so every other use of the model (HF ``generate`` included) runs
the stock code. It changes the summation order only, not the maths.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F

MAX_ROWS = 16
_state = threading.local()


@contextmanager
def skinny_linear(enabled: bool = True) -> Iterator[None]:
    """Within this block, on this thread, installed linear layers use the skinny product for <= MAX_ROWS rows."""
    previous = getattr(_state, "enabled", False)
    _state.enabled = enabled
    try:
        yield
    finally:
        _state.enabled = previous


def skinny_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` for [rows, in] x [out, in] -> [rows, out], computed as ``weight @ x.T`` (>= 2 columns)."""
    rows = x.shape[0]
    columns = x.T if rows > 1 else torch.cat([x, x]).T  # [in, max(rows, 2)]
    # back to row-major: later ops (flash attention needs a contiguous head dim) are slow on a transposed view
    return torch.matmul(weight, columns).T[:rows].contiguous()


def _linear_forward(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if getattr(_state, "enabled", False) and x.device.type == "cpu" and x.shape[-1] == module.in_features:
        rows = x.numel() // x.shape[-1]
        if 0 < rows <= MAX_ROWS:
            out = skinny_matmul(x.reshape(rows, x.shape[-1]), module.weight)  # [rows, out]
            if module.bias is not None:
                out = out + module.bias
            return out.reshape(*x.shape[:-1], module.out_features)
    return F.linear(x, module.weight, module.bias)


def install_skinny_linear(model: torch.nn.Module) -> int:
    """Give every plain ``nn.Linear`` of ``model`` the switchable forward; returns how many layers were changed."""
    count = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear and "forward" not in module.__dict__:
            module.forward = partial(_linear_forward, module)
            count += 1
    return count
