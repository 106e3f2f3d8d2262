"""TGI's generate API: /generate, /generate_stream and the TGI shape of /invocations and /.

Non-streaming answers carry TGI's timing headers; best_of runs that many sampled requests at once
and returns the one with the highest mean token logprob (TGI's rule), the rest in details.
"""

from __future__ import annotations

from collections.abc import Iterator

from flask import Response, jsonify

from serve.request_record import RequestRecord, timing_headers
from serve.request_stream import (
    Collected,
    RequestStream,
    close_all,
    collect,
    guarded_stream_error,
    open_all,
    stream_closer,
    token_texts,
)
from serve.services import Services
from serve.streaming import guarded, sse, sse_response
from serve.tgi_protocol import (
    BestOfSequence,
    Details,
    GenerateRequest,
    GenerateResponse,
    PrefillToken,
    StreamDetails,
    StreamResponse,
    Token,
)
from serve.validation import TgiPlan


class TgiApi:
    def __init__(self, services: Services) -> None:
        self.s = services

    def _token(self, token_id: int, text: str, logprob: float | None) -> Token:
        return Token(id=token_id, text=text, logprob=logprob, special=token_id in self.s.decoder.special_ids)

    def _top(self, pairs: list[tuple[int, float]]) -> list[Token]:
        return [self._token(i, self.s.decoder(i), lp) for i, lp in pairs]

    def _validate(self, body: GenerateRequest, record: RequestRecord, stream: bool, compat: bool) -> TgiPlan:
        default_full_text = compat and self.s.config.default_return_full_text
        plan = self.s.validator.tgi(body, stream=stream, default_return_full_text=default_full_text)
        record.validation_done()
        record.prompt_tokens = len(plan.prompt_token_ids)
        record.max_new_tokens = plan.params.max_new_tokens
        if self.s.config.log_prompts:
            record.prompt = body.inputs
        return plan

    def respond(self, body: GenerateRequest, record: RequestRecord, stream: bool, compat: bool) -> Response:
        """compat (/invocations, /): a one-element list, or a stream when the body says so."""
        record.stream = stream
        if stream:
            return self.generate_stream(body, record, compat)
        return self.generate(body, record, compat)

    # ---- non-streaming ----------------------------------------------------------------------

    def generate(self, body: GenerateRequest, record: RequestRecord, compat: bool) -> Response:
        plan = self._validate(body, record, stream=False, compat=compat)
        jobs = [(plan.prompt_token_ids, plan.params)] * plan.best_of
        streams = open_all(self.s.client, self.s.requests(record, jobs))
        try:
            results = [collect(st) for st in streams]
        finally:
            close_all(streams)
        best = max(range(len(results)), key=lambda i: results[i].mean_logprob)
        streams[best].account(record)
        prefix = body.inputs if plan.return_full_text else ""
        details = None
        if plan.details:
            others = [self._best_of_sequence(r, plan, prefix) for i, r in enumerate(results) if i != best]
            details = self._details(results[best], plan, others or None)
        answer = GenerateResponse(generated_text=prefix + results[best].generated_text, details=details)
        payload = answer.model_dump(mode="json")
        response = jsonify([payload] if compat else payload)
        response.headers.update(timing_headers(record, self.s.compute_type(), len(body.inputs)))
        return response

    def _tokens(self, r: Collected) -> list[Token]:
        return [self._token(i, t, lp) for i, t, lp in zip(r.token_ids, r.texts, r.logprobs)]

    def _prefill(self, r: Collected, plan: TgiPlan) -> list[PrefillToken]:
        if not plan.decoder_input_details:
            return []
        return [PrefillToken(id=i, text=self.s.decoder(i), logprob=None) for i in r.prompt_token_ids]

    def _top_tokens(self, r: Collected, plan: TgiPlan) -> list[list[Token]] | None:
        return [self._top(pairs) for pairs in r.top_tokens] if plan.params.top_n_tokens else None

    def _details(self, r: Collected, plan: TgiPlan, others: list[BestOfSequence] | None) -> Details:
        return Details(
            finish_reason=r.finish_reason,
            generated_tokens=len(r.token_ids),
            seed=r.seed,
            prefill=self._prefill(r, plan),
            tokens=self._tokens(r),
            top_tokens=self._top_tokens(r, plan),
            best_of_sequences=others,
        )

    def _best_of_sequence(self, r: Collected, plan: TgiPlan, prefix: str) -> BestOfSequence:
        return BestOfSequence(
            generated_text=prefix + r.generated_text,
            finish_reason=r.finish_reason,
            generated_tokens=len(r.token_ids),
            seed=r.seed,
            prefill=self._prefill(r, plan),
            tokens=self._tokens(r),
            top_tokens=self._top_tokens(r, plan),
        )

    # ---- streaming --------------------------------------------------------------------------

    def generate_stream(self, body: GenerateRequest, record: RequestRecord, compat: bool) -> Response:
        record.stream = True
        plan = self._validate(body, record, stream=True, compat=compat)
        streams = open_all(self.s.client, self.s.requests(record, [(plan.prompt_token_ids, plan.params)]))
        prefix = body.inputs if plan.return_full_text else ""
        frames = guarded(self._frames(streams[0], plan, prefix), guarded_stream_error(record, space=False))
        headers = {"x-compute-type": self.s.compute_type(), "x-compute-characters": str(len(body.inputs))}
        return sse_response(frames, stream_closer(streams, record), headers)

    def _frames(self, stream: RequestStream, plan: TgiPlan, prefix: str) -> Iterator[bytes]:
        index = 0
        parts: list[str] = []
        want_top = bool(plan.params.top_n_tokens)
        for event in stream:
            parts.append(event.text)
            n = len(event.token_ids)
            for j, (token_id, text) in enumerate(zip(event.token_ids, token_texts(event))):
                index += 1
                last = event.finished and j == n - 1
                logprob = event.logprobs[j] if j < len(event.logprobs) else None
                top = self._top(event.top_tokens[j]) if want_top and j < len(event.top_tokens) else None
                details = generated = None
                if last:
                    text_all = event.generated_text if event.generated_text is not None else "".join(parts)
                    generated = prefix + text_all
                    details = StreamDetails(
                        finish_reason=event.finish_reason or "length",
                        generated_tokens=event.num_generated_tokens or stream.num_tokens,
                        seed=event.seed,
                        input_length=len(plan.prompt_token_ids),
                    )
                yield sse(
                    StreamResponse(
                        index=index,
                        token=self._token(token_id, text, logprob),
                        top_tokens=top,
                        generated_text=generated,
                        details=details,
                    )
                )
