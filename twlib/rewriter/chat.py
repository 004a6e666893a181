"""Text LLMs for stage-1 trajectory rewriting (docs/design.md §9), and the disk cache in front of them.

Stage 1 asks an LLM questions in plain chat messages and reads text answers. Anything with
``chat(messages, max_tokens, temperature) -> str`` and a ``model_id`` string will do:

- `EngineChat`: any `twlib.engines.Engine` (HF, offline vLLM, ``/v1/completions`` in token ids) plus
  a tokenizer: the chat template is applied here, the engine generates ids, the reply is decoded;
- `HTTPChat`: the ``/v1/chat/completions`` route of an OpenAI-compatible server (a hosted API or
  ``vllm serve``); the server applies its own chat template.

An optional ``chat_batch(conversations, max_tokens, temperature, on_reply=None) -> list[str]``
answers many conversations at once (one engine batch, or concurrent HTTP requests).
`CachedChat` wraps either and keeps every answer on disk under a hash of everything that decides
it, so a rerun or a run resumed after a crash sends no request twice::

    >>> class Echo:
    ...     model_id = "echo"
    ...     def chat(self, messages, max_tokens, temperature):
    ...         return messages[-1]["content"][:max_tokens]
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     llm = CachedChat(Echo(), folder)
    ...     answers = [llm.chat([{"role": "user", "content": "hello"}], 4, 0.0) for _ in range(2)]
    >>> answers, llm.calls, llm.hits
    (['hell', 'hell'], 1, 1)

`Question` and `ask_all` ask many questions at once and send a malformed answer back with its
problem named (`Malformed`), a bounded number of times; prompts are ``twlib/rewriter/prompts/*.md``.
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from ..engines import EngineError, Request, Sampling
from ..engines.openai import first_choice, http_client, json_object, post_with_retries
from ..files import atomic_write_json
from ..show import progress as progress_bar

Messages = list[dict]
OnReply = Callable[[int, str], None]


class ChatLLM(Protocol):
    """A text chat model. ``model_id`` names the weights and decoding extras: it is part of cache keys."""

    model_id: str

    def chat(self, messages: Messages, max_tokens: int, temperature: float) -> str:
        ...


def check_messages(messages) -> Messages:
    """Raise `ValueError` naming the first message that is not ``{"role": str, "content": str}``."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"messages must be a non-empty list of {{'role', 'content'}} dicts, got {messages!r:.80}")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ValueError(f"message {i} must be a dict with str 'role' and 'content', got {m!r:.80}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def chat_batch(llm, conversations: Sequence[Messages], max_tokens: int, temperature: float,
               on_reply: OnReply | None = None) -> list[str]:
    """``llm.chat_batch`` where the client has one, else one ``llm.chat`` after the other."""
    if hasattr(llm, "chat_batch"):
        return llm.chat_batch(conversations, max_tokens, temperature, on_reply=on_reply)
    out = []
    for i, messages in enumerate(conversations):
        out.append(llm.chat(messages, max_tokens, temperature))
        if on_reply:
            on_reply(i, out[-1])
    return out


# ------------------------------------------------------------------------------------- clients
class EngineChat:
    """A token-id `Engine` as a chat model: ``EngineChat(HFEngine(model, tok.eos_token_id), tok, "tiny-v1")``.

    ``model_id`` must identify the weights: cached answers are shared by every client with the
    same ``model_id``. The reply is decoded without special tokens, so the closing EOS is dropped.
    """

    def __init__(self, engine, tokenizer, model_id: str, top_p: float = 1.0, seed: int | None = None):
        if not isinstance(model_id, str) or not model_id:
            raise ValueError("model_id must be a non-empty string naming the model (it keys the cache)")
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("the tokenizer has no chat template; EngineChat needs one to format messages")
        self.engine, self.tokenizer, self.top_p, self.seed = engine, tokenizer, top_p, seed
        extras = "" if (top_p, seed) == (1.0, None) else f"|top_p={top_p}|seed={seed}"
        self.model_id = model_id + extras

    def _request(self, messages: Messages, max_tokens: int, temperature: float):
        text = self.tokenizer.apply_chat_template(check_messages(messages), tokenize=False, add_generation_prompt=True)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return Request(tuple(ids), int(max_tokens), (), Sampling(float(temperature), self.top_p, self.seed))

    def chat(self, messages: Messages, max_tokens: int, temperature: float) -> str:
        return self.chat_batch([messages], max_tokens, temperature)[0]

    def chat_batch(self, conversations: Sequence[Messages], max_tokens: int, temperature: float,
                   on_reply: OnReply | None = None) -> list[str]:
        # One engine call for all: the engine batches them and shares their common prefix.
        completions = self.engine.generate([self._request(m, max_tokens, temperature) for m in conversations])
        out = []
        for i, c in enumerate(completions):
            out.append(self.tokenizer.decode(list(c.ids), skip_special_tokens=True))
            if on_reply:
                on_reply(i, out[-1])
        return out


