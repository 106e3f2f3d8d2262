"""Prometheus metrics under TGI's names (plus TTFT, inter-token latency, KV usage) and the one-JSON-line
access log (logger "serve.access"). Counters and histograms live in a per-app registry, or in
prometheus_client's multiprocess files when a directory is given (gunicorn workers); gauges are read
from the engine's latest EngineStats at scrape time.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from serve.engine_protocol import EngineClient
from serve.request_record import RequestRecord

access_logger = logging.getLogger("serve.access")

CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
_PER_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)
_LENGTH = tuple(float(2**i) for i in range(18))


class StatsCollector(Collector):
    """Gauges from EngineStats, computed when scraped (never stale per worker, no multiprocess files)."""

    def __init__(self, client: EngineClient) -> None:
        self.client = client
        self._capacity_tokens: int | None = None

    def _capacity(self) -> int | None:
        if self._capacity_tokens is None:
            try:
                self._capacity_tokens = self.client.model_info().max_batch_total_tokens
            except Exception:  # engine not up yet: try again at the next scrape
                return None
        return self._capacity_tokens

    def describe(self) -> list[Metric]:
        return []  # registering must not call into the client

    def collect(self) -> Iterator[Metric]:
        s = self.client.stats()
        capacity = self._capacity() if s else None
        gauges = {
            "tgi_queue_size": ("Requests waiting to be scheduled", s.queue_size if s else 0),
            "tgi_batch_current_size": ("Requests in the running batch", s.batch_size if s else 0),
            "tgi_batch_current_max_tokens": (
                "KV-cache tokens held by the running batch",
                round(s.kv_cache_usage * capacity) if s and capacity else 0,
            ),
            "llm_kv_cache_usage_ratio": ("Fraction of KV-cache blocks in use", s.kv_cache_usage if s else 0.0),
            "llm_requests_in_flight": ("Requests admitted by the engine and not finished", s.in_flight if s else 0),
            "llm_engine_ready": (
                "1 when the engine is ready and not draining",
                int(bool(s and s.ready and not s.draining)),
            ),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=float(value))
        yield CounterMetricFamily(
            "llm_prefix_cache_hit_tokens",
            "Prompt tokens served from the prefix cache instead of computed",
            value=float(s.prefix_cache_hit_tokens if s else 0),
        )
        yield CounterMetricFamily(
            "llm_preemptions",
            "Running requests preempted when the KV cache ran out (their tokens are recomputed, never lost)",
            value=float(s.preemptions if s else 0),
        )


class Metrics:
    def __init__(self, client: EngineClient, multiprocess_dir: str | None = None) -> None:
        prometheus_client.disable_created_metrics()  # TGI exposes no *_created series
        self.multiprocess_dir = multiprocess_dir
        self.registry = r = CollectorRegistry()
        self.stats = StatsCollector(client)
        r.register(self.stats)
        self.request_count = Counter("tgi_request_count", "Generation requests received", registry=r)
        self.request_success = Counter("tgi_request_success", "Generation requests that succeeded", registry=r)
        self.request_failure = Counter("tgi_request_failure", "Failed generation requests", ["err"], registry=r)

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, buckets=buckets, registry=r)

        self.duration = hist("tgi_request_duration", "End-to-end request latency (s)", _LATENCY)
        self.validation = hist("tgi_request_validation_duration", "Validation and tokenization (s)", _LATENCY)
        self.queue = hist("tgi_request_queue_duration", "Time waiting to be scheduled (s)", _LATENCY)
        self.inference = hist("tgi_request_inference_duration", "First scheduled to finished (s)", _LATENCY)
        self.time_per_token = hist(
            "tgi_request_mean_time_per_token_duration", "Inference time per generated token (s)", _PER_TOKEN
        )
        self.input_length = hist("tgi_request_input_length", "Prompt tokens", _LENGTH)
        self.generated_tokens = hist("tgi_request_generated_tokens", "Generated tokens", _LENGTH)
        self.max_new_tokens = hist("tgi_request_max_new_tokens", "max_new_tokens after defaults", _LENGTH)
        self.ttft = hist("llm_time_to_first_token_seconds", "HTTP arrival to first token (s)", _LATENCY)
        self.itl = hist("llm_inter_token_latency_seconds", "Time between consecutive tokens (s)", _PER_TOKEN)

    def render(self) -> bytes:
        """The Prometheus text exposition: this registry, or every worker's files plus the gauges."""
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self.multiprocess_dir)
        registry.register(self.stats)
        return generate_latest(registry)

    def started(self, record: RequestRecord) -> None:
        if record.generation:
            self.request_count.inc()

    def finish(self, record: RequestRecord) -> None:
        """Observe and log a request once, when its response (or its stream) is over."""
        if record.done:
            return
        record.done = True
        total = record.elapsed_s
        if record.generation:
            if record.error_type is not None:
                self.request_failure.labels(err=record.error_type).inc()
            else:
                self._observe_success(record, total)
        log_request(record, total)

    def _observe_success(self, rec: RequestRecord, total: float) -> None:
        self.request_success.inc()
        self.duration.observe(total)
        self.validation.observe(rec.validation_s)
        self.input_length.observe(rec.prompt_tokens)
        self.generated_tokens.observe(rec.generated_tokens)
        if rec.max_new_tokens is not None:
            self.max_new_tokens.observe(rec.max_new_tokens)
        if rec.queue_s is not None:
            self.queue.observe(rec.queue_s)
        if rec.inference_s is not None:
            self.inference.observe(rec.inference_s)
            if rec.generated_tokens:
                self.time_per_token.observe(rec.time_per_token_s(rec.inference_s))
        if rec.ttft_s is not None:
            self.ttft.observe(rec.ttft_s)
        for gap in rec.inter_token_s:
            self.itl.observe(gap)


def ensure_access_log_handler() -> None:
    """Send access lines to stdout, once, unless the host application configured the logger."""
    if not access_logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        access_logger.addHandler(handler)
        access_logger.setLevel(logging.INFO)
        access_logger.propagate = False


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


def log_request(rec: RequestRecord, total_s: float) -> None:
    """One JSON line: ids, counts and latencies; the prompt only when the config allows it."""
    line = {
        "id": rec.request_id,
        "method": rec.method,
        "route": rec.route,
        "status": rec.status,
        "stream": rec.stream,
        "prompt_tokens": rec.prompt_tokens,
        "generated_tokens": rec.generated_tokens,
        "finish_reason": rec.finish_reason,
        "error_type": rec.error_type,
        "validation_ms": _ms(rec.validation_s) if rec.generation else None,
        "queue_ms": _ms(rec.queue_s),
        "ttft_ms": _ms(rec.ttft_s),
        "total_ms": _ms(total_s),
    }
    if rec.custom_attributes:
        line["custom_attributes"] = True
    if rec.trace_id is not None:
        line["trace_id"] = rec.trace_id
    if rec.prompt is not None:
        line["prompt"] = rec.prompt
    access_logger.info(json.dumps(line, ensure_ascii=False, separators=(",", ":")))
