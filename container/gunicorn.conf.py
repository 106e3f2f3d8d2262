"""Gunicorn settings for `serve`; the launcher adds bind, workers, threads, log level and the app on its command line.

gthread workers (container/gunicorn_worker.py): a thread for each concurrent stream plus spare ones, and health checks
on a pool of their own, so /ping never queues behind streams or slow clients; the engine process does the heavy
work, workers only do HTTP, JSON and tokenization.
"""

from __future__ import annotations

from typing import Any

worker_class = "container.gunicorn_worker.ProbeFirstWorker"
timeout = 300  # gthread's main loop heartbeats between polls: this bounds a hung worker, not a long stream
graceful_timeout = 10  # on SIGTERM; the launcher has drained the engine before it stops gunicorn
keepalive = 75  # seconds; above the 60 s idle timeout of SageMaker's front end connections
worker_connections = 1000
control_socket_disable = True
accesslog = None


def child_exit(server: Any, worker: Any) -> None:
    """Drop a dead worker's live gauges from the prometheus multiprocess directory."""
    try:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)
    except Exception:  # no multiprocess directory configured: nothing to clean
        pass