def answer_problem(answer) -> str | None:
    """What makes ``answer`` unfit to be an answer (and a cache entry), or None for a good one.

    A lone surrogate survives JSON but no UTF-8 encoder: cached, it would break every later run.

    >>> answer_problem("fine"), answer_problem(3)
    (None, 'is int, not a string')
    >>> print(answer_problem("ab" + chr(0xD800)))
    is not valid Unicode (lone surrogate '\\ud800' at position 2)
    """
    if not isinstance(answer, str):
        return f"is {type(answer).__name__}, not a string"
    try:
        answer.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"is not valid Unicode (lone surrogate {answer[e.start]!r} at position {e.start})"
    return None


def chat_answer(payload: dict, max_tokens: int) -> str:
    """The text of a ``/v1/chat/completions`` answer, checked; a null content (a refusal) is the empty answer.
    A server whose ``usage.completion_tokens`` exceeds ``max_tokens`` ignored the budget: refused too.

    >>> chat_answer({"choices": [{"message": {"role": "assistant", "content": "hi"}}]}, 8)
    'hi'
    """
    usage = payload.get("usage")
    used = usage.get("completion_tokens") if isinstance(usage, dict) else None
    if type(used) is int and used > max_tokens:
        raise EngineError(f"usage.completion_tokens is {used} for max_tokens={max_tokens}")
    message = first_choice(payload).get("message")
    if not isinstance(message, dict):
        raise EngineError(f"choices[0].message must be an object, got {message!r:.80}")
    content = message.get("content")
    if content is None:  # a refusal or an empty message is an answer too; the caller judges it
        return ""
    if problem := answer_problem(content):
        raise EngineError(f"choices[0].message.content {problem}")
    return content


