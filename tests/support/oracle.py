"""transformers as the reference (`Oracle`: greedy ids, logits, log-probs of one prompt at a time) and the session's
cached engines (`Engines`), plus `run_to_completion` to step an engine dry.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, PreTrainedModel

from engine import LLM, RequestOutput
from tests.support.tiny_models import SPECS, TinyModels
from tests.support.tiny_tokenizer import EOS_ID, PAD_ID


def reference_model(path: Path, dtype: torch.dtype, seq2seq: bool = False) -> PreTrainedModel:
    """transformers' model of the checkpoint at `path`, its attention implementation chosen here, not by the installed
    version: eager where the config soft-caps attention logits (Gemma 2). SDPA cannot soft-cap, and transformers 5.17
    still picks it for Gemma 2 by default, silently dropping the cap; later versions refuse SDPA for Gemma 2."""
    config = AutoConfig.from_pretrained(path)
    attn = {"attn_implementation": "eager"} if getattr(config, "attn_logit_softcapping", None) else {}
    auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    return auto.from_pretrained(path, dtype=dtype, **attn).eval()


class Oracle:
    """transformers as the reference: one prompt at a time, no padding, float32. For encoder-decoder models the
    prompt is the encoder's input and the decoder starts from the config's start token."""

    def __init__(self, tiny_models: TinyModels) -> None:
        self.tiny_models = tiny_models
        self._models: dict[str, PreTrainedModel] = {}
        self._cache: dict[tuple, list[int]] = {}

    def model(self, name: str) -> PreTrainedModel:
        if name not in self._models:
            seq2seq = getattr(SPECS.get(name), "seq2seq", False)
            self._models[name] = reference_model(self.tiny_models(name), torch.float32, seq2seq)
        return self._models[name]

    def _seq2seq(self, name: str) -> bool:
        return bool(self.model(name).config.is_encoder_decoder)

    def greedy(
        self, name: str, prompt: list[int], max_new_tokens: int, eos_token_id: int | list[int] | None = EOS_ID, **kw
    ) -> list[int]:
        """transformers `generate` (greedy), generated ids only, EOS included if it stopped on it."""
        key = (name, tuple(prompt), max_new_tokens, str(eos_token_id), tuple(sorted(kw.items())))
        if key not in self._cache:
            out = self.model(name).generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos_token_id,
                pad_token_id=PAD_ID,
                **kw,
            )
            start = 1 if self._seq2seq(name) else len(prompt)  # seq2seq: the decoder's, after its start token
            self._cache[key] = out[0, start:].tolist()
        return self._cache[key]

    @torch.no_grad()
    def logits(self, name: str, prompt: list[int], generated: list[int]) -> torch.Tensor:
        """[len(generated), V] raw logits that predicted each generated token (one forward pass)."""
        model = self.model(name)
        if self._seq2seq(name):
            decoder = [model.generation_config.decoder_start_token_id] + generated[:-1]
            return model(torch.tensor([prompt]), decoder_input_ids=torch.tensor([decoder])).logits[0].float()
        ids = torch.tensor([prompt + generated])
        logits = model(ids).logits[0].float()
        return logits[len(prompt) - 1 : len(prompt) - 1 + len(generated)]

    def log_probs(self, name: str, prompt: list[int], generated: list[int]) -> torch.Tensor:
        """[len(generated), V] log-softmax of the logits that predicted each generated token."""
        return torch.log_softmax(self.logits(name, prompt, generated), dim=-1)


class Engines:
    """One LLM per (model name, engine config), built on first use and shared by the whole session."""

    def __init__(self, tiny_models: TinyModels) -> None:
        self.tiny_models = tiny_models
        self._llms: dict[tuple, LLM] = {}

    def __call__(self, name: str, **config) -> LLM:
        config = {"dtype": "float32", "max_batch_total_tokens": 16384, **config}
        key = (name, tuple(sorted(config.items())))
        if key not in self._llms:
            self._llms[key] = LLM(str(self.tiny_models(name)), **config)
        llm = self._llms[key]
        assert not llm.engine.has_unfinished_requests(), "an earlier test left requests in flight"
        return llm


def run_to_completion(llm: LLM, max_steps: int = 10_000) -> Iterator[RequestOutput]:
    """Step the engine until nothing is left, yielding every output."""
    for _ in range(max_steps):
        if not llm.engine.has_unfinished_requests():
            return
        yield from llm.engine.step()
    raise AssertionError(f"engine still busy after {max_steps} steps")
