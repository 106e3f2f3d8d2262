"""Gunicorn's entry point, run in each worker after the fork: `serve.wsgi:build_app('<runtime dir>/worker.pkl')`.

Reads the config file the launcher wrote (never the environment), connects a ZmqEngineClient to the engine
process and builds the flask app with serve.app.create_app over the tokenizer the engine exported (serve.tokenizer:
no torch, no transformers in a worker). It never waits for the engine: until the engine's first stats arrive (a
fraction of a second) /ping answers 503, and an engine that is gone leaves it at 503. /ping says 200 only once the
launcher has handed the port over (serve.ipc.Handover).
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from serve.ipc import STATS_INTERVAL_S, Handover, WorkerConfig
from serve.tracing import setup as setup_tracing
from serve.zmq_client import ZmqEngineClient

FIRST_STATS_WAIT_S = 4 * STATS_INTERVAL_S

if TYPE_CHECKING:
    from flask import Flask


def load_tokenizer(config: WorkerConfig) -> Any:
    """The engine's export (serve.tokenizer.WorkerTokenizer); transformers' only where the engine could not export."""
    if config.worker_tokenizer is not None:
        from serve.tokenizer import WorkerTokenizer

        return WorkerTokenizer.load(config.worker_tokenizer)
    from engine.model_source import ModelFiles, load_tokenizer  # imports transformers and torch

    return load_tokenizer(ModelFiles(config.tokenizer_dir, config.tokenizer_gguf), config.trust_remote_code)


def build_app(config_path: str) -> Flask:
    from serve.app import create_app

    config = WorkerConfig.read(config_path)
    logging.getLogger().setLevel(config.log_level.upper())
    client = ZmqEngineClient(config.addresses, config.model_info)
    client.start()
    tokenizer = load_tokenizer(config)
    handover = Handover(os.path.dirname(config_path))
    tracing = setup_tracing(config.tracing, "worker")  # after the fork: the span exporter's thread is ours
    app = create_app(client, config.server, tokenizer, serving=handover.serving, tracing=tracing)
    # The first stats before saying booted (this worker does not accept yet; the standby or a booted worker answers):
    # a worker that answered before its first stats arrived would say 503 between other workers' 200s. Bounded:
    # an engine that died sends none, and the worker then answers 503 as it should.
    client.wait_for_stats(FIRST_STATS_WAIT_S)
    handover.booted()
    return app
