"""What "lossless" means per dtype, checked (docs/architecture.md, "What lossless means per dtype").

A tree pass runs other kernels than HF's one-token step (another matrix shape, so another summation order; masked
attention), so two logits that tie within the dtype's rounding can swap. The guarantee, in every dtype, is that every
emitted token is the model's own choice in the verifying pass, and that output equals HF's up to the first such
near-tie. In float32 the tolerance is about 1e-6 of the row's largest logit, so a near-tie there is a true tie of
rounding (the edit case edit-010: a 5.7e-6 gap against a tolerance of 2.1e-5) and anything else is a bug. This module
tells the two apart:

- :func:`first_divergence`: where two token lists part.
- :func:`classify`: at that position, one teacher-forced pass of the model (in its own dtype) over the prompt and the
  reference's prefix; a *near-tie* when the token the output chose there is within :func:`rounding_tolerance` of the
  largest logit, else *hard* (the same rule in every dtype, with that dtype's epsilon).
- :func:`classify_text`: the same for an output known only as text (a server's answer).
- :func:`worst_margin`: a teacher-forced pass over prompt + output; how far each emitted token's logit falls below
  the largest logit at its position (every one should be within the tolerance).

The tolerance is ``TOLERANCE_EPS * eps(dtype) * max|logit|`` over the vocabulary at that position: the spacing of
representable values near the row's largest logit is between ``eps/2`` and ``eps`` of it, so the tolerance is
between 8 and 16 units in the last place of the largest logit (see :data:`TOLERANCE_EPS` for why 8).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

__all__ = [
    "EXACT_DTYPES", "HARD", "IDENTICAL", "NEAR_TIE", "TOLERANCE_EPS", "Margin", "Verdict", "classify",
    "classify_position", "classify_text", "first_divergence", "first_text_divergence", "position_logits",
    "rounding_tolerance", "worst_margin",
]

IDENTICAL, NEAR_TIE, HARD = "identical", "near-tie", "hard"
#: dtypes whose tolerance is so small that a near-tie there is a true tie of rounding (token identity up to ties)
EXACT_DTYPES = (torch.float32, torch.float64)
#: the tolerance in units of eps(dtype) times the row's largest |logit|. Two correct passes in half precision round
#: differently in every layer, so their logits differ by several units in the last place, not one. Measured as
#: max|logit difference| / (eps * max|logit|) between HF's one-token steps and one teacher-forced pass over the same
#: tokens: up to 3.4 (median 1.5) on the default model in bfloat16 (3 RAG cases x 32 tokens), up to 1 on tiny
#: random models (bfloat16 and float16). A gap is a difference of two logits, each off by up to that much: twice
#: 3.4, rounded up, is 8. Real divergences seen so far had gaps of at most 0.8 on that scale; a deliberately leaked
#: tree mask mostly lands at 20 or more. On the default model (largest |logit| about 30) 8 is a gap of about 1.9
#: logits in bfloat16.
TOLERANCE_EPS = 8.0


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """The first index where ``a`` and ``b`` differ (the shorter one's length when one is a prefix of the other);
    None when they are equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def first_text_divergence(decode: Callable[[Sequence[int]], str], tokens: Sequence[int], text: str) -> int | None:
    """The first index of ``tokens`` whose decoded text no longer agrees with ``text``; None when ``decode(tokens)``
    equals ``text`` (for outputs known only as text, such as a server's answers).

    Prefixes that end inside a multi-byte character (they decode to U+FFFD) are passed over; when ``text`` goes on
    after all of ``tokens`` agreed, the answer is ``len(tokens)``.
    """
    if decode(list(tokens)) == text:
        return None
    for i in range(len(tokens)):
        prefix = decode(list(tokens[:i + 1]))
        if prefix.endswith("\ufffd"):
            continue
        if not text.startswith(prefix):
            return i
    return len(tokens)


def _logits_to_keep(model: Any) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - a forward without a signature
        return False


def position_logits(model: Any, prompt_ids: Sequence[int], tokens: Sequence[int], last: int | None = None
                    ) -> torch.Tensor:
    """Teacher-forced logits: row ``i`` is the model's next-token logits after ``prompt + tokens[:i]``, from one
    plain causal pass (no cache) in the model's own dtype, returned as float32.

    Args:
        tokens: at least one token; the last one is predicted, never fed.
        last: only the last ``last`` rows (default all ``len(tokens)``).

    Returns [rows, V].
    """
    if not tokens:
        raise ValueError("position_logits needs at least one token to predict")
    rows = len(tokens) if last is None else max(1, min(last, len(tokens)))
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt_ids) + list(tokens[:-1])], device=device)  # [1, P + T - 1]
    if ids.shape[1] == 0:
        raise ValueError("position_logits needs a prompt of at least one token")
    extra = {"logits_to_keep": rows} if _logits_to_keep(model) else {}
    with torch.inference_mode():
        logits = model(input_ids=ids, use_cache=False, **extra).logits  # [1, rows or P + T - 1, V]
    return logits[0, -rows:].float()  # [rows, V]


def rounding_tolerance(logits: torch.Tensor, dtype: torch.dtype, k: float = TOLERANCE_EPS) -> torch.Tensor:
    """``k * eps(dtype) * max|logit|`` per row: [..., V] -> [...] (float32)."""
    return k * torch.finfo(dtype).eps * logits.float().abs().amax(dim=-1)


