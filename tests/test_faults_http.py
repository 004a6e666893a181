"""Misbehaving OpenAI-compatible servers against both HTTP clients (docs/design.md §6, §9).

A raw-socket stand-in on 127.0.0.1 answers every request with one behaviour: garbage JSON, missing fields,
wrong types, too many tokens, a stop id in the middle, empty choices, HTTP 500 and 401, a hang, a drip-feed,
a connection closed mid-answer. `OpenAIEngine.generate` and `HTTPChat` behind `CachedChat` must each end in
`EngineError` naming the problem within ``(retries + 1) * timeout_s`` plus backoff and a small margin, with
nothing written to the answer cache and the API key in no message or repr.
"""
import hashlib
import json
import socket
import threading
import time

import pytest

from twlib.engines import EngineError, Request
from twlib.engines.openai import OpenAIEngine
from twlib.rewriter.chat import CachedChat, CacheWarning, HTTPChat, cache_key

pytestmark = pytest.mark.faults

KEY = "sk-faults-0123456789abcdef"
MARGIN_S = 1.5  # thread start-up and a busy 2-core machine
BACKOFF_S = 0.05
MESSAGES = [{"role": "user", "content": "hi"}]


# ------------------------------------------------------------------------------- the stand-in
def _read_request(conn: socket.socket) -> dict:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            raise OSError("client went away")
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    headers = dict(line.split(": ", 1) for line in head.decode("latin-1").split("\r\n")[1:])
    headers = {k.lower(): v for k, v in headers.items()}
    while len(body) < int(headers.get("content-length", 0)):
        body += conn.recv(65536)
    return {"headers": headers, "body": json.loads(body or b"{}")}


def _head(status: int, length: int) -> bytes:
    return (f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n"
            "Connection: close\r\n\r\n").encode()


class StandIn:
    """Serves each connection with ``behave(conn, request, stop)`` in its own thread; records requests."""

    def __init__(self, behave):
        self.behave, self.requests, self.stop = behave, [], threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn):
        with conn:
            try:
                request = _read_request(conn)
                self.requests.append(request)
                self.behave(conn, request, self.stop)
            except OSError:
                pass

    def close(self):
        self.stop.set()
        self.sock.close()


