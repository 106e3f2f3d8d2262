"""Every environment variable the container reads, parsed once into frozen configs. The only module that reads
os.environ: an invalid value raises SettingsError with one line naming the variable and what it accepts.

`python -m container.settings` prints the variable table (markdown).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from container.variables import VARIABLES, VARIABLES_BY_NAME, SettingsError
from engine.config import EngineConfig
from serve.emf_exporter import EmfConfig
from serve.server_config import ServerConfig
from serve.tracing import INSTALL_HINT, TracingConfig, missing_packages

DEFAULT_TOTAL_TOKENS_CAP = 4096  # as TGI: MAX_TOTAL_TOKENS defaults to min(model context, 4096)
EXTRA_THREADS = 16  # per worker, beyond max_concurrent_requests: /ping and /metrics never wait behind streams


def _value(name: str) -> Any:
    return VARIABLES_BY_NAME[name].value


@dataclass(frozen=True)
class LauncherConfig:
    host: str = "0.0.0.0"
    port: int = _value("SAGEMAKER_BIND_TO_PORT")
    safe_port_range: tuple[int, int] | None = None
    opt_ml_dir: str = _value("SM_OPT_ML_DIR")
    workers: int = _value("SERVE_WORKERS")
    threads: int = _value("MAX_CONCURRENT_REQUESTS") + EXTRA_THREADS
    drain_timeout: float = _value("SERVE_DRAIN_TIMEOUT")
    log_level: str = _value("LOG_LEVEL")


@dataclass(frozen=True)
class TokenLimits:
    """Per-request token limits as given; None = derive from the model's context (`resolve`)."""

    max_input_tokens: int | None = None
    max_total_tokens: int | None = None
    input_variable: str = "MAX_INPUT_TOKENS"

    def resolve(self, model_context: int) -> tuple[int, int]:
        """(max_input_tokens, max_total_tokens) for a model of this context length."""
        total, name = self.max_total_tokens, "MAX_TOTAL_TOKENS"
        if total is None:
            total = min(model_context, DEFAULT_TOTAL_TOKENS_CAP)
            if self.max_input_tokens is not None and self.max_input_tokens >= total:
                total, name = self.max_input_tokens + 1, self.input_variable
        if total > model_context:
            raise SettingsError(
                f"{name} must leave room in the model's context of {model_context} tokens, got {total}"
                if name != "MAX_TOTAL_TOKENS"
                else f"{name} must be at most the model's context length ({model_context}), got {total}"
            )
        max_input = self.max_input_tokens if self.max_input_tokens is not None else total - 1
        if max_input >= total:
            raise SettingsError(f"{self.input_variable} must be less than MAX_TOTAL_TOKENS ({total}), got {max_input}")
        return max_input, total


@dataclass(frozen=True)
class Settings:
    engine: EngineConfig
    launcher: LauncherConfig
    limits: TokenLimits
    server: dict[str, Any]  # ServerConfig fields known before the model loads
    model_label: str  # what /info reports as model_id
    cloudwatch: EmfConfig = EmfConfig()
    tracing: TracingConfig = TracingConfig()
    shard_variable: str = "SM_NUM_GPUS"  # the variable that set the tensor-parallel degree (for its errors)
    quantize_variable: str = "HF_MODEL_QUANTIZE"  # the variable that set the quantization (for its errors)

    def server_config(self, model_context: int, metrics_dir: str | None) -> ServerConfig:
        """The worker's ServerConfig, token limits resolved against the loaded model's context."""
        max_input, total = self.limits.resolve(model_context)
        batch_total = self.engine.max_batch_total_tokens
        if batch_total is not None and batch_total < total:
            raise SettingsError(
                f"MAX_BATCH_TOTAL_TOKENS must be at least MAX_TOTAL_TOKENS ({total}), got {batch_total}"
            )
        return ServerConfig(max_input_tokens=max_input, max_total_tokens=total, metrics_dir=metrics_dir, **self.server)


class _Reader:
    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def get(self, name: str, default: Any = None) -> Any:
        value, _ = self.get_named(name, default)
        return value

    def get_named(self, name: str, default: Any = None) -> tuple[Any, str]:
        """The parsed value and the variable that gave it (the primary name when unset). Unset, the registry's
        default value, or `default` for a setting the registry derives (documented there in words)."""
        var = VARIABLES_BY_NAME[name]
        if var.value is not None:
            default = var.value
        for candidate in var.names:
            raw = self.env.get(candidate)
            if raw is None or not raw.strip():
                continue
            try:
                return var.parse(raw.strip()), candidate
            except ValueError:
                raise SettingsError(f"{candidate} must be {var.accepts}, got {raw!r}") from None
        return default, var.names[0]


def _has_model(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) or bool(glob.glob(os.path.join(path, "*.gguf")))


