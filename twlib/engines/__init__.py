"""Inference engines behind the fork-join orchestrator (docs/design.md §6).

An engine turns a batch of token-id requests into completions. In the lockstep schedule the orchestrator
submits every request that can run at the same time (all threads of all problems in flight) in one call,
so an engine can batch them and share their common prefix; an engine with sessions (`SessionEngine`, a
server) also completes requests one at a time as awaitables, for the event-driven schedule. Everything
here is pure Python; engines that need torch, vLLM or HTTP import them in their own modules.

>>> r = Request(prompt=(1, 2, 3), max_new_tokens=4, stop_ids=(9,))
>>> Completion(ids=(5, 9), finish_reason="stop").ids[-1] in r.stop_ids
True
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncContextManager, Awaitable, Callable, Literal, Protocol, Sequence

FinishReason = Literal["stop", "eos", "length"]

# Head sizes vLLM's CPU attention supports (a model with another one loads, then fails at the first forward).
VLLM_CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


@dataclass(frozen=True)
class Sampling:
    """Decoding settings; ``temperature == 0`` is greedy (the default, and what tests compare)."""
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = Sampling()


@dataclass(frozen=True)
class Request:
    """Continue ``prompt`` by at most ``max_new_tokens``; stop after any of ``stop_ids`` or EOS.

    The stop id (or EOS) that ends a completion is part of its ``ids``: the orchestrator keeps the
    tags the model writes.
    """
    prompt: tuple[int, ...]
    max_new_tokens: int
    stop_ids: tuple[int, ...] = ()
    sampling: Sampling = GREEDY


@dataclass(frozen=True)
class Completion:
    """Generated ids and why generation ended: a stop id, EOS, or the token limit.

    ``cached_tokens``: prompt tokens the engine took from its prefix cache, when it says (a server's
    ``usage.prompt_tokens_details.cached_tokens``); not part of equality, so completions of different
    engines still compare by their tokens.
    """
    ids: tuple[int, ...]
    finish_reason: FinishReason
    cached_tokens: int | None = field(default=None, compare=False, repr=False)


class EngineError(RuntimeError):
    """An engine could not produce a completion (server down, repeated 5xx, timeouts, bad response)."""


class Engine(Protocol):
    """Anything that completes a batch of requests, in order."""

    eos_token_id: int

    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        ...


class SessionEngine(Engine, Protocol):
    """An engine that can also complete one request at a time, as an awaitable, so that each problem of the
    orchestrator's event-driven schedule (docs/design.md §6) moves on as soon as its own requests return.

    ``async with engine.session() as complete: c = await complete(request)``; the engine bounds the requests
    in flight across the session (at most ``concurrency``).
    """

    concurrency: int

    def session(self) -> AsyncContextManager[Callable[[Request], Awaitable[Completion]]]:
        ...


def has_sessions(engine) -> bool:
    """Whether ``engine`` offers `SessionEngine.session` (what the event-driven schedule needs).

    >>> has_sessions(object())
    False
    """
    return callable(getattr(engine, "session", None))


def finish_reason(ids: Sequence[int], stop_ids: Sequence[int], eos_token_id: int) -> FinishReason:
    """Why a completion ended, from its last id.

    >>> finish_reason([4, 7], stop_ids=[7], eos_token_id=2), finish_reason([4], [7], 2)
    ('stop', 'length')
    """
    if ids and ids[-1] == eos_token_id:
        return "eos"
    if ids and ids[-1] in stop_ids:
        return "stop"
    return "length"


__all__ = ["VLLM_CPU_HEAD_DIMS", "Sampling", "GREEDY", "Request", "Completion", "Engine", "EngineError", "FinishReason",
           "SessionEngine", "has_sessions", "finish_reason"]
