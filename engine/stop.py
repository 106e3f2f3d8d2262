"""Stop conditions: EOS ids, stop strings on the detokenized text, max_new_tokens, context length.

Text that could be the start of a stop string is held back from the stream, so the pieces a client
receives always join to the final text, which never contains the stop string.
"""

from __future__ import annotations

from engine.sequence import Sequence


def token_stop_reason(seq: Sequence, eos_token_ids: frozenset[int], max_model_len: int) -> str | None:
    """Reason to finish after the last sampled token, from token counts and ids alone."""
    if not seq.sampling_params.ignore_eos and seq.output_token_ids[-1] in eos_token_ids:
        return "eos_token"
    if seq.num_output_tokens >= seq.max_new_tokens or seq.num_tokens >= max_model_len:
        return "length"
    return None


class StopStringMatcher:
    def __init__(self, stop: tuple[str, ...]) -> None:
        self.stop = stop
        self.max_len = max((len(s) for s in stop), default=0)
        self.text = ""
        self.emitted = 0

    def add(self, delta: str) -> tuple[str, bool]:
        """Feed new text; return (text safe to emit now, whether a stop string was found)."""
        if not delta:
            return "", False
        search_from = max(0, len(self.text) - self.max_len + 1)
        self.text += delta
        if self.stop:
            hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                return self._emit(len(self.text)), True
        return self._emit(len(self.text) - self._held_back()), False

    def flush(self) -> str:
        return self._emit(len(self.text))

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        for n in range(min(self.max_len - 1, len(self.text) - self.emitted), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0

    def _emit(self, upto: int) -> str:
        piece = self.text[self.emitted : upto] if upto > self.emitted else ""
        self.emitted = max(self.emitted, upto)
        return piece
