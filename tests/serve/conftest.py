"""Fixtures of the HTTP tests (test_app_*.py): `serve_env` (the shared engine, client and config; it checks
that each test leaves no request in flight and every KV block free) and `api` (a flask test client).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from flask.testing import FlaskClient

from tests.support.served_app import Served, served


@pytest.fixture
def serve_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    s = served(tmp_path_factory)
    assert s.idle(), "an earlier test left requests in flight"
    yield s
    assert s.idle(), "the test left requests in flight or KV blocks allocated"


@pytest.fixture
def api(serve_env: Served) -> FlaskClient:
    return serve_env.app().test_client()
