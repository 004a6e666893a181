"""`OpenAIEngine`: ``/v1/completions`` of any OpenAI-compatible server (``vllm serve``, SGLang) in token ids.

Prompts go out as token-id lists and completions come back as ids (``return_token_ids``), so the
orchestrator never re-tokenises text. Requests of one batch run concurrently (at most
``concurrency`` at a time) over one shared HTTP client, so the server can batch the threads of a
block and reuse their common prefix. Timeouts, 5xx answers, aborted generations and dropped
connections are retried with exponential backoff; after the last try `EngineError` names the
server and the cause — a dead server is an error within seconds, never a hang.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import httpx

from . import Completion, EngineError, Request, finish_reason


class Retry(Exception):
    """Raised by a response reader of `post_with_retries`: this answer is worth asking for again."""


def post_with_retries(client, url: str, body: dict, retries: int, backoff_s: float, read: Callable, what: str = "answer"):
    """POST ``body`` as JSON and return ``read(response)``, with exponential backoff on timeouts, dropped
    connections, HTTP 429/5xx and `Retry`; other 4xx answers fail at once. After ``retries + 1`` tries
    `EngineError` names the URL and the last cause, e.g. ``...: no completion after 3 tries; last cause: HTTP 500``.
    """
    cause = ""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff_s * 2 ** (attempt - 1))
        try:
            response = client.post(url, json=body)
        except httpx.TimeoutException as e:
            cause = f"timed out ({type(e).__name__})"
            continue
        except httpx.TransportError as e:
            cause = f"cannot reach the server ({type(e).__name__}: {e})"
            continue
        if response.status_code == 429 or response.status_code >= 500:
            cause = f"HTTP {response.status_code}: {response.text[:300]}"
            continue
        if response.status_code >= 400:
            raise EngineError(f"{url} rejected the request (HTTP {response.status_code}): {response.text[:500]}")
        try:
            return read(response)
        except Retry as e:
            cause = str(e)
    raise EngineError(f"{url}: no {what} after {retries + 1} tries; last cause: {cause}")


class OpenAIEngine:
    def __init__(self, base_url: str, model: str, eos_token_id: int, concurrency: int = 8,
                 timeout_s: float = 120.0, retries: int = 3, backoff_s: float = 0.5, api_key: str | None = None):
        if concurrency < 1 or retries < 0 or timeout_s <= 0:
            raise ValueError("need concurrency >= 1, retries >= 0 and timeout_s > 0")
        self.base_url = base_url.rstrip("/")
        self.model, self.eos_token_id = model, eos_token_id
        self.concurrency, self.retries, self.backoff_s = concurrency, retries, backoff_s
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0)), headers=headers,
                                   limits=httpx.Limits(max_connections=concurrency))

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
        url = f"{self.base_url}/v1/completions"

        def read(response) -> Completion:
            choice = response.json()["choices"][0]
            if choice.get("finish_reason") == "abort":
                raise Retry("the server aborted the generation")
            if "token_ids" not in choice or choice["token_ids"] is None:
                raise EngineError(f"{url} returned no token ids; the server must support return_token_ids "
                                  "(vLLM >= 0.10)")
            ids = tuple(int(i) for i in choice["token_ids"])
            return Completion(ids, finish_reason(ids, r.stop_ids, self.eos_token_id))

        return post_with_retries(self.client, url, self._body(r), self.retries, self.backoff_s, read, "completion")
