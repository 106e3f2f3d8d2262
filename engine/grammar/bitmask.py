"""Token bitmasks on logits: rows of int32 words, bit j of word i allowing token 32 i + j (llguidance's layout).

`apply_token_mask` is the one implementation both samplers use (the batched one on a step's constrained rows at once,
the per-row twin on one row); `allowed_from_bits` is its slow twin, bit by bit in Python, for tests.
"""

from __future__ import annotations

import torch

_POWERS: dict[torch.device, torch.Tensor] = {}


def _powers(device: torch.device) -> torch.Tensor:
    """[32] int32: 1 << j (bit 31 is the sign bit; & does not care)."""
    powers = _POWERS.get(device)
    if powers is None:
        powers = _POWERS[device] = (torch.ones(32, dtype=torch.int64) << torch.arange(32)).to(torch.int32).to(device)
    return powers


def _disallowed(bits: torch.Tensor, vocab: int) -> torch.Tensor:
    """bits [R, W] int32 -> disallowed [R, vocab] bool, in one pass with a bool result (tokens beyond 32 W are
    disallowed)."""
    rows, words = bits.shape
    off = (bits.unsqueeze(-1) & _powers(bits.device)).eq(0).view(rows, 32 * words)
    if 32 * words >= vocab:
        return off[:, :vocab]
    return torch.cat([off, torch.ones(rows, vocab - 32 * words, dtype=torch.bool, device=bits.device)], dim=1)


def unpack(bits: torch.Tensor, vocab: int) -> torch.Tensor:
    """bits [R, W] int32 -> allowed [R, vocab] bool."""
    return ~_disallowed(bits, vocab)


def apply_token_mask(logits: torch.Tensor, bits: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """logits [R, V] float, bits [R, W] int32 on the same device -> logits with disallowed tokens at -inf (a copy,
    or `logits` itself when inplace)."""
    off = _disallowed(bits, logits.shape[1])
    return logits.masked_fill_(off, float("-inf")) if inplace else logits.masked_fill(off, float("-inf"))


def allowed_from_bits(words: list[int], vocab: int) -> list[int]:
    """The allowed ids of one row, bit by bit (the slow twin of `unpack`)."""
    return [i for i in range(vocab) if i // 32 < len(words) and (words[i // 32] >> (i % 32)) & 1]
