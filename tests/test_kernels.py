"""The switchable skinny-product forward of linear layers."""

from __future__ import annotations

import threading

import pytest
import torch

from lookahead.kernels import (
    LOOP_ROWS,
    MAX_ROWS,
    PARALLEL_MIN,
    install_skinny_linear,
    skinny_enabled,
    skinny_linear,
    skinny_matmul,
)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 7, LOOP_ROWS, MAX_ROWS])
def test_skinny_matmul_equals_linear_and_is_row_major(rows, dtype, threads):
    """Every row count, dtype (float32: the compiled loop up to LOOP_ROWS rows, split over two threads too) and a
    transposed (non-contiguous) input: the product of F.linear, up to summation order, in row-major layout."""
    torch.manual_seed(rows)
    x, w = torch.randn(rows, 48).to(dtype), torch.randn(683, 48).to(dtype)
    assert w.numel() >= PARALLEL_MIN  # large enough to be split over two threads
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for given in (x, x.T.contiguous().T):
            out = skinny_matmul(given, w)
            assert out.shape == (rows, 683) and out.is_contiguous() and out.dtype == dtype
            tolerance = 1e-5 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(out, torch.nn.functional.linear(x, w), rtol=tolerance, atol=tolerance)
    finally:
        torch.set_num_threads(before)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8, bias=False))


def test_install_changes_only_linear_layers_and_only_inside_the_context(monkeypatch):
    model = _model()
    assert install_skinny_linear(model) == 2
    assert install_skinny_linear(model) == 0  # idempotent
    calls = []
    import lookahead.kernels as kernels

    real = kernels.skinny_matmul
    monkeypatch.setattr(kernels, "skinny_matmul", lambda x, w: calls.append(x.shape) or real(x, w))
    x = torch.randn(1, 3, 16)
    plain = model(x)
    assert calls == []  # outside the context: the stock F.linear
    with skinny_linear():
        fast = model(x)
    assert calls == [(3, 16), (3, 32)]
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    calls.clear()
    with skinny_linear():
        model(torch.randn(1, MAX_ROWS + 1, 16))  # too many rows: the stock path
    assert calls == []


def test_the_switch_is_per_thread():
    seen = {}

    def other():
        seen["other"] = skinny_enabled()

    with skinny_linear():
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        seen["here"] = skinny_enabled()
    assert seen == {"other": False, "here": True}


def test_masked_cpu_attention_of_a_grouped_query_model_skips_the_head_copy(monkeypatch):
    """Inside the switch a tree pass reads grouped heads directly (no repeat_kv) and gives the stock hidden states."""
    from conftest import make_model, random_prompt
    from transformers import DynamicCache
    from transformers.integrations import sdpa_attention

    from lookahead.runner import ModelRunner

    model = make_model("llama", seed=3)
    assert model.config.num_attention_heads > model.config.num_key_value_heads  # grouped-query
    install_skinny_linear(model.get_decoder())
    runner, prompt = ModelRunner(model), random_prompt(5)
    tokens, parents = [7, 8, 9, 10, 11], [-1, 0, 0, 1, 2]  # a real tree: the pass needs its 4-D mask
    copies = []
    real_repeat = sdpa_attention.repeat_kv
    monkeypatch.setattr(sdpa_attention, "repeat_kv", lambda h, n: copies.append(n) or real_repeat(h, n))
    outputs = []
    for enabled in (False, True):
        with torch.inference_mode(), skinny_linear(enabled):
            cache = DynamicCache(config=model.config)
            runner.prefill(cache, prompt)
            outputs.append(runner.run_nodes(cache, len(prompt), tokens, parents))  # [5, d]
        if not enabled:
            assert copies, "the stock masked path repeats the key/value heads"
            copies.clear()
    assert copies == []
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)


def test_installing_the_kernels_keeps_torchs_thread_count():
    """Starting numba's OpenMP pool (the first parallel call) used to reset the process's OpenMP thread count: a
    user's one-thread setting became two. A fresh process, so that pool is not started yet."""
    import os
    import subprocess
    import sys

    code = ("import torch\n"
            "from lookahead.kernels import install_skinny_linear, skinny_linear, skinny_matmul\n"
            "install_skinny_linear(torch.nn.Linear(4, 4))\n"
            "with skinny_linear():\n"
            "    skinny_matmul(torch.randn(3, 48), torch.randn(683, 48))\n"
            "print(torch.get_num_threads())\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread the way users set it
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300,
                         env=env)
    assert out.stdout.strip() == "1"
