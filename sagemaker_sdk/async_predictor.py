"""AsyncLLMPredictor: an async-inference endpoint (no 60 s limit). A request body goes to S3, InvokeEndpointAsync
queues it, and SageMaker writes the container's answer (or the failure) to S3, where AsyncResult polls for it.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from botocore.exceptions import ClientError

from sagemaker_sdk import errors
from sagemaker_sdk.aws import Aws
from sagemaker_sdk.predictor import delete_endpoint

JSON = "application/json"


def split_s3(uri: str) -> tuple[str, str]:
    parts = urlsplit(uri)
    if parts.scheme != "s3" or not parts.netloc:
        raise ValueError(f"expected an s3://bucket/key URI, got {uri!r}")
    return parts.netloc, parts.path.lstrip("/")


@dataclass(frozen=True)
class AsyncResult:
    aws: Aws
    inference_id: str
    output_location: str
    failure_location: str | None

    def _read(self, uri: str) -> bytes | None:
        bucket, key = split_s3(uri)
        try:
            return self.aws.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise

    def json(self, timeout_s: float = 3600.0, poll_s: float = 5.0) -> Any:  # noqa: ANN401 (the container's answer)
        """Wait for the answer; EndpointError when SageMaker wrote a failure, TimeoutError after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            data = self._read(self.output_location)
            if data is not None:
                return json.loads(data)
            failure = self._read(self.failure_location) if self.failure_location else None
            if failure is not None:
                raise errors.from_failure_text(failure.decode("utf-8", errors="replace"))
            if time.monotonic() > deadline:
                raise TimeoutError(f"no answer at {self.output_location} after {timeout_s:.0f}s")
            time.sleep(poll_s)


class AsyncLLMPredictor:
    def __init__(self, endpoint_name: str, output_path: str, aws: Aws | None = None) -> None:
        """`output_path`: the endpoint's S3 output path; request bodies go to its bucket too."""
        self.endpoint_name = endpoint_name
        self.aws = aws or Aws()
        bucket, _ = split_s3(output_path)
        self.input_prefix = f"s3://{bucket}/async-endpoint-inputs/{endpoint_name}"

    def __repr__(self) -> str:
        return f"AsyncLLMPredictor({self.endpoint_name!r})"

    def submit_body(self, body: dict[str, Any]) -> AsyncResult:
        inference_id = uuid.uuid4().hex
        location = f"{self.input_prefix}/{inference_id}.json"
        bucket, key = split_s3(location)
        self.aws.client("s3").put_object(Bucket=bucket, Key=key, Body=json.dumps(body).encode(), ContentType=JSON)
        try:
            response = self.aws.client("sagemaker-runtime").invoke_endpoint_async(
                EndpointName=self.endpoint_name, InputLocation=location, ContentType=JSON, Accept=JSON,
                InferenceId=inference_id,
            )  # fmt: skip
        except ClientError as e:
            raise errors.from_client_error(e) from None
        return AsyncResult(self.aws, inference_id, response["OutputLocation"], response.get("FailureLocation"))

    def submit(self, prompt: str, **params: Any) -> AsyncResult:
        """Queue a TGI request; `.json()` on the result waits for the answer."""
        return self.submit_body({"inputs": prompt, "parameters": params})

    def generate(self, prompt: str, timeout_s: float = 3600.0, poll_s: float = 5.0, **params: Any) -> str:
        answer = self.submit(prompt, **params).json(timeout_s, poll_s)
        first = answer[0] if isinstance(answer, list) else answer
        return first["generated_text"]

    def delete(self, monitoring: bool = True) -> None:
        delete_endpoint(self.aws, self.endpoint_name, monitoring)
