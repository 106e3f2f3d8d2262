"""Next-token choice: greedy or seeded sampling with TGI's warpers, plus logprobs.

Reported logprobs are the model's own (log-softmax of raw logits, as vLLM's default), whatever the
warpers did. Order of processing, as in transformers: repetition penalty, frequency penalty,
temperature, top_k, top_p, typical_p. Rows are [V] float32 logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.layers import cpu_fused_ops
from engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class SampleOutput:
    token_id: int
    logprob: float
    top_tokens: list[tuple[int, float]] = field(default_factory=list)  # top_n_tokens (id, logprob)


@dataclass
class SamplingRequest:
    params: SamplingParams
    token_ids: list[int]  # prompt + output so far (for penalties)
    generator: torch.Generator | None = None  # set when sampling


def apply_penalties(row: torch.Tensor, p: SamplingParams, token_ids: list[int]) -> torch.Tensor:
    if not token_ids:
        return row
    if p.repetition_penalty is not None and p.repetition_penalty != 1.0:
        ids = torch.tensor(sorted(set(token_ids)), device=row.device)
        vals = row[ids]
        row = row.clone()
        row[ids] = torch.where(vals < 0, vals * p.repetition_penalty, vals / p.repetition_penalty)
    if p.frequency_penalty:
        ids = torch.tensor(token_ids, device=row.device)
        counts = torch.bincount(ids, minlength=row.shape[0])[: row.shape[0]]
        # TGI's form: the penalty scales each token's frequency among all ids so far.
        row = row - p.frequency_penalty * counts.to(row.dtype) / len(token_ids)
    return row


def apply_warpers(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    neg_inf = float("-inf")
    if p.temperature is not None and p.temperature != 1.0:
        row = row / p.temperature
    if p.top_k is not None and p.top_k < row.shape[0]:
        kth = torch.topk(row, p.top_k).values[-1]
        row = row.masked_fill(row < kth, neg_inf)
    if p.top_p is not None and p.top_p < 1.0:
        sorted_logits, order = torch.sort(row)  # ascending
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum <= 1.0 - p.top_p
        drop[-1] = False  # always keep the most likely token
        row = row.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), neg_inf)
    if p.typical_p is not None and p.typical_p < 1.0:
        logp = row.log_softmax(-1)
        entropy = -(logp.exp() * logp).nansum()
        surprise_gap = (-logp - entropy).abs()
        sorted_gap, order = torch.sort(surprise_gap)
        cum = row[order].softmax(-1).cumsum(-1)
        last = int((cum < p.typical_p).sum().clamp(max=row.shape[0] - 1))
        drop = sorted_gap > sorted_gap[last]
        drop[0] = False
        row = row.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), neg_inf)
    return row


def _plain_greedy(p: SamplingParams) -> bool:
    return p.greedy and not p.needs_processing and not p.top_n_tokens


class Sampler:
    def __init__(self, fused: bool = False) -> None:
        self.fused = fused  # CPU: all-greedy batches take one compiled pass (cpu_fused_ops.greedy)

    def __call__(self, logits: torch.Tensor, requests: list[SamplingRequest]) -> list[SampleOutput]:
        """logits [N, V] (float32; bfloat16 too when fused), one row per request -> one SampleOutput each."""
        if self.fused and logits.device.type == "cpu" and all(_plain_greedy(r.params) for r in requests):
            ids, chosen = cpu_fused_ops.greedy(logits)
            return [SampleOutput(i, lp) for i, lp in zip(ids, chosen)]
        logits = logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)  # [N, V]: one fused pass
        best_logprobs, chosen = logprobs.max(dim=-1)  # greedy rows need nothing else
        for i, req in enumerate(requests):
            p = req.params
            if p.greedy and not p.needs_processing:
                continue
            row = apply_penalties(logits[i], p, req.token_ids)
            if p.greedy:
                chosen[i] = torch.argmax(row)
            else:
                probs = apply_warpers(row, p).softmax(-1)
                chosen[i] = torch.multinomial(probs, 1, generator=req.generator)[0]
            best_logprobs[i] = logprobs[i, chosen[i]]
        chosen_logprobs = best_logprobs.tolist()
        ids = chosen.tolist()
        top_n = min(max((r.params.top_n_tokens for r in requests), default=0), logits.shape[1])
        tops: list[list[tuple[int, float]]] = [[] for _ in requests]
        if top_n:
            values, indices = torch.topk(logprobs, top_n, dim=-1)
            values, indices = values.tolist(), indices.tolist()
            for i, req in enumerate(requests):
                n = req.params.top_n_tokens
                tops[i] = list(zip(indices[i][:n], values[i][:n]))
        return [SampleOutput(ids[i], chosen_logprobs[i], tops[i]) for i in range(len(requests))]
