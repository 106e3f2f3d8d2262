"""`serve`, what SageMaker runs: reads the settings, starts the engine process and gunicorn, and supervises them.

The launcher listens on the port itself from the start (container/standby.py answers 503 while the model loads and
whenever gunicorn cannot answer) and hands the socket to gunicorn. Either child dying: 503 for FAILED_GRACE_S, then
the other is stopped and `serve` exits 1; SIGTERM drains (in-flight requests finish, new ones get 503, at most
SERVE_DRAIN_TIMEOUT seconds), stops both and exits 0; a bad variable exits 2 before any model loads.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path

from container.settings import Settings, SettingsError, child_environment, load_settings
from container.standby import Standby, listen
from container.worker_config import worker_config
from serve.emf_exporter import EmfEmitter
from serve.engine_process import run
from serve.engine_server import EngineProcessConfig
from serve.ipc import Addresses, EngineFacts, Handover, die_with_parent

logger = logging.getLogger("container.launcher")
ROOT = Path(__file__).resolve().parent.parent
GUNICORN_CONF = Path(__file__).resolve().parent / "gunicorn.conf.py"
STOP_TIMEOUT_S = 15.0  # for each child to exit once told to, before it is killed
FAILED_GRACE_S = 2.0  # a child died: /ping answers 503 this long before `serve` stops and exits 1
EXIT_CONFIG = 2


class Launcher:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.signals = 0  # SIGTERM/SIGINT received: 1 drains, 2 or more stop at once
        self.engine: BaseProcess | None = None
        self.conn: Connection | None = None
        self.gunicorn: subprocess.Popen | None = None
        self.runtime_dir = ""
        self.stopped = False
        self.engine_ready = False
        self.wakeup: socket.socket | None = None
        self.emitter: EmfEmitter | None = None  # CloudWatch EMF lines, once gunicorn runs
        self.standby: Standby | None = None  # the port, open from start to exit

    def run(self) -> int:
        host, port = self.settings.launcher.host, self.settings.launcher.port
        try:
            listener = listen(host, port)
        except OSError as e:
            return _config_error(f"SAGEMAKER_BIND_TO_PORT: cannot listen on {host}:{port}: {e.strerror or e}")
        self.standby = Standby(listener).start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        self.wakeup, wakeup_writer = socket.socketpair()  # a signal writes a byte: waits return at once
        for sock in (self.wakeup, wakeup_writer):
            sock.setblocking(False)
        signal.set_wakeup_fd(wakeup_writer.fileno(), warn_on_full_buffer=False)
        self.runtime_dir = tempfile.mkdtemp(prefix="llm-serve-")
        try:
            return self._run()
        finally:
            self.standby.stopping()
            self._stop_children()
            shutil.rmtree(self.runtime_dir, ignore_errors=True)
            signal.set_wakeup_fd(-1)
            wakeup_writer.close()
            self.wakeup.close()
            self.standby.close()

    def _wait(self, timeout: float, children: bool = True) -> list:
        """Wait for a signal, and (with `children`) a message from the engine or its exit; returns what is ready."""
        assert self.conn is not None and self.engine is not None and self.wakeup is not None
        ready = wait([self.conn, self.engine.sentinel, self.wakeup] if children else [self.wakeup], timeout)
        if self.wakeup in ready:
            try:
                self.wakeup.recv(64)
            except BlockingIOError:
                pass
        return ready

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.signals += 1
        logger.info("received %s%s", signal.Signals(signum).name, " again: stopping now" if self.signals > 1 else "")

    def _run(self) -> int:
        try:
            addresses = Addresses.in_dir(self.runtime_dir)
        except ValueError as e:
            return _config_error(str(e))
        self._start_engine(addresses)
        message = self._wait_for_engine()
        if message is None:
            return 0 if self.signals else 1
        if message[0] == "error":
            _, kind, text = message
            if kind == "model":
                text = " ".join(text.split())  # one line, whatever the loader said
                return _config_error(f"HF_MODEL_ID: could not load the model {self.settings.model_label!r}: {text}")
            if kind == "quantize":  # contradicts the checkpoint, or the device cannot run it
                return _config_error(f"{self.settings.quantize_variable}: {text}")
            if kind == "parallel":  # the degree does not fit the model or the GPUs
                return _config_error(f"{self.settings.shard_variable}: {text}")
            logger.error("the engine failed to start: %s", text)
            return 1
        facts: EngineFacts = message[1]
        self.engine_ready = True
        metrics_dir = os.path.join(self.runtime_dir, "prometheus")
        os.makedirs(metrics_dir)
        try:
            worker = worker_config(self.settings, addresses, facts, metrics_dir)
        except (SettingsError, ValueError) as e:
            return _config_error(str(e))
        config_path = os.path.join(self.runtime_dir, "worker.pkl")
        worker.write(config_path)
        self._start_gunicorn(config_path, metrics_dir)
        assert self.standby is not None
        self.standby.hand_over_when_ready(Handover(self.runtime_dir))
        self._start_emitter()  # a thread: only after gunicorn is forked
        return self._supervise()

    # ---- the engine -------------------------------------------------------------------------

    def _start_engine(self, addresses: Addresses) -> None:
        s = self.settings
        tokenizer_dir = os.path.join(self.runtime_dir, "tokenizer")  # the engine exports it there for the workers
        config = EngineProcessConfig(
            s.engine, addresses, s.server["max_concurrent_requests"], s.launcher.log_level, tokenizer_dir, s.tracing
        )
        ctx = multiprocessing.get_context("spawn")
        self.conn, child_conn = ctx.Pipe()
        # not a daemon: it spawns the tensor-parallel ranks; we stop it ourselves, and it dies with us
        self.engine = ctx.Process(target=run, args=(config, child_conn), name="engine", daemon=False)
        logger.info("starting the engine process for %s", s.model_label)
        self.engine.start()
        child_conn.close()

    def _wait_for_engine(self) -> tuple | None:
        """The engine's ("ready", facts) or ("error", kind, text); None if it died or we were told to stop."""
        assert self.engine is not None and self.conn is not None
        while not self.signals:
            if self.conn in self._wait(0.5):
                try:
                    return self.conn.recv()
                except (EOFError, OSError):
                    pass
            if not self.engine.is_alive():
                logger.error("the engine process exited with code %s while loading", self.engine.exitcode)
                return None
        logger.info("stopping before the model was ready")
        return None

    # ---- gunicorn ---------------------------------------------------------------------------

    def _start_gunicorn(self, config_path: str, metrics_dir: str) -> None:
        launcher = self.settings.launcher
        assert self.standby is not None
        fd = self.standby.sock.fileno()
        command = [
            sys.executable, "-m", "gunicorn",
            "--config", str(GUNICORN_CONF),
            "--no-control-socket",
            "--bind", f"fd://{fd}",  # our listening socket: the port stays open whatever gunicorn does
            "--workers", str(launcher.workers),
            "--threads", str(launcher.threads),
            "--log-level", launcher.log_level,
            "--pythonpath", str(ROOT),
            f"serve.wsgi:build_app({config_path!r})",
        ]  # fmt: skip
        logger.info("starting gunicorn on %s:%d (%d workers x %d threads)",
                    launcher.host, launcher.port, launcher.workers, launcher.threads)  # fmt: skip
        self.gunicorn = subprocess.Popen(
            command,
            env=child_environment({"PROMETHEUS_MULTIPROC_DIR": metrics_dir}),
            start_new_session=True,  # a terminal's Ctrl-C reaches only us; we stop gunicorn in order
            preexec_fn=die_with_parent,  # SIGTERM to gunicorn if we die, even by SIGKILL
            pass_fds=(fd,),
        )

    def _start_emitter(self) -> None:
        config = self.settings.cloudwatch
        if config.enabled:
            self.emitter = EmfEmitter(config, f"http://127.0.0.1:{self.settings.launcher.port}/metrics")
            self.emitter.start()

    # ---- stopping ---------------------------------------------------------------------------

    def _stop_children(self) -> None:
        """Tell both children to stop at once, wait up to STOP_TIMEOUT_S, then kill what is left."""
        if self.stopped:
            return
        self.stopped = True
        if self.emitter is not None:
            self.emitter.stop()
        engine, gunicorn = self.engine, self.gunicorn
        engine_alive = engine is not None and engine.is_alive()
        if engine is not None and engine_alive and not self.engine_ready:
            engine.terminate()  # still loading: it does not read the pipe yet
        elif engine_alive and self.conn is not None:
            try:
                self.conn.send("stop")  # fails what is still in flight, then exits 0
            except OSError:
                pass
        if gunicorn is not None and gunicorn.poll() is None:
            gunicorn.send_signal(signal.SIGTERM)  # graceful: running responses are finished
        deadline = time.monotonic() + STOP_TIMEOUT_S
        if engine is not None and engine_alive:
            engine.join(max(0.0, deadline - time.monotonic()))
            if engine.is_alive():
                logger.warning("the engine did not stop in %.0fs; killing it", STOP_TIMEOUT_S)
                engine.kill()
                engine.join()
        if gunicorn is not None:
            try:
                gunicorn.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("gunicorn did not stop in %.0fs; killing it", STOP_TIMEOUT_S)
            try:  # its whole process group: the master and any worker it left behind
                os.killpg(gunicorn.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            gunicorn.wait()

    # ---- supervision ------------------------------------------------------------------------

    def _supervise(self) -> int:
        assert self.engine is not None and self.gunicorn is not None and self.conn is not None
        while not self.signals:
            self._wait(0.5)
            self._discard_messages()
            if not self.engine.is_alive():
                logger.error("the engine process exited with code %s; stopping", self.engine.exitcode)
                return self._failed()
            if self.gunicorn.poll() is not None:
                logger.error("gunicorn exited with code %s; stopping", self.gunicorn.returncode)
                return self._failed()
        return self._drain()

    def _failed(self) -> int:
        """A child died: /ping says 503 (the workers see the engine gone; we answer what they do not) for a moment,
        so SageMaker sees the failure, then `serve` stops and exits 1 to be replaced."""
        assert self.standby is not None
        self.standby.fail()
        deadline = time.monotonic() + FAILED_GRACE_S
        while not self.signals and (left := deadline - time.monotonic()) > 0:
            self._wait(left, children=False)
        return 1

    def _drain(self) -> int:
        assert self.engine is not None and self.gunicorn is not None and self.conn is not None
        timeout = self.settings.launcher.drain_timeout
        logger.info("draining: waiting up to %.0fs for in-flight requests", timeout)
        try:
            self.conn.send("drain")
        except OSError:
            pass
        deadline = time.monotonic() + timeout
        while self.signals < 2 and self.engine.is_alive() and self.gunicorn.poll() is None:
            left = deadline - time.monotonic()
            if left <= 0:
                logger.warning("drain timeout: stopping with requests still in flight")
                break
            if self.conn.poll(min(left, 0.2)) and self._discard_messages():
                logger.info("drained: no request in flight")
                break
        if self.emitter is not None and self.gunicorn.poll() is None:
            self.emitter.emit_once()  # the requests of the last, partial interval
        assert self.standby is not None
        self.standby.stopping()  # from here on we answer what gunicorn, stopping, no longer takes
        crashed = [
            name
            for name, code in (("engine", self.engine.exitcode), ("gunicorn", self.gunicorn.poll()))
            if code not in (None, 0)
        ]
        self._stop_children()
        if crashed:
            logger.error("%s exited with an error while draining", " and ".join(crashed))
            return 1
        logger.info("stopped")
        return 0

    def _discard_messages(self) -> bool:
        """Read what the engine sent; True if it reported being drained."""
        drained = False
        try:
            while self.conn is not None and self.conn.poll():
                drained |= self.conn.recv() == ("drained",)
        except (EOFError, OSError):
            pass
        return drained


def _config_error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return EXIT_CONFIG


def main(argv: list[str] | None = None) -> None:
    """Console script `serve`. SageMaker runs `serve` with arguments of its own: they are ignored."""
    del argv
    try:
        settings = load_settings()
    except SettingsError as e:
        sys.exit(_config_error(str(e)))
    logging.basicConfig(
        level=settings.launcher.log_level.upper(),
        format="%(asctime)s %(levelname)s [launcher] %(name)s: %(message)s",
    )
    sys.exit(Launcher(settings).run())


if __name__ == "__main__":
    main()
