"""Fork-join inference on a stock engine (paper §3.1, docs/design.md §6), in token ids, for many problems at once.

Each problem moves through five phases: (1) decode sequentially until ``</Outlines>``, EOS or the
budget; (2) read the outlines of the block just written; (3) decode one thread per outline, each
from the block head plus ``\\n<Thread>\\nN:``; (4) join: the threads in order, each behind its header,
then ``\\n``; (5) continue sequentially (the model writes ``</Parallel>`` itself).

Two schedules drive that state machine (``OrchestratorConfig.schedule``). *Lockstep* (offline engines): each
round, every request that can run at once — all threads of all problems in flight — goes to the engine in
one batch, and every problem waits for the whole batch. *Events* (engines with sessions, i.e. servers with
continuous batching): each problem sends its own requests (a block's threads together) and moves on as soon
as they return, at most ``concurrency`` requests in flight (the engine's bound). Under greedy decoding both
write the same tokens; results, records and statistics have the same form.

The joined ids are exactly the main path trie-SFT trains on (`twlib.trie.units`), so a trained model
sees at inference the contexts it was trained in. Malformed output never stops the loop: every
guard below is counted in ``Result.flags`` and the orchestrator always terminates (each call either
ends the problem or consumes at least one token of a finite budget).

Tiny example with a model that writes no block (``<think>`` and ``</think>`` only): one sequential
call, ``Result.calls == [CallRecord(kind="sequential", ...)]``, critical path = total tokens.
"""
from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal, Sequence

from . import format as fmt
from .config import OrchestratorLimits
from .engines import GREEDY, Completion, Engine, Request, Sampling, has_sessions
from .trie import Unit

Phase = Literal["sequential", "threads", "done"]
SCHEDULES = ("auto", "lockstep", "events")  # auto: events when the engine has sessions, else lockstep
_OUTLINE_NUMBER = re.compile(r"\s*(\d+)\s*:")

# Flag names (the keys of Result.flags).
FLAGS = (
    "budget",              # the total response budget ran out
    "context",             # the context length ran out
    "max_blocks",          # a block past max_blocks was decoded as plain text, without forking
    "threads_dropped",     # outlines past max_threads got no thread
    "no_outlines",         # </Outlines> with no <Outline> before it (decoding went on sequentially)
    "outline_numbering",   # outline numbers missing, repeated or not 1..K (threads numbered 1..K)
    "thread_unclosed",     # a thread hit its budget; the orchestrator closed it with </Thread>
    "eos_in_thread",       # a thread ended with EOS; the trajectory ends after the join
    "nested_tags",         # a thread wrote structure tags; they stay text
    "empty_completion",    # the engine returned no token where one was allowed
)


@dataclass(frozen=True, kw_only=True)
class OrchestratorConfig(OrchestratorLimits):
    """Guards of docs/design.md §6 (the limits group, checked once there), the context length and sampling.

    Budgets count response tokens, orchestrator-inserted ones included. ``schedule`` picks how problems
    advance (module docstring); ``max_active`` bounds the problems decoded at once (0: all given to ``run``),
    a finished one letting the next one in, in either schedule.
    """
    max_new_tokens: int = 4096
    max_thread_tokens: int = 1024
    max_context: int = 8192
    sampling: Sampling = GREEDY
    schedule: str = "auto"
    max_active: int = 0

    def knob_checks(self):
        yield from super().knob_checks()
        yield self.max_context >= 1, "max_context", "must be >= 1"
        yield self.schedule in SCHEDULES, "schedule", f"must be one of {', '.join(SCHEDULES)}"
        yield self.max_active >= 0, "max_active", "must be >= 0 (0: every problem at once)"

    @classmethod
    def for_stage(cls, cfg: OrchestratorLimits, max_context: int, sampling: Sampling = GREEDY) -> "OrchestratorConfig":
        """The limits a stage config carries (03, 04, 05), for a model of ``max_context`` tokens.

        >>> from twlib.config import EvaluationConfig
        >>> OrchestratorConfig.for_stage(EvaluationConfig(profile="p"), 512).max_new_tokens
        2048
        """
        limits = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(OrchestratorLimits)}
        return cls(**limits, max_context=max_context, sampling=sampling)


