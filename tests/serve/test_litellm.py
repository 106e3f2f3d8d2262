"""LiteLLM against one real `serve` (tiny llama, float32): the `openai/` provider on /v1, and the SageMaker providers
(`sagemaker/`, TGI bodies; `sagemaker_chat/`, the messages API) signing their requests for local_mode's runtime
emulator (`sagemaker_base_url`). Greedy answers equal engine.LLM's; streamed pieces join to them.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from engine import LLM, SamplingParams
from tests.support.serve_process import LIVE_ENDPOINT, Serve

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch of the price list at import (offline)
import litellm  # noqa: E402

pytestmark = pytest.mark.integration

PROMPT = "The quick brown fox"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
N = 12  # max new tokens
TIMEOUT = 60
AWS = dict(aws_access_key_id="x", aws_secret_access_key="x", aws_region_name="us-east-1")


def chat_reference(llm: LLM) -> str:
    return llm.chat(CHAT, SamplingParams(max_new_tokens=N, do_sample=False))[0].text


def joined(stream: Any) -> tuple[str, str | None]:
    """A litellm stream's text and its last finish_reason."""
    text, finish = "", None
    for chunk in stream:
        choice = chunk.choices[0]
        text += choice.delta.content or ""
        finish = choice.finish_reason or finish
    return text, finish


def test_openai_provider(live_server: Serve, reference_llm: LLM) -> None:
    ref = chat_reference(reference_llm)
    kw = dict(model="openai/tgi", api_base=live_server.url("/v1"), api_key="x", timeout=TIMEOUT, num_retries=0)
    answer = litellm.completion(messages=CHAT, max_tokens=N, temperature=0, **kw)
    assert answer.choices[0].message.content == ref and answer.choices[0].finish_reason == "length"
    assert answer.usage.completion_tokens == N

    assert joined(litellm.completion(messages=CHAT, max_tokens=N, temperature=0, stream=True, **kw)) == (ref, "length")

    text = litellm.text_completion(prompt=PROMPT, max_tokens=N, temperature=0, **kw)  # /v1/completions
    greedy = reference_llm.generate(PROMPT, SamplingParams(max_new_tokens=N, do_sample=False))[0].text
    assert text.choices[0].text == greedy


def sagemaker_url(runtime: str, stream: bool) -> str:
    return f"{runtime}/endpoints/{LIVE_ENDPOINT}/invocations" + ("-response-stream" if stream else "")


def test_sagemaker_provider_tgi_bodies(live_runtime: str, reference_llm: LLM) -> None:
    """`sagemaker/`: one `inputs` string made from the messages by a prompt template (here: the user's text as is),
    TGI `parameters`; greedy unless sampling is asked for (litellm turns temperature 0 into 0.01)."""
    ref = reference_llm.generate(PROMPT, SamplingParams(max_new_tokens=N, do_sample=False))[0].text
    kw: dict[str, Any] = dict(
        model=f"sagemaker/{LIVE_ENDPOINT}", messages=[{"role": "user", "content": PROMPT}], max_tokens=N,
        roles={"user": {"pre_message": "", "post_message": ""}}, num_retries=0, **AWS,
    )  # fmt: skip
    answer = litellm.completion(sagemaker_base_url=sagemaker_url(live_runtime, False), **kw)
    assert answer.choices[0].message.content == ref

    stream = litellm.completion(sagemaker_base_url=sagemaker_url(live_runtime, True), stream=True, **kw)
    assert joined(stream)[0] == ref


def test_sagemaker_chat_provider(live_runtime: str, reference_llm: LLM) -> None:
    """`sagemaker_chat/`: OpenAI chat bodies on /invocations, chat.completion.chunk events in the stream."""
    ref = chat_reference(reference_llm)
    kw: dict[str, Any] = dict(
        model=f"sagemaker_chat/{LIVE_ENDPOINT}", messages=CHAT, max_tokens=N, temperature=0, num_retries=0, **AWS
    )
    answer = litellm.completion(sagemaker_base_url=sagemaker_url(live_runtime, False), **kw)
    assert answer.choices[0].message.content == ref and answer.choices[0].finish_reason == "length"
    assert answer.usage.completion_tokens == N

    stream = litellm.completion(sagemaker_base_url=sagemaker_url(live_runtime, True), stream=True, **kw)
    assert joined(stream) == (ref, "length")


def test_validation_errors_reach_the_caller(live_server: Serve, live_runtime: str) -> None:
    """The server's 422 (JSON `error`), directly and as SageMaker's 424 ModelError, is litellm's BadRequestError."""
    too_long = dict(messages=CHAT, max_tokens=100_000, num_retries=0)
    with pytest.raises(litellm.BadRequestError) as info:
        litellm.completion(model="openai/tgi", api_base=live_server.url("/v1"), api_key="x", **too_long)
    # the openai SDK puts only an OpenAI-shaped `error.message` into the exception's text; TGI's string `error`
    # (docs/http-api.md) reaches the caller as the exception's body
    assert info.value.status_code == 422 and "`max_new_tokens` must be <= 256" in str(info.value.body)
    as_model_error = r"client error \(422\) from primary.*`max_new_tokens` must be <="
    with pytest.raises(litellm.BadRequestError, match=as_model_error) as info:
        litellm.completion(
            model=f"sagemaker_chat/{LIVE_ENDPOINT}", sagemaker_base_url=sagemaker_url(live_runtime, False),
            **too_long, **AWS,
        )  # fmt: skip
    assert info.value.status_code == 424
