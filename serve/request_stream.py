"""Running engine requests from a handler: open (admission), iterate, collect, close.

`RequestStream.open()` pulls the first event, so admission errors (429/503/422) raise before any
response byte; `close()` aborts an unfinished request. Event arrival times feed TTFT and ITL.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from serve.engine_protocol import REQUEST_CLOCK, EngineClient, EngineRequest, GenerationError, TokenEvent
from serve.request_record import RequestRecord
from serve.streaming import error_event


@dataclass
class Collected:
    """A finished request: per-token ids, texts (the streamed pieces), logprobs and alternatives."""

    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)  # joins to generated_text
    logprobs: list[float] = field(default_factory=list)
    top_tokens: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: str = "length"
    generated_text: str = ""
    seed: int | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def mean_logprob(self) -> float:
        return sum(self.logprobs) / len(self.logprobs) if self.logprobs else float("-inf")


def token_texts(event: TokenEvent) -> list[str]:
    """One text per token of the event: the event's text goes with its last token."""
    n = len(event.token_ids)
    return [""] * (n - 1) + [event.text] if n else []


class RequestStream:
    def __init__(self, client: EngineClient, request: EngineRequest) -> None:
        self.request = request
        self._events = client.generate(request)
        self._first: TokenEvent | None = None
        self._closed = False
        self.first_token_at: float | None = None  # REQUEST_CLOCK, as RequestRecord.arrival
        self.last_token_at: float | None = None
        self.inter_token_s: list[float] = []
        self.num_tokens = 0
        self.final: TokenEvent | None = None

    def open(self) -> None:
        try:
            self._first = next(self._events)
        except StopIteration:
            self.close()
            raise GenerationError("Request failed during generation: no output") from None
        except BaseException:
            self.close()
            raise
        self._record(self._first)

    def _record(self, event: TokenEvent) -> None:
        now = REQUEST_CLOCK()
        n = len(event.token_ids)
        if self.first_token_at is None:
            self.first_token_at = now
        elif n and self.last_token_at is not None:
            self.inter_token_s.extend([(now - self.last_token_at) / n] * n)
        if n:
            self.last_token_at = now
        self.num_tokens += n
        if event.finished:
            self.final = event

    def __iter__(self) -> Iterator[TokenEvent]:
        first, self._first = self._first, None
        if first is not None:
            yield first
            if first.finished:
                return
        for event in self._events:
            self._record(event)
            yield event
            if event.finished:
                return
        raise GenerationError("Request failed during generation: incomplete generation")

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            close = getattr(self._events, "close", None)
            if close is not None:
                close()

    def account(self, record: RequestRecord) -> None:
        """Add this request's counts and latencies to the HTTP request's record."""
        record.generated_tokens += self.num_tokens
        record.inter_token_s.extend(self.inter_token_s)
        if self.first_token_at is not None and record.ttft_s is None:
            record.ttft_s = max(0.0, self.first_token_at - record.arrival)
        final = self.final
        if final is not None:
            record.finish_reason = final.finish_reason
            timings = final.timings
            if record.queue_s is None and "queue" in timings:  # measured from HTTP arrival: less validation
                record.queue_s = max(0.0, timings["queue"] - record.validation_s)
            if record.inference_s is None:
                if "inference" in timings:
                    record.inference_s = timings["inference"]
                elif self.last_token_at is not None:
                    record.inference_s = max(0.0, self.last_token_at - record.arrival - record.validation_s)


def open_all(client: EngineClient, requests: Sequence[EngineRequest]) -> list[RequestStream]:
    """Submit every request (all are admitted and running) or none: on an error, close the opened."""
    streams = [RequestStream(client, r) for r in requests]
    try:
        for s in streams:
            s.open()
    except BaseException:
        close_all(streams)
        raise
    return streams


def close_all(streams: Sequence[RequestStream]) -> None:
    for s in streams:
        s.close()


def collect(stream: RequestStream) -> Collected:
    out = Collected(list(stream.request.prompt_token_ids))
    for event in stream:
        out.token_ids.extend(event.token_ids)
        out.texts.extend(token_texts(event))
        if not event.token_ids and event.text and out.texts:
            out.texts[-1] += event.text
        out.logprobs.extend(event.logprobs)
        out.top_tokens.extend(event.top_tokens)
        if event.finished:
            out.finish_reason = event.finish_reason or "length"
            out.generated_text = event.generated_text if event.generated_text is not None else "".join(out.texts)
            out.seed = event.seed
            out.timings = dict(event.timings)
    return out


def stream_closer(streams: Sequence[RequestStream], record: RequestRecord) -> Callable[[], None]:
    """Cleanup for a streamed response: abort what is unfinished, account for every request."""

    def on_close() -> None:
        close_all(streams)
        for s in streams:
            s.account(record)
        if record.error_type is None and any(s.final is None for s in streams):
            record.error_type = "cancelled"  # the client went away before the end

    return on_close


def guarded_stream_error(record: RequestRecord, space: bool) -> Callable[[BaseException], bytes]:
    """The SSE error frame for a stream that failed after it began; the record keeps the error type."""

    def on_error(exc: BaseException) -> bytes:
        frame, record.error_type = error_event(exc, space)
        return frame

    return on_error
