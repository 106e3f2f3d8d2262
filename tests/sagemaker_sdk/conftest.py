"""Fixtures of the SDK tests: no connection leaves the machine (every socket in this process may reach loopback
only: a test that tried anything else fails), fake credentials and an explicit region, moto's server for the AWS
control plane, and a real `serve` behind the local runtime emulator for invocations.
"""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

from local_mode.runtime_emulator import RuntimeEmulator
from sagemaker_sdk.aws import Aws
from tests.sagemaker_sdk.fakes import ENDPOINT, REGION
from tests.support.serve_process import Serve, running_serve
from tests.support.served_app import build_model

LOOPBACK = {"127.0.0.1", "::1", "localhost"}


class NetworkGuardError(RuntimeError):
    pass


def _host(address: Any) -> str | None:  # noqa: ANN401
    return address[0] if isinstance(address, tuple) and address else None  # AF_UNIX paths are local


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Resolving or connecting to anything but loopback raises (telemetry, real AWS, the hub...)."""
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
    real_getaddrinfo = socket.getaddrinfo

    def check(host: str | None) -> None:
        if host is not None and host not in LOOPBACK:
            raise NetworkGuardError(f"a test tried to reach {host!r}")

    def connect(self: socket.socket, address: Any) -> None:  # noqa: ANN401
        check(_host(address))
        return real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:  # noqa: ANN401
        check(_host(address))
        return real_connect_ex(self, address)

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
        check(host.decode() if isinstance(host, bytes) else host)
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@pytest.fixture(autouse=True)
def fake_aws(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("SAGEMAKER_SUPPRESS_V2_WARNING", "1")


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def moto(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """moto's server, emptied, as every AWS endpoint of this test (botocore's AWS_ENDPOINT_URL)."""
    urllib.request.urlopen(urllib.request.Request(f"{moto_server}/moto-api/reset", method="POST"), timeout=10).close()
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    return moto_server


@pytest.fixture
def aws(moto: str) -> Aws:
    return Aws(boto3.Session(region_name=REGION))


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    model: Path = build_model(tmp_path_factory.mktemp("sdk_model"))
    with running_serve(model, tmp_path_factory.mktemp("sdk_serve")) as s:
        yield s


@pytest.fixture(scope="session")
def runtime_url(server: Serve) -> Iterator[str]:
    """The local SageMaker runtime API with the endpoint ENDPOINT in front of the real server."""
    with RuntimeEmulator({ENDPOINT: server.url("")}) as emulator:
        yield emulator.url
