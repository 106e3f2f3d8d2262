"""The container's CloudWatch metrics: a thread in the launcher scrapes the server's own /metrics on loopback every
interval (one scrape covers every gunicorn worker, so nothing is counted twice), turns counter and histogram deltas
since the last scrape into counts, rates and value arrays, and writes one EMF line to stdout, which SageMaker sends
to the endpoint's log group, where CloudWatch extracts the metrics.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from serve import emf

logger = logging.getLogger(__name__)
SCRAPE_TIMEOUT_S = 5.0

Series = dict[tuple[tuple[str, str], ...], float]  # label set -> value
Snapshot = dict[str, Series]  # sample name -> series

# error_type of tgi_request_failure_total -> the outcome metric it counts in (anything else: RequestsErrored)
_OUTCOME = {
    **dict.fromkeys(
        ("validation", "template_error", "bad_request", "authentication", "not_found", "method_not_allowed",
         "payload_too_large", "unsupported_media_type", "http"), emf.INVALID),
    "overloaded": emf.OVERLOADED,
    "unhealthy": emf.UNAVAILABLE,
    "cancelled": emf.CANCELLED,
}  # fmt: skip
_HISTOGRAMS = {
    emf.TIME_TO_FIRST_TOKEN: "llm_time_to_first_token_seconds",
    emf.INTER_TOKEN_LATENCY: "llm_inter_token_latency_seconds",
    emf.REQUEST_LATENCY: "tgi_request_duration",
}
_GAUGES = {
    emf.QUEUE_SIZE: ("tgi_queue_size", 1.0),
    emf.BATCH_SIZE: ("tgi_batch_current_size", 1.0),
    emf.IN_FLIGHT: ("llm_requests_in_flight", 1.0),
    emf.KV_CACHE_USAGE: ("llm_kv_cache_usage_ratio", 100.0),
}


@dataclass(frozen=True)
class EmfConfig:
    enabled: bool = True
    namespace: str = emf.DEFAULT_NAMESPACE
    interval_s: float = 60.0
    endpoint_name: str | None = None  # SageMaker does not tell the container; the SDK passes it in
    variant_name: str = "AllTraffic"

    @property
    def dimensions(self) -> dict[str, str]:
        dims = {emf.ENDPOINT_DIMENSION: self.endpoint_name} if self.endpoint_name else {}
        return {**dims, emf.VARIANT_DIMENSION: self.variant_name}


def parse(text: str) -> Snapshot:
    snapshot: Snapshot = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            snapshot.setdefault(sample.name, {})[labels] = float(sample.value)
    return snapshot


class Deltas:
    """Differences between two snapshots of cumulative series (a series that went down restarted from 0)."""

    def __init__(self, now: Snapshot, before: Snapshot) -> None:
        self.now, self.before = now, before

    def series(self, name: str) -> Series:
        old = self.before.get(name, {})
        out = {}
        for labels, value in self.now.get(name, {}).items():
            previous = old.get(labels, 0.0)
            out[labels] = value - previous if value >= previous else value
        return out

    def total(self, name: str) -> float:
        return sum(self.series(name).values())

    def buckets(self, histogram: str) -> list[tuple[float, float]]:
        """(upper bound, observations in the bucket) of a histogram over the interval, in bound order."""
        cumulative = sorted((float(dict(labels)["le"]), v) for labels, v in self.series(f"{histogram}_bucket").items())
        out, below = [], 0.0
        for bound, count in cumulative:
            out.append((bound, max(count - below, 0.0)))
            below = max(count, below)
        return out


def metric_values(now: Snapshot, before: Snapshot, seconds: float) -> dict[emf.MetricSpec, emf.Value]:
    """The EMF values for one interval of `seconds` between two scrapes."""
    d = Deltas(now, before)
    values: dict[emf.MetricSpec, emf.Value] = {
        spec: emf.summarize(d.buckets(name), scale=1000.0) for spec, name in _HISTOGRAMS.items()
    }
    generated = d.total("tgi_request_generated_tokens_sum")
    values[emf.GENERATED_TOKENS] = generated
    values[emf.PROMPT_TOKENS] = d.total("tgi_request_input_length_sum")
    values[emf.TOKENS_PER_SECOND] = round(generated / seconds, 3) if seconds > 0 else 0.0
    for spec, (name, scale) in _GAUGES.items():
        values[spec] = round(sum(now.get(name, {}).values()) * scale, 3)
    values[emf.REQUESTS] = d.total("tgi_request_count_total")
    outcomes = dict.fromkeys(emf.OUTCOMES, 0.0)
    outcomes[emf.SUCCEEDED] = d.total("tgi_request_success_total")
    for labels, count in d.series("tgi_request_failure_total").items():
        outcomes[_OUTCOME.get(dict(labels).get("err", ""), emf.ERRORED)] += count
    values.update(outcomes)
    return values


def _write_stdout(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


class EmfEmitter:
    """Scrapes `metrics_url` every `config.interval_s` and writes one EMF line per scrape (`start`, `stop`);
    `emit_once` scrapes now (the launcher calls it once more after draining, so the last requests count)."""

    def __init__(
        self,
        config: EmfConfig,
        metrics_url: str,
        write: Callable[[str], None] = _write_stdout,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config, self.metrics_url, self.write, self.clock = config, metrics_url, write, clock
        self._before: Snapshot = {}  # a fresh server: every counter starts at 0
        self._last = clock()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def scrape(self) -> str:
        timeout = min(SCRAPE_TIMEOUT_S, self.config.interval_s)
        with urllib.request.urlopen(self.metrics_url, timeout=timeout) as response:
            return response.read().decode()

    def emit_once(self) -> bool:
        """Scrape and write one line; False (and nothing written) when the scrape fails."""
        with self._lock:
            try:
                now = parse(self.scrape())
            except Exception as e:  # the server is busy or going away: the next line covers this interval too
                logger.warning("CloudWatch metrics: could not read %s: %s", self.metrics_url, e)
                return False
            t = self.clock()
            values = metric_values(now, self._before, t - self._last)
            self._before, self._last = now, t
            doc = emf.document(self.config.namespace, self.config.dimensions, values, int(t * 1000))
            self.write(emf.line(doc))
            return True

    def _run(self) -> None:
        while not self._stop.wait(self.config.interval_s):
            self.emit_once()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="emf-emitter", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(SCRAPE_TIMEOUT_S + 1)
            self._thread = None