def _resolve_model(read: _Reader, opt_ml_dir: str) -> tuple[str | None, str]:
    """(EngineConfig.model, label) from HF_MODEL_ID, else /opt/ml/model, else the embedded default."""
    model = read.get("HF_MODEL_ID")
    if model is not None:
        local = model.startswith(("/", ".", "~")) or model.count("/") > 1 or model.endswith(".gguf")
        if local and not os.path.exists(os.path.expanduser(model)):
            raise SettingsError(f"HF_MODEL_ID must be a hub id or an existing path, got {model!r} (no such path)")
        return model, model
    model_dir = os.path.join(opt_ml_dir, "model")
    if _has_model(model_dir):
        return model_dir, model_dir
    from engine.default_model import FILENAME, default_model_path

    try:
        default_model_path()
    except FileNotFoundError as e:
        raise SettingsError(f"HF_MODEL_ID is not set and {model_dir} holds no model; {e}") from None
    return None, FILENAME.removesuffix(".gguf")


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Parse and cross-check every variable; raises SettingsError on the first bad one."""
    read = _Reader(os.environ if env is None else env)
    shards, shard_var = read.get_named("SM_NUM_GPUS")  # None: every visible GPU (1 on CPU)
    collective_timeout = read.get("SERVE_COLLECTIVE_TIMEOUT")
    quantize, quantize_var = read.get_named("HF_MODEL_QUANTIZE")
    log_level = read.get("LOG_LEVEL")
    log_level = "warning" if log_level == "warn" else log_level
    max_concurrent = read.get("MAX_CONCURRENT_REQUESTS")
    drain = read.get("SERVE_DRAIN_TIMEOUT")
    if not drain >= 0 or drain == float("inf"):
        raise SettingsError(f"SERVE_DRAIN_TIMEOUT must be a non-negative number of seconds, got {drain!r}")
    launcher = LauncherConfig(
        port=read.get("SAGEMAKER_BIND_TO_PORT"),
        safe_port_range=read.get("SAGEMAKER_SAFE_PORT_RANGE"),
        opt_ml_dir=read.get("SM_OPT_ML_DIR"),
        workers=read.get("SERVE_WORKERS"),
        threads=read.get("SERVE_THREADS", max_concurrent + EXTRA_THREADS),
        drain_timeout=drain,
        log_level=log_level,
    )
    max_input, input_var = read.get_named("MAX_INPUT_TOKENS")
    limits = TokenLimits(max_input, read.get("MAX_TOTAL_TOKENS"), input_var)
    if max_input is not None and limits.max_total_tokens is not None and max_input >= limits.max_total_tokens:
        raise SettingsError(
            f"{input_var} must be less than MAX_TOTAL_TOKENS ({limits.max_total_tokens}), got {max_input}"
        )
    batch_total = read.get("MAX_BATCH_TOTAL_TOKENS")
    if batch_total is not None and limits.max_total_tokens is not None and batch_total < limits.max_total_tokens:
        raise SettingsError(
            f"MAX_BATCH_TOTAL_TOKENS must be at least MAX_TOTAL_TOKENS ({limits.max_total_tokens}), got {batch_total}"
        )
    model, label = _resolve_model(read, launcher.opt_ml_dir)
    engine = EngineConfig(
        model=model,
        revision=read.get("HF_MODEL_REVISION"),
        hf_token=read.get("HF_TOKEN"),
        trust_remote_code=read.get("HF_MODEL_TRUST_REMOTE_CODE"),
        model_implementation=read.get("MODEL_IMPLEMENTATION"),
        dtype=read.get("DTYPE"),
        max_num_seqs=read.get("MAX_BATCH_SIZE", min(256, max_concurrent)),
        max_batch_prefill_tokens=read.get("MAX_BATCH_PREFILL_TOKENS"),
        max_batch_total_tokens=batch_total,
        enable_prefix_caching=read.get("PREFIX_CACHING"),
        max_model_len=limits.max_total_tokens,
        tensor_parallel_size=shards,
        port_range=launcher.safe_port_range,
        collective_timeout_s=collective_timeout,
        attention_backend=None if (backend := read.get("ATTENTION_BACKEND")) == "auto" else backend,
        cuda_graphs=read.get("CUDA_GRAPHS"),
        gpu_memory_utilization=read.get("CUDA_MEMORY_FRACTION"),
        quantize=quantize,
    )
    server = dict(
        model_id=label,
        max_concurrent_requests=max_concurrent,
        max_stop_sequences=read.get("MAX_STOP_SEQUENCES"),
        max_top_n_tokens=read.get("MAX_TOP_N_TOKENS"),
        max_best_of=read.get("MAX_BEST_OF"),
        max_client_batch_size=read.get("MAX_CLIENT_BATCH_SIZE"),
        payload_limit=read.get("PAYLOAD_LIMIT"),
        api_key=read.get("API_KEY"),
        log_prompts=read.get("LOG_PROMPTS"),
        messages_api_enabled=read.get("MESSAGES_API_ENABLED"),
    )
    cloudwatch = EmfConfig(
        enabled=read.get("CLOUDWATCH_METRICS"),
        namespace=read.get("CLOUDWATCH_NAMESPACE"),
        interval_s=read.get("CLOUDWATCH_METRICS_INTERVAL"),
        endpoint_name=read.get("CLOUDWATCH_ENDPOINT_NAME"),
        variant_name=read.get("CLOUDWATCH_VARIANT_NAME"),
    )
    return Settings(engine=engine, launcher=launcher, limits=limits, server=server, model_label=label,
                    cloudwatch=cloudwatch, tracing=_tracing(read), shard_variable=shard_var,
                    quantize_variable=quantize_var)  # fmt: skip


def _tracing(read: _Reader) -> TracingConfig:
    """OTLP_ENDPOINT set: the exporter it needs must be installed (the `tracing` extra)."""
    config = TracingConfig(read.get("OTLP_ENDPOINT"), read.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"),
                           read.get("OTLP_SERVICE_NAME"))  # fmt: skip
    if config.enabled and (missing := missing_packages(config.resolved_protocol)):
        raise SettingsError(f"OTLP_ENDPOINT needs {' and '.join(missing)}, which are not installed: {INSTALL_HINT}")
    return config


def child_environment(extra: Mapping[str, str]) -> dict[str, str]:
    """The environment for a child process: ours plus `extra`."""
    return {**os.environ, **extra}


def markdown_table() -> str:
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for var in VARIABLES:
        names = " / ".join(f"`{n}`" for n in var.names)
        rows.append(f"| {names} | {var.default_text} | {var.doc} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
