"""`OpenAIEngine`: ``/v1/completions`` of any OpenAI-compatible server (``vllm serve``, SGLang) in token ids.

Prompts go out as token-id lists and completions come back as ids (``return_token_ids``), so the
orchestrator never re-tokenises text (docs/design.md §6). Requests of one batch run concurrently (at most
``concurrency`` at a time) over one shared HTTP client, so the server can batch the threads of a block
and reuse their common prefix. `OpenAIEngine.session` completes requests one at a time as awaitables over
the same client, at most ``concurrency`` in flight: what the orchestrator's event-driven schedule uses, so
each problem moves on as soon as its own requests return. A completion carries the prompt tokens the
server took from its prefix cache (`cached_tokens`) when the server reports them.

**Every request attempt has a wall-clock deadline** of ``timeout_s`` covering connect, send and every read:
a server that accepts and never answers, or drips one byte every few seconds, costs ``timeout_s`` per
attempt, never more (`http_client` caps each socket operation by the time left). Timeouts, dropped
connections, 429/5xx answers, aborted generations and bodies that are not JSON are retried with
exponential backoff, each attempt with its own deadline, so one request costs at most
``(retries + 1) * timeout_s`` plus the backoff; then `EngineError` names the URL and the cause.

**A completion is checked before it is returned** (`completion_from`); a malformed one is an `EngineError`
naming what was wrong, never a retry (the same server would answer the same way):

- the body is a JSON object with a non-empty ``choices`` list of objects;
- ``token_ids`` is a list of non-negative ints (missing: the server lacks ``return_token_ids``);
- ``finish_reason``, when given, is ``stop`` or ``length`` (``abort`` is retried);
- at most ``max_tokens`` ids, and no stop id or EOS before the last position (generation ends there).

``finish_reason: length`` with fewer ids than ``max_tokens`` is accepted: vLLM shortens a request whose
prompt plus ``max_tokens`` exceeds the model length, and the orchestrator's own context cap
(``OrchestratorConfig.max_context``) may be larger than the server's. The returned finish reason is
derived from the ids (`twlib.engines.finish_reason`), as for every engine.

An API key goes into the ``Authorization`` header only: it is in no repr, and `redact` removes it from
every error message, since servers and proxies may echo request headers in their error bodies.
"""
from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator, Sequence

import httpcore
import httpx

from . import Completion, EngineError, Request, finish_reason

