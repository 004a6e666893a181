"""On a real ``vllm serve`` (CPU): the event-driven orchestrator writes what lockstep writes, token for token, and
the server's prefix-cache reports reach the call records; ``python -m twlib.bench load`` produces every field."""
import importlib.util
import json
import random
import shutil
from pathlib import Path

import pytest
import yaml
from datasets import Dataset, DatasetDict
from test_engines_vllm import memorised  # noqa: F401  (the fixture: a tiny model that forks, served below)

from twlib import bench
from twlib.bench import load
from twlib.bench.load import KINDS, SCHEDULES, TARGETS, cache_shares
from twlib.dataset import save_parquet
from twlib.engines.openai import OpenAIEngine
from twlib.engines.server import VLLMServer
from twlib.orchestrator import Orchestrator, OrchestratorConfig
from twlib.tasks import ExpressionParams, make_problem
from twlib.tokenizer import build_char_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TOK = build_char_tokenizer()
pytestmark = [pytest.mark.engines,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")]


def test_events_equal_lockstep_on_vllm_serve(memorised):  # noqa: F811
    folder, prompts, reference, hf_calls = memorised
    prompts, reference = prompts * 2, reference * 2  # the same problems twice: their prefixes meet in the cache
    with VLLMServer(folder, model_name="tiny", max_model_len=1024, extra_args=("--block-size", "32")) as server:
        results = {}
        for schedule in ("lockstep", "events"):
            engine = OpenAIEngine(server.url, "tiny", TOK.eos_token_id, concurrency=8, timeout_s=60, retries=1)
            config = OrchestratorConfig(max_context=1024, schedule=schedule, max_active=2)
            results[schedule] = Orchestrator(engine, TOK, config).run(prompts)
            engine.close()
    lockstep, events = results["lockstep"], results["events"]
    assert [r.response_ids for r in events] == [r.response_ids for r in lockstep] == reference
    assert [r.stats for r in events] == [r.stats for r in lockstep]
    assert [len(r.calls) for r in events] == hf_calls * 2
    # The server reports its cache hits on every call; threads reuse the block head.
    assert all(c.cached_tokens is not None for r in events for c in r.calls)
    shares = cache_shares(events, block_size=32)
    assert shares["threads_2_K"]["calls"] > 0 and shares["threads_2_K"]["cached"] > 0
    # Whole blocks of 32, never the whole prompt.
    assert all(c.cached_tokens % 32 == 0 and c.cached_tokens < c.prompt_tokens for r in events for c in r.calls)


@pytest.fixture
def stand_in_outputs(memorised, tmp_path):  # noqa: F811
    """The smoke profile with a run of its own: the memorised model as both the sequential (02) and the P-GRPO
    (04) model, and its two problems as the test split of 01."""
    folder = memorised[0]
    spec = yaml.safe_load((ROOT / "params" / "smoke.yaml").read_text())
    spec["output_root"] = str(tmp_path / "outputs")
    spec["05_evaluation"].update(max_new_tokens=1024, max_thread_tokens=512)  # room for the memorised answers
    params = tmp_path / "smoke.yaml"
    params.write_text(yaml.safe_dump(spec))
    root = tmp_path / "outputs" / "smoke"
    shutil.copytree(folder, root / "02_trie_sft" / "sequential_model")
    shutil.copytree(folder, root / "04_pgrpo" / "pgrpo_model")
    rng = random.Random(3)  # the memorised problems (see test_engines_vllm.memorised)
    shape = ExpressionParams(groups_min=2, groups_max=3, repeats_min=2, repeats_max=3, balanced_fraction=1.0)
    problems = [make_problem("expressions", rng, shape) for _ in range(2)]
    rows = [{"question": p.question, "answer": p.answer} for p in problems]
    save_parquet(DatasetDict({"test": Dataset.from_list(rows)}), root / "01_trajectories" / "data")
    return params, root


def test_load_bench_smoke_produces_every_field(stand_in_outputs, capsys):
    params, root = stand_in_outputs
    shutil.rmtree(root / "04_pgrpo" / "pgrpo_model")
    with pytest.raises(FileNotFoundError, match="no pgrpo model at .*run stage 04_pgrpo of profile 'smoke'"):
        bench.main(["load", "--params", str(params)])
    shutil.copytree(root / "02_trie_sft" / "sequential_model", root / "04_pgrpo" / "pgrpo_model")
    capsys.readouterr()
    assert bench.main(["load", "--params", str(params), "--concurrency", "1,2", "--problems", "2", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    records, (summary,) = lines[:-1], lines[-1:]
    assert [(r["model"], r["concurrency"], r["schedule"]) for r in records] == \
           [(m, c, s) for m in ("sequential", "pgrpo") for c in (1, 2) for s in SCHEDULES]
    for r in records:
        assert r["problems"] == 2 and r["accuracy"] == 1.0  # the memorised answers
        assert r["repeats"] == 1 and r["wall_s_runs"] == [r["wall_s"]]
        assert r["server_steps"] > 0 and r["server_tokens_per_step"] >= 1
        assert r["problems_per_s"] > 0 and r["generated_tokens_per_s"] > 0
        assert 0 < r["latency_p50_s"] <= r["latency_p95_s"] <= r["wall_s"]
        assert r["critical_path_tokens_mean"] < r["total_tokens_mean"]  # the model forks
        assert set(r["cache"]) == set(KINDS)
        for kind in ("thread_1", "threads_2_K"):
            row = r["cache"][kind]
            assert row["calls"] > 0 and row["unreported"] == 0
            assert 0 <= row["cached_share"] <= 1 and 0 < row["block_max_share"] <= 1
    assert set(summary["verdicts"]) == set(TARGETS)
    assert all(v["met"] in (True, False) and v["value"] is not None for v in summary["verdicts"].values())
    assert "model" in out and "MET" in out  # the table
    saved = json.loads((root / "bench" / "load" / "load.json").read_text())
    assert saved["records"] == records and saved["verdicts"] == summary["verdicts"]
    assert (root / "bench" / "load" / "latency_vs_throughput.png").stat().st_size > 10_000
    # What notebook 05 shows from it, read back without running anything.
    report = load.stored(root.parent, "smoke")
    assert report["figure"] == root / "bench" / "load" / "latency_vs_throughput.png"
    frame = load.results_frame(report)
    assert len(frame) == len(records) and frame.index.names == ["model", "in flight", "schedule"]
    first = frame.loc[("sequential", 1, "lockstep")]
    assert first["problems/s"] == records[0]["problems_per_s"]
    assert first["threads 2..K cached"] == records[0]["cache"]["threads_2_K"]["cached_share"]
    verdict = load.verdict_frame(report)
    assert list(verdict.index) == list(TARGETS.values()) and set(verdict["verdict"]) <= {"met", "not met"}
    assert load.stored(root.parent, "no-such-profile") is None
