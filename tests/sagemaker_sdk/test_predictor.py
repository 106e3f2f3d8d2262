"""LLMPredictor through the local runtime emulator (boto3's sagemaker-runtime client, event-stream framing) to a
real `serve`: generate / stream / chat answer what the container answers directly, streams join to the greedy
answer, container errors surface as EndpointError with the container's status and message. The SSE line buffer
is checked on its own with events split across parts and batched in one part. AsyncLLMPredictor runs against
moto's S3 and async runtime.
"""

from __future__ import annotations

import json

import boto3
import pytest

from sagemaker_sdk import AsyncLLMPredictor, Aws, EndpointError, LLMPredictor
from sagemaker_sdk.predictor import _event
from sagemaker_sdk.sse import SseDecoder
from tests.sagemaker_sdk.fakes import ENDPOINT, REGION, moto_queue_async_results
from tests.support.serve_process import Serve

PROMPT = "The quick brown fox"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
N = 12


@pytest.fixture
def predictor(runtime_url: str) -> LLMPredictor:
    return LLMPredictor(ENDPOINT, Aws(boto3.Session(region_name=REGION), runtime_endpoint_url=runtime_url))


def _direct(server: Serve, body: dict) -> object:
    """The container's own answer to a body, without SageMaker in between."""
    status, raw = server.post("/invocations", body)
    assert status == 200, raw
    return json.loads(raw)


@pytest.mark.integration
def test_generate_and_stream_answer_as_the_container(predictor: LLMPredictor, server: Serve) -> None:
    expected = _direct(server, {"inputs": PROMPT, "parameters": {"max_new_tokens": N}})[0]["generated_text"]
    assert predictor.generate(PROMPT, max_new_tokens=N) == expected and expected
    pieces = list(predictor.stream(PROMPT, max_new_tokens=N))
    assert len(pieces) > 1 and "".join(pieces) == expected  # greedy: the stream equals the answer
    seeded = {"max_new_tokens": N, "do_sample": True, "temperature": 0.9, "seed": 7}
    assert predictor.generate(PROMPT, **seeded) == "".join(predictor.stream(PROMPT, **seeded))


@pytest.mark.integration
def test_chat_and_chat_stream(predictor: LLMPredictor, server: Serve) -> None:
    body = {"messages": CHAT, "max_tokens": N, "temperature": 0}
    expected = _direct(server, body)["choices"][0]["message"]["content"]
    assert predictor.chat(CHAT, max_tokens=N, temperature=0) == expected and expected
    pieces = list(predictor.chat(CHAT, stream=True, max_tokens=N, temperature=0))
    assert len(pieces) > 1 and "".join(pieces) == expected


@pytest.mark.integration
def test_container_errors_carry_its_status_and_message(predictor: LLMPredictor) -> None:
    for stream in (False, True):
        with pytest.raises(EndpointError) as info:
            if stream:
                list(predictor.stream(PROMPT, max_new_tokens=0))
            else:
                predictor.generate(PROMPT, max_new_tokens=0)
        e = info.value
        assert (e.status, e.code, e.error_type) == (422, "ModelError", "validation")
        assert "max_new_tokens" in e.message and not e.message.startswith("{")  # the text, not the JSON body
    with pytest.raises(EndpointError) as info:
        predictor.chat([{"role": "user", "content": "hi"}], max_tokens=N, presence_penalty=0.5)
    assert info.value.status == 422 and "not supported" in info.value.message


@pytest.mark.integration
def test_unknown_endpoint_is_the_runtime_apis_error(runtime_url: str) -> None:
    missing = LLMPredictor("missing", Aws(boto3.Session(region_name=REGION), runtime_endpoint_url=runtime_url))
    with pytest.raises(EndpointError) as info:
        missing.generate(PROMPT)
    assert (info.value.status, info.value.code) == (400, "ValidationError") and "missing" in info.value.message


