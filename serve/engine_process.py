"""The engine process's entry point (a multiprocessing target started by the launcher): load the model, warm
it up, export its tokenizer for the workers, report ("ready", EngineFacts) or ("error", kind, message) on the pipe,
then run the EngineServer loop.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

from serve.engine_server import EngineProcessConfig, EngineServer, parent_alive
from serve.ipc import EngineFacts, die_with_parent

if TYPE_CHECKING:
    from engine.llm_engine import LLMEngine

logger = logging.getLogger("serve.engine")


def warm_up(engine: LLMEngine) -> None:
    """One short generation, so the first real request pays no first-call costs."""
    from engine.sampling_params import SamplingParams

    ids = [t for t in engine.encode("Hello") if 0 <= t < engine.vocab_size][:8] or [0]
    engine.add_request(ids, SamplingParams(max_new_tokens=2), "warm-up")
    while engine.has_unfinished_requests():
        engine.step()


def facts(engine: LLMEngine, tokenizer_dir: str | None = None) -> EngineFacts:
    context = engine.model_context
    return EngineFacts(
        model_dir=engine.files.directory,
        gguf_file=engine.files.gguf_file,
        model_context=int(context),
        max_model_len=engine.max_model_len,
        dtype=str(engine.runner.dtype),  # "torch.bfloat16", as TGI reports it
        device_type=engine.runner.device.type,
        kv_cache_tokens=engine.block_manager.num_blocks * engine.block_manager.block_size,
        max_batch_prefill_tokens=engine.config.max_batch_prefill_tokens,
        quantize=engine.runner.plan.quant,
        tokenizer_dir=tokenizer_dir,
        model_implementation=engine.runner.plan.model,
    )


def run(config: EngineProcessConfig, conn: Connection) -> None:
    """multiprocessing target: load, warm up, report ("ready", EngineFacts) or ("error", kind, message), serve."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the launcher, which stops us in order
    die_with_parent(signal.SIGKILL)  # a launcher killed mid-load must not leave us downloading or loading
    if not parent_alive():
        sys.exit(1)
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s [engine] %(name)s: %(message)s"
    )
    from engine.llm_engine import LLMEngine
    from engine.parallel_config import ParallelConfigError
    from engine.quant.config import QuantizationError

    started = time.monotonic()
    logger.info("loading %s", config.engine.model or "the embedded default model")
    engine: LLMEngine | None = None
    try:
        engine = LLMEngine(config.engine)
        warm_up(engine)
    except Exception as e:
        if engine is not None:
            engine.close()  # the other tensor-parallel ranks
        if isinstance(e, QuantizationError):
            conn.send(("error", "quantize", str(e)))
            sys.exit(2)
        if isinstance(e, ParallelConfigError):
            conn.send(("error", "parallel", str(e)))
            sys.exit(2)
        if isinstance(e, (ValueError, FileNotFoundError)):
            conn.send(("error", "model", str(e)))
            sys.exit(2)
        logger.exception("loading the model failed")
        conn.send(("error", "fatal", f"{type(e).__name__}: {e}"))
        sys.exit(1)
    try:
        code = _serve(engine, config, conn, started)
    finally:
        engine.close()
    sys.exit(code)


def _serve(engine: LLMEngine, config: EngineProcessConfig, conn: Connection, started: float) -> int:
    from serve.tokenizer_export import export_for_workers

    server = EngineServer(engine, config, conn)
    report = facts(engine, export_for_workers(engine.tokenizer, config.tokenizer_dir))
    logger.info(
        "model loaded and warmed up in %.1fs: %s (%s on %s, context %d, KV cache %d tokens)",
        time.monotonic() - started,
        report.model_dir,
        report.dtype,
        report.device_type,
        report.max_model_len,
        report.kv_cache_tokens,
    )
    conn.send(("ready", report))
    try:
        return server.serve()
    finally:
        server.close()
