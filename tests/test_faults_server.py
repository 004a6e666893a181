"""`VLLMServer` leaves no process and no stray log behind: failed, timed-out and interrupted starts, Ctrl-C twice.

The fast tests run a fake server (a Python leader that spawns a grandchild, so the group outlives its
leader the way vLLM's EngineCore and worker do); the slow ones interrupt and stop a real ``vllm serve``.
"""
import importlib.util
import os
import signal
import subprocess
import sys
import textwrap
import time

import httpx
import pytest

from twlib import models
from twlib.engines.server import ServerStartError, VLLMServer
from twlib.tokenizer import build_char_tokenizer

pytestmark = [pytest.mark.faults, pytest.mark.engines]
NEEDS_VLLM = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")

# argv: PIDFILE MODE. The grandchild writes PIDFILE once it is set up. Modes: "plain" (both end on
# SIGTERM), "stubborn-child" (the grandchild ignores SIGTERM, so it outlives the leader), "stubborn"
# (both ignore it), "exit" (print a line and exit 3, like a server that cannot load its model).
FAKE_SERVER = textwrap.dedent('''
    import signal, subprocess, sys, time
    pidfile, mode = sys.argv[1], sys.argv[2]
    if mode == "exit":
        print("boom: no model here", flush=True)
        sys.exit(3)
    if mode == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    ignore = "signal.signal(signal.SIGTERM, signal.SIG_IGN)" if mode.startswith("stubborn") else "pass"
    subprocess.Popen([sys.executable, "-c", f"import os, pathlib, signal, time; {ignore}; "
                      f"pathlib.Path({pidfile!r}).write_text(str(os.getpid())); time.sleep(600)"])
    time.sleep(600)
''')


def fake_command(*args, **kwargs):
    return ["-c", FAKE_SERVER]


def fake_server(tmp_path, monkeypatch, mode: str, **kwargs) -> VLLMServer:
    """A `VLLMServer` whose command is FAKE_SERVER; it never answers /health unless a test says so."""
    monkeypatch.setattr(VLLMServer, "command", staticmethod(fake_command))
    server = VLLMServer("no-model", extra_args=(str(tmp_path / "grandchild.pid"), mode), **kwargs)
    server.ABORT_GRACE_S = 0.5
    return server


def wait_for(path, timeout_s: float = 30.0) -> int:
    deadline = time.monotonic() + timeout_s
    while not (path.exists() and path.read_text()):
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)
    return int(path.read_text())


def group_members(pgid: int) -> list[tuple[int, str, str]]:
    """(pid, state, name) of every process in group ``pgid``, read from /proc."""
    members = []
    for entry in os.listdir("/proc"):
        try:
            stat = open(f"/proc/{entry}/stat").read() if entry.isdigit() else ""
        except OSError:  # the process ended meanwhile
            continue
        if stat:
            name, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
            if int(rest[2]) == pgid:
                members.append((int(entry), rest[0], name))
    return members


def seconds_until_gone(pgid: int, timeout_s: float = 10.0) -> float:
    """Seconds until ``os.killpg(pgid, 0)`` raises ProcessLookupError; fails after ``timeout_s``."""
    start = time.monotonic()
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return time.monotonic() - start
        assert time.monotonic() - start < timeout_s, f"group {pgid} still has {group_members(pgid)}"
        time.sleep(0.02)


def assert_gone(pgid: int, *pids: int) -> None:
    """Nothing of the group is left: no process, not even a zombie (init reaps orphans within seconds)."""
    seconds_until_gone(pgid)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_keyboard_interrupt_while_waiting_ends_the_group_and_removes_the_log(tmp_path, monkeypatch):
    server = fake_server(tmp_path, monkeypatch, "plain")
    pidfile = tmp_path / "grandchild.pid"

    def interrupted_health_check():
        if pidfile.exists():  # the whole group is up: leader and grandchild
            raise KeyboardInterrupt
        return False

    server._healthy = interrupted_health_check
    with pytest.raises(KeyboardInterrupt):
        server.start()
    assert server.log_path.name.startswith("vllm-serve-") and not server.log_path.exists()
    assert_gone(server.process.pid, int(pidfile.read_text()))


@pytest.mark.parametrize("how", ["temporary", "keep_log", "log_path"])
def test_a_server_that_exits_while_starting_shows_its_log_and_removes_it_unless_kept(tmp_path, monkeypatch, how):
    kwargs = {"temporary": {}, "keep_log": {"keep_log": True}, "log_path": {"log_path": tmp_path / "mine.log"}}[how]
    server = fake_server(tmp_path, monkeypatch, "exit", **kwargs)
    with pytest.raises(ServerStartError, match="exited with code 3 while starting") as error:
        server.start()
    assert "boom: no model here" in str(error.value)
    kept = how != "temporary"
    assert server.log_path.exists() == kept
    assert (f"full log: {server.log_path}" in str(error.value)) == kept  # where the log is, only if it is there
    if how == "log_path":
        assert server.log_path == tmp_path / "mine.log"
    server.log_path.unlink(missing_ok=True)
    assert_gone(server.process.pid)


def test_a_timeout_kills_a_group_that_ignores_sigterm(tmp_path, monkeypatch):
    server = fake_server(tmp_path, monkeypatch, "stubborn", startup_timeout_s=1.0)
    start = time.monotonic()
    with pytest.raises(ServerStartError, match="did not answer /health within 1 s"):
        server.start()
    assert time.monotonic() - start < 1.0 + server.ABORT_GRACE_S + 5.0  # SIGKILL after a short grace
    assert not server.log_path.exists()
    assert_gone(server.process.pid, int((tmp_path / "grandchild.pid").read_text()))


