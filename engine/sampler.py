"""Next-token choice for a whole step, batched on the logits' device: greedy, penalties, warpers, seeded draws.

Each row is processed as engine/sampler_reference.py processes it alone (its slow twin, equal token for token on the
same seeds). A draw is argmax(probs / noise) with Exp(1) noise from the request's own generator, so a seed gives the
same tokens alone or batched. Reported logprobs are the model's own (log-softmax of the raw logits). Rows with a
grammar get their token bitmask applied first (engine/grammar/bitmask.py), before penalties and warpers; other rows
never see it. The parameters go to the device in packed copies and the results come back in one; nothing in between
waits on the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from engine.grammar.bitmask import apply_token_mask
from engine.layers import cpu_fused_ops
from engine.sampler_reference import NON_FINITE, SamplingFault, choose, exponential_noise
from engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class SampleOutput:
    token_id: int
    logprob: float
    top_tokens: list[tuple[int, float]] = field(default_factory=list)  # top_n_tokens (id, logprob)
    error: str | None = None  # the row could not be sampled: its request fails alone


@dataclass
class SamplingRequest:
    params: SamplingParams
    token_ids: list[int]  # prompt + output so far (for penalties)
    generator: torch.Generator | None = None  # set when sampling
    allowed: torch.Tensor | None = None  # grammar rows: [W] int32 token bitmask (CPU), bit j of word i = token 32i+j


def _plain_greedy(r: SamplingRequest) -> bool:
    return r.params.greedy and not r.params.needs_processing and r.allowed is None


# Columns of the packed float parameters; the last four are 0/1 flags.
_REP, _FREQ, _TEMP, _TOP_P, _TYPICAL, _COUNT, _GREEDY, _HAS_FREQ, _HAS_TOP_P, _HAS_TYPICAL = range(10)


def _uses_top_p(p: SamplingParams) -> bool:
    return p.top_p is not None and p.top_p < 1.0


def _uses_typical(p: SamplingParams) -> bool:
    return p.typical_p is not None and p.typical_p < 1.0


@dataclass
class _Rows:
    """The processed rows' parameters on the device: floats [R, 10] (columns above), top_k [R], ids [R, L]; the
    grammar rows' bitmasks [G, W] and their places among the R rows [G]."""

    index: torch.Tensor  # [R] row of each in the step's logits
    floats: torch.Tensor
    top_k: torch.Tensor
    ids: torch.Tensor  # token history for penalties, padded with V
    params: list[SamplingParams]
    generators: list[torch.Generator | None]
    masks: torch.Tensor | None = None
    masked: torch.Tensor | None = None

    def flag(self, column: int) -> torch.Tensor:
        """[R, 1] bool of a flag column."""
        return self.floats[:, column : column + 1] > 0

    @classmethod
    def build(cls, rows: list[int], requests: list[SamplingRequest], vocab: int, device: torch.device) -> _Rows:
        params = [requests[i].params for i in rows]
        histories = [requests[i].token_ids for i in rows]
        width = max((len(h) for h in histories), default=0)
        floats, ints = [], []
        for i, p, h in zip(rows, params, histories):
            floats.append(
                [
                    p.effective_repetition_penalty or 1.0,
                    p.frequency_penalty or 0.0,
                    p.temperature if p.temperature is not None and not p.greedy else 1.0,
                    1.0 - p.top_p if p.top_p is not None else 0.0,  # computed in double, as the twin's comparison
                    p.typical_p or 1.0,
                    max(1, len(h)),
                    float(p.greedy),
                    float(bool(p.frequency_penalty)),
                    float(_uses_top_p(p)),
                    float(_uses_typical(p)),
                ]
            )
            ints.append([i, min(p.top_k or vocab, vocab), *h, *[vocab] * (width - len(h))])
        pinned = device.type == "cuda"
        f = torch.tensor(floats, dtype=torch.float32, pin_memory=pinned).to(device, non_blocking=True)
        n = torch.tensor(ints, dtype=torch.int64, pin_memory=pinned).to(device, non_blocking=True)
        # Columns of n are strided views; index_select with a strided index takes an elementwise path (tens of times
        # slower on CPU), so the index and top_k columns are made contiguous.
        index, top_k = n[:, 0].contiguous(), n[:, 1].contiguous()
        built = cls(index, f, top_k, n[:, 2:], params, [requests[i].generator for i in rows])
        masked = [k for k, i in enumerate(rows) if requests[i].allowed is not None]
        if masked:
            bits = torch.stack([requests[rows[k]].allowed for k in masked])  # type: ignore[misc]
            built.masks = bits.pin_memory().to(device, non_blocking=True) if pinned else bits.to(device)
            built.masked = torch.tensor(masked, dtype=torch.int64).to(device, non_blocking=True)
        return built