@dataclass(frozen=True)
class Verdict:
    """Where an output parts from its reference, and what kind of difference that is.

    In the teacher-forced pass over the reference's prefix, ``gap`` is how far the lower of the two tokens (the
    output's and the reference's) falls below the largest logit: both are the model's own choice within rounding,
    a near-tie, when ``gap <= tolerance`` (the dtype's epsilon decides: about 1e-6 of the largest logit in
    float32). When the output's token is unknown (text only), it is taken to be the best token other than the
    reference's.
    """

    kind: str  # IDENTICAL, NEAR_TIE or HARD
    dtype: str
    position: int | None = None  # first new-token index where they part
    output_token: int | None = None
    reference_token: int | None = None
    gap: float | None = None
    top2_gap: float | None = None  # the reference pass's two largest logits at ``position``
    tolerance: float | None = None

    @property
    def ok(self) -> bool:
        """Identical or a near-tie: what the dtype promises."""
        return self.kind != HARD

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        if self.kind == IDENTICAL:
            return "identical"
        where = f"{self.kind} at new token {self.position} ({self.dtype}"
        if self.gap is None:
            return where + ")"
        return where + f": logit gap {self.gap:.4g}, tolerance {self.tolerance:.4g})"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def classify_position(model: Any, prompt_ids: Sequence[int], reference: Sequence[int], position: int,
                      output_token: int | None = None, k: float = TOLERANCE_EPS) -> Verdict:
    """Classify a difference from ``reference`` that starts at new-token index ``position``.

    One teacher-forced pass over ``prompt + reference[:position]``: a near-tie when both the reference's token
    and ``output_token`` are within the dtype's rounding of the largest logit there (see :class:`Verdict`).
    ``output_token``: the token the output chose (None when only its text is known: the best token other than the
    reference's stands in). The same rule in every dtype (float32's epsilon in float32); hard when the reference has
    no token at ``position``.
    """
    dtype = model.dtype
    name = _dtype_name(dtype)
    if position >= len(reference):
        return Verdict(HARD, name, position, output_token)
    expected = int(reference[position])
    row = position_logits(model, prompt_ids, list(reference[:position + 1]), last=1)[0]  # [V]
    top2 = row.topk(2).values
    top2_gap = float(top2[0] - top2[1])
    if output_token is None:  # the output's best possible token: the largest logit but the reference's
        other = float(torch.cat([row[:expected], row[expected + 1:]]).max())
    else:
        other = float(row[output_token])
    gap = float(row.max()) - min(other, float(row[expected]))
    tolerance = float(rounding_tolerance(row, dtype, k))
    tie = gap <= tolerance
    return Verdict(NEAR_TIE if tie else HARD, name, position, output_token, expected, gap, top2_gap, tolerance)


def classify(model: Any, prompt_ids: Sequence[int], output: Sequence[int], reference: Sequence[int],
             k: float = TOLERANCE_EPS) -> Verdict:
    """Compare a greedy ``output`` with the ``reference`` (HF greedy on the same model, same dtype).

    Identical, a near-tie (where they part, the output's token is within the dtype's rounding of the largest logit
    of a teacher-forced pass over the reference), or hard (anything else; in float32 a near-tie is a gap within about
    1e-6 of the largest logit).
    """
    position = first_divergence(output, reference)
    if position is None:
        return Verdict(IDENTICAL, _dtype_name(model.dtype))
    if position >= len(output):  # the output stopped where the reference went on
        return Verdict(HARD, _dtype_name(model.dtype), position, None, int(reference[position]))
    return classify_position(model, prompt_ids, reference, position, int(output[position]), k)


def classify_text(model: Any, decode: Callable[[Sequence[int]], str], prompt_ids: Sequence[int], text: str,
                  reference: Sequence[int], k: float = TOLERANCE_EPS) -> Verdict:
    """:func:`classify` for an output known only as its ``text``: it parts from ``reference`` at the first token
    whose decoded prefix disagrees with ``text`` (:func:`first_text_divergence`), and the reference's top-2 gap
    there decides (the output's own token is unknown)."""
    position = first_text_divergence(decode, reference, text)
    if position is None:
        return Verdict(IDENTICAL, _dtype_name(model.dtype))
    return classify_position(model, prompt_ids, reference, position, None, k)


@dataclass(frozen=True)
class Margin:
    """How far the emitted tokens fall below the largest logit of a teacher-forced pass (worst position)."""

    worst: float  # largest logit minus the emitted token's logit, at ``position``
    position: int | None  # the position furthest over (or least under) its tolerance; None for no tokens
    tolerance: float  # the tolerance at ``position``
    within: bool  # every position's gap is within its tolerance


def worst_margin(model: Any, prompt_ids: Sequence[int], output: Sequence[int], k: float = TOLERANCE_EPS) -> Margin:
    """Teacher-force ``prompt + output`` in the model's dtype; every emitted token should be within the dtype's
    rounding of the largest logit at its position (in float32 too, where the tolerance is tiny)."""
    if not output:
        return Margin(0.0, None, 0.0, True)
    logits = position_logits(model, prompt_ids, output)  # [T, V]
    chosen = logits.gather(-1, torch.tensor(list(output), device=logits.device)[:, None])[:, 0]  # [T]
    gaps = logits.amax(-1) - chosen  # [T]
    tolerances = rounding_tolerance(logits, model.dtype, k)  # [T]
    excess = gaps - tolerances
    worst = int(excess.argmax())
    return Margin(float(gaps[worst]), worst, float(tolerances[worst]), bool((excess <= 0).all()))