def answer(status: int, body) -> callable:
    """A whole answer at once; ``body`` is bytes as is, or anything else as JSON."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()

    def behave(conn, request, stop):
        conn.sendall(_head(status, len(data)) + data)
    return behave


def echo_auth(status: int) -> callable:
    """An error body that echoes the Authorization header, as careless proxies do."""
    def behave(conn, request, stop):
        data = json.dumps({"error": f"bad credentials: {request['headers'].get('authorization')}"}).encode()
        conn.sendall(_head(status, len(data)) + data)
    return behave


def hang(conn, request, stop):
    stop.wait(30)


def drip(conn, request, stop):
    """Headers, then one byte of a 100-byte body every 2 s."""
    conn.sendall(_head(200, 100))
    while not stop.wait(2):
        conn.sendall(b" ")


def drip_headers(conn, request, stop):
    """The status line, then one header byte every 0.3 s: headers that never end."""
    conn.sendall(b"HTTP/1.1 200 OK\r\n")
    while not stop.wait(0.3):
        conn.sendall(b"X")


def close_mid_answer(conn, request, stop):
    conn.sendall(_head(200, 400) + b'{"choices": [{"tok')


@pytest.fixture
def serve():
    servers = []

    def start(behave):
        servers.append(StandIn(behave))
        return servers[-1]
    yield start
    for s in servers:
        s.close()


# ------------------------------------------------------------------------------------ the cases
def _ids(ids, reason="stop"):
    return {"choices": [{"token_ids": ids, "finish_reason": reason, "text": ""}]}


def _chat(content, **extra):
    return {"choices": [{"message": {"role": "assistant", "content": content}, "finish_reason": "stop"}], **extra}


# (name, behaviour, timeout_s, retries, what the error must say); each case is given to both clients where it applies.
COMMON = [
    ("garbage_json", answer(200, b'{"choices": [{"tok'), 1.0, 1, r"2 tries; last cause: the answer is not JSON"),
    ("not_an_object", answer(200, [1, 2]), 1.0, 1, r"malformed answer: the answer must be a JSON object, got list"),
    ("missing_choices", answer(200, {"id": "x"}), 1.0, 1, r"malformed answer: the answer has no choices"),
    ("empty_choices", answer(200, {"choices": []}), 1.0, 1, r"malformed answer: the answer has no choices \(got \[\]\)"),
    ("http_500", answer(500, {"error": "engine dead"}), 1.0, 1, r"2 tries; last cause: HTTP 500.*engine dead"),
    ("http_401", echo_auth(401), 1.0, 1, r"rejected the request \(HTTP 401\).*bad credentials: Bearer <api key>"),
    ("hang", hang, 1.0, 1, r"2 tries; last cause: timed out after 1 s"),
    ("drip_body", drip, 3.0, 0, r"1 tries; last cause: timed out after 3 s"),
    ("drip_headers", drip_headers, 1.5, 0, r"1 tries; last cause: timed out after 1.5 s"),
    ("closed_mid_answer", close_mid_answer, 1.0, 1, r"2 tries; last cause: cannot reach the server or the answer broke off"),
]
ENGINE = COMMON + [
    ("no_token_ids", answer(200, {"choices": [{"text": "x", "finish_reason": "stop"}]}), 1.0, 1, r"return_token_ids"),
    ("string_token_ids", answer(200, _ids(["5", "9"])), 1.0, 1, r"token_ids must be a list of non-negative ints"),
    ("choice_not_object", answer(200, {"choices": ["x"]}), 1.0, 1, r"choices\[0\] must be an object, got str"),
    ("too_many_tokens", answer(200, _ids([5, 6, 7, 8, 9, 9])), 1.0, 1, r"6 tokens for max_tokens=4"),
    ("stop_in_the_middle", answer(200, _ids([5, 9, 6])), 1.0, 1, r"goes on after stop id 9 at position 1 of 3"),
    ("eos_in_the_middle", answer(200, _ids([2, 5], "length")), 1.0, 1, r"goes on after EOS id 2 at position 0"),
    ("unknown_finish_reason", answer(200, _ids([5], "error")), 1.0, 1, r"finish_reason must be 'stop' or 'length'"),
]
CHAT = COMMON + [
    ("no_message", answer(200, {"choices": [{"finish_reason": "stop"}]}), 1.0, 1, r"choices\[0\]\.message must be"),
    ("integer_content", answer(200, _chat(42)), 1.0, 1, r"content is int, not a string"),
    ("lone_surrogate", answer(200, b'{"choices": [{"message": {"content": "ok \\ud800"}}]}'), 1.0, 1,
     r"content is not valid Unicode \(lone surrogate"),
    ("too_many_tokens", answer(200, _chat("x", usage={"completion_tokens": 9})), 1.0, 1,
     r"usage.completion_tokens is 9 for max_tokens=8"),
]


def _bound(timeout_s: float, retries: int) -> float:
    return (retries + 1) * timeout_s + sum(BACKOFF_S * 2 ** k for k in range(retries)) + MARGIN_S


def _files(folder):
    return sorted((p.relative_to(folder), p.read_bytes()) for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("name, behave, timeout_s, retries, message", ENGINE, ids=[c[0] for c in ENGINE])
def test_openai_engine_fails_fast_and_named(serve, name, behave, timeout_s, retries, message):
    server = serve(behave)
    engine = OpenAIEngine(server.url, "tiny", eos_token_id=2, timeout_s=timeout_s, retries=retries,
                          backoff_s=BACKOFF_S, api_key=KEY)
    start = time.monotonic()
    with pytest.raises(EngineError, match=message) as err:
        engine.generate([Request((1, 2), 4, stop_ids=(9,))])
    elapsed = time.monotonic() - start
    engine.close()
    print(f"OpenAIEngine {name}: {elapsed:.2f} s")
    assert elapsed < _bound(timeout_s, retries), f"{name} took {elapsed:.1f} s"
    assert server.url in str(err.value) and KEY not in str(err.value) and KEY not in repr(engine)
    assert server.requests and all(r["headers"]["authorization"] == f"Bearer {KEY}" for r in server.requests)


@pytest.mark.parametrize("name, behave, timeout_s, retries, message", CHAT, ids=[c[0] for c in CHAT])
def test_http_chat_fails_fast_named_and_uncached(serve, tmp_path, name, behave, timeout_s, retries, message):
    server = serve(behave)
    client = HTTPChat(server.url, "m", api_key=KEY, timeout_s=timeout_s, retries=retries, backoff_s=BACKOFF_S)
    llm = CachedChat(client, tmp_path / "cache")
    llm.store(cache_key(llm.model_id, MESSAGES, 8, 0.5), MESSAGES, 8, 0.5, "an older answer")
    before = _files(tmp_path / "cache")
    start = time.monotonic()
    with pytest.raises(EngineError, match=message) as err:
        llm.chat(MESSAGES, 8, 0.0)
    elapsed = time.monotonic() - start
    client.close()
    print(f"HTTPChat {name}: {elapsed:.2f} s")
    assert elapsed < _bound(timeout_s, retries), f"{name} took {elapsed:.1f} s"
    assert client.url in str(err.value) and KEY not in str(err.value) and KEY not in repr(client)
    assert _files(tmp_path / "cache") == before and (llm.calls, llm.hits) == (1, 0)


def test_4xx_and_malformed_answers_are_not_retried(serve):
    for behave in (echo_auth(401), answer(200, _ids([5, 6, 7, 8, 9]))):
        server = serve(behave)
        engine = OpenAIEngine(server.url, "tiny", eos_token_id=2, timeout_s=1.0, retries=3, backoff_s=BACKOFF_S)
        with pytest.raises(EngineError):
            engine.generate([Request((1,), 4)])
        assert len(server.requests) == 1


# ------------------------------------------------------------------------------------- the cache
def test_a_corrupt_cache_entry_is_reported_and_asked_again(serve, tmp_path):
    server = serve(answer(200, _chat("fresh")))
    llm = CachedChat(HTTPChat(server.url, "m", timeout_s=2.0, retries=0), tmp_path)
    path = llm.path(cache_key(llm.model_id, MESSAGES, 8, 0.0))
    for bad in (b"{", b"\xff\xfe not utf-8", b'{"response": 42}', b'{"response": "x \\ud800"}', b"[1]"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bad)
        with pytest.warns(CacheWarning, match=f"LLM cache file {path} is unusable"):
            assert llm.chat(MESSAGES, 8, 0.0) == "fresh"
        assert json.loads(path.read_text(encoding="utf-8"))["response"] == "fresh"  # replaced by the new answer
    assert (llm.calls, llm.hits, llm.corrupt, len(server.requests)) == (5, 0, 5, 5)
    assert llm.chat(MESSAGES, 8, 0.0) == "fresh" and llm.hits == 1 and len(server.requests) == 5
    assert llm.counters()["cache_corrupt"] == 5


def test_bad_answers_of_any_client_are_never_cached(tmp_path):
    class Bad:
        model_id = "bad"

        def __init__(self, reply):
            self.reply = reply

        def chat(self, messages, max_tokens, temperature):
            return self.reply

    for reply in (42, None, "x\ud800"):
        llm = CachedChat(Bad(reply), tmp_path)
        with pytest.raises(EngineError, match="was not cached"):
            llm.chat(MESSAGES, 8, 0.0)
    assert not any(tmp_path.rglob("*.json"))


def test_cache_keys_take_any_text():
    odd = [{"role": "user", "content": "\ud800 \udfff \x00 é"}]
    assert cache_key("m", odd, 8, 0.0) != cache_key("m", MESSAGES, 8, 0.0)
    # Valid text keys as it always did (plain UTF-8), so existing caches stay valid.
    valid = [{"role": "user", "content": "é 日本"}]
    payload = {"model": "m", "messages": valid, "max_tokens": 8, "temperature": 0.0}
    old = hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    assert cache_key("m", valid, 8, 0.0) == old
