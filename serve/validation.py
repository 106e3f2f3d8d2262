"""Request validation: API bodies -> token ids + SamplingParams, with TGI's checks, order and messages.

Every refusal is an engine_protocol.ValidationError (422). Token budgets follow TGI: a missing
max_new_tokens is max_total_tokens - input tokens (optionally capped by the config).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from engine.grammar.spec import GrammarSpec
from engine.sampling_params import SamplingParams
from serve.engine_protocol import ValidationError
from serve.openai_protocol import ChatMessage, ChatRequest, CompletionRequest
from serve.server_config import ServerConfig
from serve.structured import ToolPlan, response_format_grammar, tgi_grammar, tool_plan
from serve.tgi_protocol import GenerateRequest

_MAX_SEED = 2**64
_MAX_TOP_K = 2**63  # an int64 holds it: a bigger top_k means "every token" anyway, but could overflow a tensor


@dataclass(frozen=True)
class TgiPlan:
    """A validated TGI generate request."""

    prompt_token_ids: list[int]
    params: SamplingParams
    best_of: int
    return_full_text: bool
    details: bool
    decoder_input_details: bool


@dataclass(frozen=True)
class OpenAIPlan:
    """A validated chat or completions request: n choices for each prompt."""

    prompts: list[list[int]]
    prompt_texts: list[str]
    params: list[SamplingParams]  # one per prompt (max_new_tokens differ)
    n: int
    logprobs: bool
    top_logprobs: int
    include_usage: bool
    echo: bool = False
    tools: ToolPlan | None = None  # chat with tools: the output is a tool call (or, with "auto", a text answer)


def _params(**kwargs: Any) -> SamplingParams:
    try:
        return SamplingParams(**kwargs)
    except ValueError as e:
        raise ValidationError(str(e)) from e


class Validator:
    def __init__(self, config: ServerConfig, tokenizer: Any) -> None:
        self.config = config
        self.tokenizer = tokenizer

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        try:
            return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
        except Exception as e:  # the tokenizer refusing an input is the input's problem
            raise ValidationError(f"tokenizer error {e}") from e

    def budget(self, ids: list[int], max_new_tokens: int | None, truncate: int | None = None) -> tuple[list[int], int]:
        """(kept input ids, max_new_tokens) or TGI's MaxTotalTokens / InputLength error."""
        cfg = self.config
        input_length = min(len(ids), truncate) if truncate else len(ids)
        ids = ids[len(ids) - input_length :]
        if max_new_tokens is None:
            max_new_tokens = max(0, cfg.max_total_tokens - input_length)
            if cfg.default_max_new_tokens is not None:
                max_new_tokens = min(max_new_tokens, cfg.default_max_new_tokens)
        if input_length + max_new_tokens > cfg.max_total_tokens:
            raise ValidationError(
                f"`inputs` tokens + `max_new_tokens` must be <= {cfg.max_total_tokens}. "
                f"Given: {input_length} `inputs` tokens and {max_new_tokens} `max_new_tokens`"
            )
        if input_length > cfg.max_input_tokens:
            raise ValidationError(f"`inputs` must have less than {cfg.max_input_tokens} tokens. Given: {input_length}")
        return ids, max_new_tokens

    def stops(self, stop: str | list[str] | None) -> list[str]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > self.config.max_stop_sequences:
            raise ValidationError(
                f"`stop` supports up to {self.config.max_stop_sequences} stop sequences. Given: {len(stops)}"
            )
        return stops

    @staticmethod
    def seed(seed: int | None) -> int | None:
        if seed is not None and not 0 <= seed < _MAX_SEED:
            raise ValidationError(f"`seed` must be >= 0 and < 2^64. Given: {seed}")
        return seed

    # ---- TGI ----------------------------------------------------------------------------------

    def tgi(self, body: GenerateRequest, stream: bool, default_return_full_text: bool = False) -> TgiPlan:
        p, cfg = body.parameters, self.config
        best_of = 1 if p.best_of is None else p.best_of
        if not 0 < best_of <= cfg.max_best_of:
            raise ValidationError(f"`best_of` must be > 0 and <= {cfg.max_best_of}. Given: {best_of}")
        if stream and best_of != 1:
            raise ValidationError("`best_of` != 1 is not supported when streaming tokens")
        if stream and p.decoder_input_details:
            raise ValidationError("`decoder_input_details` == true is not supported when streaming tokens")
        sampling = p.do_sample or any(v is not None for v in (p.temperature, p.top_k, p.top_p, p.typical_p))
        if best_of > 1 and not sampling:
            raise ValidationError("you must use sampling when `best_of` is > 1")
        if p.temperature is not None and p.temperature <= 0:
            raise ValidationError("`temperature` must be strictly positive")
        if p.repetition_penalty is not None and p.repetition_penalty <= 0:
            raise ValidationError("`repetition_penalty` must be strictly positive")
        if p.frequency_penalty is not None and not -2.0 <= p.frequency_penalty <= 2.0:
            raise ValidationError("`frequency_penalty` must be >= -2.0 and <= 2.0")
        if p.top_p is not None and not 0.0 < p.top_p < 1.0:
            raise ValidationError("`top_p` must be > 0.0 and < 1.0")
        if p.typical_p is not None and not 0.0 < p.typical_p < 1.0:
            raise ValidationError("`typical_p` must be > 0.0 and < 1.0")
        if p.top_k is not None and p.top_k <= 0:
            raise ValidationError("`top_k` must be strictly positive")
        if p.top_k is not None and p.top_k >= _MAX_TOP_K:
            raise ValidationError(f"`top_k` must be < 2^63. Given: {p.top_k}")
        if p.max_new_tokens is not None and p.max_new_tokens <= 0:
            raise ValidationError("`max_new_tokens` must be strictly positive")
        stops = self.stops(p.stop)
        if p.seed is not None and best_of > 1:
            raise ValidationError("`seed` must not be set when `best_of` > 1")
        seed = self.seed(p.seed)
        top_n = 0 if p.top_n_tokens is None else p.top_n_tokens
        if not 0 <= top_n <= cfg.max_top_n_tokens:
            raise ValidationError(f"`top_n_tokens` must be >= 0 and <= {cfg.max_top_n_tokens}. Given: {top_n}")
        if not body.inputs:
            raise ValidationError("`inputs` cannot be empty")
        if p.truncate is not None and not 0 < p.truncate <= cfg.max_input_tokens:
            raise ValidationError(
                f"`truncate` must be strictly positive and less than {cfg.max_input_tokens}. Given: {p.truncate}"
            )
        ids, max_new = self.budget(self.encode(body.inputs), p.max_new_tokens, p.truncate)
        grammar = tgi_grammar(p.grammar)
        if grammar is not None and best_of > 1:
            raise ValidationError("grammar is not supported with `best_of` > 1")
        if p.watermark:
            raise ValidationError("watermark is not supported")
        if p.adapter_id:
            raise ValidationError("adapters are not supported")
        params = _params(
            max_new_tokens=max_new,
            do_sample=p.do_sample,
            temperature=p.temperature,
            top_k=p.top_k,
            top_p=p.top_p,
            typical_p=p.typical_p,
            repetition_penalty=p.repetition_penalty,
            frequency_penalty=p.frequency_penalty,
            seed=seed,
            stop=tuple(stops),
            top_n_tokens=top_n,
            grammar=grammar,
        )
        full_text = default_return_full_text if p.return_full_text is None else p.return_full_text
        return TgiPlan(ids, params, best_of, full_text, p.details, p.decoder_input_details)

    # ---- OpenAI -------------------------------------------------------------------------------

    def _choices(self, n: int | None) -> int:
        n = 1 if n is None else n
        if n < 1:
            raise ValidationError("`n` must be strictly positive")
        if n > self.config.max_client_batch_size:
            raise ValidationError(f"`n` must be <= {self.config.max_client_batch_size}. Given: {n}")
        return n

    def _openai_params(
        self, body: ChatRequest | CompletionRequest, max_new: int, top_n: int, grammar: GrammarSpec | None = None
    ) -> SamplingParams:
        t = body.temperature
        if t is not None and not 0.0 <= t <= 2.0:
            raise ValidationError("`temperature` must be >= 0.0 and <= 2.0")
        if body.top_p is not None and not 0.0 < body.top_p <= 1.0:
            raise ValidationError("`top_p` must be > 0.0 and <= 1.0")
        if body.presence_penalty:
            raise ValidationError("`presence_penalty` is not supported")
        greedy = t == 0.0  # OpenAI: temperature 0 is argmax; unset samples at 1.0 (as TGI does)
        top_p = None if greedy or body.top_p == 1.0 else body.top_p
        return _params(
            max_new_tokens=max_new,
            do_sample=not greedy,
            temperature=None if greedy else t,
            top_p=top_p,
            repetition_penalty=getattr(body, "repetition_penalty", None),
            frequency_penalty=body.frequency_penalty or None,
            seed=self.seed(body.seed),
            stop=tuple(self.stops(body.stop)),
            top_n_tokens=top_n,
            grammar=grammar,
        )

    def _check_max_tokens(self, max_tokens: int | None) -> None:
        if max_tokens is not None and max_tokens <= 0:
            raise ValidationError("`max_tokens` must be strictly positive")

    def _top_n(self, top_n: int | None, name: str) -> int:
        top_n = top_n or 0
        if not 0 <= top_n <= self.config.max_top_n_tokens:
            raise ValidationError(f"`{name}` must be >= 0 and <= {self.config.max_top_n_tokens}. Given: {top_n}")
        return top_n

    @staticmethod
    def _message(m: ChatMessage) -> dict[str, Any]:
        content = m.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise ValidationError(f"{part.type} content is not supported")
                texts.append(part.text)
            content = "".join(texts)
        message: dict[str, Any] = {"role": m.role, "content": content or ""}
        if m.name is not None:
            message["name"] = m.name
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            message["tool_calls"] = [_call_for_template(c) for c in m.tool_calls]
        return message

    def chat_prompt(self, body: ChatRequest, tools: ToolPlan | None = None) -> str:
        if not body.messages:
            raise ValidationError("`messages` cannot be empty")
        messages = [self._message(m) for m in body.messages]
        extra = {"tools": tools.tools} if tools is not None and tools.tools else {}
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)
        except Exception as e:  # no template, or the template's raise_exception: the request's problem
            err = ValidationError(f"Template error: {e}")
            err.error_type = "template_error"
            raise err from e

    def chat(self, body: ChatRequest) -> OpenAIPlan:
        if body.logit_bias:
            raise ValidationError("`logit_bias` is not supported")
        tools = tool_plan(body.tools, body.tool_choice)
        grammar = response_format_grammar(body.response_format)
        if grammar is not None and tools is not None and tools.grammar is not None:
            raise ValidationError("`response_format` cannot be combined with `tools` unless `tool_choice` is `none`")
        if tools is not None and tools.grammar is not None:
            grammar = tools.grammar
        n = self._choices(body.n)
        top_n = self._top_n(body.top_logprobs, "top_logprobs")
        if top_n and not body.logprobs:
            raise ValidationError("`top_logprobs` requires `logprobs` to be true")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        self._check_max_tokens(max_tokens)
        text = self.chat_prompt(body, tools)
        ids = self.encode(text, add_special_tokens=False)
        if not ids:
            raise ValidationError("`inputs` cannot be empty")
        ids, max_new = self.budget(ids, max_tokens)
        params = self._openai_params(body, max_new, top_n, grammar)
        usage = bool(body.stream_options and body.stream_options.include_usage)
        calls = tools if tools is not None and tools.grammar is not None else None
        return OpenAIPlan([ids], [text], [params], n, bool(body.logprobs), top_n, usage, tools=calls)

    def completion(self, body: CompletionRequest) -> OpenAIPlan:
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        if not prompts:
            raise ValidationError("`prompt` cannot be empty")
        if len(prompts) > self.config.max_client_batch_size:
            raise ValidationError(
                f"Number of prompts exceeds the maximum allowed batch size of {self.config.max_client_batch_size}"
            )
        if body.suffix:
            raise ValidationError("Suffix is not supported and can be achieved by preprocessing the prompt.")
        if body.best_of is not None and body.best_of != 1:
            raise ValidationError("`best_of` is not supported for completions")
        grammar = response_format_grammar(body.response_format)
        n = self._choices(body.n)
        top_n = self._top_n(body.logprobs, "logprobs")
        self._check_max_tokens(body.max_tokens)
        budgets = []
        for prompt in prompts:
            if not prompt:
                raise ValidationError("`inputs` cannot be empty")
            budgets.append(self.budget(self.encode(prompt), body.max_tokens))
        base = self._openai_params(body, budgets[0][1], top_n, grammar)
        params = [dataclasses.replace(base, max_new_tokens=max_new) for _, max_new in budgets]
        usage = bool(body.stream_options and body.stream_options.include_usage)
        ids = [ids for ids, _ in budgets]
        return OpenAIPlan(ids, prompts, params, n, body.logprobs is not None, top_n, usage, bool(body.echo))


def _call_for_template(call: dict[str, Any]) -> dict[str, Any]:
    """A past tool call as chat templates read it: `function.arguments` as an object when it is JSON text."""
    function = call.get("function")
    if isinstance(function, dict) and isinstance(function.get("arguments"), str):
        try:
            arguments = json.loads(function["arguments"])
        except ValueError:
            return call
        return {**call, "function": {**function, "arguments": arguments}}
    return call
