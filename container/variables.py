"""The registry of every environment variable the container reads: names (first set wins), what each accepts,
its parser (ValueError on a bad value), default and meaning. Parsing only; container/settings.py reads os.environ
and builds the frozen configs, and the SDK validates an endpoint's environment against the same registry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine.config import ATTENTION_BACKENDS, DTYPES, MODEL_IMPLEMENTATIONS, EngineConfig
from engine.quant.config import METHODS as QUANTIZE_METHODS
from serve.emf_exporter import EmfConfig
from serve.server_config import ServerConfig
from serve.tracing import PROTOCOLS, TracingConfig, parse_endpoint


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


def _fraction(raw: str) -> float:
    value = float(raw)
    if not 0 < value <= 1:  # also refuses nan
        raise ValueError(raw)
    return value


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


def _default(cls: type, name: str) -> Any:
    """A config dataclass field's default: the one source of that setting's default value."""
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def _render(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


@dataclass(frozen=True)
class Variable:
    names: tuple[str, ...]  # the first one set (and non-empty) wins
    accepts: str
    parse: Callable[[str], Any]  # raises ValueError on a bad value
    default: str  # for the docs where the default is derived (else "": the value below, rendered)
    doc: str
    value: Any = None  # the default value settings.py uses (None: derived there, or unset)

    @property
    def default_text(self) -> str:
        return self.default or _render(self.value)


# fmt: off
VARIABLES: tuple[Variable, ...] = (
    Variable(("HF_MODEL_ID",), "a hub id or a local path", _text, "`$SM_OPT_ML_DIR/model` if it holds a model, "
             "else the embedded SmolLM2-135M", "model to serve: hub id, model directory or .gguf file"),
    Variable(("HF_MODEL_REVISION", "REVISION"), "a revision", _text, "main", "hub revision (branch, tag, commit)"),
    Variable(("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"), "a token", _text, "-", "token for gated/private hub models"),
    Variable(("HF_MODEL_TRUST_REMOTE_CODE", "TRUST_REMOTE_CODE"), _BOOL, _bool, "",
             "allow custom code from the model repository", value=_default(EngineConfig, "trust_remote_code")),
    Variable(("SM_NUM_GPUS", "NUM_SHARD"), _POSITIVE, _positive_int, "visible GPUs (1 on CPU)",
             "tensor-parallel degree: processes (GPUs) the model is sharded over"),
    Variable(("SERVE_COLLECTIVE_TIMEOUT",), "a positive number of seconds", _positive_seconds, "",
             "a tensor-parallel collective waiting longer on a rank fails the engine",
             value=_default(EngineConfig, "collective_timeout_s")),
    Variable(("HF_MODEL_QUANTIZE", "QUANTIZE"), "one of " + ", ".join(QUANTIZE_METHODS), _choice(*QUANTIZE_METHODS),
             "what the checkpoint holds", "weight quantization (docs/quantization.md): TGI's bitsandbytes, "
             "bitsandbytes-nf4, bitsandbytes-fp4, gptq, awq, fp8; int8 / int4 made at load; gguf keeps a GGUF "
             "file's Q4_0 / Q4_1 / Q8_0; none serves 16-bit weights (GGUF dequantized)"),
    Variable(("DTYPE",), "one of " + ", ".join(DTYPES), _choice(*DTYPES), "", "auto: bfloat16 (float16 on GPUs "
             "without bf16)", value=_default(EngineConfig, "dtype")),
    Variable(("MODEL_IMPLEMENTATION",), "one of " + ", ".join(MODEL_IMPLEMENTATIONS), _choice(*MODEL_IMPLEMENTATIONS),
             "", "auto: our native implementation where the architecture has one, else transformers' modelling code "
             "on our paged KV cache (docs/models.md; one GPU, no CUDA graphs); native or transformers forces one",
             value=_default(EngineConfig, "model_implementation")),
    Variable(("ATTENTION_BACKEND",), "one of auto, " + ", ".join(ATTENTION_BACKENDS),
             _choice("auto", *ATTENTION_BACKENDS), "", "attention kernels; auto: triton on GPUs, the compiled "
             "kernels on CPU (the start-up log's plan line says which ran)", value="auto"),
    Variable(("CUDA_GRAPHS",), _BOOL, _bool, "", "GPU: replay decode steps as CUDA graphs (one per batch-size "
             "bucket up to MAX_BATCH_SIZE)", value=_default(EngineConfig, "cuda_graphs")),
    Variable(("CUDA_MEMORY_FRACTION",), "a number in (0, 1]", _fraction, "", "GPU: share of device memory for "
             "weights, activations and the KV cache (the cache gets what a profile step leaves)",
             value=_default(EngineConfig, "gpu_memory_utilization")),
    Variable(("MAX_TOTAL_TOKENS",), _POSITIVE, _positive_int, "min(model context, 4096)",
             "prompt + generated tokens per request"),
    Variable(("MAX_INPUT_TOKENS", "MAX_INPUT_LENGTH"), _POSITIVE, _positive_int, "MAX_TOTAL_TOKENS - 1",
             "prompt tokens per request"),
    Variable(("MAX_BATCH_PREFILL_TOKENS",), _POSITIVE, _positive_int, "",
             "prompt tokens computed per engine step (longer prompts are chunked)",
             value=_default(EngineConfig, "max_batch_prefill_tokens")),
    Variable(("MAX_BATCH_TOTAL_TOKENS",), _POSITIVE, _positive_int, "fits the memory budget",
             "KV-cache capacity in tokens"),
    Variable(("PREFIX_CACHING",), _BOOL, _bool, "",
             "reuse the KV-cache blocks of prompts' shared leading tokens (system prompts, chat history)",
             value=_default(EngineConfig, "enable_prefix_caching")),
    Variable(("MAX_BATCH_SIZE",), _POSITIVE, _positive_int, "min(256, MAX_CONCURRENT_REQUESTS)",
             "sequences decoded together per step"),
    Variable(("MAX_CONCURRENT_REQUESTS",), _POSITIVE, _positive_int, "",
             "requests in the engine (queued + running); more get 429",
             value=_default(ServerConfig, "max_concurrent_requests")),
    Variable(("MAX_STOP_SEQUENCES",), _NON_NEGATIVE, _non_negative_int, "", "stop sequences per request",
             value=_default(ServerConfig, "max_stop_sequences")),
    Variable(("MAX_TOP_N_TOKENS",), _NON_NEGATIVE, _non_negative_int, "", "`top_n_tokens` per request",
             value=_default(ServerConfig, "max_top_n_tokens")),
    Variable(("MAX_BEST_OF",), _POSITIVE, _positive_int, "", "`best_of` per request",
             value=_default(ServerConfig, "max_best_of")),
    Variable(("MAX_CLIENT_BATCH_SIZE",), _POSITIVE, _positive_int, "", "prompts per request",
             value=_default(ServerConfig, "max_client_batch_size")),
    Variable(("PAYLOAD_LIMIT",), "a positive integer (bytes)", _positive_int, "6291456 (6 MiB)",
             "request body size, on the bytes read however the body is framed (413 beyond)",
             value=_default(ServerConfig, "payload_limit")),
    Variable(("MESSAGES_API_ENABLED",), _BOOL, _bool, "", "false: `/invocations` refuses OpenAI chat bodies "
             "(`messages`) with 422, as TGI without the Messages API; `/v1/chat/completions` is always served",
             value=_default(ServerConfig, "messages_api_enabled")),
    Variable(("API_KEY",), "a key", _text, "-", "when set, generation routes and /tokenize need `Authorization: Bearer "
             "<key>` (never /ping, /health, /metrics, /info, /v1/models, /openapi.json)"),
    Variable(("LOG_PROMPTS",), _BOOL, _bool, "", "log prompts and generated text",
             value=_default(ServerConfig, "log_prompts")),
    Variable(("LOG_LEVEL",), "one of " + ", ".join(_LEVELS), _choice(*_LEVELS, "warn"), "", "log level", value="info"),
    Variable(("SAGEMAKER_BIND_TO_PORT",), "a port number (1-65535)", _port, "", "HTTP port", value=8080),
    Variable(("SAGEMAKER_SAFE_PORT_RANGE",), "'LOW-HIGH' with 1 <= LOW <= HIGH <= 65535", _port_range, "-",
             "ports the container may use internally: the tensor-parallel rendezvous port comes from it"),
    Variable(("SM_OPT_ML_DIR",), "a directory", _text, "", "SageMaker's /opt/ml root (moved in tests)",
             value="/opt/ml"),
    Variable(("SERVE_WORKERS", "SAGEMAKER_MODEL_SERVER_WORKERS"), _POSITIVE, _positive_int, "",
             "gunicorn worker processes", value=2),
    Variable(("SERVE_THREADS",), _POSITIVE, _positive_int, "MAX_CONCURRENT_REQUESTS + 16", "threads per worker"),
    Variable(("SERVE_DRAIN_TIMEOUT",), "a non-negative number of seconds", float, "",
             "on SIGTERM, how long in-flight requests may run on", value=25.0),
    Variable(("CLOUDWATCH_METRICS",), _BOOL, _bool, "", "write a CloudWatch EMF metrics line to stdout every "
             "interval", value=_default(EmfConfig, "enabled")),
    Variable(("CLOUDWATCH_NAMESPACE",), "a CloudWatch namespace (1-255 characters, not AWS/...)", _namespace,
             "", "namespace of the EMF metrics", value=_default(EmfConfig, "namespace")),
    Variable(("CLOUDWATCH_METRICS_INTERVAL",), "a number of seconds >= 1", _seconds, "",
             "seconds between EMF lines", value=_default(EmfConfig, "interval_s")),
    Variable(("CLOUDWATCH_ENDPOINT_NAME",), "an endpoint name (at most 1024 characters)", _dimension, "-",
             "`EndpointName` dimension of the EMF metrics (the SDK sets it; no such dimension when unset)"),
    Variable(("CLOUDWATCH_VARIANT_NAME",), "a variant name (at most 1024 characters)", _dimension, "",
             "`VariantName` dimension of the EMF metrics", value=_default(EmfConfig, "variant_name")),
    Variable(("OTLP_ENDPOINT",), "an http:// or https:// URL", parse_endpoint, "-", "OpenTelemetry: send request "
             "spans to this OTLP endpoint (docs/tracing.md; needs the `tracing` extra); unset: no tracing"),
    Variable(("OTLP_SERVICE_NAME", "OTEL_SERVICE_NAME"), "a service name", _text, "",
             "`service.name` of the spans", value=_default(TracingConfig, "service_name")),
    Variable(("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"), "one of " + ", ".join(PROTOCOLS),
             _choice(*PROTOCOLS), "from the URL", "OTLP protocol; unset: http/protobuf for port 4318 or a "
             "`/v1/traces` path, else grpc"),
)
# fmt: on
VARIABLES_BY_NAME = {name: var for var in VARIABLES for name in var.names}
