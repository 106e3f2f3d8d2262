"""The per-row sampler: penalties, warpers and the draw for one row of logits at a time.

It is the slow twin of the batched `Sampler` (tests hold the two token-for-token equal on the same seeds) and the
path the engine falls back to, row by row, when a batched pass raises, so one request's failure stays its own.
Order of processing, as in transformers: repetition penalty, frequency penalty, temperature, top_k, top_p, typical_p.
"""

from __future__ import annotations

import torch

from engine.sampling_params import SamplingParams

NON_FINITE = "the sampling probabilities are not finite (NaN or infinity)"
# Exponential noise is clamped to this from below: q == 0 would make probs / q a NaN (0 / 0) or an infinity.
MIN_NOISE = 1e-20


class SamplingFault(ValueError):
    """A row whose probabilities are not a distribution (NaN, infinities): it fails its request alone."""


def apply_penalties(row: torch.Tensor, p: SamplingParams, token_ids: list[int]) -> torch.Tensor:
    """row [V] float32 -> penalised copy (the input is not modified)."""
    if not token_ids:
        return row
    penalty = p.effective_repetition_penalty
    if penalty is not None:
        ids = torch.tensor(sorted(set(token_ids)), device=row.device)
        vals = row[ids]
        row = row.clone()
        row[ids] = torch.where(vals < 0, vals * penalty, vals / penalty)
    if p.frequency_penalty:
        ids = torch.tensor(token_ids, device=row.device)
        counts = torch.bincount(ids, minlength=row.shape[0])[: row.shape[0]]
        # TGI's form: the penalty scales each token's frequency among all ids so far.
        row = row - p.frequency_penalty * counts.to(row.dtype) / len(token_ids)
    return row


def apply_warpers(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """row [V] float32 -> warped copy: dropped tokens are -inf."""
    neg_inf = float("-inf")
    if p.temperature is not None and p.temperature != 1.0:
        row = row / p.temperature
    if p.top_k is not None and p.top_k < row.shape[0]:
        kth = torch.topk(row, p.top_k).values[-1]
        row = row.masked_fill(row < kth, neg_inf)
    if p.top_p is not None and p.top_p < 1.0:
        sorted_logits, order = torch.sort(row, stable=True)  # ascending
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum <= 1.0 - p.top_p
        drop[-1] = False  # always keep the most likely token
        row = row.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), neg_inf)
    if p.typical_p is not None and p.typical_p < 1.0:
        logp = row.log_softmax(-1)
        entropy = -(logp.exp() * logp).nansum(-1)
        surprise_gap = (-logp - entropy).abs()
        sorted_gap, order = torch.sort(surprise_gap, stable=True)
        cum = row[order].softmax(-1).cumsum(-1)
        last = int((cum < p.typical_p).sum().clamp(max=row.shape[0] - 1))
        drop = sorted_gap > sorted_gap[last]
        drop[0] = False
        row = row.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), neg_inf)
    return row


def exponential_noise(vocab: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """[V] Exp(1) draws from the request's generator: argmax(probs / noise) is a draw from probs."""
    return torch.empty(vocab, device=device).exponential_(generator=generator).clamp_min_(MIN_NOISE)


def choose(row: torch.Tensor, p: SamplingParams, token_ids: list[int], generator: torch.Generator | None) -> int:
    """The token for one row: logits [V] float32 -> id. Raises SamplingFault for a row that is not a distribution."""
    row = apply_penalties(row, p, token_ids)
    if p.greedy:
        if torch.isnan(row).any():
            raise SamplingFault(NON_FINITE)
        return int(torch.argmax(row))
    probs = apply_warpers(row, p).softmax(-1)
    if not bool(torch.isfinite(probs).all()):
        raise SamplingFault(NON_FINITE)
    return int(torch.argmax(probs / exponential_noise(row.shape[0], generator, row.device)))
