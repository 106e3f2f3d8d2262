"""The benchmark's baseline: what the SageMaker Hugging Face inference toolkit does for an LLM — one transformers
`generate` per request (no batching across requests), streamed through a TextIteratorStreamer — behind a threaded
stdlib HTTP server answering TGI-shaped /generate, /generate_stream, /invocations and /, and /ping.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer


def load(path: str, dtype: str = "bfloat16") -> tuple[Any, Any]:
    """A GGUF file (dequantized to float32 by transformers, then cast) or a model directory, plus its tokenizer."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    kw = {"gguf_file": os.path.basename(path)} if path.endswith(".gguf") else {}
    folder = os.path.dirname(path) if kw else path
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw)
    return model.to(getattr(torch, dtype)).eval(), AutoTokenizer.from_pretrained(folder, **kw)


class TokenStreamer(TextIteratorStreamer):
    """A TextIteratorStreamer that queues (token id, text piece) per generated token instead of word by word;
    a piece is "" while the text ends in an incomplete UTF-8 character."""

    def put(self, value: torch.Tensor) -> None:
        if value.dim() > 1:
            value = value[0]
        if self.skip_prompt and self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return
        for token_id in value.tolist():
            self.token_cache.append(token_id)
            text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
            piece = ""
            if not text.endswith("\ufffd"):
                piece, self.print_len = text[self.print_len :], len(text)
            self.text_queue.put((token_id, piece), timeout=self.timeout)

    def end(self) -> None:
        self.next_tokens_are_prompt = True
        self.text_queue.put(self.stop_signal, timeout=self.timeout)


class Baseline:
    def __init__(self, model: Any, tokenizer: Any, slots: int) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.slots = threading.Semaphore(slots)  # generate() calls running at once (1: serialized)
        eos = model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.special = set(tokenizer.all_special_ids)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos), 0)

    def events(self, inputs: str, parameters: dict[str, Any]) -> Any:
        """Yield (token id, text, finish reason or None) as generate() produces them."""
        max_new = int(parameters.get("max_new_tokens") or 20)
        do_sample = bool(parameters.get("do_sample", False))
        enc = self.tokenizer(inputs, return_tensors="pt")
        streamer = TokenStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        kwargs = dict(
            **enc, max_new_tokens=max_new, do_sample=do_sample, streamer=streamer,
            pad_token_id=self.pad_id,
        )  # fmt: skip
        if do_sample:
            kwargs.update({k: parameters[k] for k in ("temperature", "top_k", "top_p") if parameters.get(k)})

        def run() -> None:
            try:
                with torch.inference_mode():
                    self.model.generate(**kwargs)
            finally:
                self.slots.release()

        self.slots.acquire()
        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        count = 0
        for token_id, piece in streamer:
            count += 1
            finish = "eos_token" if token_id in self.eos else "length" if count >= max_new else None
            yield token_id, piece, finish
        worker.join()


class Handler(BaseHTTPRequestHandler):
    server_version = "baseline/0.1"
    baseline: Baseline

    def log_message(self, format: str, *args: Any) -> None:  # quiet: the benchmark measures, not logs
        pass

    def _json(self, status: int, payload: Any) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path in ("/ping", "/health"):
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self._json(404, {"error": "not found", "error_type": "not_found"})

    def do_POST(self) -> None:
        try:
            data = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            inputs, parameters = str(data["inputs"]), dict(data.get("parameters") or {})
        except (ValueError, KeyError, TypeError) as e:
            self._json(422, {"error": f"bad request: {e}", "error_type": "validation"})
            return
        compat = self.path in ("/invocations", "/")  # TGI's compat routes: a list, or a stream if asked
        if self.path == "/generate_stream" or (compat and data.get("stream")):
            self._stream(inputs, parameters)
        elif compat or self.path == "/generate":
            text, count, finish = "", 0, "length"
            for _, piece, done in self.baseline.events(inputs, parameters):
                text, count, finish = text + piece, count + 1, done or finish
            answer = {"generated_text": text, "details": {"finish_reason": finish, "generated_tokens": count}}
            self._json(200, [{"generated_text": text}] if compat else answer)
        else:
            self._json(404, {"error": "not found", "error_type": "not_found"})

    def _stream(self, inputs: str, parameters: dict[str, Any]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        pieces: list[str] = []
        for index, (token_id, piece, finish) in enumerate(self.baseline.events(inputs, parameters), start=1):
            pieces.append(piece)
            event = {
                "index": index,
                "token": {"id": token_id, "text": piece, "logprob": None, "special": token_id in self.baseline.special},
                "generated_text": "".join(pieces) if finish else None,
                "details": {"finish_reason": finish, "generated_tokens": index} if finish else None,
            }
            try:
                self.wfile.write(b"data:" + json.dumps(event, ensure_ascii=False).encode() + b"\n\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                pass  # generate() runs to its end anyway, as in the toolkit


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 2048  # as gunicorn's backlog; socketserver's 5 resets connections under a burst


def serve(model_path: str, host: str, port: int, dtype: str, threads: int, slots: int) -> None:
    torch.set_num_threads(threads)
    started = time.monotonic()
    model, tokenizer = load(model_path, dtype)
    Handler.baseline = Baseline(model, tokenizer, slots)
    httpd = Server((host, port), Handler)
    print(f"baseline: {model_path} loaded in {time.monotonic() - started:.1f}s; listening on {host}:{port}", flush=True)
    httpd.serve_forever()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a .gguf file or a model directory")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8081)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    ap.add_argument("--slots", type=int, default=1, help="generate() calls at once (1: one request at a time)")
    args = ap.parse_args(argv)
    serve(args.model, args.host, args.port, args.dtype, args.threads, args.slots)


if __name__ == "__main__":
    main()
