"""Every environment variable the container reads, parsed once into frozen configs. The only module that reads
os.environ: an invalid value raises SettingsError with one line naming the variable and what it accepts.

`python -m container.settings` prints the variable table (markdown).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from engine.config import DTYPES, EngineConfig
from serve.emf import DEFAULT_NAMESPACE
from serve.emf_exporter import EmfConfig
from serve.server_config import ServerConfig

DEFAULT_TOTAL_TOKENS_CAP = 4096  # as TGI: MAX_TOTAL_TOKENS defaults to min(model context, 4096)
EXTRA_THREADS = 16  # per worker, beyond max_concurrent_requests: /ping and /metrics never wait behind streams


class SettingsError(ValueError):
    """One line for the operator: which variable, what it accepts, what it got."""


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise ValueError(raw)
    return value


def _non_negative_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError(raw)
    return value


def _positive_seconds(raw: str) -> float:
    value = float(raw)
    if not 0 < value < 1e9:  # also refuses nan and inf
        raise ValueError(raw)
    return value


def _port(raw: str) -> int:
    value = int(raw)
    if not 1 <= value <= 65535:
        raise ValueError(raw)
    return value


def _port_range(raw: str) -> tuple[int, int]:
    low, sep, high = raw.partition("-")
    if not sep:
        raise ValueError(raw)
    lo, hi = _port(low.strip()), _port(high.strip())
    if lo > hi:
        raise ValueError(raw)
    return lo, hi


def _bool(raw: str) -> bool:
    value = raw.lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


def _choice(*values: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw.lower() not in values:
            raise ValueError(raw)
        return raw.lower()

    return parse


def _text(raw: str) -> str:
    return raw


def _seconds(raw: str) -> float:
    value = float(raw)
    if not 1 <= value < float("inf"):
        raise ValueError(raw)
    return value


def _namespace(raw: str) -> str:
    """A custom CloudWatch namespace: 1-255 characters, no leading ':' and not AWS/ (reserved for AWS services)."""
    if not 0 < len(raw) <= 255 or raw.startswith(":") or raw.upper().startswith("AWS/"):
        raise ValueError(raw)
    return raw


def _dimension(raw: str) -> str:
    if len(raw) > 1024:
        raise ValueError(raw)
    return raw


_POSITIVE = "a positive integer"
_NON_NEGATIVE = "a non-negative integer"
_BOOL = "true or false (1/0, yes/no, on/off)"
_LEVELS = ("debug", "info", "warning", "error", "critical")


@dataclass(frozen=True)
class Variable:
    names: tuple[str, ...]  # the first one set (and non-empty) wins
    accepts: str
    parse: Callable[[str], Any]  # raises ValueError on a bad value
    default: str  # for the docs
    doc: str


# fmt: off
VARIABLES: tuple[Variable, ...] = (
    Variable(("HF_MODEL_ID",), "a hub id or a local path", _text, "`$SM_OPT_ML_DIR/model` if it holds a model, "
             "else the embedded SmolLM2-135M", "model to serve: hub id, model directory or .gguf file"),
    Variable(("HF_MODEL_REVISION", "REVISION"), "a revision", _text, "main", "hub revision (branch, tag, commit)"),
    Variable(("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"), "a token", _text, "-", "token for gated/private hub models"),
    Variable(("HF_MODEL_TRUST_REMOTE_CODE", "TRUST_REMOTE_CODE"), _BOOL, _bool, "false",
             "allow custom code from the model repository"),
    Variable(("SM_NUM_GPUS", "NUM_SHARD"), _POSITIVE, _positive_int, "visible GPUs (1 on CPU)",
             "tensor-parallel degree: processes (GPUs) the model is sharded over"),
    Variable(("SERVE_COLLECTIVE_TIMEOUT",), "a positive number of seconds", _positive_seconds, "600",
             "a tensor-parallel collective waiting longer on a rank fails the engine"),
    Variable(("HF_MODEL_QUANTIZE", "QUANTIZE"), "none (quantization is not available yet)", _choice("none"), "none",
             "quantization; only `none` for now (GGUF files are dequantized on load)"),
    Variable(("DTYPE",), "one of " + ", ".join(DTYPES), _choice(*DTYPES), "auto", "auto: bfloat16 (float16 on GPUs "
             "without bf16)"),
    Variable(("MAX_TOTAL_TOKENS",), _POSITIVE, _positive_int, "min(model context, 4096)",
             "prompt + generated tokens per request"),
    Variable(("MAX_INPUT_TOKENS", "MAX_INPUT_LENGTH"), _POSITIVE, _positive_int, "MAX_TOTAL_TOKENS - 1",
             "prompt tokens per request"),
    Variable(("MAX_BATCH_PREFILL_TOKENS",), _POSITIVE, _positive_int, "4096",
             "prompt tokens computed per engine step (longer prompts are chunked)"),
    Variable(("MAX_BATCH_TOTAL_TOKENS",), _POSITIVE, _positive_int, "fits the memory budget",
             "KV-cache capacity in tokens"),
    Variable(("MAX_BATCH_SIZE",), _POSITIVE, _positive_int, "min(256, MAX_CONCURRENT_REQUESTS)",
             "sequences decoded together per step"),
    Variable(("MAX_CONCURRENT_REQUESTS",), _POSITIVE, _positive_int, "128",
             "requests in the engine (queued + running); more get 429"),
    Variable(("MAX_STOP_SEQUENCES",), _NON_NEGATIVE, _non_negative_int, "4", "stop sequences per request"),
    Variable(("MAX_TOP_N_TOKENS",), _NON_NEGATIVE, _non_negative_int, "5", "`top_n_tokens` per request"),
    Variable(("MAX_BEST_OF",), _POSITIVE, _positive_int, "2", "`best_of` per request"),
    Variable(("MAX_CLIENT_BATCH_SIZE",), _POSITIVE, _positive_int, "4", "prompts per request"),
    Variable(("PAYLOAD_LIMIT",), "a positive integer (bytes)", _positive_int, "6291456 (6 MiB)",
             "request body size"),
    Variable(("MESSAGES_API_ENABLED",), _BOOL, _bool, "true", "accepted for TGI compatibility; the Messages API is "
             "always served"),
    Variable(("API_KEY",), "a key", _text, "-", "when set, requests must send `Authorization: Bearer <key>`"),
    Variable(("LOG_PROMPTS",), _BOOL, _bool, "false", "log prompts and generated text"),
    Variable(("LOG_LEVEL",), "one of " + ", ".join(_LEVELS), _choice(*_LEVELS, "warn"), "info", "log level"),
    Variable(("SAGEMAKER_BIND_TO_PORT",), "a port number (1-65535)", _port, "8080", "HTTP port"),
    Variable(("SAGEMAKER_SAFE_PORT_RANGE",), "'LOW-HIGH' with 1 <= LOW <= HIGH <= 65535", _port_range, "-",
             "ports the container may use internally: the tensor-parallel rendezvous port comes from it"),
    Variable(("SM_OPT_ML_DIR",), "a directory", _text, "/opt/ml", "SageMaker's /opt/ml root (moved in tests)"),
    Variable(("SERVE_WORKERS", "SAGEMAKER_MODEL_SERVER_WORKERS"), _POSITIVE, _positive_int, "2",
             "gunicorn worker processes"),
    Variable(("SERVE_THREADS",), _POSITIVE, _positive_int, "MAX_CONCURRENT_REQUESTS + 16", "threads per worker"),
    Variable(("SERVE_DRAIN_TIMEOUT",), "a non-negative number of seconds", float, "25",
             "on SIGTERM, how long in-flight requests may run on"),
    Variable(("CLOUDWATCH_METRICS",), _BOOL, _bool, "true", "write a CloudWatch EMF metrics line to stdout every "
             "interval"),
    Variable(("CLOUDWATCH_NAMESPACE",), "a CloudWatch namespace (1-255 characters, not AWS/...)", _namespace,
             DEFAULT_NAMESPACE, "namespace of the EMF metrics"),
    Variable(("CLOUDWATCH_METRICS_INTERVAL",), "a number of seconds >= 1", _seconds, "60",
             "seconds between EMF lines"),
    Variable(("CLOUDWATCH_ENDPOINT_NAME",), "an endpoint name (at most 1024 characters)", _dimension, "-",
             "`EndpointName` dimension of the EMF metrics (the SDK sets it; no such dimension when unset)"),
    Variable(("CLOUDWATCH_VARIANT_NAME",), "a variant name (at most 1024 characters)", _dimension, "AllTraffic",
             "`VariantName` dimension of the EMF metrics"),
)
# fmt: on
_BY_NAME = {name: var for var in VARIABLES for name in var.names}


@dataclass(frozen=True)
class LauncherConfig:
    host: str = "0.0.0.0"
    port: int = 8080
    safe_port_range: tuple[int, int] | None = None
    opt_ml_dir: str = "/opt/ml"
    workers: int = 2
    threads: int = 128 + EXTRA_THREADS
    drain_timeout: float = 25.0
    log_level: str = "info"
    messages_api_enabled: bool = True


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
    shard_variable: str = "SM_NUM_GPUS"  # the variable that set the tensor-parallel degree (for its errors)

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
        """The parsed value and the variable that gave it (the primary name when unset)."""
        var = _BY_NAME[name]
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
    collective_timeout = read.get("SERVE_COLLECTIVE_TIMEOUT", 600.0)
    read.get("HF_MODEL_QUANTIZE")
    log_level = read.get("LOG_LEVEL", "info")
    log_level = "warning" if log_level == "warn" else log_level
    max_concurrent = read.get("MAX_CONCURRENT_REQUESTS", 128)
    drain = read.get("SERVE_DRAIN_TIMEOUT", 25.0)
    if not drain >= 0 or drain == float("inf"):
        raise SettingsError(f"SERVE_DRAIN_TIMEOUT must be a non-negative number of seconds, got {drain!r}")
    launcher = LauncherConfig(
        port=read.get("SAGEMAKER_BIND_TO_PORT", 8080),
        safe_port_range=read.get("SAGEMAKER_SAFE_PORT_RANGE"),
        opt_ml_dir=read.get("SM_OPT_ML_DIR", "/opt/ml"),
        workers=read.get("SERVE_WORKERS", 2),
        threads=read.get("SERVE_THREADS", max_concurrent + EXTRA_THREADS),
        drain_timeout=drain,
        log_level=log_level,
        messages_api_enabled=read.get("MESSAGES_API_ENABLED", True),
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
        trust_remote_code=read.get("HF_MODEL_TRUST_REMOTE_CODE", False),
        dtype=read.get("DTYPE", "auto"),
        max_num_seqs=read.get("MAX_BATCH_SIZE", min(256, max_concurrent)),
        max_batch_prefill_tokens=read.get("MAX_BATCH_PREFILL_TOKENS", 4096),
        max_batch_total_tokens=batch_total,
        max_model_len=limits.max_total_tokens,
        tensor_parallel_size=shards,
        port_range=launcher.safe_port_range,
        collective_timeout_s=collective_timeout,
    )
    server = dict(
        model_id=label,
        max_concurrent_requests=max_concurrent,
        max_stop_sequences=read.get("MAX_STOP_SEQUENCES", 4),
        max_top_n_tokens=read.get("MAX_TOP_N_TOKENS", 5),
        max_best_of=read.get("MAX_BEST_OF", 2),
        max_client_batch_size=read.get("MAX_CLIENT_BATCH_SIZE", 4),
        payload_limit=read.get("PAYLOAD_LIMIT", 6 << 20),
        api_key=read.get("API_KEY"),
        log_prompts=read.get("LOG_PROMPTS", False),
    )
    cloudwatch = EmfConfig(
        enabled=read.get("CLOUDWATCH_METRICS", True),
        namespace=read.get("CLOUDWATCH_NAMESPACE", DEFAULT_NAMESPACE),
        interval_s=read.get("CLOUDWATCH_METRICS_INTERVAL", 60.0),
        endpoint_name=read.get("CLOUDWATCH_ENDPOINT_NAME"),
        variant_name=read.get("CLOUDWATCH_VARIANT_NAME", "AllTraffic"),
    )
    return Settings(engine=engine, launcher=launcher, limits=limits, server=server, model_label=label,
                    cloudwatch=cloudwatch, shard_variable=shard_var)  # fmt: skip


def child_environment(extra: Mapping[str, str]) -> dict[str, str]:
    """The environment for a child process: ours plus `extra`."""
    return {**os.environ, **extra}


def markdown_table() -> str:
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for var in VARIABLES:
        names = " / ".join(f"`{n}`" for n in var.names)
        rows.append(f"| {names} | {var.default} | {var.doc} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
