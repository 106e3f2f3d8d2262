"""The registry of every environment variable the container reads: names (first set wins), what each accepts,
its parser (ValueError on a bad value), default and meaning. Parsing only; container/settings.py reads os.environ
and builds the frozen configs, and the SDK validates an endpoint's environment against the same registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine.config import ATTENTION_BACKENDS, DTYPES
from engine.quant.config import METHODS as QUANTIZE_METHODS
from serve.emf import DEFAULT_NAMESPACE


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
    Variable(("HF_MODEL_QUANTIZE", "QUANTIZE"), "one of " + ", ".join(QUANTIZE_METHODS), _choice(*QUANTIZE_METHODS),
             "what the checkpoint holds", "weight quantization (docs/quantization.md): TGI's bitsandbytes, "
             "bitsandbytes-nf4, bitsandbytes-fp4, gptq, awq, fp8; int8 / int4 made at load; gguf keeps a GGUF "
             "file's Q4_0 / Q4_1 / Q8_0; none serves 16-bit weights (GGUF dequantized)"),
    Variable(("DTYPE",), "one of " + ", ".join(DTYPES), _choice(*DTYPES), "auto", "auto: bfloat16 (float16 on GPUs "
             "without bf16)"),
    Variable(("ATTENTION_BACKEND",), "one of auto, " + ", ".join(ATTENTION_BACKENDS),
             _choice("auto", *ATTENTION_BACKENDS), "auto", "attention kernels; auto: triton on GPUs, the compiled "
             "kernels on CPU (the start-up log's plan line says which ran)"),
    Variable(("CUDA_GRAPHS",), _BOOL, _bool, "true", "GPU: replay decode steps as CUDA graphs (one per batch-size "
             "bucket up to MAX_BATCH_SIZE)"),
    Variable(("CUDA_MEMORY_FRACTION",), "a number in (0, 1]", _fraction, "0.9", "GPU: share of device memory for "
             "weights, activations and the KV cache (the cache gets what a profile step leaves)"),
    Variable(("MAX_TOTAL_TOKENS",), _POSITIVE, _positive_int, "min(model context, 4096)",
             "prompt + generated tokens per request"),
    Variable(("MAX_INPUT_TOKENS", "MAX_INPUT_LENGTH"), _POSITIVE, _positive_int, "MAX_TOTAL_TOKENS - 1",
             "prompt tokens per request"),
    Variable(("MAX_BATCH_PREFILL_TOKENS",), _POSITIVE, _positive_int, "4096",
             "prompt tokens computed per engine step (longer prompts are chunked)"),
    Variable(("MAX_BATCH_TOTAL_TOKENS",), _POSITIVE, _positive_int, "fits the memory budget",
             "KV-cache capacity in tokens"),
    Variable(("PREFIX_CACHING",), _BOOL, _bool, "true",
             "reuse the KV-cache blocks of prompts' shared leading tokens (system prompts, chat history)"),
    Variable(("MAX_BATCH_SIZE",), _POSITIVE, _positive_int, "min(256, MAX_CONCURRENT_REQUESTS)",
             "sequences decoded together per step"),
    Variable(("MAX_CONCURRENT_REQUESTS",), _POSITIVE, _positive_int, "128",
             "requests in the engine (queued + running); more get 429"),
    Variable(("MAX_STOP_SEQUENCES",), _NON_NEGATIVE, _non_negative_int, "4", "stop sequences per request"),
    Variable(("MAX_TOP_N_TOKENS",), _NON_NEGATIVE, _non_negative_int, "5", "`top_n_tokens` per request"),
    Variable(("MAX_BEST_OF",), _POSITIVE, _positive_int, "2", "`best_of` per request"),
    Variable(("MAX_CLIENT_BATCH_SIZE",), _POSITIVE, _positive_int, "4", "prompts per request"),
    Variable(("PAYLOAD_LIMIT",), "a positive integer (bytes)", _positive_int, "6291456 (6 MiB)",
             "request body size, on the bytes read however the body is framed (413 beyond)"),
    Variable(("MESSAGES_API_ENABLED",), _BOOL, _bool, "true", "accepted for TGI compatibility; the Messages API is "
             "always served"),
    Variable(("API_KEY",), "a key", _text, "-", "when set, generation routes and /tokenize need `Authorization: Bearer "
             "<key>` (never /ping, /health, /metrics, /info, /v1/models, /openapi.json)"),
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
VARIABLES_BY_NAME = {name: var for var in VARIABLES for name in var.names}