class Sampler:
    def __init__(self, fused: bool = False) -> None:
        self.fused = fused  # CPU: greedy rows (with or without a grammar mask) take one compiled pass (cpu_fused_ops)

    def __call__(self, logits: torch.Tensor, requests: list[SamplingRequest]) -> list[SampleOutput]:
        """logits [N, V] (float32; bfloat16 too when fused), one row per request -> one SampleOutput each."""
        plain = [_plain_greedy(r) for r in requests]
        top_n = min(max((r.params.top_n_tokens for r in requests), default=0), logits.shape[1])
        fusable = [r.params.greedy and not r.params.needs_processing for r in requests]  # plain, or plain + a mask
        if self.fused and logits.device.type == "cpu" and any(fusable) and not top_n:
            masked = [i for i, r in enumerate(requests) if fusable[i] and r.allowed is not None]
            masks, mask_rows = None, None
            if masked:  # greedy grammar rows: the kernel picks among their allowed ids
                masks = torch.stack([requests[i].allowed for i in masked])  # type: ignore[misc]
                mask_rows = [-1] * len(requests)
                for k, i in enumerate(masked):
                    mask_rows[i] = k
            ids, chosen = cpu_fused_ops.greedy(logits, masks, mask_rows)  # finite-math: NaN rows are found apart
            nan_rows = torch.isnan(logits).any(dim=-1).tolist()
            outs = [SampleOutput(i, lp, [], NON_FINITE if nan else None) for i, lp, nan in zip(ids, chosen, nan_rows)]
            rows = [i for i, p in enumerate(fusable) if not p]  # sampled or processed rows; the fused ones never pay
            if rows:
                for i, out in zip(rows, Sampler()(logits[rows], [requests[i] for i in rows])):
                    outs[i] = out
            return outs
        logits = logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)  # [N, V]
        ids = logprobs.argmax(dim=-1)  # plain greedy rows need nothing else
        bad = torch.zeros_like(ids, dtype=torch.bool)
        rows = [i for i, p in enumerate(plain) if not p]
        if rows:
            picked, failed, index = self._process(logits, _Rows.build(rows, requests, logits.shape[1], logits.device))
            ids.index_copy_(0, index, picked)
            bad.index_copy_(0, index, failed)
        chosen = logprobs.gather(1, ids[:, None])[:, 0]
        bad |= torch.isnan(chosen)  # a NaN or infinite logit in any row, greedy ones included
        parts = [ids.double(), chosen.double(), bad.double()]
        if top_n:
            values, indices = torch.topk(logprobs, top_n, dim=-1)
            parts += [values.double().flatten(), indices.double().flatten()]
        host = torch.cat(parts).tolist()  # the one device -> host copy of the step's samples
        n = len(requests)
        outs = []
        for i, r in enumerate(requests):
            tops: list[tuple[int, float]] = []
            if r.params.top_n_tokens:
                base = 3 * n + i * top_n
                k = r.params.top_n_tokens
                vals, inds = host[base : base + k], host[base + n * top_n : base + n * top_n + k]
                tops = [(int(t), v) for t, v in zip(inds, vals)]
            outs.append(SampleOutput(int(host[i]), host[n + i], tops, NON_FINITE if host[2 * n + i] else None))
        return outs

    def one(self, logits: torch.Tensor, request: SamplingRequest) -> SampleOutput:
        """The per-row twin for one row of logits [V]; raises SamplingFault where __call__ flags the row."""
        row = logits.float()
        logprobs = torch.log_softmax(row, dim=-1)
        if request.allowed is not None:
            row = apply_token_mask(row[None], request.allowed[None].to(row.device))[0]
        token = choose(row, request.params, request.token_ids, request.generator)
        if math.isnan(float(logprobs[token])):
            raise SamplingFault(NON_FINITE)
        n = min(request.params.top_n_tokens, row.shape[0])
        tops: list[tuple[int, float]] = []
        if n:
            values, indices = torch.topk(logprobs, n)
            tops = list(zip(indices.tolist(), values.tolist()))
        return SampleOutput(token, float(logprobs[token]), tops)

    def reference(self, logits: torch.Tensor, requests: list[SamplingRequest]) -> list[SampleOutput]:
        """Every row through the per-row twin (tests; a failing row gets its error instead of raising)."""
        outs = []
        for row, request in zip(logits, requests):
            try:
                outs.append(self.one(row, request))
            except SamplingFault as e:
                outs.append(SampleOutput(-1, float("nan"), [], str(e)))
        return outs

    def _process(self, x: torch.Tensor, rows: _Rows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Grammar masks, penalties, then argmax (greedy rows) or warpers and a draw -> (ids [R], failed [R], rows'
        index [R])."""
        xs = x.index_select(0, rows.index)
        vocab, f, ps = xs.shape[1], rows.floats, rows.params
        if rows.masks is not None and rows.masked is not None:  # xs is the step's own copy: masked in place
            if rows.masks.shape[0] == xs.shape[0]:
                apply_token_mask(xs, rows.masks, inplace=True)
            else:
                xs.index_copy_(0, rows.masked, apply_token_mask(xs.index_select(0, rows.masked), rows.masks))
        if rows.ids.shape[1]:
            xs = self._penalties(xs, rows)
        greedy = rows.flag(_GREEDY)[:, 0]
        picked = xs.argmax(dim=-1)
        failed = torch.isnan(xs).any(dim=-1) & greedy
        if all(p.greedy for p in ps):
            return picked, failed, rows.index
        neg_inf = float("-inf")
        xs = xs / f[:, _TEMP : _TEMP + 1]  # 1.0 where unset: exact
        if any(p.top_k is not None for p in ps):
            kth = torch.sort(xs, dim=-1, descending=True, stable=True).values.gather(1, rows.top_k[:, None] - 1)
            xs = xs.masked_fill(xs < kth, neg_inf)
        if any(_uses_top_p(p) for p in ps):
            sorted_x, order = torch.sort(xs, dim=-1, stable=True)  # ascending
            drop = sorted_x.softmax(-1).cumsum(-1) <= f[:, _TOP_P : _TOP_P + 1]
            drop[:, -1] = False  # always keep the most likely token
            drop &= rows.flag(_HAS_TOP_P)
            xs = xs.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), neg_inf)
        if any(_uses_typical(p) for p in ps):
            xs = self._typical(xs, rows)
        probs = xs.softmax(-1)
        sampled = [i for i, p in enumerate(ps) if not p.greedy]
        noise = torch.ones_like(probs)
        for i in sampled:  # one draw per sampling row, from its own generator (no host sync)
            noise[i] = exponential_noise(vocab, rows.generators[i], xs.device)
        drawn = (probs / noise).argmax(dim=-1)
        not_finite = ~torch.isfinite(probs).all(dim=-1)
        picked = torch.where(greedy, picked, drawn)
        failed = torch.where(greedy, failed, not_finite)
        return picked, failed, rows.index

    @staticmethod
    def _penalties(xs: torch.Tensor, rows: _Rows) -> torch.Tensor:
        """Repetition penalty on the ids seen, then TGI's frequency penalty (penalty x count / ids so far)."""
        vocab, f, ps = xs.shape[1], rows.floats, rows.params
        if any(p.effective_repetition_penalty is not None for p in ps):
            seen = torch.zeros(xs.shape[0], vocab + 1, dtype=torch.bool, device=xs.device)
            seen = seen.scatter_(1, rows.ids, True)[:, :vocab]
            rp = f[:, _REP : _REP + 1]
            xs = torch.where(seen, torch.where(xs < 0, xs * rp, xs / rp), xs)
        if any(p.frequency_penalty for p in ps):
            counts = torch.zeros(xs.shape[0], vocab + 1, dtype=xs.dtype, device=xs.device)
            counts = counts.scatter_add_(1, rows.ids, torch.ones_like(rows.ids, dtype=xs.dtype))[:, :vocab]
            penalised = xs - f[:, _FREQ : _FREQ + 1] * counts / f[:, _COUNT : _COUNT + 1]
            xs = torch.where(rows.flag(_HAS_FREQ), penalised, xs)
        return xs

    @staticmethod
    def _typical(xs: torch.Tensor, rows: _Rows) -> torch.Tensor:
        """Keep the tokens whose surprise is closest to the entropy, up to typical_p of the mass."""
        logp = xs.log_softmax(-1)
        entropy = -(logp.exp() * logp).nansum(-1, keepdim=True)
        sorted_gap, order = torch.sort((-logp - entropy).abs(), dim=-1, stable=True)
        cum = xs.gather(1, order).softmax(-1).cumsum(-1)
        last = (cum < rows.floats[:, _TYPICAL : _TYPICAL + 1]).sum(-1, keepdim=True).clamp(max=xs.shape[1] - 1)
        drop = sorted_gap > sorted_gap.gather(1, last)
        drop[:, 0] = False
        drop &= rows.flag(_HAS_TYPICAL)
        return xs.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))
