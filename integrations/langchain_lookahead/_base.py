"""Fields and request plumbing shared by :class:`LookaheadLLM` and :class:`ChatLookahead`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from lookahead.config import LookaheadConfig
from lookahead.inputs import check_positive_int, check_stop
from lookahead.pacing import StreamChunking
from lookahead.sampling import SamplingParams

from ._engine import DocumentRouter, EngineHandle, check_documents, get_engine, register_engine

#: environment variable naming the model when none is passed
MODEL_ENV = "LOOKAHEAD_MODEL"
#: per-call keyword arguments the LangChain classes understand (anything else is refused with this list)
CALL_KWARGS = ("documents", "max_new_tokens", "max_tokens", "model", "n", "temperature", "top_p", "top_k", "seed",
               "prediction")
#: the per-call keyword arguments that choose how tokens are drawn
SAMPLING_KWARGS = ("temperature", "top_p", "top_k", "seed")


class LookaheadParams(BaseModel):
    """Model selection and decoding knobs. Constructing an object is cheap: the model is loaded on the first call
    (once per process for the same settings, so instances naming the same model share its global trie), unless a
    prebuilt ``generator`` is given."""

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True, protected_namespaces=())

    model_name: str = Field(default_factory=lambda: os.environ.get(MODEL_ENV) or "default", alias="model")
    """'default' (the embedded SmolLM2-135M-Instruct), a Hugging Face model id in the local cache, a local model
    directory or a .gguf file. Default: ``$LOOKAHEAD_MODEL``, else 'default'."""
    dtype: str = "auto"
    """auto (bfloat16 on a CUDA GPU that supports it, float16 on other GPUs, float32 on CPU), float32, float16 or
    bfloat16."""
    device: str | None = None
    """cpu, cuda, cuda:1 ... (None: CUDA when available, else CPU)."""
    max_new_tokens: int = Field(default=256, alias="max_tokens", ge=1)
    """Most new tokens per call (``max_tokens`` is accepted as an alias)."""
    temperature: float | None = None
    """None or 0: greedy, exactly the tokens of plain greedy decoding. Above 0: lossless sampling, every token drawn
    from the same distribution as Hugging Face sampling (with ``seed``, the same tokens)."""
    top_p: float | None = None
    """Nucleus sampling threshold in (0, 1] when sampling (None: the model's generation config)."""
    top_k: int | None = None
    """Keep the k most likely tokens when sampling (0: off; None: the model's generation config)."""
    seed: int | None = None
    """Seed of each sampled call (reproducible output); None draws a fresh one."""
    stop: list[str] | None = None
    """Default stop strings; the output is cut right before the first one."""
    n: int = Field(default=1, ge=1)
    """Completions per prompt. Above 1 they come from :class:`lookahead.multidraft.MultiDraftGenerator` (tree
    method): the first is the greedy output, the others follow by model log-probability (not with streaming)."""
    decoding_length: int | None = None
    """Most draft nodes verified per pass (None: the engine default)."""
    branch_length: int | None = None
    """Deepest draft path (None: the engine default)."""
    adaptive: bool = True
    """Pick the draft size each step from the measured cost model (False: always ``decoding_length`` nodes)."""
    lookahead_config: dict[str, Any] | None = None
    """Any other :class:`lookahead.config.LookaheadConfig` knobs."""
    use_lookahead: bool = True
    """False runs plain Hugging Face greedy ``generate`` on the same model: the baseline for A/B comparisons."""
    streaming: bool = False
    """Accepted for LangChain compatibility: ``invoke`` then goes through the streaming path."""
    stream_chunk: str = "run"
    """How ``stream`` cuts an answer (:class:`lookahead.pacing.StreamChunking`): ``"run"`` (one chunk per accepted
    run, the fastest), ``"token"`` or ``"fixed:N"`` (N tokens per chunk at a steady cadence, so chunk sizes and times
    do not tell how much was drafted). Only streams are paced (``invoke`` too with ``streaming=True``)."""
    generator: Any = Field(default=None, exclude=True)
    """A prebuilt :class:`lookahead.engine.LookaheadGenerator` (then nothing is loaded)."""

    _handle: EngineHandle | None = PrivateAttr(default=None)
    _router: DocumentRouter = PrivateAttr(default_factory=DocumentRouter)

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        allowed = ("auto", "float32", "float16", "bfloat16")
        if value not in allowed:
            raise ValueError(f"dtype must be one of {', '.join(allowed)}, got {value!r}")
        return value

    @field_validator("stream_chunk")
    @classmethod
    def _known_chunking(cls, value: str) -> str:
        return str(StreamChunking.parse(value))  # a clear ValueError naming the allowed forms

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not all(isinstance(s, str) for s in value):
            raise ValueError("stop must be a list of strings")
        return value

    @model_validator(mode="after")
    def _check_knobs(self) -> LookaheadParams:
        self.lookahead_settings()  # LookaheadConfig validates every knob with a clear message
        self.sampling({})  # SamplingParams validates the sampling fields with a clear message
        if self.generator is not None:
            self._handle = register_engine(self.generator)
            if "model_name" not in self.model_fields_set:
                self.model_name = self._handle.name
        return self

    # ------------------------------------------------------------------ engine access

    def lookahead_settings(self) -> LookaheadConfig:
        """The engine knobs these fields describe."""
        changes = dict(self.lookahead_config or {})
        if self.decoding_length is not None:
            changes["decoding_length"] = self.decoding_length
        if self.branch_length is not None:
            changes["branch_length"] = self.branch_length
        changes.setdefault("adaptive", self.adaptive)
        return LookaheadConfig().with_updates(**changes)

    def sampling(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Keyword arguments of the engine's ``generate``/``stream`` for this call's sampling settings (the fields,
        overridden per call); empty for greedy decoding."""
        values = {name: kwargs.get(name, getattr(self, name)) for name in SAMPLING_KWARGS}
        params = SamplingParams(do_sample=True, **values)  # raises a clear ValueError on a bad value
        if values["temperature"] in (None, 0, 0.0):
            return {}
        return {"do_sample": True, **{k: v for k, v in asdict(params).items() if k in values and v is not None}}

    def engine(self, model: str | None = None) -> EngineHandle:
        """The loaded engine (loading the model on first use); ``model`` picks another model for one call."""
        if model is not None and model != self.model_name:
            return get_engine(model, self.dtype, self.device, self.lookahead_settings())
        if self._handle is None:
            self._handle = get_engine(self.model_name, self.dtype, self.device, self.lookahead_settings())
        return self._handle

    @property
    def loaded(self) -> bool:
        """Whether this object's engine is loaded (constructors load nothing; the first call loads it)."""
        return self._handle is not None

    @property
    def router(self) -> DocumentRouter:
        """Where :class:`LookaheadRetriever` leaves the documents it retrieved for this model's next call."""
        return self._router

    def route_documents(self, run_key: Any, documents: Sequence[Any]) -> None:
        """Seed the request-local trie of this model's call in the chain run ``run_key`` with ``documents``."""
        self._router.file(run_key, check_documents(documents))

    def _request(self, stop: list[str] | None, kwargs: dict[str, Any], parent_run_id: Any, prompt_text: str
                 ) -> tuple[EngineHandle, int, list[str], list[str]]:
        """Resolve one call's engine, token limit, stop strings and documents (explicit + routed)."""
        unknown = sorted(set(kwargs) - set(CALL_KWARGS))
        if unknown:
            raise TypeError(f"unexpected keyword argument(s) {unknown}; per-call options: {', '.join(CALL_KWARGS)}")
        limit = kwargs.get("max_new_tokens", kwargs.get("max_tokens", self.max_new_tokens))
        check_positive_int("max_new_tokens", limit)
        stops = list(check_stop(list(stop) if stop is not None else list(self.stop or [])))
        documents = check_documents(kwargs.get("documents"))
        for text in self._router.take(parent_run_id, prompt_text):
            if text not in documents:
                documents.append(text)
        model = kwargs.get("model")
        if model is not None and not isinstance(model, str):
            raise TypeError(f"model must be a string, got {type(model).__name__}")
        return self.engine(model), limit, stops, documents

    def _completions(self, kwargs: dict[str, Any]) -> int:
        """How many completions this call asks for (``n=`` per call, else the field)."""
        n = kwargs.get("n", self.n)
        check_positive_int("n", n)
        if n > 1 and not self.use_lookahead:
            raise ValueError("n > 1 needs use_lookahead=True (the plain baseline returns one completion)")
        if n > 1 and self.sampling(kwargs):
            raise ValueError("n > 1 returns the n most probable completions; it cannot be combined with temperature "
                             "> 0 (call several times with different seeds to get sampled completions)")
        return n

    def _params(self) -> dict[str, Any]:
        data: dict[str, Any] = {"model_name": self.model_name, "dtype": self.dtype, "device": self.device,
                                "max_new_tokens": self.max_new_tokens, "use_lookahead": self.use_lookahead,
                                "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                                "seed": self.seed}
        data.update(self.lookahead_settings().to_dict())
        return data