class HTTPChat:
    """``POST {base_url}/v1/chat/completions`` of an OpenAI-compatible server (docs/design.md §9, stage 1).

    ``HTTPChat("https://api.example.com", "some-model", api_key=key)``; the caller reads the key (notebook
    01b: from the environment variable ``llm_api_key_env`` names); it is sent as a bearer token and shown in
    no repr or error. Each attempt of a request has a wall-clock deadline of ``timeout_s``; timeouts, 429 and
    5xx answers, dropped connections and bodies that are not JSON are retried ``retries`` times with
    exponential backoff; other 4xx answers and malformed answers (`chat_answer`) fail at once, as
    `EngineError`. ``extra_body`` is merged into every request (e.g. ``{"reasoning_effort": "low"}``);
    ``max_tokens_field`` renames ``max_tokens`` for APIs that want ``max_completion_tokens``.
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None, concurrency: int = 4,
                 timeout_s: float = 300.0, retries: int = 3, backoff_s: float = 1.0,
                 extra_body: dict | None = None, max_tokens_field: str = "max_tokens"):
        if not base_url or not model:
            raise ValueError("HTTPChat needs a base_url and a model name")
        if concurrency < 1 or retries < 0 or not timeout_s > 0 or backoff_s < 0:
            raise ValueError("need concurrency >= 1, retries >= 0, timeout_s > 0 and backoff_s >= 0")
        self.url = base_url.rstrip("/") + ("" if base_url.rstrip("/").endswith("/v1") else "/v1") + "/chat/completions"
        self.model, self.concurrency, self.retries, self.backoff_s = model, concurrency, retries, backoff_s
        self.timeout_s = float(timeout_s)
        self.extra_body, self.max_tokens_field = dict(extra_body or {}), max_tokens_field
        extras = json.dumps(self.extra_body, sort_keys=True) if self.extra_body else ""
        self.model_id = model + (f"|{extras}" if extras else "")
        self.client = http_client(concurrency, api_key)

    def __repr__(self) -> str:
        key = "set" if "authorization" in self.client.headers else "none"
        return (f"HTTPChat({self.url!r}, model_id={self.model_id!r}, timeout_s={self.timeout_s:g}, "
                f"retries={self.retries}, api_key={key})")

    def close(self) -> None:
        self.client.close()

    def chat(self, messages: Messages, max_tokens: int, temperature: float) -> str:
        body = {"model": self.model, "messages": check_messages(messages), self.max_tokens_field: int(max_tokens),
                "temperature": float(temperature)} | self.extra_body
        return post_with_retries(self.client, self.url, body, self.retries, self.backoff_s,
                                 lambda response: chat_answer(json_object(response), int(max_tokens)),
                                 timeout_s=self.timeout_s)

    def chat_batch(self, conversations: Sequence[Messages], max_tokens: int, temperature: float,
                   on_reply: OnReply | None = None) -> list[str]:
        out: list[str | None] = [None] * len(conversations)
        error: BaseException | None = None
        with ThreadPoolExecutor(max_workers=max(1, min(self.concurrency, len(conversations)))) as pool:
            futures = {pool.submit(self.chat, m, max_tokens, temperature): i for i, m in enumerate(conversations)}
            for f in as_completed(futures):
                try:
                    out[futures[f]] = f.result()
                except Exception as e:  # report the others first, so that a cache keeps them
                    error = error or e
                    continue
                if on_reply:
                    on_reply(futures[f], out[futures[f]])
        if error is not None:
            raise error
        return out


# --------------------------------------------------------------------------------------- cache
def cache_key(model_id: str, messages: Messages, max_tokens: int, temperature: float) -> str:
    """sha256 of everything that decides an answer; any text hashes, a lone surrogate included.

    >>> cache_key("m", [{"role": "user", "content": "hi"}], 8, 0.0) == cache_key("m", [{"role": "user", "content": "hi"}], 8, 0)
    True
    """
    payload = {"model": model_id, "messages": check_messages(messages), "max_tokens": int(max_tokens),
               "temperature": float(temperature)}
    # surrogatepass: the same bytes as UTF-8 for valid text (keys unchanged), and no crash on a lone surrogate.
    text = json.dumps(payload, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


class CacheWarning(UserWarning):
    """A cache entry could not be used (unreadable, not JSON, or a bad answer); it counts as a miss."""


class CachedChat:
    """Every answer of ``llm`` stored as ``<folder>/<key[:2]>/<key>.json`` (atomic writes; docs/design.md §9).

    ``calls`` counts requests sent to ``llm``, ``hits`` answers read from disk, ``corrupt`` entries found
    unusable (each reported as a `CacheWarning` naming the file, then asked again and overwritten). In
    `chat_batch` each answer is stored as soon as it arrives, and misses go out in chunks of ``batch_size``,
    so a crash loses at most the requests in flight. An answer that is not a valid string is never stored.
    """

    def __init__(self, llm: ChatLLM, folder: str | Path, batch_size: int = 64):
        if isinstance(llm, CachedChat):
            raise ValueError("llm is already a CachedChat")
        if not isinstance(getattr(llm, "model_id", None), str) or not llm.model_id:
            raise ValueError(f"{type(llm).__name__} has no model_id string; the cache needs one to key answers")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.llm, self.folder, self.batch_size = llm, Path(folder), batch_size
        self.model_id = llm.model_id
        self.calls = self.hits = self.corrupt = 0
        self._lock = threading.Lock()

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.json"

    def lookup(self, key: str) -> str | None:
        """The stored answer, or None: no entry, or one that cannot be used (warned about and counted)."""
        path = self.path(key)
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:  # ValueError: not UTF-8 or not JSON (a torn or foreign file)
            return self._unusable(path, f"{type(e).__name__}: {e}")
        response = entry.get("response") if isinstance(entry, dict) else None
        if problem := answer_problem(response):
            return self._unusable(path, f"its response {problem}")
        return response

    def _unusable(self, path: Path, why: str) -> None:
        with self._lock:
            self.corrupt += 1
        warnings.warn(f"LLM cache file {path} is unusable ({why:.200}); asking the LLM again", CacheWarning,
                      stacklevel=4)
        return None

    def store(self, key: str, messages: Messages, max_tokens: int, temperature: float, response: str) -> None:
        if problem := answer_problem(response):
            raise EngineError(f"{type(self.llm).__name__} answered a reply that {problem}; it was not cached")
        atomic_write_json(self.path(key), {"model": self.model_id, "max_tokens": max_tokens,
                                           "temperature": temperature, "messages": messages, "response": response})

    def chat(self, messages: Messages, max_tokens: int, temperature: float) -> str:
        return self.chat_batch([messages], max_tokens, temperature)[0]

    def chat_batch(self, conversations: Sequence[Messages], max_tokens: int, temperature: float,
                   on_reply: OnReply | None = None) -> list[str]:
        conversations = [check_messages(m) for m in conversations]
        keys = [cache_key(self.model_id, m, max_tokens, temperature) for m in conversations]
        out: list[str | None] = [self.lookup(k) for k in keys]
        # Identical requests in one batch go out once; the copies count as hits.
        first: dict[str, int] = {}
        misses = [first.setdefault(k, i) for i, k in enumerate(keys) if out[i] is None and k not in first]
        copies = [i for i, k in enumerate(keys) if out[i] is None and first[k] != i]
        with self._lock:
            self.hits += len(out) - len(misses)
        for i, r in enumerate(out):
            if r is not None and on_reply:
                on_reply(i, r)
        for start in range(0, len(misses), self.batch_size):
            chunk = misses[start:start + self.batch_size]

            def arrived(j: int, reply: str, chunk=chunk) -> None:
                i = chunk[j]
                self.store(keys[i], conversations[i], max_tokens, temperature, reply)
                for c in [i] + [c for c in copies if keys[c] == keys[i]]:
                    out[c] = reply
                    if on_reply:
                        on_reply(c, reply)

            with self._lock:
                self.calls += len(chunk)
            replies = chat_batch(self.llm, [conversations[i] for i in chunk], max_tokens, temperature,
                                 on_reply=arrived)
            for j, reply in enumerate(replies):
                if out[chunk[j]] is None:  # a client whose chat_batch does not report replies one by one
                    arrived(j, reply)
        return out  # type: ignore[return-value]

    def counters(self) -> dict:
        return {"llm_calls": self.calls, "cache_hits": self.hits, "cache_corrupt": self.corrupt}


# ------------------------------------------------------------------- questions with retries
class Malformed(ValueError):
    """An answer (or result) that breaks a step's rules; ``reason`` is the counted code, e.g. ``steps/gap``."""

    def __init__(self, reason: str, detail: str):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}")


