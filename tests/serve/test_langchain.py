"""LangChain against one real `serve` (tiny llama, float32): langchain-openai's ChatOpenAI on /v1 (invoke, stream,
with_structured_output by JSON schema and by function calling) and langchain-aws's SagemakerEndpoint and
ChatSagemakerEndpoint through boto3 and local_mode's runtime emulator. Greedy answers equal engine.LLM's.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import boto3
import pytest
from botocore.config import Config
from langchain_aws.chat_models.sagemaker_endpoint import ChatModelContentHandler, ChatSagemakerEndpoint
from langchain_aws.llms.sagemaker_endpoint import LLMContentHandler, SagemakerEndpoint
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from engine import LLM, SamplingParams
from tests.support.serve_process import LIVE_ENDPOINT, Serve
from tests.support.sse import sse_line

pytestmark = pytest.mark.integration

PROMPT = "The quick brown fox"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
N = 12  # max new tokens
TIMEOUT = 60


def chat_reference(llm: LLM) -> str:
    return llm.chat(CHAT, SamplingParams(max_new_tokens=N, do_sample=False))[0].text


# ---- langchain-openai ---------------------------------------------------------------------------


def chat_openai(server: Serve, **kw: Any) -> ChatOpenAI:
    options: dict[str, Any] = dict(model="tgi", temperature=0, max_tokens=N)
    return ChatOpenAI(base_url=server.url("/v1"), api_key="x", timeout=TIMEOUT, max_retries=0, **{**options, **kw})


def test_chat_openai_invoke_and_stream(live_server: Serve, reference_llm: LLM) -> None:
    ref = chat_reference(reference_llm)
    answer = chat_openai(live_server).invoke(CHAT)
    assert isinstance(answer, AIMessage) and answer.content == ref
    assert answer.response_metadata["finish_reason"] == "length" and answer.usage_metadata["output_tokens"] == N

    chunks = list(chat_openai(live_server, stream_usage=True).stream(CHAT))
    assert all(isinstance(c, AIMessageChunk) for c in chunks) and len(chunks) > 1
    assert "".join(c.content for c in chunks) == ref
    whole = sum(chunks[1:], chunks[0])  # LangChain's own merge of the chunks
    assert whole.content == ref and whole.usage_metadata["output_tokens"] == N
    assert whole.response_metadata["finish_reason"] == "length"


class Pet(BaseModel):
    kind: Literal["cat", "dog", "fish"]
    age: int = Field(ge=0, le=30)


class Owner(BaseModel):
    """A pet owner."""

    name: str = Field(max_length=6)
    pets: list[Pet] = Field(max_length=2)
    verified: bool


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_chat_openai_structured_output(live_server: Serve, method: str) -> None:
    """response_format json_schema / a forced tool call: the random model's sampled answer must still parse."""
    for seed in (0, 1):
        model = chat_openai(live_server, temperature=1.0, seed=seed, max_tokens=200)
        out = model.with_structured_output(Owner, method=method, include_raw=True).invoke(CHAT)
        assert out["parsing_error"] is None and isinstance(out["parsed"], Owner), out
        raw: AIMessage = out["raw"]
        if method == "json_schema":
            assert Owner.model_validate_json(raw.content) == out["parsed"]
            assert raw.response_metadata["finish_reason"] == "stop"
        else:
            (call,) = raw.tool_calls
            assert call["name"] == "Owner" and Owner.model_validate(call["args"]) == out["parsed"]
            assert raw.response_metadata["finish_reason"] in ("tool_calls", "stop")


# ---- langchain-aws through the SageMaker Runtime API -------------------------------------------


def sagemaker_runtime(url: str):  # noqa: ANN201 (boto3's client classes are generated)
    return boto3.client(
        "sagemaker-runtime", endpoint_url=url, region_name="us-east-1", aws_access_key_id="x",
        aws_secret_access_key="x", config=Config(retries={"max_attempts": 1}, read_timeout=TIMEOUT),
    )  # fmt: skip


class TGIHandler(LLMContentHandler):
    """TGI bodies: `{"inputs", "parameters", "stream"}` in; `[{"generated_text"}]` or SSE token events out."""

    content_type = accepts = "application/json"

    def __init__(self, stream: bool = False) -> None:
        self.stream = stream

    def transform_input(self, prompt: str, model_kwargs: dict) -> bytes:
        return json.dumps({"inputs": prompt, "parameters": model_kwargs, "stream": self.stream}).encode()

    def transform_output(self, output: Any) -> str:
        if isinstance(output, bytes):  # a line of the stream
            event = sse_line(output)  # None: a blank separator line
            return "" if event is None else event["token"]["text"]
        return json.loads(output.read())[0]["generated_text"]


class MessagesHandler(ChatModelContentHandler):
    """OpenAI chat bodies on /invocations: a chat.completion, or chat.completion.chunk SSE events when streaming."""

    content_type = accepts = "application/json"

    def __init__(self, stream: bool = False) -> None:
        self.stream = stream

    def transform_input(self, prompt: list[dict[str, Any]], model_kwargs: dict) -> bytes:
        return json.dumps({"messages": prompt, **model_kwargs, "stream": self.stream}).encode()

    def transform_output(self, output: Any) -> BaseMessage:
        if isinstance(output, bytes):  # a line of the stream
            event = sse_line(output)  # None: a blank separator line
            delta = event["choices"][0]["delta"] if isinstance(event, dict) and event["choices"] else {}
            return AIMessageChunk(content=delta.get("content") or "")
        body = json.loads(output.read())
        assert body["object"] == "chat.completion", body
        return AIMessage(content=body["choices"][0]["message"]["content"], response_metadata=body["usage"])


def test_sagemaker_endpoint_invoke_and_stream(live_runtime: str, reference_llm: LLM) -> None:
    ref = reference_llm.generate(PROMPT, SamplingParams(max_new_tokens=N, do_sample=False))[0].text
    kw = dict(endpoint_name=LIVE_ENDPOINT, client=sagemaker_runtime(live_runtime), model_kwargs={"max_new_tokens": N})
    assert SagemakerEndpoint(content_handler=TGIHandler(), **kw).invoke(PROMPT) == ref
    pieces = list(SagemakerEndpoint(content_handler=TGIHandler(stream=True), **kw).stream(PROMPT))
    assert len(pieces) > 1 and "".join(pieces) == ref


def test_chat_sagemaker_endpoint_invoke_and_stream(live_runtime: str, reference_llm: LLM) -> None:
    ref = chat_reference(reference_llm)
    kw = dict(
        endpoint_name=LIVE_ENDPOINT, client=sagemaker_runtime(live_runtime),
        model_kwargs={"max_tokens": N, "temperature": 0},
    )  # fmt: skip
    answer = ChatSagemakerEndpoint(content_handler=MessagesHandler(), **kw).invoke(CHAT)
    assert answer.content == ref and answer.response_metadata["completion_tokens"] == N
    chunks = list(ChatSagemakerEndpoint(content_handler=MessagesHandler(stream=True), **kw).stream(CHAT))
    assert len(chunks) > 1 and "".join(c.content for c in chunks) == ref
