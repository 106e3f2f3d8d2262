"""EMF documents against the spec (tests/serve/emf_spec.py), the histogram summary against real prometheus_client
histograms, and the /metrics -> EMF conversion over serve.metrics.Metrics itself (the names the server exports).
"""

from __future__ import annotations

import bisect
import json
import math
import random
import time
from collections.abc import Iterator

import jsonschema
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from serve import emf
from serve.emf_exporter import Deltas, EmfConfig, EmfEmitter, metric_values, parse
from serve.engine_protocol import EngineClient, EngineRequest, EngineStats, ModelInfo, TokenEvent
from serve.metrics import Metrics
from serve.request_record import RequestRecord
from tests.serve.emf_spec import validate_line

BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


def _doc(**overrides: object) -> dict:
    values = {emf.TIME_TO_FIRST_TOKEN: [12.5, 30.0], emf.QUEUE_SIZE: 3.0, emf.INTER_TOKEN_LATENCY: []}
    doc = emf.document("SageMakerLLM", {"EndpointName": "ep", "VariantName": "AllTraffic"}, values, 1_700_000_000_123)
    doc.update(overrides)
    return doc


def test_document_is_valid_emf() -> None:
    doc = validate_line(emf.line(_doc()))
    directive = doc["_aws"]["CloudWatchMetrics"][0]
    assert doc["_aws"]["Timestamp"] == 1_700_000_000_123 and directive["Namespace"] == "SageMakerLLM"
    assert directive["Dimensions"] == [["EndpointName", "VariantName"]]
    assert directive["Metrics"] == [
        {"Name": "TimeToFirstToken", "Unit": "Milliseconds"},
        {"Name": "QueueSize", "Unit": "Count"},
    ]  # the empty distribution is left out: no datapoint rather than an empty array
    assert doc["TimeToFirstToken"] == [12.5, 30.0] and doc["EndpointName"] == "ep" and "InterTokenLatency" not in doc


@pytest.mark.parametrize(
    "values",
    [{emf.TIME_TO_FIRST_TOKEN: [1.0] * 101}, {emf.QUEUE_SIZE: float("nan")}, {emf.KV_CACHE_USAGE: [float("inf")]}],
)
def test_document_refuses_what_the_spec_forbids(values: dict) -> None:
    with pytest.raises(ValueError):
        emf.document("ns", {"VariantName": "v"}, values, 0)


def test_the_spec_oracle_rejects_invalid_documents() -> None:
    good = _doc()
    bad = [
        {k: v for k, v in good.items() if k != "EndpointName"},  # a dimension without its root member
        {**good, "QueueSize": "3"},  # a metric that is not a number
        {**good, "_aws": {**good["_aws"], "Timestamp": 1.5}},  # not integer milliseconds
        {**good, "_aws": {"CloudWatchMetrics": good["_aws"]["CloudWatchMetrics"]}},  # no timestamp
    ]
    directive = good["_aws"]["CloudWatchMetrics"][0]
    for change in ({"Dimensions": [[f"d{i}" for i in range(31)]]}, {"Metrics": [{"Name": "x"}] * 101},
                   {"Metrics": [{"Name": "QueueSize", "Unit": "Tokens"}]}, {"Namespace": ""}):  # fmt: skip
        bad.append({**good, "_aws": {**good["_aws"], "CloudWatchMetrics": [{**directive, **change}]}})
    for doc in bad:
        with pytest.raises((AssertionError, jsonschema.ValidationError)):
            validate_line(json.dumps(doc))


def _histogram_buckets(observations: list[float]) -> list[tuple[float, float]]:
    registry = CollectorRegistry()
    h = Histogram("lat", "latency", buckets=BOUNDS, registry=registry)
    for x in observations:
        h.observe(x)
    return Deltas(parse(generate_latest(registry).decode()), {}).buckets("lat")


def _in_bucket_of(value_ms: float, x: float) -> bool:
    """Whether a summary value (ms, rounded to 1 us) lies in the bucket of observation x (s); beyond the last bound
    counts as the last bucket, where summaries put it."""
    b = min(bisect.bisect_left(BOUNDS, x), len(BOUNDS) - 1)
    lower = BOUNDS[b - 1] if b else 0.0
    return lower * 1000 - 0.001 <= value_ms <= BOUNDS[b] * 1000 + 0.001


def test_summary_puts_each_observation_in_its_bucket() -> None:
    rng = random.Random(0)
    observations = [rng.uniform(0.001, 0.9) for _ in range(37)] + [3.0, 7.0]  # two beyond the last bound
    values = emf.summarize(_histogram_buckets(observations), scale=1000.0)
    assert len(values) == len(observations) and values == sorted(values)
    assert all(_in_bucket_of(v, x) for v, x in zip(values, sorted(observations)))
    assert values[-2:] == [1000.0, 1000.0]  # +Inf bucket -> the last finite bound, as histogram_quantile
    assert emf.summarize(_histogram_buckets([])) == []


def test_summary_of_many_observations_keeps_the_quantiles() -> None:
    rng = random.Random(1)
    observations = sorted(rng.lognormvariate(-3.5, 1.0) for _ in range(5000))
    values = emf.summarize(_histogram_buckets(observations), scale=1000.0)
    assert len(values) == emf.MAX_VALUES and values == sorted(values)
    for i, value in enumerate(values):  # value i stands for the observation of rank (i + 0.5) * n / 100
        rank = math.ceil((i + 0.5) * len(observations) / len(values))
        assert _in_bucket_of(value, observations[rank - 1]), (i, value)