@pytest.mark.parametrize("keep_log", [False, True])
def test_stop_is_idempotent_and_ends_a_grandchild_that_outlives_the_leader(tmp_path, monkeypatch, keep_log):
    server = fake_server(tmp_path, monkeypatch, "stubborn-child", keep_log=keep_log)
    pidfile = tmp_path / "grandchild.pid"
    server._healthy = pidfile.exists
    server.start()
    assert server.log_path.exists()
    pgid, grandchild = server.pgid, int(pidfile.read_text())
    server.stop(grace_s=0.5)
    assert server.pgid is None and server.process.returncode == -signal.SIGTERM  # the leader went on SIGTERM
    assert_gone(pgid, grandchild)  # the grandchild ignored it: SIGKILL after the grace
    assert server.log_path.exists() == keep_log
    server.stop()
    server.kill()
    server.log_path.unlink(missing_ok=True)


# Runs VLLMServer in a child process and prints its group once the server process exists, so that a
# test can press "Ctrl-C" (SIGINT to the child) while the server starts. argv: MODEL, or PIDFILE fake SOURCE.
INTERRUPTED_START = textwrap.dedent('''
    import os, sys, threading, time
    from twlib.engines.server import VLLMServer

    if __name__ == "__main__":
        if sys.argv[2:3] == ["fake"]:  # a group that ignores SIGTERM, and a long grace: only a second Ctrl-C ends it soon
            VLLMServer.command = staticmethod(lambda *args, **kwargs: ["-c", sys.argv[3]])
            server = VLLMServer("no-model", extra_args=(sys.argv[1], "stubborn"))
            server.ABORT_GRACE_S = 120.0
        else:
            server = VLLMServer(sys.argv[1], model_name="tiny", max_model_len=1024)

        def report():
            while server.process is None:
                time.sleep(0.01)
            print(f"PGID {os.getpgid(server.process.pid)} LOG {server.log_path} URL {server.url}", flush=True)

        threading.Thread(target=report, daemon=True).start()
        server.start()
        print("STARTED", flush=True)
        server.stop()
''')


def start_child(tmp_path, *args: str) -> tuple[subprocess.Popen, int, str, str]:
    """The child running INTERRUPTED_START, its server's process group, log path and URL."""
    script = tmp_path / "interrupted_start.py"
    script.write_text(INTERRUPTED_START)
    child = subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    line = child.stdout.readline()
    assert line.startswith("PGID "), child.communicate()[1][-4000:]
    _, pgid, _, log, _, url = line.split()
    return child, int(pgid), log, url


def end_child(child: subprocess.Popen, pgid: int) -> None:
    """After a failed check: end the child and its server's group, so that no test leaks them."""
    if child.poll() is None:
        child.kill()
        child.wait()
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_a_second_ctrl_c_during_the_cleanup_hurries_it_and_still_ends_the_group(tmp_path):
    pidfile = tmp_path / "grandchild.pid"
    child, pgid, log, _ = start_child(tmp_path, str(pidfile), "fake", FAKE_SERVER)
    try:
        grandchild = wait_for(pidfile)
        child.send_signal(signal.SIGINT)
        time.sleep(1.0)  # the cleanup now waits out a 120 s SIGTERM grace the group ignores
        assert child.poll() is None and len(group_members(pgid)) == 2
        start = time.monotonic()
        child.send_signal(signal.SIGINT)
        stdout, stderr = child.communicate(timeout=60)
        assert time.monotonic() - start < 10.0, "the second Ctrl-C did not cut the grace short"
        assert_gone(pgid, grandchild)
    finally:
        end_child(child, pgid)
    assert child.returncode != 0 and "KeyboardInterrupt" in stderr and "STARTED" not in stdout
    assert not os.path.exists(log)
    assert_gone(pgid, grandchild)
    assert not os.path.exists(log)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    tok = build_char_tokenizer()
    spec = models.TinyModelSpec(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128)
    return models.save_model(models.build_tiny_model(tok, spec, seed=0), tok, tmp_path_factory.mktemp("tiny") / "model")


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1.0).status_code == 200
    except httpx.TransportError:
        return False


@NEEDS_VLLM
def test_ctrl_c_while_vllm_serve_starts_leaves_no_process_and_no_log(tiny_model, tmp_path):
    child, pgid, log, url = start_child(tmp_path, str(tiny_model))
    try:
        # Interrupt once the worker exists (API server, resource tracker, EngineCore, worker): the
        # processes that were left running, re-parented to PID 1, before start() ended its group.
        deadline = time.monotonic() + 240
        while len(group_members(pgid)) < 4:
            assert child.poll() is None and not healthy(url) and time.monotonic() < deadline, group_members(pgid)
            time.sleep(0.2)
        assert not healthy(url), "vllm serve answered /health before the test could interrupt its start"
        print(f"\ninterrupting vllm serve's start with group {group_members(pgid)}")
        start = time.monotonic()
        child.send_signal(signal.SIGINT)
        stderr = child.communicate(timeout=60)[1]
        elapsed = time.monotonic() - start
        elapsed += seconds_until_gone(pgid)
    finally:
        end_child(child, pgid)
    print(f"SIGINT -> no process of vllm serve's group left: {elapsed:.2f} s")
    assert elapsed < VLLMServer.ABORT_GRACE_S + 10.0
    assert "KeyboardInterrupt" in stderr and not os.path.exists(log)


@NEEDS_VLLM
def test_vllm_serve_stops_with_its_engine_and_worker_and_its_log_goes(tiny_model):
    with VLLMServer(tiny_model, model_name="tiny", max_model_len=1024) as server:
        pgid, log = server.pgid, server.log_path
        assert healthy(server.url) and log.exists()
        assert len(group_members(pgid)) >= 3, group_members(pgid)  # the API server spawned the engine
    assert_gone(pgid)
    assert not log.exists() and not healthy(server.url)
