"""Gunicorn's entry point, run in each worker after the fork: `serve.wsgi:build_app('<runtime dir>/worker.pkl')`.

Reads the config file the launcher wrote (never the environment), connects a ZmqEngineClient to the engine
process and builds the flask app with serve.app.create_app.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from serve.ipc import WorkerConfig
from serve.zmq_client import ZmqEngineClient

if TYPE_CHECKING:
    from flask import Flask

FIRST_STATS_WAIT_S = 5.0  # so the first /ping after start-up already sees the engine


def build_app(config_path: str) -> Flask:
    from engine.model_source import ModelFiles, load_tokenizer
    from serve.app import create_app

    config = WorkerConfig.read(config_path)
    logging.getLogger().setLevel(config.log_level.upper())
    client = ZmqEngineClient(config.addresses, config.model_info)
    client.start()
    tokenizer = load_tokenizer(ModelFiles(config.tokenizer_dir, config.tokenizer_gguf), config.trust_remote_code)
    client.wait_for_stats(FIRST_STATS_WAIT_S)
    return create_app(client, config.server, tokenizer)
