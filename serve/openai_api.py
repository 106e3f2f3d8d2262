"""OpenAI-compatible chat completions and completions, streamed (`data: {...}` ... `data: [DONE]`) or not.

n choices (and several completion prompts) run as separate engine requests admitted together;
a stream sends each choice's chunks in turn, told apart by `index`. Finish reasons map to OpenAI's:
eos_token and stop_sequence -> "stop", length -> "length"; a complete tool call -> "tool_calls".
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator

from flask import Response, jsonify

from engine.sampling_params import SamplingParams
from serve.openai_protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatLogprobs,
    ChatRequest,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    FunctionCall,
    FunctionCallDelta,
    TokenLogprob,
    ToolCallDelta,
    ToolCallOut,
    TopLogprob,
    Usage,
)
from serve.request_record import RequestRecord, timing_headers
from serve.request_stream import (
    Collected,
    RequestStream,
    close_all,
    collect,
    guarded_stream_error,
    open_all,
    stream_closer,
)
from serve.services import Services
from serve.streaming import guarded, sse, sse_response
from serve.tool_calls import ToolCall, ToolStream, call_id, parse, read
from serve.validation import OpenAIPlan

FINISH_REASONS = {"eos_token": "stop", "stop_sequence": "stop", "length": "length"}
DONE = b"data: [DONE]\n\n"


def choice_params(params: SamplingParams, choice: int) -> SamplingParams:
    """Choice j of n samples with seed + j: reproducible, yet the choices differ."""
    if params.seed is None or choice == 0:
        return params
    return dataclasses.replace(params, seed=(params.seed + choice) % 2**64)


def finish_reason(reason: str | None) -> str:
    return FINISH_REASONS.get(reason or "length", "stop")


class OpenAIApi:
    def __init__(self, services: Services, system_fingerprint: str) -> None:
        self.s = services
        self.fingerprint = system_fingerprint

    def _start(self, plan: OpenAIPlan, record: RequestRecord) -> list[RequestStream]:
        record.validation_done()
        record.prompt_tokens = sum(len(ids) for ids in plan.prompts)
        record.max_new_tokens = max(p.max_new_tokens for p in plan.params)
        if self.s.config.log_prompts:
            record.prompt = "".join(plan.prompt_texts) if len(plan.prompt_texts) == 1 else repr(plan.prompt_texts)
        jobs = [
            (ids, choice_params(params, j)) for ids, params in zip(plan.prompts, plan.params) for j in range(plan.n)
        ]
        return open_all(self.s.client, self.s.requests(record, jobs))

    def _usage(self, plan: OpenAIPlan, completion_tokens: int) -> Usage:
        prompt = sum(len(ids) for ids in plan.prompts)
        return Usage(prompt_tokens=prompt, completion_tokens=completion_tokens, total_tokens=prompt + completion_tokens)

    def _run(self, plan: OpenAIPlan, record: RequestRecord) -> list[Collected]:
        streams = self._start(plan, record)
        try:
            results = [collect(st) for st in streams]
        finally:
            close_all(streams)
        for st in streams:
            st.account(record)
        return results

    def _answer(self, payload: ChatCompletion | Completion, record: RequestRecord, plan: OpenAIPlan) -> Response:
        response = jsonify(payload.model_dump(mode="json"))
        characters = sum(len(t) for t in plan.prompt_texts)
        response.headers.update(timing_headers(record, self.s.compute_type(), characters))
        return response

    def _stream(self, frames: Iterator[bytes], streams: list[RequestStream], record: RequestRecord) -> Response:
        record.stream = True
        guarded_frames = guarded(frames, guarded_stream_error(record, space=True))
        return sse_response(guarded_frames, stream_closer(streams, record), {"x-compute-type": self.s.compute_type()})

    # ---- chat -------------------------------------------------------------------------------

    def _chat_logprobs(
        self, ids: list[int], logprobs: list[float], tops: list[list[tuple[int, float]]]
    ) -> ChatLogprobs:
        d = self.s.decoder
        content = []
        for k, (token_id, lp) in enumerate(zip(ids, logprobs)):
            top = [TopLogprob(token=d(i), logprob=v) for i, v in (tops[k] if k < len(tops) else [])]
            content.append(TokenLogprob(token=d(token_id), logprob=lp, top_logprobs=top))
        return ChatLogprobs(content=content)

    def chat(self, body: ChatRequest, record: RequestRecord) -> Response:
        record.stream = bool(body.stream)
        plan = self.s.validator.chat(body)
        chat_id, created = f"chatcmpl-{record.request_id}", int(time.time())
        if body.stream:
            streams = self._start(plan, record)
            return self._stream(self._chat_frames(streams, plan, chat_id, created), streams, record)
        results = self._run(plan, record)
        choices = []
        for k, r in enumerate(results):
            message, reason = self._reply(r, plan)
            logprobs = self._chat_logprobs(r.token_ids, r.logprobs, r.top_tokens) if plan.logprobs else None
            choices.append(ChatChoice(index=k, message=message, logprobs=logprobs, finish_reason=reason))
        usage = self._usage(plan, sum(len(r.token_ids) for r in results))
        answer = ChatCompletion(
            id=chat_id,
            created=created,
            model=self.s.config.model_id,
            system_fingerprint=self.fingerprint,
            choices=choices,
            usage=usage,
        )
        return self._answer(answer, record, plan)

    @staticmethod
    def _reply(r: Collected, plan: OpenAIPlan) -> tuple[AssistantMessage, str]:
        """The message and finish reason of one choice: a tool request's output is read back as a call (finish reason
        "tool_calls" when complete) or, with "auto", a text answer."""
        reason = finish_reason(r.finish_reason)
        if plan.tools is None:
            return AssistantMessage(content=r.generated_text), reason
        answer = read(r.generated_text)
        if isinstance(answer, str):
            return AssistantMessage(content=answer), reason
        call = ToolCallOut(id=call_id(), function=FunctionCall(name=answer.name, arguments=answer.arguments))
        if r.finish_reason == "eos_token":
            reason = "tool_calls"
        return AssistantMessage(content=None, tool_calls=[call]), reason

    @staticmethod
    def _tool_delta(pieces: list[tuple[str, str]]) -> ChatDelta:
        """One chunk's delta from a ToolStream's pieces: text content, or the call's first delta / arguments."""
        content = "".join(v for kind, v in pieces if kind == "content") or None
        call: ToolCallDelta | None = None
        for kind, value in pieces:
            if kind == "call":
                call = ToolCallDelta(index=0, id=call_id(), type="function", function=FunctionCallDelta(name=value))
            elif kind == "arguments":
                call = call or ToolCallDelta(index=0, function=FunctionCallDelta())
                call.function.arguments += value
        return ChatDelta(content=content, tool_calls=[call] if call is not None else None)

    def _chat_frames(
        self, streams: list[RequestStream], plan: OpenAIPlan, chat_id: str, created: int
    ) -> Iterator[bytes]:
        model, generated = self.s.config.model_id, 0
        for k, stream in enumerate(streams):
            tools = ToolStream() if plan.tools is not None else None
            for event in stream:
                generated += len(event.token_ids)
                reason = finish_reason(event.finish_reason) if event.finished else None
                if tools is None:
                    delta = ChatDelta(content=event.text)
                else:
                    delta = self._tool_delta(tools.add(event.text) + (tools.finish() if event.finished else []))
                    complete = event.finished and event.finish_reason == "eos_token"
                    if complete and isinstance(parse(tools.text), ToolCall):
                        reason = "tool_calls"
                if not (delta.content or delta.tool_calls or event.finished or plan.logprobs):
                    continue  # a token whose text is held back: nothing to say yet
                logprobs = None
                if plan.logprobs:
                    logprobs = self._chat_logprobs(event.token_ids, event.logprobs, event.top_tokens)
                choice = ChatChunkChoice(index=k, delta=delta, logprobs=logprobs, finish_reason=reason)
                chunk = ChatCompletionChunk(
                    id=chat_id, created=created, model=model, system_fingerprint=self.fingerprint, choices=[choice]
                )
                yield sse(chunk, space=True)
        if plan.include_usage:
            chunk = ChatCompletionChunk(
                id=chat_id,
                created=created,
                model=model,
                system_fingerprint=self.fingerprint,
                choices=[],
                usage=self._usage(plan, generated),
            )
            yield sse(chunk, space=True)
        yield DONE

    # ---- completions ------------------------------------------------------------------------

    def _completion_logprobs(
        self,
        ids: list[int],
        texts: list[str],
        logprobs: list[float],
        tops: list[list[tuple[int, float]]],
        offset: int,
        top_n: int,
    ) -> CompletionLogprobs:
        d = self.s.decoder
        offsets = []
        for text in texts:
            offsets.append(offset)
            offset += len(text)
        top = [{d(i): v for i, v in pairs} for pairs in tops] if top_n else None
        return CompletionLogprobs(
            tokens=[d(i) for i in ids], token_logprobs=logprobs, top_logprobs=top, text_offset=offsets
        )

    def completion(self, body: CompletionRequest, record: RequestRecord) -> Response:
        record.stream = bool(body.stream)
        plan = self.s.validator.completion(body)
        cmpl_id, created = f"cmpl-{record.request_id}", int(time.time())
        if body.stream:
            streams = self._start(plan, record)
            return self._stream(self._completion_frames(streams, plan, cmpl_id, created), streams, record)
        results = self._run(plan, record)
        choices = []
        for k, r in enumerate(results):
            echo = plan.prompt_texts[k // plan.n] if plan.echo else ""
            logprobs = None
            if plan.logprobs:
                logprobs = self._completion_logprobs(
                    r.token_ids, r.texts, r.logprobs, r.top_tokens, len(echo), plan.top_logprobs
                )
            choices.append(
                CompletionChoice(
                    index=k,
                    text=echo + r.generated_text,
                    logprobs=logprobs,
                    finish_reason=finish_reason(r.finish_reason),
                )
            )
        usage = self._usage(plan, sum(len(r.token_ids) for r in results))
        answer = Completion(
            id=cmpl_id,
            created=created,
            model=self.s.config.model_id,
            system_fingerprint=self.fingerprint,
            choices=choices,
            usage=usage,
        )
        return self._answer(answer, record, plan)

    def _completion_frames(
        self, streams: list[RequestStream], plan: OpenAIPlan, cmpl_id: str, created: int
    ) -> Iterator[bytes]:
        model, generated = self.s.config.model_id, 0
        for k, stream in enumerate(streams):
            echo = plan.prompt_texts[k // plan.n] if plan.echo else ""
            offset = 0
            for event in stream:
                generated += len(event.token_ids)
                text, echo = echo + event.text, ""
                if not (text or event.finished or plan.logprobs):
                    continue
                logprobs = None
                if plan.logprobs:
                    texts = [""] * (len(event.token_ids) - 1) + [event.text] if event.token_ids else []
                    logprobs = self._completion_logprobs(
                        event.token_ids,
                        texts,
                        event.logprobs,
                        event.top_tokens,
                        offset + len(text) - len(event.text),
                        plan.top_logprobs,
                    )
                offset += len(text)
                choice = CompletionChoice(
                    index=k,
                    text=text,
                    logprobs=logprobs,
                    finish_reason=finish_reason(event.finish_reason) if event.finished else None,
                )
                yield sse(
                    Completion(
                        id=cmpl_id, created=created, model=model, system_fingerprint=self.fingerprint, choices=[choice]
                    ),
                    space=True,
                )
        if plan.include_usage:
            usage = self._usage(plan, generated)
            chunk = Completion(
                id=cmpl_id, created=created, model=model, system_fingerprint=self.fingerprint, choices=[], usage=usage
            )
            yield sse(chunk, space=True)
        yield DONE