@dataclass(frozen=True)
class CallRecord:
    """One engine call: what it was for, how long its prompt was, what came back, and its time: the batch's
    (lockstep), or the call's own from submission to answer, queueing in the engine included (events)."""
    kind: Literal["sequential", "thread"]
    prompt_tokens: int
    generated_tokens: int
    finish_reason: str
    seconds: float
    block: int | None = None
    thread: int | None = None
    started: float = 0.0  # when its batch (or the call) began, in seconds since the run began (for timelines)
    cached_tokens: int | None = None  # prompt tokens the engine took from its prefix cache, when it says


@dataclass
class Result:
    """The outcome for one problem. ``stats`` follows docs/design.md §7 (response tokens only)."""
    prompt_ids: list[int]
    response_ids: list[int]
    text: str
    trajectory: fmt.Trajectory | None
    calls: list[CallRecord]
    flags: Counter
    stats: fmt.TrajectoryStats
    wall_seconds: float = 0.0     # the whole run's wall time (shared by the problems decoded together)
    engine_seconds: float = 0.0   # time this problem waited on the engine: its batches (lockstep), its calls (events)
    latency_seconds: float = 0.0  # from the problem's start (admission, see max_active) until it was done
    # Every call as ``<context, completion>`` ids, the completion exactly as the model wrote it (before
    # the orchestrator closes a thread): what RL scores (`twlib.trie.build_trie(..., main=...)`).
    units: list[Unit] = field(default_factory=list)

    @property
    def metrics(self) -> dict:
        """``stats`` as a dict (what records and logs store), plus the number of engine calls."""
        return {**self.stats.as_dict(), "engine_calls": len(self.calls)}


@dataclass
class _Block:
    head_end: int                      # len(response) when </Outlines> was read
    numbers: list[int]                 # thread numbers 1..K
    threads: dict[int, list[int]] = field(default_factory=dict)
    header_tokens: dict[int, int] = field(default_factory=dict)
    wrapper_tokens: int = 0            # block tokens the orchestrator writes outside any thread


@dataclass
class _State:
    prompt: list[int]
    response: list[int] = field(default_factory=list)
    phase: Phase = "sequential"
    blocks: list[_Block] = field(default_factory=list)
    sequential_tokens: int = 0         # tokens decoded by sequential calls
    calls: list[CallRecord] = field(default_factory=list)
    units: list[Unit] = field(default_factory=list)
    flags: Counter = field(default_factory=Counter)
    pending: _Block | None = None
    engine_seconds: float = 0.0        # wall time of the engine batches this problem took part in
    scan_from: int = 0                 # outlines are looked for after this response index
    end_after_join: bool = False
    admitted: float = 0.0              # seconds since the run began: when decoding this problem started
    finished: float | None = None      # ... and when it was done


