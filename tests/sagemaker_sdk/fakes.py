"""The SDK tests' fake AWS account (region, role, image, endpoint) and a way to queue the results moto's
SageMaker async endpoint returns.
"""

from __future__ import annotations

import json
import urllib.request
from typing import Any

REGION = "us-east-1"
ROLE = "arn:aws:iam::123456789012:role/SageMakerRole"
IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/llm-server:latest"
ENDPOINT = "tiny-llm"


def moto_queue_async_results(moto_url: str, results: list[dict[str, Any]]) -> None:
    body = json.dumps({"region": REGION, "results": results}).encode()
    request = urllib.request.Request(f"{moto_url}/moto-api/static/sagemaker/async-endpoint-results", data=body)
    urllib.request.urlopen(request, timeout=10).close()