def test_sse_decoder_across_part_boundaries() -> None:
    events = [{"token": {"text": "héllo 東京"}}, {"token": {"text": " wörld"}}, {"generated_text": "x"}]
    stream = "".join(f"data:{json.dumps(e, ensure_ascii=False)}\n\n" for e in events).encode() + b"data: [DONE]\n\n"
    expected = [json.dumps(e, ensure_ascii=False) for e in events] + ["[DONE]"]
    for size in range(1, len(stream) + 1):  # every split, multi-byte characters and "\n\n" cut in two included
        decoder, out = SseDecoder(), []
        for i in range(0, len(stream), size):
            out += decoder.feed(stream[i : i + size])
        assert out + decoder.close() == expected, size
    decoder = SseDecoder()  # several events in one part, CRLF, a comment, a multi-line event, no final blank line
    assert decoder.feed(b": ping\r\ndata: a\r\n\r\ndata:b\ndata: c\n\nevent: x\ndata: d") == ["a", "b\nc"]
    assert decoder.close() == ["d"] and decoder.close() == []


def test_mid_stream_error_event_raises() -> None:
    with pytest.raises(EndpointError) as info:
        _event('{"error": "Request failed during generation: engine died", "error_type": "generation"}')
    assert (info.value.status, info.value.code, info.value.error_type) == (424, "StreamError", "generation")
    assert info.value.message == "Request failed during generation: engine died"


@pytest.mark.slow
def test_sagemaker_session_keeps_user_config_and_opts_out_of_telemetry(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    config = tmp_path / "config.yaml"
    config.write_text("SchemaVersion: '1.0'\nSageMaker:\n  Model:\n    EnableNetworkIsolation: true\n")
    monkeypatch.setenv("SAGEMAKER_USER_CONFIG_OVERRIDE", str(config))
    from sagemaker.config.config_schema import TELEMETRY_OPT_OUT_PATH
    from sagemaker.utils import resolve_value_from_config

    session = Aws(boto3.Session(region_name=REGION)).sagemaker_session()
    assert resolve_value_from_config(None, TELEMETRY_OPT_OUT_PATH, False, session) is True
    assert session.sagemaker_config["SageMaker"]["Model"]["EnableNetworkIsolation"] is True


@pytest.mark.integration
def test_async_predictor_over_s3(moto: str, server: Serve) -> None:
    """moto plays SageMaker's async side (it answers from a queue): the body the predictor puts in S3 is sent to the
    real container here, and its answer queued for moto to write where the predictor polls."""
    aws = Aws(boto3.Session(region_name=REGION))
    aws.client("s3").create_bucket(Bucket="results")
    predictor = AsyncLLMPredictor("async-llm", "s3://results/llm", aws)
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": N}}
    answer = _direct(server, body)
    error = {"error": "Input validation error: `max_new_tokens` must be strictly positive", "error_type": "validation"}
    failure = f'Received client error (422) from primary with message "{json.dumps(error)}". See the logs.'
    moto_queue_async_results(moto, [{"data": json.dumps(answer)}, {"is_failure": True, "data": failure}])
    result = predictor.submit(PROMPT, max_new_tokens=N)
    bucket, key = result.output_location.removeprefix("s3://").split("/", 1)
    inputs = aws.client("s3").list_objects_v2(Bucket="results", Prefix="async-endpoint-inputs/async-llm/")
    (uploaded,) = inputs["Contents"]
    stored = aws.client("s3").get_object(Bucket="results", Key=uploaded["Key"])["Body"].read()
    assert json.loads(stored) == body and bucket and key
    assert result.json(timeout_s=10, poll_s=0.05) == answer
    failed = predictor.submit(PROMPT, max_new_tokens=0)
    with pytest.raises(EndpointError) as info:
        failed.json(timeout_s=10, poll_s=0.05)
    assert (info.value.status, info.value.error_type) == (422, "validation")
    assert info.value.message == "Input validation error: `max_new_tokens` must be strictly positive"
