"""The stop condition of one request: EOS, stop strings and ``max_new_tokens``, exactly where HF ``generate`` ends."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

from transformers import PreTrainedTokenizerBase


class Emitter:
    """Appends verified tokens one by one and ends the request exactly where HF ``generate`` would.

    A run ends at the first EOS token (kept), at the token whose text completes a stop string (kept; the text is cut
    before the stop string), or at ``max_new_tokens``. Text deltas hold back a possible partial stop string and an
    incomplete UTF-8 character until they are settled.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, eos: Iterable[int], stop: Sequence[str],
                 max_new_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.eos = set(eos)
        self.stop = [s for s in stop if s]
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.max_new_tokens = max_new_tokens
        self.generated: list[int] = []
        self.text = ""  # text emitted so far
        self.finish: str | None = None

    def fork(self) -> Emitter:
        """An independent copy (its own token list) that continues from here."""
        twin = copy.copy(self)
        twin.generated = list(self.generated)
        return twin

    def _decode(self) -> str:
        return self.tokenizer.decode(self.generated, skip_special_tokens=True)

    def _cut(self, text: str) -> str:
        found = [p for p in (text.find(s) for s in self.stop) if p >= 0]
        return text[: min(found)] if found else text

    def push(self, tokens: Sequence[int]) -> tuple[list[int], str]:
        """Take this step's tokens; returns those kept and the new text. Sets ``finish`` when the request ends."""
        run: list[int] = []
        for token in tokens:
            self.generated.append(token)
            run.append(token)
            if token in self.eos:
                self.finish = "eos"
            elif self.stop and any(s in self._decode() for s in self.stop):
                self.finish = "stop"
            elif len(self.generated) >= self.max_new_tokens:
                self.finish = "length"
            if self.finish:
                break
        full = self._cut(self._decode()) if self.stop else self._decode()
        end = len(full)
        if not self.finish:
            end -= self.holdback if self.stop else 0
            while end > 0 and full[end - 1] == "\ufffd":  # an incomplete UTF-8 character
                end -= 1
        delta = full[len(self.text):max(end, len(self.text))]
        self.text += delta
        return run, delta

    def settle(self, tokens: Sequence[int]) -> tuple[str, str]:
        """The text and finish reason of a whole output decoded elsewhere (a plain-HF baseline): the text cut before
        a stop string; an output that ends without EOS or a stop string ends by ``"length"``."""
        self.push(tokens)
        return self._cut(self._decode()), self.finish or "length"
