"""The event-driven schedule against an in-process stand-in server: it writes what lockstep writes, the engine's
bound on requests in flight holds, and a fast problem does not wait for a slow one. Also the prefix-cache
readers of `twlib.engines.openai` and `twlib.bench.load` on a recorded answer and hand-checked cases."""
import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
from scripted_engines import ReplayEngine, ScriptEngine
from test_orchestrator import SEQUENTIAL, TWO_BLOCKS

from twlib import format as fmt
from twlib import trie
from twlib.bench.load import block_max, cache_shares
from twlib.config import ConfigError
from twlib.engines import EngineError, Request
from twlib.engines.openai import OpenAIEngine, cached_tokens, completion_from
from twlib.orchestrator import CallRecord, Orchestrator, OrchestratorConfig
from twlib.tokenizer import build_char_tokenizer, prompt_ids, segment_ids

TOK = build_char_tokenizer()


class StandIn:
    """``/v1/completions`` answered from a table (context → completion ids) after ``delay(prompt)`` seconds,
    reporting half the prompt as cached; counts the requests in flight (until each answer is written)."""

    def __init__(self, table: dict, delay):
        self.table, self.delay = table, delay
        self.lock = threading.Lock()
        self.in_flight = self.max_in_flight = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.answer(self, body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def answer(self, handler, body: dict) -> None:
        prompt = tuple(body["prompt"])
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        time.sleep(self.delay(prompt))
        ids = self.table.get(prompt)
        status, payload = (400, {"error": "unknown context"}) if ids is None else (200, {
            "choices": [{"token_ids": list(ids), "finish_reason": "stop"}],
            "usage": {"prompt_tokens": len(prompt), "prompt_tokens_details": {"cached_tokens": len(prompt) // 2}}})
        with self.lock:
            self.in_flight -= 1  # before the answer leaves: the client may send its next request at once
        data = json.dumps(payload).encode()
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up on this request (a run that failed)
            pass


@pytest.fixture
def stand_in():
    servers = []

    def start(table, delay):
        servers.append(StandIn(table, delay))
        return servers[-1]
    yield start
    for s in servers:
        s.server.shutdown()


def _problems(texts: dict[str, str]):
    """Units, prompts and expected ids of one trajectory per question."""
    units, prompts, expected = [], {}, {}
    for q, text in texts.items():
        prompts[q] = prompt_ids(TOK, q)
        units += trie.units(prompts[q], fmt.parse(text), TOK)
        expected[q] = segment_ids(fmt.parse(text), TOK).ids
    return units, prompts, expected


def _events(url: str, concurrency: int, **config) -> Orchestrator:
    engine = OpenAIEngine(url, "m", TOK.eos_token_id, concurrency=concurrency, timeout_s=30, retries=0)
    return Orchestrator(engine, TOK, OrchestratorConfig(**config))


def test_events_write_what_lockstep_writes_and_hold_the_bound(stand_in):
    units, prompts, expected = _problems({f"q{i}": TWO_BLOCKS for i in range(6)})
    server = stand_in({u.context: u.completion for u in units}, lambda prompt: 0.15)
    orchestrator = _events(server.url, concurrency=3)
    assert orchestrator.schedule == "events"  # chosen for an engine with sessions
    events = orchestrator.run(list(prompts.values()))
    assert server.max_in_flight == 3  # six problems could send 18 at once; the engine's bound is 3
    lockstep = Orchestrator(ReplayEngine(units), TOK).run(list(prompts.values()))
    assert orchestrator.schedule == "events" and Orchestrator(ReplayEngine(units), TOK).schedule == "lockstep"
    for e, ls, ids in zip(events, lockstep, expected.values()):
        assert e.response_ids == ls.response_ids == ids
        assert e.stats == ls.stats and e.flags == ls.flags
        assert [(c.kind, c.block, c.thread, c.prompt_tokens) for c in e.calls] == \
               [(c.kind, c.block, c.thread, c.prompt_tokens) for c in ls.calls]
        assert e.units == ls.units
        assert [c.cached_tokens for c in e.calls] == [c.prompt_tokens // 2 for c in e.calls]
        assert 0 < e.latency_seconds <= e.wall_seconds


def test_max_active_bounds_the_problems_in_flight(stand_in):
    units, prompts, expected = _problems({f"q{i}": TWO_BLOCKS for i in range(3)})
    server = stand_in({u.context: u.completion for u in units}, lambda prompt: 0.1)
    results = _events(server.url, concurrency=16, max_active=1).run(list(prompts.values()))
    assert server.max_in_flight == 3  # one problem at a time: its largest block has three threads
    assert [r.response_ids for r in results] == list(expected.values())
    # One after the other: the run takes three problems' time, each problem's latency is its own (5 steps).
    assert results[0].wall_seconds >= 3 * 5 * 0.1
    assert all(0.5 <= r.latency_seconds < 0.5 * r.wall_seconds for r in results)


def test_a_fast_problem_finishes_while_a_slow_call_is_out(stand_in):
    units, prompts, _ = _problems({"slow": SEQUENTIAL, "fast": TWO_BLOCKS})
    slow = prompts["slow"]
    server = stand_in({u.context: u.completion for u in units}, lambda p: 1.5 if p[:len(slow)] == tuple(slow) else 0.02)
    slow_r, fast_r = _events(server.url, concurrency=4).run([slow, prompts["fast"]])
    assert len(fast_r.calls) == 8  # three sequential calls, blocks of two and three threads
    slow_call_end = slow_r.calls[0].started + slow_r.calls[0].seconds
    assert fast_r.latency_seconds < 1.0 < slow_call_end  # eight calls done before the slow one came back
    # Lockstep on the same server: every round waits for the slow call.
    slow_l, fast_l = _events(server.url, concurrency=4, schedule="lockstep").run([slow, prompts["fast"]])
    assert fast_l.response_ids == fast_r.response_ids and fast_l.latency_seconds >= 1.5


def test_events_inside_a_running_event_loop(stand_in):
    """As in a Jupyter kernel: ``run`` is called where an event loop is already running."""
    units, prompts, expected = _problems({"q": TWO_BLOCKS})
    server = stand_in({u.context: u.completion for u in units}, lambda p: 0.0)
    orchestrator = _events(server.url, concurrency=2)

    async def inside():
        return orchestrator.run([prompts["q"]])
    assert asyncio.run(inside())[0].response_ids == expected["q"]


def test_an_engine_error_ends_the_run_and_names_the_cause(stand_in):
    units, prompts, _ = _problems({"q": TWO_BLOCKS, "other": TWO_BLOCKS})
    known = [u for u in units if u.context[:len(prompts["q"])] == tuple(prompts["q"])]
    server = stand_in({u.context: u.completion for u in known}, lambda p: 0.05)  # "other" gets HTTP 400
    with pytest.raises(EngineError, match="rejected the request"):
        _events(server.url, concurrency=4).run([prompts["q"], prompts["other"]])


def test_schedule_is_checked():
    with pytest.raises(ValueError, match="needs an engine with sessions"):
        Orchestrator(ScriptEngine(lambda p: ""), TOK, OrchestratorConfig(schedule="events"))
    with pytest.raises(ConfigError, match="schedule"):
        OrchestratorConfig(schedule="async")
    with pytest.raises(ConfigError, match="max_active"):
        OrchestratorConfig(max_active=-1)


# --------------------------------------------------------------------------------------------- prefix cache
# A vLLM 0.32 CPU answer (vllm serve --enable-prefix-caching --enable-prompt-tokens-details --block-size 32):
# a 142-token prompt sent right after one sharing its first 141 tokens.
RECORDED = json.loads("""{"id": "cmpl-8a20c414de5c0549", "object": "text_completion", "created": 1796082228,
 "model": "tiny", "choices": [{"index": 0, "text": "[z*:", "logprobs": null, "finish_reason": "length",
 "stop_reason": null, "token_ids": [88, 39, 75, 81], "prompt_logprobs": null, "prompt_token_ids": null,
 "routed_experts": null}], "service_tier": null, "system_fingerprint": "vllm-0.32.0-82f2b532",
 "usage": {"prompt_tokens": 142, "total_tokens": 146, "completion_tokens": 4, "prompt_tokens_details":
 {"cached_tokens": 128, "created_cache_tokens": null, "multimodal_tokens": null}, "completion_tokens_details": null},
 "kv_transfer_params": null, "ec_transfer_params": null, "metrics": null}""")


def test_cached_tokens_are_read_from_a_recorded_answer():
    c = completion_from(RECORDED, Request(tuple(range(142)), 4), eos_token_id=2)
    assert c.ids == (88, 39, 75, 81) and c.cached_tokens == 128
    assert c == completion_from({**RECORDED, "usage": None}, Request(tuple(range(142)), 4), 2)  # not compared
    assert cached_tokens({"usage": {"prompt_tokens": 9}}) is None
    assert cached_tokens({"usage": {"prompt_tokens_details": {"cached_tokens": "128"}}}) is None
    assert block_max(142, 141, 32) == 128  # what the server reported is the block maximum
    assert block_max(142, 142, 32) == 128 and block_max(160, 160, 32) == 128 and block_max(161, 160, 32) == 160


def test_cache_shares_by_call_kind_hand_checked():
    """A sequential call (prompt 70, completion 40: 109 tokens left in the cache), then two threads of 114 tokens:
    thread 1 shares 109 with it (block max 96), thread 2 shares 112 with thread 1 (96 again), then a sequential
    continuation of 200 tokens whose first 150 are thread 2's prompt and completion (block max 128)."""
    head = list(range(1, 71))
    out = list(range(100, 140))  # 40 ids, the last never computed
    t1 = head + out + [7, 8, 9, 1]
    t2 = head + out + [7, 8, 9, 2]
    t2_out = list(range(300, 336))
    cont = t2 + t2_out + list(range(400, 450))
    units = [trie.Unit(tuple(head), tuple(out), "sequential"), trie.Unit(tuple(t1), (5, 6), "thread", 0, 1),
             trie.Unit(tuple(t2), tuple(t2_out), "thread", 0, 2), trie.Unit(tuple(cont), (2,), "sequential")]
    calls = [CallRecord("sequential", 70, 40, "stop", 1.0, started=0.0, cached_tokens=0),
             CallRecord("thread", 114, 2, "stop", 1.0, 0, 1, started=1.0, cached_tokens=96),
             CallRecord("thread", 114, 36, "stop", 1.0, 0, 2, started=1.0, cached_tokens=64),
             CallRecord("sequential", 200, 1, "eos", 1.0, started=2.0, cached_tokens=None)]
    shares = cache_shares([SimpleNamespace(calls=calls, units=units)], block_size=32)
    assert shares["thread_1"] == {"calls": 1, "prompt": 114, "cached": 96, "block_max": 96, "unreported": 0,
                                  "cached_share": round(96 / 114, 4), "block_max_share": round(96 / 114, 4)}
    assert shares["threads_2_K"]["block_max"] == 96 and shares["threads_2_K"]["cached"] == 64
    assert shares["sequential"]["block_max"] == 0 + 128 and shares["sequential"]["unreported"] == 1