# ------------------------------------------------------------------------------- deadlines
_deadlines = threading.local()  # each request runs in its own thread; socket calls happen in that thread


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Within the block, each socket operation of this thread through an `http_client` waits at most the time
    left before ``seconds`` from now; past it, the next one fails at once with a timeout.

    >>> with deadline(5.0):
    ...     0 < _capped(60.0, httpcore.ReadTimeout) <= 5.0
    True
    """
    previous = getattr(_deadlines, "at", None)
    _deadlines.at = time.monotonic() + seconds
    try:
        yield
    finally:
        _deadlines.at = previous


def _capped(timeout: float | None, error: type[Exception]) -> float | None:
    """``timeout`` capped by the time left before this thread's deadline; ``error`` when none is left."""
    at = getattr(_deadlines, "at", None)
    if at is None:
        return timeout
    left = at - time.monotonic()
    if left <= 0:
        raise error("the request's deadline passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    """A socket stream whose reads and writes never outlast the deadline (a read gets min(its timeout, time left))."""

    def __init__(self, stream: httpcore.NetworkStream):
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, _capped(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, _capped(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, ssl_context, server_hostname: str | None = None, timeout: float | None = None):
        return _DeadlineStream(self._stream.start_tls(ssl_context, server_hostname,
                                                      _capped(timeout, httpcore.ConnectTimeout)))

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    """httpcore's blocking sockets, each connection a `_DeadlineStream`."""

    def __init__(self):
        self._backend = httpcore.SyncBackend()

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        return _DeadlineStream(self._backend.connect_tcp(host, port, _capped(timeout, httpcore.ConnectTimeout),
                                                         local_address, socket_options))

    def connect_unix_socket(self, path, timeout=None, socket_options=None):
        return _DeadlineStream(self._backend.connect_unix_socket(path, _capped(timeout, httpcore.ConnectTimeout),
                                                                 socket_options))

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


class _DeadlineTransport(httpx.HTTPTransport):
    """httpx's own transport (exception mapping, streams) over a connection pool of `_DeadlineBackend` sockets."""

    def __init__(self, max_connections: int):
        limits = httpx.Limits(max_connections=max_connections)
        super().__init__(limits=limits)
        # httpx takes no network backend, so its pool is rebuilt with ours (same settings, httpcore's public API).
        if not isinstance(getattr(self, "_pool", None), httpcore.ConnectionPool):
            raise RuntimeError(f"httpx {httpx.__version__} changed HTTPTransport; the request deadline cannot be set")
        self._pool.close()
        self._pool = httpcore.ConnectionPool(ssl_context=httpx.create_ssl_context(), max_connections=max_connections,
                                             max_keepalive_connections=limits.max_keepalive_connections,
                                             keepalive_expiry=limits.keepalive_expiry,
                                             network_backend=_DeadlineBackend())


def http_client(concurrency: int, api_key: str | None = None) -> httpx.Client:
    """An HTTP client whose requests obey `deadline`; ``api_key`` goes into the Authorization header only.

    Proxies from the environment are not used (the clients talk to the URL they are given).
    """
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.Client(transport=_DeadlineTransport(concurrency), headers=headers)


def redact(text: str, client: httpx.Client) -> str:
    """``text`` without the client's API key: a server may echo the Authorization header in an error body.

    >>> redact("bad token Bearer abc123", httpx.Client(headers={"Authorization": "Bearer abc123"}))
    'bad token Bearer <api key>'
    """
    key = client.headers.get("authorization", "").split(" ", 1)[-1].strip()
    return text.replace(key, "<api key>") if key else text


# --------------------------------------------------------------------------------- retries
class Retry(Exception):
    """Raised by a response reader of `post_with_retries`: this answer is worth asking for again."""


class _TryAgain(Exception):
    """Internal: one attempt failed in a way another attempt may fix; the message is the cause."""


def json_object(response: httpx.Response) -> dict:
    """The JSON object of a 2xx body; `Retry` if it is not JSON (a truncated body may be whole next time),
    `EngineError` if it is JSON but no object."""
    try:
        payload = response.json()
    except ValueError:
        raise Retry(f"the answer is not JSON: {response.text[:120]!r}") from None
    if not isinstance(payload, dict):
        raise EngineError(f"the answer must be a JSON object, got {type(payload).__name__}")
    return payload


def first_choice(payload: dict) -> dict:
    """``payload["choices"][0]``, checked: a non-empty list whose first item is an object.

    >>> first_choice({"choices": []})
    Traceback (most recent call last):
    twlib.engines.EngineError: the answer has no choices (got [])
    """
    choices = payload.get("choices")
    if not isinstance(choices, list) or not choices:
        raise EngineError(f"the answer has no choices (got {choices!r:.80})")
    if not isinstance(choices[0], dict):
        raise EngineError(f"choices[0] must be an object, got {type(choices[0]).__name__}")
    return choices[0]


def _attempt(client: httpx.Client, url: str, body: dict, timeout_s: float, read: Callable):
    """One POST within ``timeout_s`` of wall clock, answered by ``read(response)``; `_TryAgain` for what another
    attempt may fix (timeouts, dropped connections, 429/5xx, `Retry`), `EngineError` for what it cannot."""
    try:
        with deadline(timeout_s):
            # Connecting gets 10 s at most, as before: an unreachable host is reported in seconds, not minutes.
            response = client.post(url, json=body, timeout=_timeouts(timeout_s))
    except httpx.RequestError as e:
        raise _transport_failure(e, timeout_s) from None
    return _answer(url, response, read)


def _timeouts(timeout_s: float) -> httpx.Timeout:
    return httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0))


