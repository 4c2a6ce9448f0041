"""How a Ray worker builds its engine: a small picklable description instead of a loaded model."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import torch

from lookahead.budget import CostCurve
from lookahead.config import LookaheadConfig
from lookahead.engine import LookaheadGenerator
from lookahead.models import load_model


@dataclass(frozen=True)
class GeneratorSpec:
    """Everything a worker needs to load the same engine as the local commands.

    Args:
        model: ``"default"``, an HF model id, a local folder or a ``.gguf`` file (as ``--model``).
        dtype: ``"auto"``, ``"float32"``, ``"float16"`` or ``"bfloat16"`` (as ``--dtype``).
        device: ``"cpu"``, ``"cuda"`` ... or None (CUDA when the worker sees a GPU).
        config: the engine's knobs.
        cost_curve: a fixed cost curve (None: measured on the worker, or read from the cost cache).
        threads: torch intra-op threads of the worker (None: leave torch's default, which Ray sets from the
            worker's CPUs).
    """

    model: str = "default"
    dtype: str = "auto"
    device: str | None = None
    config: LookaheadConfig = field(default_factory=LookaheadConfig)
    cost_curve: CostCurve | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads must be an integer >= 1 or None, got {self.threads!r}")

    @classmethod
    def from_args(cls, args: argparse.Namespace, threads: int | None = None) -> GeneratorSpec:
        """The spec of the shared model options of the command line (``--model``, ``--dtype``, ``--device``,
        ``--decoding-length``, ``--branch-length``, ``--fixed-draft``)."""
        config = LookaheadConfig(decoding_length=args.decoding_length, branch_length=args.branch_length,
                                 adaptive=not args.fixed_draft)
        return cls(model=args.model, dtype=args.dtype, device=args.device, config=config, threads=threads)

    def build(self) -> LookaheadGenerator:
        """Load the model and return its engine (run this inside the worker)."""
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        model, tokenizer = load_model(self.model, dtype=self.dtype, device=self.device)
        return LookaheadGenerator(model, tokenizer, self.config, cost_curve=self.cost_curve)