class Orchestrator:
    """Runs the fork-join loop over ``engine`` for the prompts it is given.

    ``tokenizer`` supplies the tag ids (each tag must be one token) and encodes the headers and the
    join exactly as `twlib.tokenizer.segment_ids` does for training.
    """

    def __init__(self, engine: Engine, tokenizer, config: OrchestratorConfig = OrchestratorConfig()):
        self.engine, self.tokenizer, self.config = engine, tokenizer, config
        self.schedule = self._pick_schedule(engine, config.schedule)
        ids = {tag: i for i, tag in fmt.tag_id_map(tokenizer).items()}
        self.outlines_open, self.outlines_close = ids[fmt.OUTLINES_OPEN], ids[fmt.OUTLINES_CLOSE]
        self.outline_open, self.outline_close = ids[fmt.OUTLINE_OPEN], ids[fmt.OUTLINE_CLOSE]
        self.thread_close = ids[fmt.THREAD_CLOSE]
        self.structure = {ids[t] for t in fmt.STRUCTURE_TAGS} - {self.thread_close}
        self.eos = tokenizer.eos_token_id
        self.join_ids = tokenizer.encode(fmt.JOIN, add_special_tokens=False)

    def header_ids(self, number: int, first: bool) -> list[int]:
        return self.tokenizer.encode(fmt.thread_header(number, first), add_special_tokens=False)

    # ------------------------------------------------------------------------------- the loop
    def run(self, prompts: Sequence[Sequence[int]], progress=None) -> list[Result]:
        """Decode every prompt to the end; ``progress(n)`` is called as problems finish."""
        t0 = time.perf_counter()
        states = [_State(list(p)) for p in prompts]
        if self.schedule == "events":
            _run_coroutine(self._run_events(states, t0, progress))
        else:
            self._run_lockstep(states, t0, progress)
        wall = time.perf_counter() - t0
        return [self._result(s, wall) for s in states]

    @staticmethod
    def _pick_schedule(engine, schedule: str) -> str:
        if schedule == "events" and not has_sessions(engine):
            raise ValueError(f"schedule 'events' needs an engine with sessions (a server); {type(engine).__name__} "
                             "has none: use 'lockstep' or 'auto'")
        if schedule == "auto":
            return "events" if has_sessions(engine) else "lockstep"
        return schedule

    def _run_lockstep(self, states: list[_State], t0: float, progress) -> None:
        """Rounds: the requests of every active problem go to the engine in one batch, and all wait for it."""
        waiting, active = deque(states), []
        limit = self.config.max_active or len(states)
        while waiting or active:
            while waiting and len(active) < limit:
                active.append(waiting.popleft())
                active[-1].admitted = time.perf_counter() - t0
            requests, owners = [], []
            for s in active:
                for req, meta in self._requests(s):
                    requests.append(req)
                    owners.append((s, meta))
            if requests:
                start = time.perf_counter()
                completions = self.engine.generate(requests)
                seconds = time.perf_counter() - start
                if len(completions) != len(requests):
                    raise RuntimeError(f"engine returned {len(completions)} completions for {len(requests)} requests")
                for (s, meta), req, c in zip(owners, requests, completions):
                    self._absorb(s, meta, req, c, seconds, start - t0)
                for s in {id(s): s for s, _ in owners}.values():
                    s.engine_seconds += seconds
            for s in active:
                self._advance(s, t0, progress)
            active = [s for s in active if s.phase != "done"]

    async def _run_events(self, states: list[_State], t0: float, progress) -> None:
        """Each problem on its own: it sends its requests, absorbs them as they return, and goes on; at most
        ``max_active`` problems at once, the engine's session bounding the requests in flight."""
        admission = asyncio.Semaphore(self.config.max_active or max(len(states), 1))
        async with self.engine.session() as complete:
            async def drive(s: _State) -> None:
                async with admission:
                    s.admitted = time.perf_counter() - t0
                    while s.phase != "done":
                        await self._step(s, complete, t0)
                        self._advance(s, t0, progress)
            await _all_or_nothing([drive(s) for s in states])

    async def _step(self, s: _State, complete, t0: float) -> None:
        """One step of one problem: its pending requests (a sequential call, or a block's threads) sent together,
        absorbed in request order once all are back (the order lockstep absorbs them in)."""
        pending = self._requests(s)
        if not pending:
            return
        start = time.perf_counter()
        answers = await _all_or_nothing([_timed(complete, req) for req, _ in pending])
        s.engine_seconds += time.perf_counter() - start
        for (req, meta), (c, began, seconds) in zip(pending, answers):
            self._absorb(s, meta, req, c, seconds, began - t0)

    def _advance(self, s: _State, t0: float, progress) -> None:
        """After a step: join a block whose threads are all back; note when a problem is done."""
        if s.phase == "threads" and s.pending is not None and len(s.pending.threads) == len(s.pending.numbers):
            self._join(s)
        if s.phase == "done" and s.finished is None:
            s.finished = time.perf_counter() - t0
            if progress:
                progress(1)

    def _budget(self, s: _State) -> int:
        """Tokens a call may still add: the smaller of the response budget and the context room."""
        by_total = self.config.max_new_tokens - len(s.response)
        by_context = self.config.max_context - len(s.prompt) - len(s.response)
        if by_total <= 0 or by_context <= 0:
            s.flags["budget" if by_total <= by_context else "context"] += 1
            return 0
        return min(by_total, by_context)

    def _requests(self, s: _State):
        cfg = self.config
        if s.phase == "sequential":
            room = self._budget(s)
            if room <= 0:
                s.phase = "done"
                return []
            return [(Request(tuple(s.prompt + s.response), room, (self.outlines_close,), cfg.sampling), None)]
        block = s.pending
        waiting = [n for n in block.numbers if n not in block.threads]
        # Split what the response budget leaves after the block's own tokens evenly, so the joined
        # block never overruns it however the threads' lengths turn out.
        per_thread = (cfg.max_new_tokens - len(s.response) - self._block_overhead(block.numbers)) // len(waiting)
        out = []
        for n in waiting:
            context = s.prompt + s.response + self.header_ids(n, first=True)
            by_context = cfg.max_context - len(context)
            room = min(cfg.max_thread_tokens, per_thread, by_context)
            if room <= 0:
                # No room for this thread: close it at once so the block can still be joined.
                s.flags["context" if by_context <= 0 else "budget"] += 1
                s.flags["thread_unclosed"] += 1
                block.threads[n] = [self.thread_close]
                continue
            out.append((Request(tuple(context), room, (self.thread_close,), cfg.sampling), n))
        return out

    def _block_overhead(self, numbers: list[int]) -> int:
        """Tokens a joined block adds beyond its threads' generated text: the headers as they appear in the
        join, the join itself, and one closing tag per thread in case the orchestrator has to close it."""
        headers = sum(len(self.header_ids(n, k == 0)) for k, n in enumerate(numbers))
        return headers + len(self.join_ids) + len(numbers)

    def _absorb(self, s: _State, thread: int | None, req: Request, c: Completion, seconds: float,
                started: float = 0.0) -> None:
        ids = list(c.ids)
        block_index = len(s.blocks) if thread is not None else None
        s.calls.append(CallRecord("thread" if thread is not None else "sequential", len(req.prompt), len(ids),
                                  c.finish_reason, seconds, block_index, thread, started, c.cached_tokens))
        s.units.append(Unit(req.prompt, tuple(ids), "thread" if thread is not None else "sequential",
                            block_index, thread))
        if thread is not None:
            self._absorb_thread(s, thread, ids)
            return
        if not ids:
            s.flags["empty_completion"] += 1
            s.phase = "done"
            return
        s.response += ids
        s.sequential_tokens += len(ids)
        if ids[-1] == self.eos:
            s.phase = "done"
        elif ids[-1] == self.outlines_close:
            self._open_block(s)
        # A completion that hit its limit leaves the phase as is; the next _budget call ends it.

    def _absorb_thread(self, s: _State, number: int, ids: list[int]) -> None:
        block = s.pending
        if ids and ids[-1] == self.eos:
            s.flags["eos_in_thread"] += 1
            ids = ids[:-1] + [self.thread_close]
            s.end_after_join = True
        elif not ids or ids[-1] != self.thread_close:
            if not ids:
                s.flags["empty_completion"] += 1
            s.flags["thread_unclosed"] += 1
            ids = ids + [self.thread_close]
        if any(i in self.structure for i in ids[:-1]):
            s.flags["nested_tags"] += 1
        block.threads[number] = ids

    def _open_block(self, s: _State) -> None:
        numbers = self._outline_numbers(s)
        s.scan_from = len(s.response)
        if numbers is None:
            return
        if len(s.blocks) >= self.config.max_blocks:
            s.flags["max_blocks"] += 1
            return
        if self.config.max_new_tokens - len(s.response) - self._block_overhead(numbers) < len(numbers):
            # Not even one token per thread fits: the response ends at </Outlines>.
            s.flags["budget"] += 1
            s.phase = "done"
            return
        s.pending = _Block(len(s.response), numbers)
        s.phase = "threads"

    def _outline_numbers(self, s: _State) -> list[int] | None:
        """Thread numbers 1..K for the outlines just closed, or None when there are none."""
        r = s.response
        end = len(r) - 1
        start = max((i for i in range(s.scan_from, end) if r[i] == self.outlines_open), default=None)
        if start is None:
            s.flags["no_outlines"] += 1
            return None
        found, i = [], start + 1
        while i < end:
            if r[i] == self.outline_open:
                close = next((j for j in range(i + 1, end) if r[j] == self.outline_close), end)
                m = _OUTLINE_NUMBER.match(self.tokenizer.decode(r[i + 1:close], skip_special_tokens=False))
                found.append(int(m.group(1)) if m else None)
                i = close
            i += 1
        if not found:
            s.flags["no_outlines"] += 1
            return None
        if found != list(range(1, len(found) + 1)):
            s.flags["outline_numbering"] += 1
        if len(found) > self.config.max_threads:
            s.flags["threads_dropped"] += len(found) - self.config.max_threads
            found = found[:self.config.max_threads]
        return list(range(1, len(found) + 1))

    def _join(self, s: _State) -> None:
        block = s.pending
        for k, n in enumerate(block.numbers):
            header = self.header_ids(n, first=k == 0)
            # The first header's leading newline belongs to the block, not to thread 1 (docs/design.md §7).
            block.header_tokens[n] = len(self.header_ids(n, first=False))
            block.wrapper_tokens += len(header) - block.header_tokens[n]
            s.response += header + block.threads[n]
        s.response += self.join_ids
        s.blocks.append(block)
        s.pending = None
        s.scan_from = len(s.response)
        s.phase = "done" if s.end_after_join else "sequential"

    # ---------------------------------------------------------------------------- the result
    def _result(self, s: _State, wall: float) -> Result:
        threads_per_block = [len(b.numbers) for b in s.blocks]
        text = self.tokenizer.decode(s.response, skip_special_tokens=False)
        try:
            trajectory = fmt.parse_ids(s.response, self.tokenizer, strict=False)
        except fmt.FormatError:
            trajectory = None
        # Tokens inside blocks (docs/design.md §7) need the block extents, which only the parse knows; the
        # threads and joins the orchestrator placed are a lower bound when the text does not parse.
        parallel = sum(b.header_tokens[n] + len(b.threads[n]) for b in s.blocks for n in b.numbers)
        if trajectory is not None and trajectory.items and s.blocks:
            try:
                parallel = fmt.statistics(trajectory).parallel_tokens
            except fmt.FormatError:
                pass
        longest = sum(max(b.header_tokens[n] + len(b.threads[n]) for n in b.numbers) for b in s.blocks)
        joins = sum(len(self.join_ids) + b.wrapper_tokens for b in s.blocks)
        total = len(s.response)
        stats = fmt.TrajectoryStats(total, s.sequential_tokens + longest + joins, total - parallel, parallel,
                                    len(s.blocks), tuple(threads_per_block))
        latency = (s.finished if s.finished is not None else wall) - s.admitted
        return Result(list(s.prompt), list(s.response), text, trajectory, s.calls, s.flags, stats, wall,
                      s.engine_seconds, latency, s.units)


# --------------------------------------------------------------------------- event-loop helpers
async def _timed(complete, req: Request) -> tuple[Completion, float, float]:
    """``complete(req)`` with when it was sent and how long it took to come back."""
    began = time.perf_counter()
    c = await complete(req)
    return c, began, time.perf_counter() - began


async def _all_or_nothing(coroutines) -> list:
    """All results in order, or the first error once the others are cancelled (none is left running)."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _run_coroutine(coroutine):
    """Run ``coroutine`` to the end here, or in a thread of its own under a running event loop (Jupyter's)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine).result()
