"""A local SageMaker Runtime API (InvokeEndpoint, InvokeEndpointWithResponseStream) in front of containers'
`/invocations`, shaped as botocore's sagemaker-runtime service model parses it: boto3 pointed at it with
`endpoint_url` behaves as against real endpoints, errors (ModelError, ValidationError, ModelStreamError) included.
"""

from __future__ import annotations

import argparse
import http.client
import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

from local_mode.event_stream import model_stream_error, payload_part

ACCOUNT = "123456789012"
REGION = "us-east-1"
VARIANT = "AllTraffic"
CORAL = "http://internal.amazon.com/coral/com.amazon.sagemaker/"
INVOKE_TIMEOUT = 60.0  # SageMaker gives the container 60 s to answer InvokeEndpoint
STREAM_TIMEOUT = 300.0  # and a streamed response at most 60 s between parts / 8 min in all; one socket timeout here
CHUNK = 64 * 1024


class _ContainerError(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(status)
        self.status, self.body = status, body


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (stdlib's signature)
        if self.server.verbose:
            super().log_message(format, *args)

    # ---- responses ----------------------------------------------------------------------------

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("x-amzn-RequestId", str(uuid.uuid4()))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, code: str, payload: dict[str, object]) -> None:
        """A rest-json error: botocore reads the code from x-amzn-ErrorType, the modeled members from the body."""
        headers = {"Content-Type": "application/json", "x-amzn-ErrorType": f"{code}:{CORAL}"}
        self._send(status, json.dumps(payload).encode(), headers)

    def _model_error(self, name: str, status: int, body: bytes) -> None:
        text = body.decode("utf-8", errors="replace")
        kind = "client" if status < 500 else "server"
        log_stream = f"arn:aws:logs:{REGION}:{ACCOUNT}:log-group:/aws/sagemaker/Endpoints/{name}"
        self._error(424, "ModelError", {
            "ErrorCode": f"{kind.upper()}_ERROR_FROM_MODEL",
            "Message": f'Received {kind} error ({status}) from primary with message "{text}". See '
                       f"{log_stream} in account {ACCOUNT} for more information.",
            "OriginalStatusCode": status,
            "OriginalMessage": text,
            "LogStreamArn": log_stream,
        })  # fmt: skip

    # ---- routing ------------------------------------------------------------------------------

    def do_POST(self) -> None:  # noqa: N802 (stdlib's name)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        parts = urlsplit(self.path).path.strip("/").split("/")
        if len(parts) != 3 or parts[0] != "endpoints" or parts[2] not in ("invocations", "invocations-response-stream"):
            self._error(404, "UnknownOperationException", {"message": f"Unknown operation POST {self.path}"})
            return
        name = unquote(parts[1])
        container = self.server.endpoints.get(name)
        if container is None:
            message = f"Endpoint {name} of account {ACCOUNT} not found."
            self._error(400, "ValidationError", {"message": message})
            return
        streaming = parts[2] == "invocations-response-stream"
        accept = self.headers.get("X-Amzn-SageMaker-Accept" if streaming else "Accept")
        headers = {"Content-Type": self.headers.get("Content-Type") or "application/octet-stream"}
        if accept:
            headers["Accept"] = accept
        if attributes := self.headers.get("X-Amzn-SageMaker-Custom-Attributes"):
            headers["X-Amzn-SageMaker-Custom-Attributes"] = attributes
        try:
            conn, response = _forward(container, body, headers, STREAM_TIMEOUT if streaming else INVOKE_TIMEOUT)
        except _ContainerError as e:
            self._model_error(name, e.status, e.body)
            return
        try:
            if streaming:
                self._stream(response)
            else:
                self._invoke(name, response)
        finally:
            conn.close()

    def _invoke(self, name: str, response: http.client.HTTPResponse) -> None:
        try:
            data = response.read()
        except (OSError, http.client.HTTPException) as e:
            self._model_error(name, 502, f"connection to the model broke: {e!r}".encode())
            return
        headers = {"Content-Type": response.getheader("Content-Type") or "application/octet-stream"}
        headers["x-Amzn-Invoked-Production-Variant"] = VARIANT
        if attributes := response.getheader("X-Amzn-SageMaker-Custom-Attributes"):
            headers["X-Amzn-SageMaker-Custom-Attributes"] = attributes
        self._send(200, data, headers)

    def _stream(self, response: http.client.HTTPResponse) -> None:
        """The container's bytes as PayloadPart frames (chunked); a broken container stream -> ModelStreamError."""
        self.send_response(200)
        self.send_header("Content-Type", "application/vnd.amazon.eventstream")
        self.send_header("X-Amzn-SageMaker-Content-Type", response.getheader("Content-Type") or "application/json")
        self.send_header("x-Amzn-Invoked-Production-Variant", VARIANT)
        if attributes := response.getheader("X-Amzn-SageMaker-Custom-Attributes"):
            self.send_header("X-Amzn-SageMaker-Custom-Attributes", attributes)
        self.send_header("x-amzn-RequestId", str(uuid.uuid4()))
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            while True:
                try:
                    data = response.read1(CHUNK)
                except TimeoutError:
                    self._chunk(
                        model_stream_error("The model did not send data in time.", "ModelInvocationTimeExceeded")
                    )
                    break
                except (OSError, http.client.HTTPException) as e:
                    self._chunk(model_stream_error(f"The model's connection was reset or closed: {e!r}"))
                    break
                if not data:
                    break
                self._chunk(payload_part(data))
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):  # the client went away
            self.close_connection = True

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()


