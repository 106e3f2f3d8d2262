"""Free TCP ports for the launcher's internal endpoints, within SageMaker's safe port range when it names one."""

from __future__ import annotations

import socket


def free_port(port_range: tuple[int, int] | None, host: str = "127.0.0.1") -> int:
    """A port nobody listens on, from `port_range` when given (else any free one)."""
    low, high = port_range or (0, 0)  # port 0: any free port the kernel picks
    for port in range(low, high + 1):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise RuntimeError(f"no free port in SAGEMAKER_SAFE_PORT_RANGE ({low}-{high})")
