"""Pydantic schemas of the OpenAI-compatible API: chat completions, completions, models.

Unknown request keys are ignored; parameters this server cannot honour are accepted by the schema
and refused with a 422 by serve.validation, so the client learns why.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from serve.tgi_protocol import Request, Response


class StreamOptions(Request):
    include_usage: bool = False


class ContentPart(Request):
    type: str
    text: str | None = None


class ChatMessage(Request):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = Field(None, description="An assistant turn's calls (history)")
    tool_call_id: str | None = Field(None, description="A tool turn: the call it answers")


class ChatRequest(Request):
    model: str | None = Field(None, description="Ignored: the endpoint serves one model")
    messages: list[ChatMessage]
    frequency_penalty: float | None = None
    presence_penalty: float | None = Field(None, description="Not supported: non-zero is a 422")
    logit_bias: dict[str, float] | None = Field(None, description="Not supported: non-empty is a 422")
    logprobs: bool | None = None
    top_logprobs: int | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    n: int | None = Field(None, description="Choices to generate (<= max_client_batch_size)")
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, description="0 = greedy; unset = sampling at 1.0")
    top_p: float | None = None
    tools: list[dict[str, Any]] | None = Field(None, description="Functions the model may call (constrained)")
    tool_choice: str | dict[str, Any] | None = Field(None, description="none, auto, required, or a function")
    response_format: dict[str, Any] | None = Field(None, description="text, json_object or json_schema")
    user: str | None = None


class CompletionRequest(Request):
    model: str | None = Field(None, description="Ignored: the endpoint serves one model")
    prompt: str | list[str]
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = Field(None, description="Not supported: non-zero is a 422")
    repetition_penalty: float | None = None
    n: int | None = None
    echo: bool | None = None
    logprobs: int | None = Field(None, description="Top alternatives per token (<= max_top_n_tokens)")
    suffix: str | None = Field(None, description="Not supported: a suffix is a 422")
    best_of: int | None = Field(None, description="Not supported: > 1 is a 422")
    response_format: dict[str, Any] | None = Field(None, description="text, json_object or json_schema")
    user: str | None = None


# ---- responses --------------------------------------------------------------------------------


class Usage(Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(Response):
    token: str
    logprob: float


class TokenLogprob(Response):
    token: str
    logprob: float
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(Response):
    content: list[TokenLogprob]


class FunctionCall(Response):
    name: str
    arguments: str  # JSON text, valid against the function's parameters


class ToolCallOut(Response):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(Response):
    omit_if_none = ("tool_calls",)

    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(Response):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str


class ChatCompletion(Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage


class FunctionCallDelta(Response):
    omit_if_none = ("name",)

    name: str | None = None
    arguments: str = ""


class ToolCallDelta(Response):
    """OpenAI's stream form: the first delta of a call has its id, type and name; the others add arguments."""

    omit_if_none = ("id", "type")

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class ChatDelta(Response):
    omit_if_none = ("tool_calls",)

    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(Response):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(Response):
    """The legacy completions shape: parallel lists, one entry per token."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None = None
    text_offset: list[int]


class CompletionChoice(Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class Completion(Response):
    """The /v1/completions body, and (object "text_completion", finish_reason null) each stream chunk."""

    omit_if_none = ("usage",)

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]
