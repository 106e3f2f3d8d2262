"""Services: what the route handlers share (engine client, config, validator, token decoder, metrics), built
once by create_app, and how one HTTP request becomes engine requests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from engine.sampling_params import SamplingParams
from serve.engine_protocol import EngineClient, EngineRequest
from serve.metrics import Metrics
from serve.request_record import RequestRecord
from serve.server_config import ServerConfig
from serve.token_decoder import TokenDecoder
from serve.validation import Validator


@dataclass
class Services:
    """What the route handlers share, built once by create_app."""

    client: EngineClient
    config: ServerConfig
    validator: Validator
    decoder: TokenDecoder
    metrics: Metrics
    compute_type: Callable[[], str]

    def requests(self, record: RequestRecord, jobs: Sequence[tuple[list[int], SamplingParams]]) -> list[EngineRequest]:
        """One engine request per job; ids derive from the HTTP request id."""
        single = len(jobs) == 1
        return [
            EngineRequest(
                record.request_id if single else f"{record.request_id}-{i}",
                ids,
                params,
                record.arrival,
                trace_context=record.trace_context,
            )
            for i, (ids, params) in enumerate(jobs)
        ]
