"""Helpers of test_kubernetes.py: an engine client with set stats, the status a route answers with over it
(the real flask app), and Kubernetes quantities in bytes.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

from serve.app import create_app
from serve.engine_protocol import EngineClient, EngineRequest, EngineStats, ModelInfo, TokenEvent, UnavailableError
from serve.server_config import ServerConfig

INFO = ModelInfo("stub", "torch.bfloat16", "cuda", 10, 20, 100, 50, 4, [1])
_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


class StubClient(EngineClient):
    """An engine that never generates, with the stats given (None: gone, or silent too long)."""

    def __init__(self, stats: EngineStats | None) -> None:
        self._stats = stats

    def generate(self, request: EngineRequest) -> Iterator[TokenEvent]:
        raise UnavailableError("the engine is not available")
        yield  # pragma: no cover

    def stats(self) -> EngineStats | None:
        return self._stats

    def model_info(self) -> ModelInfo:
        return INFO


def stats(ready: bool = True, draining: bool = False, **fields: Any) -> EngineStats:
    values: dict[str, Any] = dict(queue_size=0, batch_size=0, in_flight=0, kv_cache_usage=0.0, kv_cache_blocks=10)
    return EngineStats(ready=ready, draining=draining, time=time.time(), **{**values, **fields})


def _get(path: str, state: EngineStats | None) -> Any:
    """GET `path` from the real app while the engine reports `state` (no tokenizer: these routes need none)."""
    app = create_app(StubClient(state), ServerConfig("stub", 10, 20), None)
    return app.test_client().get(path)


def probe_status(path: str, state: EngineStats | None) -> int:
    return _get(path, state).status_code


def route_text(path: str, state: EngineStats | None) -> str:
    response = _get(path, state)
    assert response.status_code == 200, (path, response.status_code)
    return response.get_data(as_text=True)


def quantity(value: str | int) -> int:
    """A Kubernetes quantity ('8Gi', '512M', 1024) in bytes."""
    match = re.fullmatch(r"(\d+)([kMGT]i?)?", str(value))
    if match is None:
        raise ValueError(f"not a quantity this test knows: {value!r}")
    return int(match.group(1)) * _UNITS[match.group(2) or ""]
