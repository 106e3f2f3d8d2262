"""LLMEngine: the incremental interface a server drives — add_request, step, abort.

Each `step()` schedules one batch, runs it, samples, detokenizes, applies stop conditions and
returns a RequestOutput for every request that got a token. Whatever goes wrong for one request after the forward
pass fails that request alone (`_isolated`); a failed forward pass fails the step. Single-threaded by design: the caller
owns the loop (the offline LLM, or the server's engine process). Sharded over N ranks, this process is
rank 0: it schedules and samples, and hands every step to the other ranks (`close()` stops them).
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import torch

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.device import resolve_device
from engine.faults import RequestFault, is_device_fault
from engine.grammar.compiler import GrammarCompiler, GrammarState
from engine.grammar.masks import MaskFiller, PendingMasks
from engine.model_runner import ModelRunner
from engine.model_source import decoder_start_token_id, eos_token_ids, load_hf_config, load_tokenizer, resolve_model
from engine.models import context_length
from engine.outputs import RequestMetrics, RequestOutput
from engine.parallel_config import resolve_parallel_config
from engine.quant.config import resolve_quantization
from engine.quant.report import check_groups_divide
from engine.sampler import SampleOutput, Sampler, SamplingRequest
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledBatch, Scheduler
from engine.sequence import Sequence
from engine.stop import StopStringMatcher, token_stop_reason

if TYPE_CHECKING:
    from engine.tp_group import TensorParallelGroup

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class _Request:
    seq: Sequence
    detokenizer: IncrementalDetokenizer
    matcher: StopStringMatcher
    metrics: RequestMetrics
    generator: torch.Generator | None
    seed: int | None
    logprobs: list[float]
    top_tokens: list[list[tuple[int, float]]]
    grammar: GrammarState | None = None  # has consumed exactly the generated tokens


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.files = resolve_model(config.model, config.revision, config.hf_token)
        self.hf_config = load_hf_config(self.files, config.trust_remote_code)
        self.tokenizer = load_tokenizer(self.files, config.trust_remote_code)
        self.eos_token_ids = eos_token_ids(self.files, self.hf_config)
        self.model_context = context_length(self.hf_config)  # the model's own; max_model_len may cap it
        self.max_model_len = min(config.max_model_len or self.model_context, self.model_context)
        self.parallel = resolve_parallel_config(config, self.hf_config)
        device = resolve_device(config.device)
        self.quant = resolve_quantization(
            config.quantize, self.hf_config, bool(self.files.gguf_file), device, group_size=config.quant_group_size
        )
        check_groups_divide(self.quant, self.hf_config, self.parallel.world_size)
        self.tp_group: TensorParallelGroup | None = None
        self.runner = self._start_ranks()
        # Encoder-decoder: the prompt feeds the encoder; the decoder starts from one start token. Its K/V depend on
        # the encoder output, so decoder blocks are never shared between requests (no prefix caching).
        self.encoder_decoder = bool(getattr(self.hf_config, "is_encoder_decoder", False))
        self.decoder_start = decoder_start_token_id(self.files, self.hf_config) if self.encoder_decoder else None
        self.block_manager = BlockManager(
            self.runner.num_blocks,
            self.runner.block_size,
            enable_prefix_caching=config.enable_prefix_caching and not self.encoder_decoder,
        )
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_batch_prefill_tokens)
        self.vocab_size = self.hf_config.vocab_size
        self.sampler = Sampler(fused=self.runner.fused_ops)
        # Grammars are compiled on rank 0, where sampling is; the vocabulary view is built once, here.
        self.grammars, self.masks = self._grammar_support()
        self._requests: dict[str, _Request] = {}
        self.last_batch: ScheduledBatch | None = None  # what the latest step() scheduled (read by observers)
        self._ids = itertools.count()
        self._seeds = random.Random(config.seed)

    def _grammar_support(self) -> tuple[GrammarCompiler | None, MaskFiller | None]:
        """Structured output's compiler and mask filler; (None, None) for a tokenizer llguidance cannot read (the
        engine serves everything else; grammar requests get a 422)."""
        try:
            grammars = GrammarCompiler(self.tokenizer, self.vocab_size, self.eos_token_ids)
        except Exception as e:
            logger.warning("structured output is unavailable for this tokenizer: %s: %s", type(e).__name__, e)
            return None, None
        return grammars, MaskFiller(grammars.mask_width, self.runner.device)

    def _start_ranks(self) -> ModelRunner:
        """Rank 0's ModelRunner; with several ranks, the other ranks' processes first (stopped on failure)."""
        if self.parallel.world_size == 1:
            return ModelRunner(self.config, self.files, self.hf_config, self.max_model_len)
        from engine.tp_group import TensorParallelGroup

        group = self.tp_group = TensorParallelGroup(self.config, self.parallel, self.files, self.max_model_len)
        try:
            runner = ModelRunner(self.config, self.files, self.hf_config, self.max_model_len, group.state)
            group.wait_ready()
        except Exception as e:
            # a rank's own error says more than the collective it broke here (not so for rank 0's model errors)
            reported = None if isinstance(e, ValueError) else group.startup_error()
            group.close()
            if reported is not None:
                raise reported from e
            raise
        runner.send_step = group.send
        return runner

    def check_health(self) -> None:
        """Raise if a tensor-parallel rank has died or the group failed; a no-op for one rank."""
        if self.tp_group is not None:
            self.tp_group.check()

    def close(self) -> None:
        """Stop the other tensor-parallel ranks (idempotent; also done at interpreter exit)."""
        if self.tp_group is not None:
            self.tp_group.close()

    # ---- requests ---------------------------------------------------------------------------

    def encode(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model has no chat template")
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> str:
        params = params or SamplingParams()
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            ids = self.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("prompt is empty")
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt is {len(ids)} tokens, which leaves no room to generate in the model's "
                f"context of {self.max_model_len} tokens"
            )
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in flight")
        encoder_ids = None
        if self.encoder_decoder:
            encoder_ids, ids = ids, [self.decoder_start]
        grammar = None
        if params.grammar is not None:
            if self.grammars is None:
                raise ValueError("grammar is not supported: the grammar engine cannot read this tokenizer")
            grammar = self.grammars.state(params.grammar)  # GrammarError (a ValueError: 422)
        max_new = min(params.max_new_tokens, self.max_model_len - len(ids))
        seq = Sequence(request_id, ids, max_new, params, encoder_token_ids=encoder_ids)
        self.scheduler.add(seq)  # may raise: the request could never fit in the KV cache
        seed = generator = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else self._seeds.getrandbits(63)
            generator = torch.Generator(device=self.runner.device).manual_seed(seed)
        self._requests[request_id] = _Request(
            seq=seq,
            detokenizer=IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens),
            matcher=StopStringMatcher(params.stop),
            metrics=RequestMetrics(arrival_time=seq.arrival_time),
            generator=generator,
            seed=seed,
            logprobs=[],
            top_tokens=[],
            grammar=grammar,
        )
        return request_id

    def abort_request(self, request_id: str) -> bool:
        """Drop a request wherever it is; its KV blocks are freed. False if unknown."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return False
        self.scheduler.abort(request_id)
        self.runner.release(request_id)
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_requests(self) -> int:
        return len(self._requests)

    # ---- the loop ---------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        batch = self.last_batch = self.scheduler.schedule()
        if batch.is_empty:
            return []
        rows = [item for item in batch.scheduled if item.sample]
        requests = [self._requests[item.seq.request_id] for item in rows]
        constrained = [i for i, r in enumerate(requests) if r.grammar is not None]
        states = [r.grammar for r in requests if r.grammar is not None]
        pending = self.masks.start(states) if states and self.masks else None  # filled while the model runs
        try:
            logits = self.runner.execute(batch)
        except BaseException as e:
            if pending is not None:
                pending.wait()  # no matcher may still be in use when the step is retried
            # The step's blocks were cached when it was scheduled: an error or an interrupt (Ctrl-C) midway leaves
            # their K/V unwritten, so they must not stay cached.
            self.scheduler.abandon(batch)
            if self.tp_group is not None and isinstance(e, Exception):  # a rank died or hung: the group cannot go on
                raise self.tp_group.fail(e) from e
            raise
        outputs: list[RequestOutput] = []
        allowed, failed = self._masks(requests, constrained, pending, outputs)
        sampling = [
            SamplingRequest(r.seq.sampling_params, _history(r.seq), r.generator, allowed[i])
            for i, r in enumerate(requests)
        ]
        batched = self._sample_batch(logits, sampling) if rows else []
        picked: dict[str, SampleOutput] = {}
        for i, req in enumerate(requests):
            if i in failed:
                continue
            sample = self._isolated(
                req, outputs, lambda i=i: _checked(batched[i] if batched else self.sampler.one(logits[i], sampling[i]))
            )
            if sample is not None:
                picked[req.seq.request_id] = sample
        self.scheduler.update(batch, [_token(picked.get(item.seq.request_id)) for item in batch.scheduled])
        now = time.monotonic()
        for req in requests:
            sample = picked.get(req.seq.request_id)
            if sample is not None:
                out = self._isolated(req, outputs, lambda req=req, sample=sample: self._process(req, sample, now))
                if out is not None:
                    outputs.append(out)
        return outputs

    def _masks(
        self,
        requests: list[_Request],
        constrained: list[int],
        pending: PendingMasks | None,
        failures: list[RequestOutput],
    ) -> tuple[list[torch.Tensor | None], set[int]]:
        """Each sampling row's token bitmask (None: unconstrained), and the rows whose grammar failed (their requests
        failed alone, through `_isolated`)."""
        allowed: list[torch.Tensor | None] = [None] * len(requests)
        failed: set[int] = set()
        if pending is None:
            return allowed, failed
        for k, i in enumerate(constrained):
            allowed[i] = self._isolated(requests[i], failures, lambda k=k: pending.row(k))
            if allowed[i] is None:
                failed.add(i)
        return allowed, failed

    def _sample_batch(self, logits: torch.Tensor, rows: list[SamplingRequest]) -> list[SampleOutput] | None:
        """The batched sampler's rows; None when it raised for a reason other than the device (the caller then
        samples row by row, each row isolated, so the row that broke the batch fails alone)."""
        try:
            return self.sampler(logits, rows)
        except Exception as e:
            if is_device_fault(e):
                raise
            logger.warning("batched sampling failed (%s: %s); sampling the step row by row", type(e).__name__, e)
            return None

    def _isolated(self, req: _Request, failures: list[RequestOutput], work: Callable[[], T]) -> T | None:
        """The one guarded place for per-request work (sampling a row, detokenizing, stop matching, and any later
        per-request stage): an error fails this request alone, appending its final output to `failures`, and the
        step goes on. Device and collective errors are raised on: they fail the engine."""
        try:
            return work()
        except Exception as e:
            if is_device_fault(e):
                raise
            failures.append(self._fail(req, e))
            return None

    def _fail(self, req: _Request, error: Exception) -> RequestOutput:
        seq = req.seq
        if isinstance(error, RequestFault):
            message = str(error)
            logger.warning("request %s failed: %s", seq.request_id, message)
        else:
            message = f"{type(error).__name__}: {error}"
            logger.error("request %s failed: %s", seq.request_id, message, exc_info=error)
        if not seq.is_finished:
            self.scheduler.finish(seq, "error")
        self._requests.pop(seq.request_id, None)
        self.runner.release(seq.request_id)
        req.metrics.finished_time = time.monotonic()
        return self._output(req, [], "", [], [], "error", error=message)

    def _process(self, req: _Request, sample: SampleOutput, now: float) -> RequestOutput:
        seq, m = req.seq, req.metrics
        m.first_scheduled_time = seq.first_scheduled_time
        m.num_preemptions = seq.num_preemptions
        if m.first_token_time is None:
            m.first_token_time = now
        m.last_token_time = now
        if req.grammar is not None:
            req.grammar.accept(sample.token_id)  # a token the mask allowed; RequestFault otherwise
        req.logprobs.append(sample.logprob)
        req.top_tokens.append(sample.top_tokens)
        new_text, stopped = req.matcher.add(req.detokenizer.add([sample.token_id]))
        reason = "stop_sequence" if stopped else token_stop_reason(seq, self.eos_token_ids, self.max_model_len)
        grammar_done = req.grammar is not None and req.grammar.finished
        if reason is None and grammar_done and sample.token_id in self.eos_token_ids:
            reason = "eos_token"  # a complete grammar ends on its EOS even where EOS is otherwise ignored
        if reason is not None:
            if not stopped:
                more, stopped = req.matcher.add(req.detokenizer.flush())
                new_text += more if stopped else more + req.matcher.flush()
                reason = "stop_sequence" if stopped else reason
            self.scheduler.finish(seq, reason)
            m.finished_time = now
            del self._requests[seq.request_id]
            self.runner.release(seq.request_id)
        return self._output(req, [sample.token_id], new_text, [sample.logprob], [sample.top_tokens], reason)

    def _output(
        self,
        req: _Request,
        ids: list[int],
        text: str,
        logprobs: list[float],
        tops: list[list[tuple[int, float]]],
        reason: str | None,
        error: str | None = None,
    ) -> RequestOutput:
        """This step's delta; the final one also carries the whole output (built once, at the end)."""
        seq = req.seq
        out = RequestOutput(
            request_id=seq.request_id,
            new_token_ids=ids,
            new_text=text,
            new_logprobs=logprobs,
            new_top_tokens=tops,
            num_generated_tokens=seq.num_output_tokens,
            finished=reason is not None,
            finish_reason=reason,
            seed=req.seed,
            metrics=req.metrics,
            error=error,
        )
        if out.finished:
            out.prompt_token_ids = seq.encoder_token_ids or seq.prompt_token_ids
            out.token_ids = list(seq.output_token_ids)
            out.text = req.matcher.text[: req.matcher.emitted]
            out.logprobs, out.top_tokens = req.logprobs, req.top_tokens
        return out


def _checked(sample: SampleOutput) -> SampleOutput:
    if sample.error is not None:
        raise RequestFault(sample.error)
    return sample


def _token(sample: SampleOutput | None) -> int | None:
    return None if sample is None else sample.token_id


def _history(seq: Sequence) -> list[int]:
    """The ids the penalties look at: every token so far, only for requests with penalties."""
    return seq.all_token_ids if seq.sampling_params.needs_processing else []