def _forward(
    container: str, body: bytes, headers: dict[str, str], timeout: float
) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """POST to `{container}/invocations`; raises _ContainerError for a status >= 400 or no answer at all."""
    url = urlsplit(container)
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port or 80, timeout=timeout)
    try:
        conn.request("POST", url.path.rstrip("/") + "/invocations", body=body, headers=headers)
        response = conn.getresponse()
    except (OSError, http.client.HTTPException) as e:
        conn.close()
        raise _ContainerError(502, f"could not reach the model at {container}: {e!r}".encode()) from e
    if response.status >= 400:
        try:
            data = response.read()
        except (OSError, http.client.HTTPException):
            data = b""
        conn.close()
        raise _ContainerError(response.status, data)
    return conn, response


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], endpoints: dict[str, str], verbose: bool) -> None:
        super().__init__(address, _Handler)
        self.endpoints, self.verbose = endpoints, verbose


class RuntimeEmulator:
    """`RuntimeEmulator({"my-endpoint": "http://127.0.0.1:8080"}).start()` -> the `endpoint_url` for boto3."""

    def __init__(self, endpoints: dict[str, str], host: str = "127.0.0.1", port: int = 0, verbose: bool = False):
        self.endpoints, self.host, self.port, self.verbose = dict(endpoints), host, port, verbose
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> str:
        self._server = _Server((self.host, self.port), self.endpoints, self.verbose)
        self._thread = threading.Thread(target=self._server.serve_forever, name="runtime-emulator", daemon=True)
        self._thread.start()
        return self.url

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> RuntimeEmulator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _endpoint(text: str) -> tuple[str, str]:
    name, sep, url = text.partition("=")
    if not sep or not name or not url.startswith("http://"):
        raise argparse.ArgumentTypeError(f"expected NAME=http://HOST:PORT, got {text!r}")
    return name, url


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="A local SageMaker Runtime API (InvokeEndpoint[WithResponseStream]) for containers."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: a free port (printed)")
    parser.add_argument("--endpoint", type=_endpoint, action="append", required=True, metavar="NAME=URL")
    parser.add_argument("--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    server = _Server((args.host, args.port), dict(args.endpoint), args.verbose)
    host, port = server.server_address[:2]
    print(f"SageMaker runtime emulator on http://{host}:{port} for {', '.join(server.endpoints)}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
