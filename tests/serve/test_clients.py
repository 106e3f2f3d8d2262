"""Real clients against one real `serve` process (tiny random llama, float32): text_generation, openai,
huggingface_hub's InferenceClient and the SageMaker SDK's HuggingFacePredictor in local mode. Greedy answers
must equal what engine.LLM generates in-process for the same prompt; streamed pieces join to the full answer.
Also the serving benchmark's baseline server (TGI-shaped, same greedy tokens) and its load generator.
"""

from __future__ import annotations

import json
import sys
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

# Installed by .ci/run with `pip install --no-deps text-generation` (its metadata pins huggingface_hub<1).
import text_generation  # noqa: E402
import torch
from huggingface_hub import InferenceClient

from engine import LLM, RequestOutput, SamplingParams
from tests.support.serve_process import Serve, base_env, free_port, running_serve
from tests.support.served_app import build_model

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore::DeprecationWarning:text_generation"),  # its pydantic v1 calls
]

PROMPT = "The quick brown fox"
PROMPTS = [PROMPT, "Paris is the capital of", "Once upon a time", "héllo wörld 東京"]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
N = 12  # max new tokens
TIMEOUT = 60


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model(tmp_path_factory.mktemp("client_model"))  # llama_gqa with a chat template


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    with running_serve(model_dir, tmp_path_factory.mktemp("client_serve")) as s:
        yield s


@pytest.fixture(scope="module")
def llm(model_dir: Path) -> LLM:
    torch.set_num_threads(1)
    return LLM(str(model_dir), dtype="float32", max_batch_total_tokens=4096)


def greedy(llm: LLM, prompt: str, n: int = N) -> RequestOutput:
    return llm.generate(prompt, SamplingParams(max_new_tokens=n, do_sample=False))[0]


def base(server: Serve) -> str:
    return server.url("")


# ---- text_generation (TGI's client) ------------------------------------------------------------


