"""OpenAIEngine against a stand-in HTTP server: 5xx answers are retried, a silent server times out, 4xx is final."""
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from twlib.engines import EngineError, Request
from twlib.engines.openai import OpenAIEngine


class Script:
    """What the stand-in answers: a list of (status, body or None to stay silent), consumed in order."""

    def __init__(self, answers):
        self.answers, self.bodies = list(answers), []


def _serve(script: Script):
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            script.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            status, body = script.answers.pop(0) if script.answers else (200, None)
            if body is None:
                time.sleep(3)  # longer than the client's timeout
                return
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def stand_in():
    servers = []

    def start(answers):
        script = Script(answers)
        servers.append(_serve(script))
        return f"http://127.0.0.1:{servers[-1].server_address[1]}", script
    yield start
    for s in servers:
        s.shutdown()


def _ok(ids, reason="stop"):
    return 200, {"choices": [{"token_ids": ids, "finish_reason": reason}]}


def test_5xx_is_retried_then_succeeds(stand_in):
    url, script = stand_in([(500, {"error": "busy"}), (503, {"error": "busy"}), _ok([5, 9])])
    engine = OpenAIEngine(url, "tiny", eos_token_id=2, retries=3, backoff_s=0.01)
    (c,) = engine.generate([Request((1, 2, 3), 8, stop_ids=(9,))])
    assert c.ids == (5, 9) and c.finish_reason == "stop" and len(script.bodies) == 3
    body = script.bodies[-1]
    assert body["prompt"] == [1, 2, 3] and body["stop_token_ids"] == [9] and body["return_token_ids"] is True
    assert body["max_tokens"] == 8 and body["temperature"] == 0.0


def test_persistent_5xx_names_the_cause(stand_in):
    url, _ = stand_in([(500, {"error": "engine dead"})] * 3)
    engine = OpenAIEngine(url, "tiny", eos_token_id=2, retries=2, backoff_s=0.01)
    with pytest.raises(EngineError, match="3 tries; last cause: HTTP 500"):
        engine.generate([Request((1,), 4)])


def test_a_silent_server_times_out(stand_in):
    url, _ = stand_in([(200, None), (200, None)])
    engine = OpenAIEngine(url, "tiny", eos_token_id=2, timeout_s=0.5, retries=1, backoff_s=0.01)
    start = time.monotonic()
    with pytest.raises(EngineError, match="timed out"):
        engine.generate([Request((1,), 4)])
    assert time.monotonic() - start < 5


def test_4xx_is_not_retried(stand_in):
    url, script = stand_in([(400, {"error": "prompt too long"})])
    engine = OpenAIEngine(url, "tiny", eos_token_id=2, retries=3, backoff_s=0.01)
    with pytest.raises(EngineError, match="HTTP 400.*prompt too long"):
        engine.generate([Request((1,), 4)])
    assert len(script.bodies) == 1


def test_aborted_generation_is_retried_and_order_is_kept(stand_in):
    url, _ = stand_in([_ok([7], "abort"), _ok([4, 2], "stop"), _ok([6], "length")])
    engine = OpenAIEngine(url, "tiny", eos_token_id=2, retries=2, backoff_s=0.01, concurrency=1)
    got = engine.generate([Request((1,), 4), Request((2,), 1)])
    assert [(c.ids, c.finish_reason) for c in got] == [((4, 2), "eos"), ((6,), "length")]