def _transport_failure(e: httpx.RequestError, timeout_s: float) -> _TryAgain:
    """A failed send or read, named; always worth another attempt."""
    if isinstance(e, httpx.ConnectTimeout):
        return _TryAgain(f"timed out connecting (after {min(timeout_s, 10.0):g} s)")
    if isinstance(e, httpx.TimeoutException):
        return _TryAgain(f"timed out after {timeout_s:g} s ({type(e).__name__})")
    # refused, reset, or closed before the answer was complete
    return _TryAgain(f"cannot reach the server or the answer broke off ({type(e).__name__}: {e})")


def _answer(url: str, response: httpx.Response, read: Callable):
    """``read(response)`` of an answer that arrived: 429/5xx and `Retry` are `_TryAgain`, other 4xx and a
    malformed or unreadable answer `EngineError`."""
    status = response.status_code
    if status == 429 or status >= 500:
        raise _TryAgain(f"HTTP {status}: {response.text[:300]}")
    if status >= 400:
        raise EngineError(f"{url} rejected the request (HTTP {status}): {response.text[:500]}")
    try:
        return read(response)
    except Retry as e:
        raise _TryAgain(str(e)) from None
    except EngineError as e:
        raise EngineError(f"{url} sent a malformed answer: {e}") from None
    except (ValueError, LookupError, TypeError, AttributeError) as e:  # a reader's oversight: still the server's fault
        raise EngineError(f"{url} sent an unreadable answer ({type(e).__name__}: {e})") from None


def post_with_retries(client, url: str, body: dict, retries: int, backoff_s: float, read: Callable, what: str = "answer",
                      *, timeout_s: float):
    """POST ``body`` as JSON and return ``read(response)``; each of the ``retries + 1`` attempts has its own
    wall-clock deadline of ``timeout_s`` (connect, send and every read), with exponential backoff between them.
    Timeouts, dropped connections, HTTP 429/5xx and `Retry` are tried again; other 4xx answers and
    `EngineError` from ``read`` are final. Every failure is an `EngineError` naming the URL and the cause,
    e.g. ``...: no completion after 3 tries; last cause: HTTP 500``, with the API key redacted.
    """
    cause = ""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff_s * 2 ** (attempt - 1))
        try:
            return _attempt(client, url, body, timeout_s, read)
        except _TryAgain as e:
            cause = str(e)
        except EngineError as e:
            raise EngineError(redact(str(e), client)) from None
    raise EngineError(redact(f"{url}: no {what} after {retries + 1} tries; last cause: {cause}", client))


# ---------------------------------------------------------------------------------- engine
def completion_from(payload: dict, r: Request, eos_token_id: int) -> Completion:
    """A ``/v1/completions`` answer as a `Completion`, checked by the rules of this module's docstring.

    >>> completion_from({"choices": [{"token_ids": [5, 9], "finish_reason": "stop"}]}, Request((1,), 4, (9,)), 2)
    Completion(ids=(5, 9), finish_reason='stop')
    >>> completion_from({"choices": [{"token_ids": [9, 5], "finish_reason": "length"}]}, Request((1,), 4, (9,)), 2)
    Traceback (most recent call last):
    twlib.engines.EngineError: the completion goes on after stop id 9 at position 0 of 2
    """
    choice = first_choice(payload)
    reason = choice.get("finish_reason")
    if reason == "abort":
        raise Retry("the server aborted the generation")
    if reason not in (None, "stop", "length"):
        raise EngineError(f"finish_reason must be 'stop' or 'length', got {reason!r:.40}")
    ids = choice.get("token_ids")
    if ids is None:
        raise EngineError("no token ids; the server must support return_token_ids (vLLM >= 0.10)")
    if not isinstance(ids, list) or not all(type(i) is int and i >= 0 for i in ids):
        raise EngineError(f"token_ids must be a list of non-negative ints, got {ids!r:.80}")
    if len(ids) > r.max_new_tokens:
        raise EngineError(f"{len(ids)} tokens for max_tokens={r.max_new_tokens}")
    ends = {*r.stop_ids, eos_token_id}
    for position, i in enumerate(ids[:-1]):
        if i in ends:  # the server ignored a stop rule: what follows was never meant to be generated
            kind = "EOS" if i == eos_token_id else "stop"
            raise EngineError(f"the completion goes on after {kind} id {i} at position {position} of {len(ids)}")
    return Completion(tuple(ids), finish_reason(ids, r.stop_ids, eos_token_id), cached_tokens(payload))


