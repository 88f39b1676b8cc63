"""``server.workers: N``: N serving processes sharing one port, supervised.

One Python process uses one core. Each worker binds the listening port with
``SO_REUSEPORT``, so the kernel spreads connections over them. A unix socket
(``server.unix_socket``) cannot be bound twice: the supervisor binds it and hands
each worker the listening socket (they all accept on it), and removes the file at
exit. The supervisor restarts a worker that dies (with a back-off, so a worker that
cannot start does not spin), forwards SIGHUP (config reload) and drains them all on
SIGTERM.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import socket
import time
from multiprocessing.process import BaseProcess
from types import FrameType

import structlog
from cryptography.hazmat.primitives import serialization

from gateway import logs
from gateway.assertion import AssertionKeyError, load_or_generate_key
from gateway.model import Config
from gateway.sockets import bind_unix_socket, remove_unix_socket

log = structlog.get_logger("gateway.workers")

CONFIG_ERROR_EXIT = 78  # EX_CONFIG (sysexits.h): the worker cannot load its config
# A worker that dies sooner than this after starting counts as a failed start and
# waits before the next try, doubling up to the cap.
FAILED_START_WINDOW_S = 10.0
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
POLL_S = 0.2


def _worker(
    config_path: str, key_pem: bytes, index: int, unix_socket: socket.socket | None = None
) -> None:
    """Entry point of one worker process (spawned: a fresh interpreter; ``unix_socket``
    arrives as a copy of the supervisor's descriptor)."""
    from gateway.config import load_config
    from gateway.errors import ConfigError
    from gateway.server import run_one

    try:
        config = load_config(config_path)
    except ConfigError as exc:
        logs.configure()
        log.error("worker_config_invalid", worker=index, problems=[str(p) for p in exc.problems])
        raise SystemExit(CONFIG_ERROR_EXIT) from None
    key = serialization.load_pem_private_key(key_pem, password=None)
    raise SystemExit(run_one(config, config_path, key, unix_socket))  # type: ignore[arg-type]


class Supervisor:
    def __init__(self, config: Config, config_path: str, key_pem: bytes) -> None:
        self.config = config
        self.config_path = config_path
        self.key_pem = key_pem
        self.context = multiprocessing.get_context("spawn")
        count = config.server.workers
        self.procs: list[BaseProcess | None] = [None] * count
        self.started_at = [0.0] * count
        self.failures = [0] * count
        self.restart_at = [0.0] * count
        self.stopping = False
        self.unix_socket: socket.socket | None = None  # server.unix_socket, for every worker

    def start(self, index: int) -> None:
        proc = self.context.Process(
            target=_worker,
            args=(self.config_path, self.key_pem, index, self.unix_socket),
            name=f"stepup-gateway-worker-{index}",
        )
        proc.start()
        self.procs[index] = proc
        self.started_at[index] = time.monotonic()
        log.info("worker_started", worker=index, worker_pid=proc.pid)

    def check(self) -> None:
        now = time.monotonic()
        for index, proc in enumerate(self.procs):
            if proc is not None and proc.is_alive():
                if now - self.started_at[index] > FAILED_START_WINDOW_S:
                    self.failures[index] = 0
                continue
            if proc is not None:
                quick = now - self.started_at[index] < FAILED_START_WINDOW_S
                self.failures[index] = self.failures[index] + 1 if quick else 0
                delay = (
                    min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (self.failures[index] - 1))
                    if self.failures[index]
                    else 0.0
                )
                log.error(
                    "worker_died",
                    worker=index,
                    worker_pid=proc.pid,
                    exitcode=proc.exitcode,
                    restart_in_s=delay,
                )
                self.procs[index] = None
                self.restart_at[index] = now + delay
            if now >= self.restart_at[index]:
                self.start(index)

    def signal_all(self, sig: signal.Signals) -> None:
        for proc in self.procs:
            if proc is not None and proc.is_alive() and proc.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, sig)

    def drain(self) -> None:
        log.info("workers_draining", shutdown_timeout_s=self.config.server.shutdown_timeout_s)
        self.signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self.config.server.shutdown_timeout_s + 5
        for proc in self.procs:
            if proc is None:
                continue
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                log.error("worker_killed", worker_pid=proc.pid)
                proc.kill()
                proc.join(5)

    def run(self) -> int:
        def on_stop(signum: int, frame: FrameType | None) -> None:
            self.stopping = True

        def on_hup(signum: int, frame: FrameType | None) -> None:
            self.signal_all(signal.SIGHUP)

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_hup)
        unix_file: tuple[str, int] | None = None
        if self.config.server.unix_socket is not None:
            try:
                self.unix_socket, unix_file = bind_unix_socket(self.config.server)
            except OSError as exc:
                log.error("listen_failed", error=str(exc))
                return 1
        log.info("supervisor_started", workers=len(self.procs), pid=os.getpid())
        try:
            for index in range(len(self.procs)):
                self.start(index)
            while not self.stopping:
                time.sleep(POLL_S)
                if not self.stopping:
                    self.check()
            self.drain()
        finally:
            if self.unix_socket is not None:
                self.unix_socket.close()
            if unix_file is not None:
                remove_unix_socket(*unix_file)
        log.info("supervisor_stopped")
        return 0


def supervise(config: Config, config_path: str | None) -> int:
    """Run ``config.server.workers`` workers until SIGTERM; the exit status."""
    logs.configure(config.server.log_level)
    if config_path is None:
        log.error("workers_need_a_config_file")
        return 1
    try:
        key, generated = load_or_generate_key(config.assertion.key_file)
    except AssertionKeyError as exc:
        log.error("assertion_key_error", error=str(exc))
        return 1
    if generated:
        # One key for all of this process's workers, so the JWKS they publish agree.
        # Replicas still differ: set assertion.key_file in production.
        log.warning(
            "assertion_key_generated",
            hint="set assertion.key_file so every replica and restart signs with one key",
        )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return Supervisor(config, config_path, key_pem).run()