def test_tgi_client_generate_matches_the_engine(server: Serve, llm: LLM) -> None:
    client = text_generation.Client(base(server), timeout=TIMEOUT)
    ref = greedy(llm, PROMPT)
    r = client.generate(PROMPT, max_new_tokens=N, decoder_input_details=True)
    assert r.generated_text == ref.text
    assert [t.id for t in r.details.tokens] == ref.token_ids
    assert "".join(t.text for t in r.details.tokens) == ref.text
    assert r.details.finish_reason.value == ref.finish_reason and r.details.generated_tokens == len(ref.token_ids)
    assert [t.id for t in r.details.prefill] == llm.tokenizer(PROMPT)["input_ids"]

    stop = ref.text[len(ref.text) // 2 :][:2]  # a stop string taken from the greedy answer itself
    r = client.generate(PROMPT, max_new_tokens=N, stop_sequences=[stop])
    assert r.details.finish_reason.value == "stop_sequence" and stop not in r.generated_text
    assert ref.text.startswith(r.generated_text)


def test_tgi_client_stream_joins_to_the_answer(server: Serve, llm: LLM) -> None:
    client = text_generation.Client(base(server), timeout=TIMEOUT)
    ref = greedy(llm, PROMPTS[1])
    events = list(client.generate_stream(PROMPTS[1], max_new_tokens=N))
    assert len(events) == len(ref.token_ids) and [e.token.id for e in events] == ref.token_ids
    assert all(e.generated_text is None and e.details is None for e in events[:-1])
    last = events[-1]
    assert last.generated_text == "".join(e.token.text for e in events) == ref.text
    assert last.details.finish_reason.value == ref.finish_reason and last.details.generated_tokens == N


def test_tgi_client_seeded_sampling_is_reproducible(server: Serve, llm: LLM) -> None:
    client = text_generation.Client(base(server), timeout=TIMEOUT)
    kw = dict(do_sample=True, seed=1234, temperature=0.8, top_k=50, max_new_tokens=N)
    first, again = client.generate(PROMPT, **kw), client.generate(PROMPT, **kw)
    assert first.generated_text == again.generated_text and first.details.seed == 1234
    params = SamplingParams(max_new_tokens=N, do_sample=True, seed=1234, temperature=0.8, top_k=50)
    assert first.generated_text == llm.generate(PROMPT, params)[0].text


# ---- openai ------------------------------------------------------------------------------------


def test_openai_chat_completions(server: Serve, llm: LLM) -> None:
    client = openai.OpenAI(base_url=f"{base(server)}/v1", api_key="x", timeout=TIMEOUT, max_retries=0)
    ref = llm.chat(CHAT, SamplingParams(max_new_tokens=N, do_sample=False))[0]
    answer = client.chat.completions.create(model="tgi", messages=CHAT, max_tokens=N, temperature=0)
    choice = answer.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == ref.text
    assert choice.finish_reason == "length" and answer.usage.completion_tokens == N
    assert answer.object == "chat.completion"

    chunks = list(
        client.chat.completions.create(
            model="tgi", messages=CHAT, max_tokens=N, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    deltas = [c.choices[0].delta.content for c in chunks if c.choices]
    assert "".join(deltas) == ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == N


def test_openai_completions(server: Serve, llm: LLM) -> None:
    client = openai.OpenAI(base_url=f"{base(server)}/v1", api_key="x", timeout=TIMEOUT, max_retries=0)
    ref = greedy(llm, PROMPT)
    answer = client.completions.create(model="tgi", prompt=PROMPT, max_tokens=N, temperature=0)
    assert answer.choices[0].text == ref.text and answer.choices[0].finish_reason == "length"
    assert answer.usage.completion_tokens == N and answer.usage.prompt_tokens == len(ref.prompt_token_ids)

    chunks = list(client.completions.create(model="tgi", prompt=PROMPT, max_tokens=N, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref.text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_concurrent_openai_streams_each_match_the_engine(server: Serve, llm: LLM) -> None:
    """Requests batched together by the server give each prompt its own unbatched greedy answer."""
    client = openai.OpenAI(base_url=f"{base(server)}/v1", api_key="x", timeout=TIMEOUT, max_retries=0)

    def one(prompt: str) -> str:
        stream = client.completions.create(model="tgi", prompt=prompt, max_tokens=2 * N, temperature=0, stream=True)
        return "".join(c.choices[0].text for c in stream if c.choices)

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        texts = list(pool.map(one, PROMPTS))
    assert texts == [greedy(llm, p, 2 * N).text for p in PROMPTS]


# ---- huggingface_hub.InferenceClient -----------------------------------------------------------


def test_inference_client_text_generation(server: Serve, llm: LLM) -> None:
    client = InferenceClient(base_url=base(server), timeout=TIMEOUT)
    ref = greedy(llm, PROMPT)
    assert client.text_generation(PROMPT, max_new_tokens=N) == ref.text

    detailed = client.text_generation(PROMPT, max_new_tokens=N, details=True)
    assert detailed.generated_text == ref.text and detailed.details.finish_reason == ref.finish_reason
    assert [t.id for t in detailed.details.tokens] == ref.token_ids

    assert "".join(client.text_generation(PROMPT, max_new_tokens=N, stream=True)) == ref.text
    events = list(client.text_generation(PROMPT, max_new_tokens=N, stream=True, details=True))
    assert [e.token.id for e in events] == ref.token_ids and events[-1].generated_text == ref.text
    assert events[-1].details.finish_reason == ref.finish_reason


def test_inference_client_chat_completion(server: Serve, llm: LLM) -> None:
    ref = llm.chat(CHAT, SamplingParams(max_new_tokens=N, do_sample=False))[0]
    for client in (InferenceClient(base_url=base(server)), InferenceClient(model=base(server))):
        answer = client.chat_completion(CHAT, max_tokens=N, temperature=0)
        assert answer.choices[0].message.content == ref.text and answer.choices[0].finish_reason == "length"
        chunks = client.chat_completion(CHAT, max_tokens=N, temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content for c in chunks if c.choices) == ref.text


# ---- SageMaker Python SDK (v2), local mode -----------------------------------------------------


def test_sagemaker_predictor_in_local_mode(server: Serve, llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    """LocalSession's runtime client posts to http://<docker host>:<local.serving_port>/invocations."""
    for name, value in dict(
        AWS_DEFAULT_REGION="us-east-1", AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test",
        SAGEMAKER_SUPPRESS_V2_WARNING="1",
    ).items():  # fmt: skip
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    from sagemaker.huggingface import HuggingFacePredictor
    from sagemaker.local import LocalSession, local_session

    # `serve` runs here, not in docker: no `docker info` / `docker context inspect` to find the host.
    monkeypatch.setattr(local_session, "get_docker_host", lambda: "127.0.0.1")
    no_telemetry = {"SchemaVersion": "1.0", "SageMaker": {"PythonSDK": {"Modules": {"TelemetryOptOut": True}}}}
    session = LocalSession(sagemaker_config=no_telemetry)
    session.config = {"local": {"local_code": True, "serving_port": server.port}}
    assert session.sagemaker_runtime_client.serving_port == server.port
    predictor = HuggingFacePredictor(endpoint_name="local-llm", sagemaker_session=session)

    ref = greedy(llm, PROMPT)
    assert predictor.predict({"inputs": PROMPT, "parameters": {"max_new_tokens": N}}) == [{"generated_text": ref.text}]
    full = predictor.predict({"inputs": PROMPT, "parameters": {"max_new_tokens": N, "return_full_text": True}})
    assert full == [{"generated_text": PROMPT + ref.text}]

    chat_ref = llm.chat(CHAT, SamplingParams(max_new_tokens=N, do_sample=False))[0]
    answer = predictor.predict({"messages": CHAT, "max_tokens": N, "temperature": 0})
    assert answer["object"] == "chat.completion" and answer["choices"][0]["message"]["content"] == chat_ref.text
    assert answer["usage"]["completion_tokens"] == N


# ---- the serving benchmark's baseline and load generator -----------------------------------------


def test_baseline_server_and_benchmark_client(server: Serve, llm: LLM, model_dir: Path, tmp_path: Path) -> None:
    """serve/baseline_server.py answers TGI's stream shape (read here by text_generation's client) with the same
    greedy tokens; serve.benchmark's request timing and report run over both servers."""
    from serve import benchmark

    port = free_port()
    command = [sys.executable, "-m", "serve.baseline_server", "--model", str(model_dir), "--port", str(port)]
    command += ["--dtype", "float32", "--threads", "1"]
    baseline = benchmark.Server("baseline", command, base_env(), port, tmp_path / "baseline.log")
    try:
        baseline.wait_ready(timeout=120)
        ref = greedy(llm, PROMPT)
        client = text_generation.Client(f"http://127.0.0.1:{port}", timeout=TIMEOUT)
        events = list(client.generate_stream(PROMPT, max_new_tokens=N))
        assert [e.token.id for e in events] == ref.token_ids
        assert events[-1].generated_text == "".join(e.token.text for e in events) == ref.text
        body = json.dumps({"inputs": PROMPT, "parameters": {"max_new_tokens": N}}).encode()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/invocations", data=body, timeout=TIMEOUT) as r:
            assert json.loads(r.read()) == [{"generated_text": ref.text}]

        results = []
        for name, p in (("ours", server.port), ("baseline", port)):
            samples = [benchmark.stream_request(p, PROMPT, N, TIMEOUT) for _ in range(2)]
            assert all(x.ok and x.tokens == N and len(x.itl) == N - 1 and 0 < x.ttft <= x.e2e for x in samples)
            results.append(benchmark.summarize(name, "concurrency", 1, samples, [0.0, 0.0, 0.0]))
        assert results[0].output_tokens == results[1].output_tokens == 2 * N
        ratio = benchmark.ratios(results)["concurrency=1"]
        assert set(ratio) == {"output_tokens_per_s", "ttft_p50", "tpot_p50", "e2e_p50"}
        assert ratio["output_tokens_per_s"] > 0
        benchmark.print_table(results, benchmark.ratios(results))
        benchmark.plot(results, tmp_path / "plot.png")
        assert (tmp_path / "plot.png").stat().st_size > 0
    finally:
        baseline.stop()