def cached_tokens(payload: dict) -> int | None:
    """Prompt tokens the server took from its prefix cache (``usage.prompt_tokens_details.cached_tokens``), or
    None when it does not say (``vllm serve`` reports it with ``--enable-prompt-tokens-details``).

    >>> cached_tokens({"usage": {"prompt_tokens": 142, "prompt_tokens_details": {"cached_tokens": 128}}})
    128
    >>> cached_tokens({"usage": {"prompt_tokens": 142, "prompt_tokens_details": None}}) is None
    True
    """
    usage = payload.get("usage")
    details = usage.get("prompt_tokens_details") if isinstance(usage, dict) else None
    value = details.get("cached_tokens") if isinstance(details, dict) else None
    return value if type(value) is int and value >= 0 else None


class OpenAIEngine:
    """``OpenAIEngine("http://127.0.0.1:8000", "tiny", eos_token_id=2, timeout_s=60, retries=2)``.

    ``timeout_s`` bounds each attempt of each request in wall-clock time; ``api_key`` is sent as a bearer
    token and shown nowhere (read it from an environment variable named in params, docs/design.md §10).
    """

    def __init__(self, base_url: str, model: str, eos_token_id: int, concurrency: int = 8,
                 timeout_s: float = 120.0, retries: int = 3, backoff_s: float = 0.5, api_key: str | None = None):
        if concurrency < 1 or retries < 0 or not timeout_s > 0 or backoff_s < 0:
            raise ValueError("need concurrency >= 1, retries >= 0, timeout_s > 0 and backoff_s >= 0")
        self.base_url = base_url.rstrip("/")
        self.model, self.eos_token_id = model, eos_token_id
        self.concurrency, self.timeout_s, self.retries, self.backoff_s = concurrency, float(timeout_s), retries, backoff_s
        self.client = http_client(concurrency, api_key)
        self._auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def __repr__(self) -> str:
        key = "set" if "authorization" in self.client.headers else "none"
        return (f"OpenAIEngine({self.base_url!r}, model={self.model!r}, timeout_s={self.timeout_s:g}, "
                f"retries={self.retries}, api_key={key})")

    def close(self) -> None:
        self.client.close()

    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        if not requests:
            return []
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(requests))) as pool:
            return list(pool.map(self._complete, requests))

    def _body(self, r: Request) -> dict:
        body = {"model": self.model, "prompt": list(r.prompt), "max_tokens": r.max_new_tokens,
                "temperature": r.sampling.temperature, "top_p": r.sampling.top_p,
                "stop_token_ids": list(r.stop_ids), "return_token_ids": True, "skip_special_tokens": False}
        if r.sampling.seed is not None:
            body["seed"] = r.sampling.seed
        return body

    def _complete(self, r: Request) -> Completion:
        if r.max_new_tokens < 1:
            return Completion((), "length")
        read = lambda response: completion_from(json_object(response), r, self.eos_token_id)
        return post_with_retries(self.client, f"{self.base_url}/v1/completions", self._body(r), self.retries,
                                 self.backoff_s, read, "completion", timeout_s=self.timeout_s)

    @asynccontextmanager
    async def session(self) -> AsyncIterator[Callable[[Request], Awaitable[Completion]]]:
        """``async with engine.session() as complete: await complete(request)``: one request at a time, at most
        ``concurrency`` in flight (the others wait their turn), each `generate`'s own call — same client, deadline,
        retries and checks — on a pool of ``concurrency`` threads (`twlib.engines.SessionEngine`). Measured on a
        CPU ``vllm serve`` with 16 requests in flight, an async HTTP client took 4x as long for the same answers."""
        loop = asyncio.get_running_loop()
        pool = ThreadPoolExecutor(max_workers=self.concurrency)

        async def complete(r: Request) -> Completion:
            return await loop.run_in_executor(pool, self._complete, r)

        try:
            yield complete
        finally:
            # Requests still on the wire end by their own deadline; none waiting is started.
            pool.shutdown(wait=False, cancel_futures=True)