class _Stats(EngineClient):
    """Only what Metrics reads: the engine's latest stats and its KV capacity."""

    def __init__(self, stats: EngineStats) -> None:
        self.latest = stats

    def generate(self, request: EngineRequest) -> Iterator[TokenEvent]:
        raise NotImplementedError

    def stats(self) -> EngineStats:
        return self.latest

    def model_info(self) -> ModelInfo:
        return ModelInfo("m", "float32", "cpu", 10, 20, 1000, 100, 8, [2])


def _finish(metrics: Metrics, ttft: float | None, tokens: int = 0, error: str | None = None) -> None:
    record = RequestRecord("id", "/invocations", "POST", generation=True, prompt_tokens=5, generated_tokens=tokens)
    record.ttft_s, record.error_type = ttft, error
    record.inter_token_s = [0.02] * max(tokens - 1, 0)
    metrics.started(record)
    metrics.finish(record)


def test_metric_values_from_the_servers_own_metrics() -> None:
    client = _Stats(EngineStats(True, False, 3, 5, 8, 0.25, 100, time.time()))
    metrics = Metrics(client)
    for ttft in (0.03, 0.2, 0.04):
        _finish(metrics, ttft, tokens=4)
    for error in ("validation", "overloaded", "unhealthy", "cancelled", "generation", "template_error"):
        _finish(metrics, None, error=error)
    first = parse(metrics.render().decode())
    values = metric_values(first, {}, seconds=4.0)
    by_name = {spec.name: v for spec, v in values.items()}
    assert by_name["Requests"] == 9 and by_name["RequestsSucceeded"] == 3 and by_name["RequestsInvalid"] == 2
    assert (by_name["RequestsOverloaded"], by_name["RequestsUnavailable"]) == (1, 1)
    assert (by_name["RequestsCancelled"], by_name["RequestsErrored"]) == (1, 1)
    assert by_name["GeneratedTokens"] == 12 and by_name["GeneratedTokensPerSecond"] == 3.0
    assert by_name["PromptTokens"] == 15
    assert (by_name["QueueSize"], by_name["BatchSize"], by_name["RequestsInFlight"]) == (3, 5, 8)
    assert by_name["KVCacheUsage"] == 25.0
    ttft = by_name["TimeToFirstToken"]  # one value per request, in the bucket of its TTFT
    assert len(ttft) == 3 and 25 < ttft[0] <= ttft[1] <= 50 and 100 < ttft[2] <= 250
    assert len(by_name["InterTokenLatency"]) == 9 and all(10 < v <= 20 for v in by_name["InterTokenLatency"])
    assert set(by_name) == {spec.name for spec in emf.ALL_METRICS}

    _finish(metrics, 0.6, tokens=2)  # the next interval counts only what happened since
    later = metric_values(parse(metrics.render().decode()), first, seconds=2.0)
    later_by_name = {spec.name: v for spec, v in later.items()}
    assert later_by_name["Requests"] == 1 and later_by_name["RequestsSucceeded"] == 1
    assert later_by_name["RequestsInvalid"] == 0 and later_by_name["GeneratedTokens"] == 2
    assert later_by_name["GeneratedTokensPerSecond"] == 1.0 and len(later_by_name["TimeToFirstToken"]) == 1
    doc = emf.document("ns", EmfConfig(endpoint_name="ep").dimensions, later, 0)
    validate_line(emf.line(doc))


def test_emitter_writes_valid_lines_and_skips_failed_scrapes() -> None:
    client = _Stats(EngineStats(True, False, 0, 1, 1, 0.5, 100, time.time()))
    metrics = Metrics(client)
    lines: list[str] = []
    clock = iter([100.0, 110.0, 125.0]).__next__
    emitter = EmfEmitter(EmfConfig(namespace="Ns", variant_name="v"), "http://unused", lines.append, clock)
    emitter.scrape = lambda: metrics.render().decode()  # type: ignore[method-assign]
    _finish(metrics, 0.03, tokens=10)
    assert emitter.emit_once()
    emitter.scrape = lambda: (_ for _ in ()).throw(ConnectionRefusedError())  # type: ignore[method-assign]
    assert not emitter.emit_once() and len(lines) == 1
    doc = validate_line(lines[0])
    assert doc["VariantName"] == "v" and "EndpointName" not in doc and doc["GeneratedTokensPerSecond"] == 1.0
    assert doc["_aws"]["Timestamp"] == 110_000
    assert doc["_aws"]["CloudWatchMetrics"][0]["Dimensions"] == [["VariantName"]]


def test_the_launcher_starts_an_emitter_only_when_enabled(tmp_path) -> None:  # noqa: ANN001
    from container.launcher import Launcher
    from container.settings import load_settings

    base = {"SM_OPT_ML_DIR": str(tmp_path), "HF_MODEL_ID": "org/model", "SAGEMAKER_BIND_TO_PORT": "18080"}
    off = Launcher(load_settings({**base, "CLOUDWATCH_METRICS": "false"}))
    off._start_emitter()
    assert off.emitter is None
    on = Launcher(load_settings({**base, "CLOUDWATCH_METRICS_INTERVAL": "30", "CLOUDWATCH_ENDPOINT_NAME": "ep"}))
    on._start_emitter()
    try:
        assert on.emitter is not None and on.emitter.metrics_url == "http://127.0.0.1:18080/metrics"
        assert on.emitter.config.interval_s == 30 and on.emitter.config.dimensions["EndpointName"] == "ep"
    finally:
        on.emitter.stop()
