"""Stop conditions against the transformers reference: stop strings (cut text, stop at the completing
token, never streamed), EOS ids from generation_config.json, ignore_eos, max_new_tokens and the
model's context length.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from engine import LLM, RequestOutput, SamplingParams
from tests.support.oracle import Engines, Oracle, run_to_completion
from tests.support.tiny_models import CHAIN_BYTES, CHAIN_TEXT, MAX_POSITIONS, TinyModels, greedy, random_prompt
from tests.support.tiny_tokenizer import EOS_ID, PAD_ID, byte_token_id


def _stream(llm: LLM, prompt: list[int], params: SamplingParams) -> tuple[list[str], RequestOutput]:
    """Run one request through the incremental API: (new_text of every step, the final output)."""
    rid = llm.engine.add_request(prompt, params)
    pieces: list[str] = []
    final: RequestOutput | None = None
    for out in run_to_completion(llm):
        assert out.request_id == rid
        pieces.append(out.new_text)
        if out.finished:
            final = out
    assert final is not None
    return pieces, final


def _pick_stop(tokenizer: PreTrainedTokenizerFast, ids: list[int], length: int = 3) -> tuple[str, int]:
    """A stop string spanning a token boundary in the second half of decode(ids), and the number of
    tokens after which the decoded text first contains it (with no incomplete character pending)."""

    def decode(k: int) -> str:
        return tokenizer.decode(ids[:k], skip_special_tokens=True)

    text = decode(len(ids))
    for k in range(len(ids) // 2, len(ids) - 1):
        b = len(decode(k))
        stop = text[b - 1 : b - 1 + length]
        if len(stop) < length or "\ufffd" in stop or not stop.strip():
            continue
        first = next(j for j in range(1, len(ids) + 1) if stop in decode(j))
        if not decode(first).endswith("\ufffd"):
            return stop, first
    raise AssertionError("no usable stop string in the reference output")


def _prompt_without_eos(oracle: Oracle, name: str, index: int, length: int, max_new: int) -> list[int]:
    """The index-th random prompt (in a fixed order) whose reference continuation has no EOS."""
    found = (
        p
        for p in (random_prompt(length, seed=s) for s in range(10, 200))
        if EOS_ID not in oracle.greedy(name, p, max_new)
    )
    return next(p for i, p in enumerate(found) if i == index)


@pytest.mark.parametrize("case", range(3))
def test_stop_string_matches_reference_text(case: int, engines: Engines, oracle: Oracle, tokenizer) -> None:
    prompt = _prompt_without_eos(oracle, "llama_gqa", case, length=6, max_new=40)
    ref = oracle.greedy("llama_gqa", prompt, 40)
    stop, k = _pick_stop(tokenizer, ref)
    full_text = tokenizer.decode(ref, skip_special_tokens=True)
    expected_text = full_text[: full_text.index(stop)]

    llm = engines("llama_gqa")
    out = llm.generate([prompt], greedy(40, stop=("never-generated-\u2603", stop)))[0]
    assert out.finish_reason == "stop_sequence"
    assert out.token_ids == ref[:k], "generation must stop at the token that completed the stop string"
    assert out.text == expected_text
    assert stop not in out.text

    pieces, final = _stream(llm, prompt, greedy(40, stop=(stop,)))
    assert final.token_ids == ref[:k] and final.text == expected_text
    assert "".join(pieces) == expected_text
    streamed = ""
    for piece in pieces:
        streamed += piece
        assert stop not in streamed


def test_stop_string_on_split_multibyte_characters(engines: Engines, oracle: Oracle, tokenizer) -> None:
    """The byte-chain model emits CHAIN_TEXT one byte per token; stop on its last two characters."""
    prompt = [byte_token_id(tokenizer, CHAIN_BYTES[-1])]
    ref = oracle.greedy("byte_chain", prompt, 30)
    assert ref[: len(CHAIN_BYTES)] == [byte_token_id(tokenizer, b) for b in CHAIN_BYTES]
    stop = CHAIN_TEXT[-2:]  # "京😀": 7 bytes, i.e. 7 tokens
    pieces, final = _stream(engines("byte_chain"), prompt, greedy(30, stop=stop))
    assert final.finish_reason == "stop_sequence"
    assert final.token_ids == ref[: len(CHAIN_BYTES)]
    assert final.text == CHAIN_TEXT[:-2]
    assert "".join(pieces) == final.text
    assert all("\ufffd" not in p and CHAIN_TEXT[-2] not in p for p in pieces)


def test_held_back_prefix_of_stop_string_is_released(engines: Engines, oracle: Oracle, tokenizer) -> None:
    """Text that starts a stop string is held back, then released when the stop string does not follow."""
    prompt = [byte_token_id(tokenizer, CHAIN_BYTES[-1])]
    n = 2 * len(CHAIN_BYTES)
    assert oracle.greedy("byte_chain", prompt, n) == [byte_token_id(tokenizer, b) for b in CHAIN_BYTES * 2]
    stops = (CHAIN_TEXT[-2] + "x", "😀😀")  # 京 and 😀 are generated and start a stop string; x never comes
    pieces, final = _stream(engines("byte_chain"), prompt, greedy(n, stop=stops))
    assert final.finish_reason == "length"
    assert final.text == CHAIN_TEXT * 2
    assert "".join(pieces) == final.text
    assert any(p == "" for p in pieces[1:]) and "😀" in "".join(pieces)
    streamed = ""
    for i, piece in enumerate(pieces, start=1):
        streamed += piece
        decoded = tokenizer.decode(final.token_ids[:i], skip_special_tokens=True).replace("\ufffd", "")
        # everything decodable is streamed, except a tail that could still grow into a stop string
        held = next((j for j in (2, 1) if i < n and any(s.startswith(decoded[-j:]) for s in stops)), 0)
        assert streamed == decoded[: len(decoded) - held], f"step {i}"


def _copy_with_generation_eos(src: Path, dst: Path, eos_ids: list[int]) -> Path:
    shutil.copytree(src, dst)
    gen = json.loads((dst / "generation_config.json").read_text())
    gen["eos_token_id"] = eos_ids
    (dst / "generation_config.json").write_text(json.dumps(gen))
    return dst


def test_eos_from_generation_config(tiny_models: TinyModels, oracle: Oracle, tokenizer, tmp_path: Path) -> None:
    prompt = random_prompt(10, seed=31)
    ref = oracle.greedy("llama_gqa", prompt, 24)
    assert EOS_ID not in ref
    k = next(i for i in range(4, len(ref)) if ref[i] not in ref[:i])  # first new token from step 4 on
    path = _copy_with_generation_eos(tiny_models("llama_gqa"), tmp_path / "eos_model", [EOS_ID, ref[k]])

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    hf_ids = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=24, pad_token_id=PAD_ID)
    expected = hf_ids[0, len(prompt) :].tolist()  # transformers reads the same generation_config.json
    assert expected == ref[: k + 1]

    llm = LLM(str(path), dtype="float32", max_batch_total_tokens=1024)
    out, ignored = llm.generate([prompt, prompt], [greedy(24), greedy(24, ignore_eos=True)])
    assert out.finish_reason == "eos_token"
    assert out.token_ids == expected and out.token_ids[-1] == ref[k]  # the EOS id is included
    assert len(out.logprobs) == k + 1
    assert out.text == tokenizer.decode(expected, skip_special_tokens=True)
    assert ignored.finish_reason == "length"
    assert ignored.token_ids == ref


@pytest.mark.slow
def test_model_eos_token_finishes_and_is_not_in_text(engines: Engines, oracle: Oracle, tokenizer) -> None:
    """Search a few prompts for one where the random model emits </s>; the engine must stop there too."""
    llm = engines("llama_tied")
    for seed in range(300, 340):
        prompt = random_prompt(4, seed=seed)
        ref = oracle.greedy("llama_tied", prompt, 40)
        if ref[-1] == EOS_ID:
            out = llm.generate([prompt], greedy(40))[0]
            assert out.finish_reason == "eos_token" and out.token_ids == ref
            assert out.text == tokenizer.decode(ref[:-1], skip_special_tokens=True)
            assert "</s>" not in out.text
            return
    pytest.fail("no prompt made the reference emit </s>; pick other seeds")


@pytest.mark.slow
def test_eos_kept_in_text_without_skip_special_tokens(engines: Engines, oracle: Oracle, tokenizer) -> None:
    llm = engines("llama_tied")
    prompt = next(
        p
        for p in (random_prompt(4, seed=s) for s in range(300, 340))
        if oracle.greedy("llama_tied", p, 40)[-1] == EOS_ID
    )
    out = llm.generate([prompt], greedy(40, skip_special_tokens=False))[0]
    assert out.finish_reason == "eos_token"
    assert out.text == tokenizer.decode(out.token_ids, skip_special_tokens=False)
    assert out.text.endswith("</s>")


def test_max_new_tokens_gives_length(engines: Engines, oracle: Oracle) -> None:
    prompt = random_prompt(8, seed=41)
    for n in (1, 2, 7):
        out = engines("qwen2").generate([prompt], greedy(n))[0]
        assert out.finish_reason == "length"
        assert out.token_ids == oracle.greedy("qwen2", prompt, n)
        assert len(out.token_ids) == n


@pytest.mark.parametrize("room", [1, 3])
def test_context_length_stops_at_the_models_limit(room: int, engines: Engines, oracle: Oracle) -> None:
    prompt = random_prompt(MAX_POSITIONS - room, seed=50 + room)
    out = engines("llama_gqa").generate([prompt], greedy(50))[0]
    assert out.finish_reason == "length"
    assert len(prompt) + len(out.token_ids) == MAX_POSITIONS
    assert out.token_ids == oracle.greedy("llama_gqa", prompt, room)


def test_context_length_with_a_smaller_max_model_len(engines: Engines, oracle: Oracle) -> None:
    llm = engines("qwen2", max_model_len=64, max_batch_prefill_tokens=16)
    prompts = [random_prompt(60, seed=61), random_prompt(10, seed=63)]
    assert EOS_ID not in oracle.greedy("qwen2", prompts[1], 54)
    outs = llm.generate(prompts, greedy(100))
    assert [o.finish_reason for o in outs] == ["length", "length"]
    assert [len(o.token_ids) for o in outs] == [4, 54]
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == oracle.greedy("qwen2", prompt, 64 - len(prompt))
