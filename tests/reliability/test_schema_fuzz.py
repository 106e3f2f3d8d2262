"""schemathesis against the app's own /openapi.json, in-process (WSGI) over a tiny model engine: bounded examples of
every operation, schema-conforming and schema-violating bodies. No answer may be a 5xx; every error is a JSON
{"error", "error_type"} body; answers match the documented status codes, content types and response schemas; the
engine is idle (no request in flight, every KV block free) after each operation's run.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.support.served_app import Served, served

pytestmark = [pytest.mark.slow, pytest.mark.reliability]


@pytest.fixture(scope="module")
def engine_env(tmp_path_factory: pytest.TempPathFactory) -> Served:
    s = served(tmp_path_factory)
    # IEEE arithmetic, as in a gunicorn worker: no library loaded with the engine may turn on flush-to-zero /
    # denormals-are-zero for the process (-ffast-math start-up code did; hypothesis then refuses to draw floats)
    assert 5e-324 > 0, "denormals are flushed to zero in this process"
    return s


@pytest.fixture(scope="module")
def api_schema(engine_env: Served) -> Any:
    app = engine_env.app()
    return schemathesis.openapi.from_wsgi("/openapi.json", app)


schema = schemathesis.pytest.from_fixture("api_schema")


def error_shaped(response: Any) -> None:
    if response.status_code < 400:
        return
    assert response.headers.get("content-type", [""])[0].startswith("application/json"), response.headers
    body = json.loads(response.content)
    assert set(body) == {"error", "error_type"} and body["error"], body


@schema.parametrize()
@settings(
    max_examples=20,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_every_operation(case: Any, engine_env: Served) -> None:
    response = case.call()
    case.validate_response(
        response,
        checks=[not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance],
    )
    error_shaped(response)
    assert engine_env.idle(), "a request was left in flight or holding KV blocks"
