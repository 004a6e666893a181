"""The stage-1 API key is read from the environment and written nowhere (docs/design.md §10).

Notebook 01b runs through the real pipeline against a stand-in ``/v1/chat/completions`` server that checks
the bearer token and echoes it in its 401 answers (as careless proxies do). The key is rotated in the middle
of the run: the first run fails, the second resumes with the new key and no ``--force``, from the cache.
Afterwards no file under the output root and no line the pipeline printed holds either key.
"""
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from twlib import config
from twlib.rewriter import sources

pytestmark = pytest.mark.faults

ROOT = Path(__file__).resolve().parents[1]
VAR = "TWLIB_FAULTS_SECRET_KEY"
OLD_KEY, NEW_KEY = "sk-old-3f9c0e11d2a84b7b9d1e5a6c", "sk-new-b81d4f0a7c2e4e7f8a9b0c1d"


class ChatStandIn:
    """Answers chat requests bearing ``Bearer <key>`` with prose (so stage 1 retries, then rejects); any
    other token gets a 401 echoing it. After ``revoke_after`` good answers the key stops working."""

    def __init__(self, key: str, revoke_after: int):
        self.key, self.revoke_after, self.answered, self.refused = key, revoke_after, 0, 0
        self.lock = threading.Lock()
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                status, body = stand_in.reply(self.headers.get("Authorization", ""))
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def reply(self, auth: str) -> tuple[int, dict]:
        with self.lock:
            if auth == f"Bearer {self.key}" and self.answered < self.revoke_after:
                self.answered += 1
                return 200, {"choices": [{"message": {"role": "assistant", "content": "Sure, here are the steps."},
                                          "finish_reason": "stop"}]}
            self.refused += 1
            return 401, {"error": {"message": f"invalid credentials: {auth}"}}


def _params(tmp_path: Path, url: str) -> Path:
    spec = yaml.safe_load((ROOT / "params" / "smoke.yaml").read_text())
    spec["output_root"] = str(tmp_path / "outputs")
    spec["01b_rewriting"].update(llm_engine="endpoint", llm_model="stand-in", llm_base_url=url, llm_api_key_env=VAR,
                                 llm_timeout_s=10.0, llm_retries=0, n_traces=2, max_retries=1)
    path = tmp_path / "params" / "smoke.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(spec))
    return path


def _pipeline(params: Path, key: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != VAR} | {VAR: key}
    return subprocess.run([sys.executable, "-m", "twlib.pipeline", str(params), "--stages", "01_trajectories,01b_rewriting"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def _holders(folder: Path, *needles: str) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.is_file() and any(n.encode() in p.read_bytes() for n in needles)]


@pytest.mark.notebooks
def test_the_key_is_written_nowhere_and_rotating_it_resumes(tmp_path):
    server = ChatStandIn(OLD_KEY, revoke_after=2)  # step 1 of both traces, then the key is revoked
    params = _params(tmp_path, server.url)
    try:
        first = _pipeline(params, OLD_KEY)
        assert first.returncode == 1, first.stdout + first.stderr
        assert "HTTP 401" in first.stderr and "<api key>" in first.stderr  # the echoed key was redacted
        server.key, server.revoke_after = NEW_KEY, 100  # rotated: same variable, new value, no --force
        second = _pipeline(params, NEW_KEY)
    finally:
        server.server.shutdown()
    assert second.returncode == 0, second.stdout + second.stderr
    stage = tmp_path / "outputs" / "smoke" / "01b_rewriting"
    metrics = json.loads((stage / "metrics.json").read_text())
    report = metrics["metrics"]["report"]
    # The two first answers came from the cache; only the two retries were paid for again.
    assert (report["cache_hits"], report["llm_calls"], server.answered) == (2, 2, 4)
    assert metrics["params"]["llm_api_key_env"] == VAR and (stage / "01b_rewriting.failed.ipynb").exists()
    assert (stage / "01b_rewriting.ipynb").exists() and any((stage / "stage1" / "llm_cache").rglob("*.json"))
    assert _holders(tmp_path / "outputs", OLD_KEY, NEW_KEY) == []
    for out in (first.stdout, first.stderr, second.stdout, second.stderr):
        assert OLD_KEY not in out and NEW_KEY not in out


# --------------------------------------------------------------------------------- configuration
@pytest.mark.parametrize("value, what", [
    ("sk-proj-AbCdEf0123456789", "looks like an API key"),
    ("hf_AbCdEfGhIjKlMnOpQrStUvWxYz012345", "looks like an API key"),
    ("X" * 80, "looks like an API key"),
    ("Bearer abc.def", "is not an environment variable name"),
    ("MY-KEY", "is not an environment variable name"),
])
def test_a_key_in_place_of_the_variable_name_is_refused_unrepeated(value, what):
    with pytest.raises(config.ConfigError, match=f"'llm_api_key_env' {what}") as err:
        config.RewritingConfig.from_dict({"profile": "p", "llm_api_key_env": value})
    assert value not in str(err.value) and "OPENAI_API_KEY" in str(err.value)


@pytest.mark.parametrize("bad", [{"llm_timeout_s": 0.0}, {"llm_timeout_s": -1}, {"llm_timeout_s": float("inf")},
                                 {"llm_retries": -1}, {"llm_retries": 11}])
def test_timeout_and_retries_are_checked(bad):
    with pytest.raises(config.ConfigError, match=f"'{next(iter(bad))}'"):
        config.RewritingConfig.from_dict({"profile": "p", **bad})


def test_the_key_is_read_from_the_named_variable_at_build_time(monkeypatch):
    cfg = config.RewritingConfig.from_dict({"profile": "p", "llm_engine": "endpoint", "llm_base_url": "http://127.0.0.1:9",
                                            "llm_api_key_env": VAR, "llm_timeout_s": 7.5, "llm_retries": 1})
    assert "llm_api_key" not in cfg.to_dict()  # only the variable's name is a parameter
    monkeypatch.delenv(VAR, raising=False)
    with pytest.raises(config.ConfigError, match=f"environment variable {VAR}, which is not set"):
        sources.make_llm(cfg, run=None)
    monkeypatch.setenv(VAR, "")
    with pytest.raises(config.ConfigError, match=f"environment variable {VAR}, which is empty"):
        sources.make_llm(cfg, run=None)
    monkeypatch.setenv(VAR, OLD_KEY)
    llm = sources.make_llm(cfg, run=None)
    try:
        assert llm.client.headers["Authorization"] == f"Bearer {OLD_KEY}" and (llm.timeout_s, llm.retries) == (7.5, 1)
        assert OLD_KEY not in repr(llm) and OLD_KEY not in llm.model_id and "api_key=set" in repr(llm)
    finally:
        llm.close()
