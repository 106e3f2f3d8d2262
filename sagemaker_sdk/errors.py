"""EndpointError: the one exception an invocation raises, with the container's HTTP status and message when the
container answered (SageMaker's ModelError carries both), else the runtime API's own status, code and message.
"""

from __future__ import annotations

import json
import re

from botocore.exceptions import ClientError, EventStreamError

# the container's error_type (in a mid-stream SSE error event) -> the status it would have answered with
STATUS_BY_ERROR_TYPE = {"validation": 422, "overloaded": 429, "unhealthy": 503, "generation": 424}


class EndpointError(Exception):
    def __init__(self, status: int, message: str, code: str = "ModelError", error_type: str | None = None) -> None:
        super().__init__(f"{code} ({status}): {message}")
        self.status = status  # the container's HTTP status when it answered, else the runtime API's
        self.message = message  # the container's `error` text when it sent JSON
        self.code = code  # the runtime API's error code: ModelError, ValidationError, ModelStreamError...
        self.error_type = error_type  # the container's `error_type` ("validation", "overloaded"...)


def container_message(text: str) -> tuple[str, str | None]:
    """(message, error_type) from a container's error body: {"error", "error_type"} JSON, else the text itself."""
    try:
        body = json.loads(text)
    except ValueError:
        return text, None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        error_type = body.get("error_type")
        return body["error"], error_type if isinstance(error_type, str) else None
    return text, None


def from_client_error(e: ClientError) -> EndpointError:
    response = e.response
    error = response.get("Error", {})
    code = error.get("Code", "Unknown")
    if "OriginalStatusCode" in response:  # ModelError: what the container answered
        message, error_type = container_message(str(response.get("OriginalMessage", "")))
        return EndpointError(int(response["OriginalStatusCode"]), message, code, error_type)
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 500)
    return EndpointError(status, error.get("Message") or str(e), code)


def from_stream_error(e: EventStreamError) -> EndpointError:
    error = e.response.get("Error", {})
    code = error.get("Code", "StreamError")
    return EndpointError(424 if code == "ModelStreamError" else 500, error.get("Message") or str(e), code)


def from_event(event: dict) -> EndpointError:
    """An SSE `{"error", "error_type"}` event: the container failed after the stream began."""
    error_type = event.get("error_type")
    status = STATUS_BY_ERROR_TYPE.get(error_type, 500) if isinstance(error_type, str) else 500
    return EndpointError(status, str(event.get("error")), "StreamError", error_type)


def from_failure_text(text: str) -> EndpointError:
    """An async inference failure object: SageMaker's 'Received client error (422) from primary with message "..."'."""
    match = re.search(r"error \((\d{3})\) from \w+ with message \"(.*)\"", text, re.DOTALL)
    if match is None:
        return EndpointError(500, text.strip(), "AsyncInferenceFailure")
    message, error_type = container_message(match.group(2))
    return EndpointError(int(match.group(1)), message, "AsyncInferenceFailure", error_type)
