"""Test a model locally the way SageMaker hosts it: start the container (`docker`) or `serve` as a process against an
/opt/ml-shaped directory (`process`), wait for /ping, send a sample /invocations, print the answer, stop it with
SIGTERM. `invoke` does the same against a container already running (the compose file's). `--help` on each.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from local_mode.docker_server import DockerServer, DockerSpec, docker_run_command, gpus_available
from local_mode.process_server import ProcessServer, ProcessSpec, opt_ml_dir
from local_mode.server import SAMPLE_PAYLOAD, LocalServer, ServerExited, answer_text, invoke, wait_for_ping

SECRET_WORDS = ("TOKEN", "KEY", "SECRET", "PASSWORD")


def _env_item(text: str) -> tuple[str, str | None]:
    name, sep, value = text.partition("=")
    if not name or not name.replace("_", "").isalnum():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE or NAME, got {text!r}")
    return name, value if sep else None


def _payload(text: str) -> bytes:
    data = Path(text[1:]).read_bytes() if text.startswith("@") else text.encode()
    try:
        json.loads(data)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"the payload is not JSON: {e}") from None
    return data


def _masked(command: list[str]) -> str:
    """The command for the log, with the values of secret-looking variables hidden."""
    shown = []
    for arg in command:
        name, sep, _ = arg.partition("=")
        secret = sep and any(word in name.upper() for word in SECRET_WORDS) and name.replace("_", "").isalnum()
        shown.append(f"{name}=***" if secret else arg)
    return shlex.join(shown)


def _report(result_status: int, seconds: float, body: bytes) -> None:
    print(f"POST /invocations: {result_status} in {seconds:.2f}s", flush=True)
    try:
        parsed = json.loads(body)
    except ValueError:
        print(body.decode("utf-8", errors="replace"), flush=True)
        return
    print(json.dumps(parsed, indent=2), flush=True)
    text = answer_text(parsed)
    if text is not None:
        print(f"answer: {text!r}", flush=True)


def _sample(url: str, args: argparse.Namespace, exit_code: Callable[[], int | None] = lambda: None) -> bool:
    waited = wait_for_ping(url, args.ready_timeout, exit_code)
    print(f"GET /ping: 200 after {waited:.1f}s", flush=True)
    result = invoke(url, args.payload, args.invoke_timeout)
    _report(result.status, result.seconds, result.body)
    return result.status == 200


def _serve_until_interrupted(server: LocalServer, args: argparse.Namespace) -> bool:
    """Keep the server up until Ctrl-C/SIGTERM (True) or its own exit (False); optionally behind the emulator."""
    from local_mode.runtime_emulator import RuntimeEmulator

    emulator = None
    if args.emulator_port is not None:
        emulator = RuntimeEmulator({args.endpoint_name: server.url}, port=args.emulator_port)
        print(f"SageMaker runtime emulator on {emulator.start()} (endpoint {args.endpoint_name!r})", flush=True)
    print(f"serving on {server.url}; Ctrl-C stops it", flush=True)
    try:
        while server.exit_code() is None:
            time.sleep(0.5)
        print(f"error: the server exited with code {server.exit_code()}", file=sys.stderr)
        return False
    except KeyboardInterrupt:
        return True
    finally:
        if emulator is not None:
            emulator.stop()


def _run(server: LocalServer, args: argparse.Namespace) -> int:
    print(f"starting: {_masked(server.command())}", flush=True)
    ok = False
    server.start()
    try:
        ok = _sample(server.url, args, server.exit_code)
        if ok and args.keep_running:
            ok = _serve_until_interrupted(server, args)
    except (ServerExited, OSError) as e:  # OSError: a timeout or a broken connection
        print(f"error: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
    finally:
        code = server.stop()
        print(f"stopped: serve exited with code {code}", flush=True)
    return 0 if ok and code == 0 else 1


def _docker(args: argparse.Namespace) -> int:
    gpus = args.gpus == "all" or (args.gpus == "auto" and gpus_available())
    spec = DockerSpec(
        image=args.image, port=args.port, model_dir=args.model, hf_model_id=args.hf_model_id, env=dict(args.env),
        gpus=gpus, shm_size=args.shm_size, host_network=args.network_host, hf_cache=args.hf_cache, name=args.name,
    )  # fmt: skip
    if args.print_command:
        print(shlex.join(docker_run_command(spec, args.docker)))
        return 0
    return _run(DockerServer(spec, args.docker, log=args.log), args)


def _process(args: argparse.Namespace) -> int:
    opt_ml = args.opt_ml if args.opt_ml is not None else opt_ml_dir(args.model)
    spec = ProcessSpec(opt_ml=opt_ml, port=args.port, hf_model_id=args.hf_model_id, env=dict(args.env))
    print(f"/opt/ml: {opt_ml}", flush=True)
    try:
        return _run(ProcessServer(spec, log=args.log), args)
    finally:
        if args.opt_ml is None:
            shutil.rmtree(opt_ml, ignore_errors=True)  # ours (model/ is only a link to the model)


def _invoke(args: argparse.Namespace) -> int:
    try:
        return 0 if _sample(args.url.rstrip("/"), args) else 1
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--payload",
        type=_payload,
        default=json.dumps(SAMPLE_PAYLOAD).encode(),
        help="the /invocations body: JSON, or @FILE (default: a chat question)",
    )
    parser.add_argument("--ready-timeout", type=float, default=900, help="seconds to wait for /ping (default 900)")
    parser.add_argument("--invoke-timeout", type=float, default=120, help="seconds for the answer (default 120)")


def _server_options(parser: argparse.ArgumentParser) -> None:
    _common(parser)
    parser.add_argument("--port", type=int, default=8080, help="port on 127.0.0.1 (default 8080)")
    parser.add_argument("--hf-model-id", help="HF_MODEL_ID: a hub id or a local path (a directory or a .gguf)")
    parser.add_argument(
        "--env",
        "-e",
        type=_env_item,
        action="append",
        default=[],
        metavar="NAME[=VALUE]",
        help="a variable for the container (repeatable); NAME alone passes this shell's value",
    )
    parser.add_argument("--keep-running", action="store_true", help="after the sample, serve until Ctrl-C")
    parser.add_argument("--emulator-port", type=int, help="with --keep-running: a SageMaker runtime emulator here")
    parser.add_argument("--endpoint-name", default="local-endpoint", help="the emulator's endpoint name")
    parser.add_argument("--log", type=argparse.FileType("ab"), help="the server's output (default: stderr)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m local_mode.run", description=__doc__)
    sub = parser.add_subparsers(dest="mode", required=True)

    docker = sub.add_parser("docker", help="run the image as SageMaker does: docker run ... IMAGE serve")
    docker.add_argument("image", help="the image, e.g. sagemaker-llm-server:cpu")
    docker.add_argument("--model", type=Path, help="a model directory, mounted read-only at /opt/ml/model")
    _server_options(docker)
    docker.add_argument(
        "--gpus",
        choices=("auto", "all", "none"),
        default="auto",
        help="--gpus all for docker: auto when nvidia-smi lists a GPU (default)",
    )
    docker.add_argument("--shm-size", default="1g", help="/dev/shm size (default 1g)")
    docker.add_argument(
        "--network-host",
        action="store_true",
        help="--network host and SAGEMAKER_BIND_TO_PORT=PORT instead of -p 127.0.0.1:PORT:8080",
    )
    docker.add_argument("--hf-cache", type=Path, help="a host directory for hub downloads, kept across runs")
    docker.add_argument("--name", help="the container's name (default sagemaker-llm-PORT)")
    docker.add_argument("--docker", default="docker", help="the docker client (default docker)")
    docker.add_argument("--print-command", action="store_true", help="print the docker run command and exit")
    docker.set_defaults(handler=_docker)

    process = sub.add_parser("process", help="run `serve` as a local process (no Docker) against an /opt/ml dir")
    where = process.add_mutually_exclusive_group()
    where.add_argument("--opt-ml", type=Path, help="an /opt/ml-shaped directory (its model/ is served)")
    where.add_argument("--model", type=Path, help="a model directory, linked into a fresh /opt/ml-shaped one")
    _server_options(process)
    process.set_defaults(handler=_process)

    call = sub.add_parser("invoke", help="wait for /ping and send the sample to a running container")
    call.add_argument("--url", default="http://127.0.0.1:8080", help="the container (default http://127.0.0.1:8080)")
    _common(call)
    call.set_defaults(handler=_invoke)
    return parser


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for path in (getattr(args, "model", None), getattr(args, "opt_ml", None)):
        if path is not None and not path.is_dir():
            print(f"error: {path} is not a directory", file=sys.stderr)
            return 2
    signal.signal(signal.SIGTERM, _interrupt)  # stopping the runner stops the server in order
    if getattr(args, "log", "unset") is None:
        args.log = sys.stderr
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
