"""TokenDecoder: the text of one token id, for top alternatives and logprob entries, cached per worker.

Streamed text comes from the engine's detokenizer; this decodes single ids the way TGI shows them.
"""

from __future__ import annotations

from typing import Any


class TokenDecoder:
    """Text of a single token id (top alternatives, logprob entries), cached; and which ids are special."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.special_ids = frozenset(getattr(tokenizer, "all_special_ids", ()) or ())
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self._cache[token_id] = text
        return text
