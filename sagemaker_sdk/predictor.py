"""LLMPredictor: a real-time endpoint over boto3's sagemaker-runtime client. `generate` and `chat` answer with the
text, `stream` and `chat(stream=True)` yield text pieces as InvokeEndpointWithResponseStream delivers them, and
`delete` removes the endpoint, its config, its model and (by default) its dashboard, alarms and autoscaling.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from botocore.exceptions import ClientError, EventStreamError

from sagemaker_sdk import errors
from sagemaker_sdk.aws import Aws, describe
from sagemaker_sdk.sse import SseDecoder

JSON = "application/json"


class LLMPredictor:
    def __init__(self, endpoint_name: str, aws: Aws | None = None) -> None:
        self.endpoint_name = endpoint_name
        self.aws = aws or Aws()

    def __repr__(self) -> str:
        return f"LLMPredictor({self.endpoint_name!r})"

    # ---- raw bodies ---------------------------------------------------------------------------

    def invoke(self, body: dict[str, Any]) -> Any:  # noqa: ANN401 (the container's JSON answer)
        """POST one JSON body (TGI `inputs`, OpenAI `messages` or `prompt`) and return the JSON answer."""
        try:
            response = self.aws.client("sagemaker-runtime").invoke_endpoint(
                EndpointName=self.endpoint_name, Body=json.dumps(body), ContentType=JSON, Accept=JSON
            )
        except ClientError as e:
            raise errors.from_client_error(e) from None
        return json.loads(response["Body"].read())

    def invoke_stream(self, body: dict[str, Any]) -> Iterator[Any]:
        """POST a streaming body and yield each SSE event's data, JSON-decoded ("[DONE]" ends the stream)."""
        try:
            response = self.aws.client("sagemaker-runtime").invoke_endpoint_with_response_stream(
                EndpointName=self.endpoint_name, Body=json.dumps(body), ContentType=JSON, Accept="text/event-stream"
            )
        except ClientError as e:
            raise errors.from_client_error(e) from None
        decoder, stream = SseDecoder(), response["Body"]
        try:
            for part in stream:
                for data in decoder.feed(part.get("PayloadPart", {}).get("Bytes", b"")):
                    yield _event(data)
            for data in decoder.close():
                yield _event(data)
        except EventStreamError as e:
            raise errors.from_stream_error(e) from None
        finally:
            stream.close()

    # ---- text in, text out --------------------------------------------------------------------

    def generate(self, prompt: str, **params: Any) -> str:
        """The generated text for `prompt` (TGI parameters: max_new_tokens, temperature, top_p, stop, seed...)."""
        answer = self.invoke({"inputs": prompt, "parameters": params})
        first = answer[0] if isinstance(answer, list) else answer
        return first["generated_text"]

    def stream(self, prompt: str, **params: Any) -> Iterator[str]:
        """The generated text in pieces as they are produced; joined they equal `generate`'s answer."""
        for event in self.invoke_stream({"inputs": prompt, "parameters": params, "stream": True}):
            token = event.get("token") if isinstance(event, dict) else None
            if token is not None and not token.get("special") and token.get("text"):
                yield token["text"]

    def chat(self, messages: list[dict[str, Any]], stream: bool = False, **params: Any) -> str | Iterator[str]:
        """The assistant's reply to OpenAI-style `messages` (chat template applied by the container); with
        `stream=True` an iterator of its pieces. Parameters are OpenAI's: max_tokens, temperature, top_p..."""
        body = {"messages": messages, **params}
        if stream:
            return self._chat_stream({**body, "stream": True})
        answer = self.invoke(body)
        return answer["choices"][0]["message"]["content"]

    def _chat_stream(self, body: dict[str, Any]) -> Iterator[str]:
        for event in self.invoke_stream(body):
            if event == "[DONE]":
                return
            for choice in event.get("choices", []):
                if content := (choice.get("delta") or {}).get("content"):
                    yield content

    # ---- lifecycle ----------------------------------------------------------------------------

    def delete(self, monitoring: bool = True) -> None:
        """Delete the endpoint, its endpoint config and its model; with `monitoring`, also the dashboard, alarms
        and autoscaling that `sagemaker_sdk.monitor` created for it."""
        delete_endpoint(self.aws, self.endpoint_name, monitoring)


def _event(data: str) -> Any:  # noqa: ANN401
    if data == "[DONE]":
        return data
    event = json.loads(data)
    if isinstance(event, dict) and "error" in event and "error_type" in event:
        raise errors.from_event(event)
    return event


def delete_endpoint(aws: Aws, endpoint_name: str, monitoring: bool = True) -> None:
    parts = describe(aws, endpoint_name)
    if monitoring:
        from sagemaker_sdk.monitoring import remove_monitoring

        remove_monitoring(aws, endpoint_name, parts.variant_name)
    sm = aws.client("sagemaker")
    sm.delete_endpoint(EndpointName=endpoint_name)
    sm.delete_endpoint_config(EndpointConfigName=parts.config_name)
    sm.delete_model(ModelName=parts.model_name)
