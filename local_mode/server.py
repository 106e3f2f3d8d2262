"""A serving container started locally (a `docker run` or a `serve` process) and what the runner does with it:
wait for `/ping`, send a sample `/invocations`, stop it the way SageMaker does (SIGTERM, then a grace period).
Only loopback is ever contacted.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

from serve.ipc import die_with_parent

SAMPLE_PAYLOAD: dict[str, object] = {
    "messages": [{"role": "user", "content": "What is the capital of France?"}],
    "max_tokens": 32,
    "temperature": 0,
}
STOP_TIMEOUT_S = 40.0  # serve drains for at most SERVE_DRAIN_TIMEOUT (25 s), then stops its children


class ServerExited(RuntimeError):
    """The server process ended before it became ready."""


@dataclass(frozen=True)
class Invocation:
    status: int
    body: bytes
    seconds: float

    def json(self) -> object:
        return json.loads(self.body)


class LocalServer:
    """A child process that serves SageMaker's contract on `url`; subclasses say how to start and stop it."""

    def __init__(self, port: int, log: IO[Any] | None = None) -> None:
        self.port = port
        self.log = log
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str] | None:
        """The child's environment; None inherits ours."""
        return None

    def request_stop(self) -> None:
        """Ask the server to stop gracefully (SIGTERM to what runs `serve`)."""
        raise NotImplementedError

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.command(), env=self.environment(), stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log,
            start_new_session=True,  # a terminal's Ctrl-C reaches the runner only; it stops the server in order
            preexec_fn=die_with_parent,  # and if the runner dies, so does the child
        )  # fmt: skip

    def exit_code(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def wait_ready(self, timeout: float) -> float:
        """Seconds until `/ping` answered 200; ServerExited if the child ends first, TimeoutError after `timeout`."""
        return wait_for_ping(self.url, timeout, self.exit_code)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """Stop gracefully and return the exit code; killed (and -9 returned) if it outlives `timeout`."""
        assert self.proc is not None, "not started"
        if self.proc.poll() is None:
            self.request_stop()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()


def wait_for_ping(url: str, timeout: float, exit_code: Callable[[], int | None] = lambda: None) -> float:
    """Poll GET {url}/ping until 200; returns the seconds it took. `exit_code` tells whether the server ended."""
    start = time.monotonic()
    while True:
        code = exit_code()
        if code is not None:
            raise ServerExited(f"the server exited with code {code} before /ping answered 200")
        if ping(url) == 200:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{url}/ping did not answer 200 within {timeout:.0f}s")
        time.sleep(0.5)


def ping(url: str, timeout: float = 2.0) -> int | None:
    """HTTP status of GET {url}/ping; None when nothing answers."""
    try:
        with urllib.request.urlopen(f"{url}/ping", timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return None


def invoke(url: str, payload: bytes, timeout: float = 120.0) -> Invocation:
    """POST the payload to {url}/invocations as SageMaker does (JSON in, whatever the container answers)."""
    request = urllib.request.Request(
        f"{url}/invocations", data=payload, headers={"Content-Type": "application/json", "Accept": "application/json"}
    )
    start = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return Invocation(response.status, response.read(), time.monotonic() - start)
    except urllib.error.HTTPError as e:
        return Invocation(e.code, e.read(), time.monotonic() - start)


def answer_text(body: object) -> str | None:
    """The generated text of a TGI, OpenAI chat or OpenAI completions answer; None for anything else."""
    if isinstance(body, list) and body and isinstance(body[0], dict):
        body = body[0]
    if not isinstance(body, dict):
        return None
    if isinstance(body.get("generated_text"), str):
        return body["generated_text"]
    choices = body.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        choice = choices[0]
        message = choice.get("message")
        text = message.get("content") if isinstance(message, dict) else choice.get("text")
        return text if isinstance(text, str) else None
    return None
