"""What each gunicorn worker is told (serve.ipc.WorkerConfig, pickled in the runtime dir): the HTTP limits resolved
against the loaded model, the model facts /info reports, where the engine's sockets and the tokenizer are.
"""

from __future__ import annotations

import logging

from container.settings import Settings
from serve.ipc import Addresses, EngineFacts, WorkerConfig, model_info

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
    extra = {"model_revision": s.engine.revision, "max_batch_size": s.engine.max_num_seqs}
    info = model_info(
        facts, server.model_id, server.max_input_tokens, server.max_total_tokens, server.max_concurrent_requests, extra
    )
    return WorkerConfig(
        addresses,
        server,
        info,
        facts.model_dir,
        facts.gguf_file,
        s.engine.trust_remote_code,
        s.launcher.log_level,
        facts.tokenizer_dir,
        s.tracing,
    )
