"""The engine's spans, made by the EngineLoop when tracing is on: one `engine.request` span per request, a child of
the HTTP request's span (its W3C context comes in the request message), with `queue`, `prefill` and `decode`
children drawn from the engine's own timestamps; and one `engine.step` span per step, linked (not parented) to
the request spans of every sequence it ran. No prompt text or token ids are put in attributes.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from opentelemetry.context import Context
from opentelemetry.trace import Link, SpanKind, Status, StatusCode, set_span_in_context

from serve.tracing import Tracing, wall_ns

if TYPE_CHECKING:
    from engine.llm_engine import LLMEngine
    from engine.outputs import RequestMetrics, RequestOutput
    from serve.engine_protocol import EngineError, EngineRequest


class EngineSpans:
    """Single-threaded, as the loop that calls it. Keys are the engine's request ids."""

    def __init__(self, tracing: Tracing) -> None:
        self.tracing = tracing
        self.tracer = tracing.tracer
        self._open: dict[str, Any] = {}  # request id -> its engine.request span, until it finishes
        self._metrics: dict[str, RequestMetrics] = {}  # request id -> the engine's timestamps (once it produced)

    def started(self, rid: str, request: EngineRequest, added: float) -> None:
        parent = self.tracing.extract(getattr(request, "trace_context", None))
        attributes = {
            "llm.request_id": request.request_id,
            "gen_ai.usage.input_tokens": len(request.prompt_token_ids),
            "gen_ai.request.max_tokens": request.params.max_new_tokens,
        }
        self._open[rid] = self.tracer.start_span(
            "engine.request", context=parent, kind=SpanKind.CONSUMER, start_time=wall_ns(added),
            attributes=attributes,
        )  # fmt: skip

    # ---- the step ---------------------------------------------------------------------------

    def step(self, engine: LLMEngine, start_ns: int) -> None:
        """The step span of what engine.step() just ran (its ScheduledBatch), linked to the requests' spans."""
        batch = engine.last_batch
        if batch is None or batch.is_empty:
            return
        links = []
        for item in batch.scheduled:
            span = self._open.get(item.seq.request_id)
            if span is not None and span.is_recording():  # a sampled request (a dropped one needs no step span)
                links.append(Link(span.get_span_context()))
        if not links:  # no sampled request in the step: no span (one root trace per step would flood the exporter)
            return
        attributes = {
            "llm.batch.size": len(batch.decodes) + len(batch.prefills),
            "llm.batch.decode_requests": len(batch.decodes),
            "llm.batch.prefill_requests": len(batch.prefills),
            "llm.batch.prefill_tokens": sum(s.num_new_tokens for s in batch.prefills),
            "llm.batch.tokens": batch.num_tokens,
            "llm.batch.preempted": len(batch.preempted),
            "llm.prefix_cache.hit_tokens": batch.hit_tokens,
            "llm.kv_cache.usage": float(engine.block_manager.usage),  # as the step ended (finished requests freed)
        }
        span = self.tracer.start_span("engine.step", context=Context(), links=links, start_time=start_ns,
                                      attributes=attributes)  # fmt: skip
        span.end()

    def output(self, rid: str, out: RequestOutput) -> None:
        if out.finished:
            self._finish(rid, out)
        elif rid not in self._metrics and out.metrics is not None:
            self._metrics[rid] = out.metrics  # the engine updates this object in place; read if cancelled

    # ---- endings ----------------------------------------------------------------------------

    def _finish(self, rid: str, out: RequestOutput) -> None:
        span = self._open.pop(rid, None)
        self._metrics.pop(rid, None)
        if span is None:
            return
        span.set_attribute("gen_ai.usage.output_tokens", out.num_generated_tokens)
        if out.error is not None:
            span.set_attribute("error.type", "generation")
            span.set_status(Status(StatusCode.ERROR, "the request failed in the engine"))
        else:
            span.set_attribute("gen_ai.response.finish_reasons", [out.finish_reason or "length"])
        self._end(span, out.metrics)

    def cancelled(self, rid: str) -> None:
        """The client went away: the request was aborted in the engine."""
        span = self._open.pop(rid, None)
        if span is not None:
            span.set_attribute("error.type", "cancelled")
            self._end(span, self._metrics.pop(rid, None))

    def failed(self, rid: str, error: EngineError) -> None:
        span = self._open.pop(rid, None)
        if span is not None:
            span.set_attribute("error.type", error.error_type)
            span.set_status(Status(StatusCode.ERROR, type(error).__name__))
            self._end(span, self._metrics.pop(rid, None))

    def _end(self, span: Any, m: RequestMetrics | None) -> None:
        """queue (added -> first scheduled), prefill (-> first token), decode (-> last token), then the span."""
        offset_ns = time.time_ns() - time.monotonic_ns()  # once, so the children's edges meet exactly

        def ns(monotonic_s: float) -> int:
            return int(monotonic_s * 1e9) + offset_ns

        end = m.finished_time if m is not None and m.finished_time is not None else time.monotonic()
        if m is not None:
            if m.first_token_time is not None:
                span.set_attribute("llm.time_to_first_token_s", m.first_token_time - m.arrival_time)
            span.set_attribute("llm.preemptions", m.num_preemptions)
            marks = [m.arrival_time, m.first_scheduled_time, m.first_token_time, end]
            for name, begin, until in zip(("queue", "prefill", "decode"), marks, marks[1:]):
                if begin is None:
                    break
                child = self.tracer.start_span(name, context=set_span_in_context(span), start_time=ns(begin))
                child.end(end_time=ns(until if until is not None else end))
        span.end(end_time=ns(end))