_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


def prompt(name: str, **values) -> str:
    """``twlib/rewriter/prompts/<name>.md`` with its ``{{key}}`` placeholders filled.

    >>> prompt("retry", problem="steps/gap: line 3 belongs to no step").splitlines()[0]
    'That answer cannot be used: steps/gap: line 3 belongs to no step'
    """
    text = resources.files("twlib.rewriter").joinpath("prompts", f"{name}.md").read_text(encoding="utf-8")
    if missing := sorted(set(_PLACEHOLDER.findall(text)) - set(values)):
        raise KeyError(f"prompt {name} needs values for {missing}")
    # One pass: a value that itself contains "{{...}}" (a question, a thread) is left as it is.
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), text)


def json_list(reply: str, key: str, step: str) -> list:
    """The list under ``key`` of a JSON-object answer; a leading think block and code fences are ignored.

    >>> json_list('```json\\n{"steps": [1]}\\n```', "steps", "steps")
    [1]
    >>> json_list("sure! here", "steps", "steps")
    Traceback (most recent call last):
    twlib.rewriter.chat.Malformed: steps/bad_json: the answer is not a JSON object: 'sure! here'
    """
    text = reply.rsplit("</think>", 1)[-1].strip()
    text = re.sub(r"^```[a-zA-Z]*\n?|\n?```$", "", text).strip()
    try:
        obj = json.loads(text)
    except ValueError:
        try:  # prose around the object
            obj = json.loads(text[text.find("{"): text.rfind("}") + 1])
        except ValueError:
            raise Malformed(f"{step}/bad_json", f"the answer is not a JSON object: {reply[:80]!r}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get(key), list):
        raise Malformed(f"{step}/bad_schema", f'the answer must be {{"{key}": [...]}}')
    return obj[key]


@dataclass
class Question:
    """One request whose answer ``parse`` validates; a `Malformed` answer is asked again, the problem named."""
    messages: list[dict]
    parse: Callable[[str], Any]
    tag: Any = None  # the caller's bookkeeping (which trace, block, thread)
    attempts: list[dict] = field(default_factory=list)
    value: Any = None
    error: Malformed | None = None

    def conversation(self) -> Messages:
        conv = list(self.messages)
        for a in self.attempts:
            conv += [{"role": "assistant", "content": a["reply"]},
                     {"role": "user", "content": prompt("retry", problem=a["error"])}]
        return conv


def ask_all(llm, questions: Sequence[Question], max_retries: int, max_tokens: int, temperature: float,
            desc: str = "", progress: bool = True) -> Counter:
    """Answer every question, asking the malformed ones again (all pending ones in one batch per
    round) up to ``max_retries`` times; returns the count of malformed answers per reason."""
    malformed: Counter = Counter()
    pending = list(questions)
    with progress_bar(0, desc, unit="answer", disable=not progress or not questions) as bar:
        for _ in range(max_retries + 1):
            if not pending:
                break
            bar.total += len(pending)
            bar.refresh()
            replies = chat_batch(llm, [q.conversation() for q in pending], max_tokens, temperature,
                                 on_reply=lambda i, r: bar.update(1))
            again = []
            for q, reply in zip(pending, replies):
                try:
                    q.value, q.error = q.parse(reply), None
                except Malformed as e:
                    q.error = e
                    malformed[e.reason] += 1
                    again.append(q)
                q.attempts.append({"reply": reply, "error": None if q.error is None else str(q.error)})
            pending = again
    return malformed


__all__ = ["ChatLLM", "EngineChat", "HTTPChat", "CachedChat", "CacheWarning", "cache_key", "answer_problem", "chat_answer",
           "chat_batch", "check_messages", "Malformed", "prompt", "json_list", "Question", "ask_all"]
