"""Pydantic schemas of the TGI-shaped API: generate requests and responses, stream events, /info,
/tokenize and the error body. Field names, defaults and optional keys follow TGI's router.

Requests ignore unknown keys (as serde does); range checks live in serve.validation so that the
messages are TGI's own.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

FinishReason = Literal["length", "eos_token", "stop_sequence"]


class Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Response(BaseModel):
    """A response body; keys named in `omit_if_none` disappear when None (serde's skip_serializing_if)."""

    omit_if_none: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _omit(self, handler: SerializerFunctionWrapHandler) -> Any:
        data = handler(self)
        for key in self.omit_if_none:
            if data.get(key) is None:
                data.pop(key, None)
        return data


# ---- requests ---------------------------------------------------------------------------------


class GenerateParameters(Request):
    best_of: int | None = Field(None, description="Generate best_of sequences, return the most likely one")
    temperature: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    typical_p: float | None = None
    do_sample: bool = False
    max_new_tokens: int | None = Field(None, description="Default: max_total_tokens - input tokens")
    return_full_text: bool | None = None
    stop: list[str] | None = None
    truncate: int | None = Field(None, description="Keep only the last `truncate` input tokens")
    watermark: bool = Field(False, description="Not supported: true is a 422")
    details: bool = False
    decoder_input_details: bool = Field(False, description="Prefill tokens in details (logprob null)")
    seed: int | None = None
    top_n_tokens: int | None = None
    grammar: dict[str, Any] | None = Field(
        None, description='{"type": "json" | "json_schema" | "regex", "value": ...}: constrain the output'
    )
    adapter_id: str | None = Field(None, description="Not supported: an adapter is a 422")


class GenerateRequest(Request):
    inputs: str
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool = Field(False, description="Only on /invocations and /: answer as /generate_stream")


class TokenizeRequest(Request):
    inputs: str
    add_special_tokens: bool = True


# ---- responses --------------------------------------------------------------------------------


class ErrorResponse(Response):
    error: str
    error_type: str


class PrefillToken(Response):
    id: int
    text: str
    logprob: float | None = None


class Token(Response):
    id: int
    text: str
    logprob: float | None = None
    special: bool = False


class BestOfSequence(Response):
    omit_if_none = ("top_tokens",)

    generated_text: str
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None = None
    prefill: list[PrefillToken] = Field(default_factory=list)
    tokens: list[Token] = Field(default_factory=list)
    top_tokens: list[list[Token]] | None = None


class Details(Response):
    omit_if_none = ("top_tokens", "best_of_sequences")

    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None = None
    prefill: list[PrefillToken] = Field(default_factory=list)
    tokens: list[Token] = Field(default_factory=list)
    top_tokens: list[list[Token]] | None = None
    best_of_sequences: list[BestOfSequence] | None = None


class GenerateResponse(Response):
    omit_if_none = ("details",)

    generated_text: str
    details: Details | None = None


class StreamDetails(Response):
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None = None
    input_length: int


class StreamResponse(Response):
    """One `data:` event of /generate_stream: a token, and on the last one the text and details."""

    omit_if_none = ("top_tokens",)

    index: int
    token: Token
    top_tokens: list[Token] | None = None
    generated_text: str | None = None
    details: StreamDetails | None = None


class SimpleToken(Response):
    id: int
    text: str
    start: int
    stop: int


class Info(Response):
    model_id: str
    model_sha: str | None = None
    model_dtype: str
    model_device_type: str
    model_pipeline_tag: str | None = None
    max_concurrent_requests: int
    max_best_of: int
    max_stop_sequences: int
    max_top_n_tokens: int
    max_input_tokens: int
    max_input_length: int  # TGI 1.x name of max_input_tokens
    max_total_tokens: int
    max_batch_total_tokens: int
    max_batch_prefill_tokens: int
    max_client_batch_size: int
    quantize: str | None = None  # "none", or the method and its kernel ("gptq int4 g128 on triton")
    model_implementation: str = "native"  # ours: "native", or "transformers" (the fallback, docs/models.md)
    validation_workers: int = 1
    router: str = "text-generation-router"
    version: str
    sha: str | None = None
    docker_label: str | None = None
