"""What each gunicorn worker is told (serve.ipc.WorkerConfig, pickled in the runtime dir): the HTTP limits resolved
against the loaded model, the model facts /info reports, where the engine's sockets and the tokenizer are.
"""

from __future__ import annotations

import logging

from container.settings import Settings
from serve.engine_protocol import ModelInfo
from serve.ipc import Addresses, EngineFacts, WorkerConfig

logger = logging.getLogger("container.launcher")


def worker_config(s: Settings, addresses: Addresses, facts: EngineFacts, metrics_dir: str) -> WorkerConfig:
    """The config every worker reads (serve.wsgi): the HTTP limits resolved against the model, what /info reports."""
    server = s.server_config(facts.model_context, metrics_dir)
    if facts.kv_cache_tokens < server.max_total_tokens:
        logger.warning(
            "the KV cache holds %d tokens, fewer than MAX_TOTAL_TOKENS (%d): the longest requests are refused",
            facts.kv_cache_tokens,
            server.max_total_tokens,
        )
    info = ModelInfo(
        model_id=server.model_id,
        model_dtype=facts.dtype,
        model_device_type=facts.device_type,
        max_input_tokens=server.max_input_tokens,
        max_total_tokens=server.max_total_tokens,
        max_batch_total_tokens=facts.kv_cache_tokens,
        max_batch_prefill_tokens=facts.max_batch_prefill_tokens,
        max_concurrent_requests=server.max_concurrent_requests,
        eos_token_ids=facts.eos_token_ids,
        extra={
            "model_revision": s.engine.revision,
            "model_context": facts.model_context,
            "max_batch_size": s.engine.max_num_seqs,
            "messages_api_enabled": s.launcher.messages_api_enabled,
        },
    )
    return WorkerConfig(
        addresses, server, info, facts.model_dir, facts.gguf_file, s.engine.trust_remote_code, s.launcher.log_level
    )
