"""boto3's sagemaker-runtime client against local_mode.runtime_emulator in front of one real `serve` (tiny llama,
float32): InvokeEndpoint (TGI and OpenAI bodies), InvokeEndpointWithResponseStream (streamed text equals the greedy
answer), the error shapes boto3 raises, and the event-stream frames as botocore's own parser reads them.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from botocore.config import Config
from botocore.eventstream import EventStream, EventStreamBuffer
from botocore.exceptions import ClientError, EventStreamError
from botocore.parsers import EventStreamJSONParser

from local_mode.event_stream import model_stream_error, payload_part
from local_mode.runtime_emulator import RuntimeEmulator
from tests.support.serve_process import Serve, base_env, free_port, running_serve, write_chain_model
from tests.support.served_app import build_model
from tests.support.sse import sse_events

ENDPOINT = "tiny-llm"
PROMPT = "The quick brown fox"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
N = 12


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    with running_serve(
        build_model(tmp_path_factory.mktemp("emulator_model")), tmp_path_factory.mktemp("emulator_serve")
    ) as s:
        yield s


def _client(url: str):  # noqa: ANN202 (boto3's client classes are generated)
    return boto3.client(
        "sagemaker-runtime", endpoint_url=url, region_name="us-east-1", aws_access_key_id="x",
        aws_secret_access_key="x", config=Config(retries={"max_attempts": 1}, read_timeout=60),
    )  # fmt: skip


@pytest.fixture(scope="module")
def runtime(server: Serve) -> Iterator:
    with RuntimeEmulator({ENDPOINT: server.url("")}) as emulator:
        yield _client(emulator.url)


def _invoke(runtime, body: dict) -> dict:  # noqa: ANN001
    r = runtime.invoke_endpoint(EndpointName=ENDPOINT, Body=json.dumps(body), ContentType="application/json")
    assert r["InvokedProductionVariant"] == "AllTraffic" and r["ContentType"].startswith("application/json")
    return json.loads(r["Body"].read())


# ---- against the real container ----------------------------------------------------------------


@pytest.mark.integration
def test_invoke_endpoint_tgi_and_openai_bodies(runtime) -> None:  # noqa: ANN001
    tgi = _invoke(runtime, {"inputs": PROMPT, "parameters": {"max_new_tokens": N, "do_sample": False}})
    assert isinstance(tgi, list) and isinstance(tgi[0]["generated_text"], str) and tgi[0]["generated_text"]
    chat = _invoke(runtime, {"messages": CHAT, "max_tokens": N, "temperature": 0})
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["role"] == "assistant"
    assert chat["usage"]["completion_tokens"] >= 1


@pytest.mark.integration
def test_stream_joins_to_the_greedy_answer(runtime) -> None:  # noqa: ANN001
    params = {"max_new_tokens": N, "do_sample": False}
    expected = _invoke(runtime, {"inputs": PROMPT, "parameters": params})[0]["generated_text"]
    r = runtime.invoke_endpoint_with_response_stream(
        EndpointName=ENDPOINT, Body=json.dumps({"inputs": PROMPT, "parameters": params, "stream": True}),
        ContentType="application/json",
    )  # fmt: skip
    assert r["ContentType"].startswith("text/event-stream") and r["InvokedProductionVariant"] == "AllTraffic"
    parts = [event["PayloadPart"]["Bytes"] for event in r["Body"]]
    assert parts and all(isinstance(p, bytes) for p in parts)
    events = sse_events(b"".join(parts))
    assert "".join(e["token"]["text"] for e in events) == expected == events[-1]["generated_text"]
    assert len(events) == N


@pytest.mark.integration
def test_container_422_is_a_model_error(runtime) -> None:  # noqa: ANN001
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 0}}
    for call in (runtime.invoke_endpoint, runtime.invoke_endpoint_with_response_stream):
        with pytest.raises(runtime.exceptions.ModelError) as info:
            call(EndpointName=ENDPOINT, Body=json.dumps(body), ContentType="application/json")
        response = info.value.response
        assert response["ResponseMetadata"]["HTTPStatusCode"] == 424 and response["Error"]["Code"] == "ModelError"
        assert response["OriginalStatusCode"] == 422 and "max_new_tokens" in response["OriginalMessage"]
        assert "(422)" in response["Error"]["Message"] and response["LogStreamArn"].startswith("arn:aws:logs:")


@pytest.mark.integration
def test_unknown_endpoint_is_a_validation_error(runtime) -> None:  # noqa: ANN001
    for call in (runtime.invoke_endpoint, runtime.invoke_endpoint_with_response_stream):
        with pytest.raises(ClientError) as info:
            call(EndpointName="nope", Body=b"{}", ContentType="application/json")
        error = info.value.response["Error"]
        assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
        assert (
            error["Code"] == "ValidationError"
            and error["Message"] == "Endpoint nope of account 123456789012 not found."
        )


# ---- frames through botocore's parser ----------------------------------------------------------


def _stream_shape():  # noqa: ANN202
    op = _client("http://127.0.0.1:9").meta.service_model.operation_model("InvokeEndpointWithResponseStream")
    return op.output_shape.members["Body"]


class _Raw:
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    def stream(self) -> Iterator[bytes]:
        yield from self.chunks

    def close(self) -> None:
        pass


def _odd_chunks(data: bytes) -> list[bytes]:
    sizes, out, i, k = [1, 3, 7, 2, 13, 5], [], 0, 0
    while i < len(data):
        out.append(data[i : i + sizes[k % len(sizes)]])
        i, k = i + sizes[k % len(sizes)], k + 1
    return out


def test_frames_parse_split_and_batched() -> None:
    payloads = [b'data: {"a": 1}\n\n', b"", "héllo 東京".encode(), bytes(range(256)) * 40]
    frames = b"".join(payload_part(p) for p in payloads)
    for chunks in (_odd_chunks(frames), [frames]):  # split across reads; all in one read
        buffer, messages = EventStreamBuffer(), []
        for chunk in chunks:
            buffer.add_data(chunk)
            messages.extend(buffer)
        assert [m.payload for m in messages] == payloads
        assert all(
            m.headers[":event-type"] == "PayloadPart" and m.headers[":message-type"] == "event" for m in messages
        )
        stream = EventStream(_Raw(chunks), _stream_shape(), EventStreamJSONParser(), "InvokeEndpointWithResponseStream")
        assert [e["PayloadPart"]["Bytes"] for e in stream] == payloads


def test_model_stream_error_frame_raises_in_botocore() -> None:
    data = payload_part(b"data: x\n\n") + model_stream_error("broken", "StreamBroken")
    stream = EventStream(_Raw(_odd_chunks(data)), _stream_shape(), EventStreamJSONParser(), "X")
    events = iter(stream)
    assert next(events) == {"PayloadPart": {"Bytes": b"data: x\n\n"}}
    with pytest.raises(EventStreamError) as info:
        next(events)
    assert info.value.response["Error"] == {"Code": "ModelStreamError", "Message": "broken"}


# ---- a container that drops the connection mid-stream ------------------------------------------


@pytest.fixture
def dropping_container() -> Iterator[tuple[str, threading.Event]]:
    """Answers one request with a chunked SSE head and one event, then (once the test has that event) resets
    the connection. Waiting matters: a reset can discard bytes the emulator has not read yet."""
    listener = socket.create_server(("127.0.0.1", 0))
    received = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            event = b'data:{"token": {"text": "hi"}}\n\n'
            head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
            conn.sendall(head + f"{len(event):x}\r\n".encode() + event + b"\r\n")
            received.wait(30)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}", received
    received.set()
    thread.join(5)
    listener.close()


def test_dropped_container_stream_is_a_model_stream_error(dropping_container: tuple[str, threading.Event]) -> None:
    url, received = dropping_container
    with RuntimeEmulator({"drops": url}) as emulator:
        r = _client(emulator.url).invoke_endpoint_with_response_stream(
            EndpointName="drops", Body=b'{"inputs": "x", "stream": true}', ContentType="application/json"
        )
        events = iter(r["Body"])
        assert next(events)["PayloadPart"]["Bytes"] == b'data:{"token": {"text": "hi"}}\n\n'
        received.set()  # now the container drops the connection
        with pytest.raises(EventStreamError) as info:
            next(events)
        assert info.value.response["Error"]["Code"] == "ModelStreamError"


@pytest.mark.integration
def test_real_engine_kill_mid_stream_passes_the_sse_error_through(tmp_path: Path) -> None:
    """serve answers an engine death with an SSE error event and a clean end: PayloadParts, no ModelStreamError."""
    env = base_env(
        HF_MODEL_ID=str(write_chain_model(tmp_path / "chain")), SM_OPT_ML_DIR=str(tmp_path / "opt_ml"),
        SAGEMAKER_BIND_TO_PORT=str(free_port()), DTYPE="float32", SERVE_WORKERS="1",
        MAX_TOTAL_TOKENS="2048", MAX_BATCH_TOTAL_TOKENS="4096",
    )  # fmt: skip
    s = Serve(env, tmp_path / "serve.log")
    try:
        s.wait_ready()
        with RuntimeEmulator({"chain": s.url("")}) as emulator:
            body = {"inputs": "a", "parameters": {"max_new_tokens": 2000}, "stream": True}
            r = _client(emulator.url).invoke_endpoint_with_response_stream(
                EndpointName="chain", Body=json.dumps(body), ContentType="application/json"
            )
            parts = []
            for event in r["Body"]:
                parts.append(event["PayloadPart"]["Bytes"])
                if len(parts) == 3:
                    s.engine_process().kill()
        events = sse_events(b"".join(parts))
        assert 3 <= len(events) < 2000 and events[-1]["error_type"] == "generation"
        assert s.wait_exit(30) == 1
    finally:
        s.close()


def test_unreachable_container_is_a_model_error() -> None:
    with RuntimeEmulator({"gone": f"http://127.0.0.1:{free_port()}"}) as emulator:
        with pytest.raises(_client(emulator.url).exceptions.ModelError) as info:
            _client(emulator.url).invoke_endpoint(EndpointName="gone", Body=b"{}", ContentType="application/json")
    assert info.value.response["OriginalStatusCode"] == 502


def test_cli_parses_endpoints() -> None:
    from local_mode.runtime_emulator import _endpoint

    assert _endpoint("a=http://127.0.0.1:8080") == ("a", "http://127.0.0.1:8080")
    with pytest.raises(Exception, match="NAME=http"):
        _endpoint("nope")
