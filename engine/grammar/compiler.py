"""Grammars compiled for the engine's vocabulary, and the per-request matcher that follows what was generated.

The compiler builds llguidance's view of the tokenizer once (every token's bytes; the EOS ids end a grammar) and caches
one pristine matcher per grammar spec (the tokenizer is fixed per engine, so the key is (schema, tokenizer)); each
request gets a copy. Nothing here raises for a bad token: a matcher that cannot go on reports an error, which fails its
request alone (RequestFault).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import llguidance
import llguidance.hf

from engine.faults import RequestFault
from engine.grammar.spec import GrammarError, GrammarSpec, check_grammar

# Bound the work one mask may take (llguidance stops the matcher with an error instead): a pathological grammar fails
# its own request, it never stalls the step for everyone.
_LIMITS = dict(step_lexer_fuel=200_000, step_max_items=50_000, max_lexer_states=250_000)


class GrammarState:
    """One request's matcher: it has consumed exactly the request's generated tokens so far. A preempted request is
    recomputed from those same tokens, so its state needs no change on recompute."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self.matcher = matcher

    def check(self) -> None:
        """Raise RequestFault if the matcher is in error (its mask then allows nothing useful)."""
        if self.matcher.is_error():
            raise RequestFault(f"grammar error: {_first_line(self.matcher.get_error())}")

    def accept(self, token_id: int) -> None:
        """Advance by the sampled token; one the grammar does not allow is a RequestFault."""
        if not self.matcher.consume_token(token_id):
            raise RequestFault(
                f"grammar error: token {token_id} is not allowed here ({_first_line(self.matcher.get_error())})"
            )

    @property
    def finished(self) -> bool:
        """The grammar is complete: only EOS may follow (its mask then holds the EOS ids alone)."""
        return self.matcher.is_stopped()

    def allowed_ids(self, vocab: int) -> list[int]:
        """The ids the grammar allows next (tests, debugging)."""
        mask = self.matcher.compute_bitmask()
        return [i for i in range(min(vocab, 8 * len(mask))) if mask[i // 8] >> (i % 8) & 1]


class GrammarCompiler:
    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Iterable[int], cache_size: int = 256) -> None:
        """vocab_size: the logits' width (the model's, which may exceed the tokenizer's); ids beyond the tokenizer's
        are never allowed."""
        self.vocab_size = max(vocab_size, len(tokenizer))
        eos = sorted(eos_token_ids) or None
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=self.vocab_size, eos_token=eos)
        self.limits = llguidance.LLParserLimits(**_LIMITS)
        self.cache_size = cache_size
        self._cache: OrderedDict[GrammarSpec, llguidance.LLMatcher] = OrderedDict()

    @property
    def mask_width(self) -> int:
        """Words of a bitmask row: bit j of word i allows token 32 i + j."""
        return (self.vocab_size + 31) // 32

    def state(self, spec: GrammarSpec) -> GrammarState:
        """A fresh matcher for `spec`; GrammarError (a ValueError: 422) if the grammar cannot be compiled."""
        pristine = self._cache.get(spec)
        if pristine is None:
            check_grammar(spec)
            pristine = llguidance.LLMatcher(self.tokenizer, spec.llguidance_grammar(), log_level=0, limits=self.limits)
            if not pristine.is_error():
                pristine.compute_bitmask()  # the first mask: a grammar no output can satisfy fails here
            if pristine.is_error():
                raise GrammarError(f"no output satisfies it ({_first_line(pristine.get_error())})")
            self._cache[spec] = pristine
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(spec)
        return GrammarState(pristine.deep_copy())


def _first_line(message: str) -> str:
    """llguidance's errors may carry a dump of the parser state after the first line."""
    return (message.strip().splitlines() or ["unknown"])[0]
