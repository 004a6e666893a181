"""The paper's evaluation protocol (docs/design.md §7): avg@n and its standard error, per-sample speedups against
the sequential model's mean, both latency conventions, the per-benchmark table and the six-benchmark mean, the
endpoint engine's knobs, and notebook 05's endpoint engine against a real ``vllm serve`` (token-identical to the
offline engines)."""
import importlib.util
import json
import math
import random
import textwrap
import time
from pathlib import Path

import pytest
from test_orchestrator import TOK, TWO_BLOCKS, ReplayEngine

from twlib import evaluation, models, sft, trie
from twlib import format as fmt
from twlib.config import ConfigError, EvaluationConfig
from twlib.engines.local import api_key, endpoint_engine
from twlib.orchestrator import Orchestrator
from twlib.runs import RunFolder
from twlib.tasks import ExpressionParams, make_problem
from twlib.tasks.math_data import BENCHMARKS
from twlib.tokenizer import prompt_ids


def _record(problem, sample, correct, total, critical, family="f", shape="s", prompt=10, threads=()):
    return {"id": f"p{problem}", "problem": problem, "sample": sample, "family": family, "shape": shape,
            "gold": "1", "correct": correct, "total_tokens": total, "critical_path_tokens": critical,
            "prompt_tokens": prompt, "threads_per_block": list(threads), "num_blocks": len(threads),
            "format_correct": True, "wall_seconds": 1.0, "engine_seconds": 0.5}


# Three problems, two samples each (problem-major, as evaluate_models returns them).
SEQ = [_record(0, 0, True, 300, 300), _record(0, 1, True, 100, 100),
       _record(1, 0, True, 200, 200), _record(1, 1, False, 200, 200),
       _record(2, 0, False, 400, 400), _record(2, 1, False, 400, 400)]
PAR = [_record(0, 0, True, 220, 100, threads=(2,)), _record(0, 1, False, 210, 200, threads=(2,)),
       _record(1, 0, True, 150, 100, threads=(3,)), _record(1, 1, True, 200, 200),
       _record(2, 0, False, 300, 200, threads=(2, 2)), _record(2, 1, False, 400, 400)]


def test_avg_at_n_and_its_standard_error_by_hand():
    s = evaluation.summarize(SEQ, PAR)
    assert (s["problems"], s["samples_per_problem"]) == (3, 2)
    # per-problem accuracy: sequential (1, 0.5, 0), parallel (0.5, 1, 0)
    assert s["sequential_accuracy"] == pytest.approx(0.5) and s["parallel_accuracy"] == pytest.approx(0.5)
    # standard error = sd over problems of the per-problem means (ddof 1) / √3; both sds are 0.5
    assert s["sequential_accuracy_se"] == pytest.approx(0.5 / math.sqrt(3))
    assert s["parallel_accuracy_se"] == pytest.approx(0.5 / math.sqrt(3))
    assert evaluation.avg_at_n([True], ["only"]) == (1.0, None)  # one problem: no spread to estimate
    models_table = evaluation.model_table({"sequential": SEQ, "parallel": PAR})
    assert models_table.loc["parallel", "accuracy"] == pytest.approx(0.5)
    assert models_table.loc["parallel", "accuracy_se"] == pytest.approx(0.5 / math.sqrt(3))


def test_speedups_per_sample_against_the_sequential_mean_by_hand():
    # sequential mean totals per problem: 200, 200, 400 → per-sample speedups 2, 1 | 2, 1 | 2, 1
    assert evaluation.speedups(SEQ, PAR) == pytest.approx([2.0, 1.0, 2.0, 1.0, 2.0, 1.0])
    s = evaluation.summarize(SEQ, PAR)
    assert s["mean_speedup"] == pytest.approx(1.5)
    assert s["speedup_of_means"] == pytest.approx((800 / 3) / (1200 / 6))
    # correct parallel samples of problems the sequential model solves (>= half its samples): p0 s0, p1 s0, p1 s1
    assert s["max_speedup_both_correct"] == pytest.approx(2.0)
    assert s["activation_ratio"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    # official: baseline mean + prompt (210, 210, 410) over critical + 2(K-1) per block + prompt
    official = [210 / 112, 210 / 212, 210 / 114, 210 / 210, 410 / 214, 410 / 410]
    assert evaluation.speedups(SEQ, PAR, "official") == pytest.approx(official)
    assert s["official_mean_speedup"] == pytest.approx(sum(official) / 6)


def test_both_latency_conventions_on_a_two_block_trajectory():
    units = trie.units(prompt_ids(TOK, "q1"), fmt.parse(TWO_BLOCKS), TOK)
    problem = {"id": "p0", "question": "q1", "answer": "7"}
    r = evaluation.evaluate(Orchestrator(ReplayEngine(units), TOK), [problem], TOK, sample=3)[0]
    # Ours by hand, one token per character and per tag (`\boxed{` is one token too), EOS counted:
    # before block 1: "<think>\nfirst\n" 8; block 1: head "<Parallel>\n<Outlines>\n" + two outline lines +
    # "</Outlines>\n" 20, threads "<Thread>\n1: aa\n</Thread>" 9 and "...2: bbbb..." 11, "\n</Parallel>" 2;
    # "\nmid\n" 5; block 2: head 27, threads 8, 9, 10, tail 2; "\nend\n</think>\n\n\boxed{7}" 11; EOS 1.
    total = 8 + (20 + 9 + 11 + 2) + 5 + (27 + 8 + 9 + 10 + 2) + 11 + 1
    critical = 8 + (20 + 11 + 2) + 5 + (27 + 10 + 2) + 11 + 1
    prompt = len(prompt_ids(TOK, "q1"))
    assert (r["total_tokens"], r["critical_path_tokens"], r["prompt_tokens"]) == (total, critical, prompt)
    assert (r["threads_per_block"], r["sample"], r["problem"]) == ([2, 3], 3, 0)
    assert evaluation.acceleration_ratio(r) == pytest.approx(1 - critical / total)
    # Official: every thread's two tags move to the block's sequential part (2(K-1) more per block), prompt added.
    longest, official_total = critical + 2 * 1 + 2 * 2 + prompt, total + prompt
    assert evaluation.official_latency(r) == (longest, official_total) == (124, 144)
    assert evaluation.acceleration_ratio(r, "official") == pytest.approx(1 - 124 / 144)
    assert evaluation.acceleration_ratio(r) > evaluation.acceleration_ratio(r, "official")  # ours reads higher
    with pytest.raises(ValueError, match="convention"):
        evaluation.costs(r, "paper")


def test_per_benchmark_table_in_both_conventions():
    frame = evaluation.paired_frame(SEQ, PAR)
    assert list(frame.speedup) == pytest.approx([2.0, 1.0, 2.0, 1.0, 2.0, 1.0])
    ours, official = evaluation.paper_table(frame), evaluation.paper_table(frame, "official")
    assert list(ours.family) == ["f", "all"]  # one benchmark, then every problem pooled
    row = ours.iloc[0]
    assert (row.problems, row.samples) == (3, 2)
    assert (row.seq_latency, row.par_latency) == pytest.approx((800 / 3, 1200 / 6))
    assert (row.mean_speedup, row.max_speedup) == pytest.approx((1.5, 2.0))
    assert row.par_accuracy_se == pytest.approx(0.5 / math.sqrt(3))
    off = official.iloc[0]
    # official longest paths: 112, 212 | 114, 210 | 214, 410 (critical + 2(K-1) per block + prompt 10)
    assert (off.seq_latency, off.par_latency) == pytest.approx((800 / 3 + 10, 1272 / 6))
    assert off.mean_speedup < row.mean_speedup and off.acceleration_ratio < row.acceleration_ratio
    conventions = evaluation.latency_conventions(frame)
    assert list(conventions.index) == [evaluation.CONVENTIONS["ours"], evaluation.CONVENTIONS["official"]]
    assert evaluation.json_table(ours)[0]["family"] == "f"


def _benchmark_records(sizes: dict[str, int]):
    """One sample per problem; benchmark b's sequential answers all right, its parallel ones right on the first
    problem only, parallel critical paths half the sequential totals on the first problem."""
    seq, par, i = [], [], 0
    for b, n in sizes.items():
        for j in range(n):
            seq.append(_record(i, 0, True, 100, 100, family=b, shape="all"))
            par.append(_record(i, 0, j == 0, 100, 50 if j == 0 else 100, family=b, shape="all", threads=(2,) if j == 0 else ()))
            i += 1
    for r in seq + par:
        del r["shape"]  # real-math records carry no shape
    return seq, par


def test_six_benchmark_mean_is_over_benchmarks_not_problems():
    sizes = dict(zip(BENCHMARKS, (2, 2, 3, 4, 2, 10)))
    frame = evaluation.paired_frame(*_benchmark_records(sizes))
    table = evaluation.paper_table(frame, "ours")
    assert list(table.family) == sorted(BENCHMARKS) + [evaluation.SIX_MEAN]
    accuracies = {b: 1 / n for b, n in sizes.items()}  # only the first problem of each is right
    mean = table.iloc[-1]
    assert mean.par_accuracy == pytest.approx(sum(accuracies.values()) / 6)  # not 6 / 20, the pooled value
    assert mean.seq_accuracy == 1.0 and mean.problems == 23
    speedups = {b: (2 + (n - 1)) / n for b, n in sizes.items()}
    assert mean.mean_speedup == pytest.approx(sum(speedups.values()) / 6)
    assert mean.max_speedup == pytest.approx(2.0)
    per = table.iloc[:-1].set_index("family")
    assert per.loc["aime24", "par_accuracy_se"] == pytest.approx(0.5)  # problems (1, 0): sd 0.707 / √2
    assert mean.par_accuracy_se == pytest.approx(math.sqrt(sum(per.par_accuracy_se ** 2)) / 6)
    comparison = evaluation.paper_comparison(evaluation.paper_table(frame, "official"))
    assert list(comparison.index) == ["paper: Qwen3-8B, six benchmarks", f"this run ({evaluation.SIX_MEAN})"]
    five = evaluation.paired_frame(*_benchmark_records(dict(list(sizes.items())[:5])))
    assert evaluation.paper_table(five).family.iloc[-1] == "all"  # not the paper's six: pooled instead


def test_summary_refuses_unpaired_samples():
    shuffled = [SEQ[1], SEQ[0], *SEQ[2:]]
    with pytest.raises(ValueError, match="same problems"):
        evaluation.summarize(shuffled, PAR)


# ------------------------------------------------------------------------------------------------ config
SECRET = "sk-proj-abcdefghijklmnop"


@pytest.mark.parametrize("knobs, message", [
    ({"engine": "endpoint", "base_url": "127.0.0.1:8000"}, "'base_url' must be the server's http"),
    ({"engine": "vllm", "check_engine": "vllm"}, "'check_engine' must be empty"),
    ({"check_engine": "sglang"}, "'check_engine' must be empty"),
    ({"engine": "endpoint", "base_url": "ftp://host"}, "'base_url' must be the server's http"),
    ({"engine": "sglang"}, "'engine' must be 'hf', 'vllm'"),
    ({"engine": "endpoint", "base_url": "http://h", "served_model": " "}, "'served_model' must name"),
    ({"served_model": "{name}"}, "'served_model' may hold {model}"),
    ({"samples_per_problem": 4}, "'samples_per_problem' must be >= 1, and 1 when temperature is 0"),
    ({"samples_per_problem": 0, "temperature": 0.6}, "'samples_per_problem' must be >= 1"),
    ({"top_p": 0.0}, "'top_p' must be in"),
    ({"endpoint_timeout_s": 0.0}, "'endpoint_timeout_s' must be > 0"),
    ({"endpoint_concurrency": 0}, "'endpoint_concurrency' must be >= 1"),
    ({"tensor_parallel_size": 2, "engine": "endpoint", "base_url": "http://h"}, "needs engine 'vllm'"),
])
def test_config_errors_name_the_parameter(knobs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("{", r"\{")):
        EvaluationConfig.from_dict({"profile": "p", **knobs})


@pytest.mark.parametrize("knobs, field", [
    ({"api_key_env": SECRET}, "api_key_env"),
    ({"api_key_env": "x" * 80}, "api_key_env"),
    ({"engine": "endpoint", "base_url": f"https://me:{SECRET}@host:8000"}, "base_url"),
    ({"engine": "endpoint", "base_url": SECRET}, "base_url"),
])
def test_secrets_are_refused_without_being_echoed(knobs, field):
    with pytest.raises(ConfigError, match=f"'{field}'") as err:
        EvaluationConfig.from_dict({"profile": "p", **knobs})
    assert SECRET not in str(err.value) and "x" * 20 not in str(err.value) and "is not shown" in str(err.value)


def test_endpoint_knobs_and_key_from_the_environment():
    cfg = EvaluationConfig.from_dict({"profile": "p", "engine": "endpoint", "base_url": "http://127.0.0.1:9",
                                      "api_key_env": "TW_EVAL_KEY", "temperature": 0.6, "top_p": 0.95,
                                      "samples_per_problem": 16})
    assert (cfg.served_model, cfg.samples_per_problem) == ("{model}", 16)
    with pytest.raises(ValueError, match="TW_EVAL_KEY is not set") as err:
        api_key(cfg.api_key_env, {})
    assert "export TW_EVAL_KEY" in str(err.value)
    engine = endpoint_engine(cfg.base_url, "parallel", 2, cfg.api_key_env, environ={"TW_EVAL_KEY": SECRET})
    assert SECRET not in repr(engine) and "api_key=set" in repr(engine)
    engine.close()
    with pytest.raises(ValueError, match="http"):
        endpoint_engine(SECRET, "parallel", 2)


def test_several_models_need_a_model_placeholder(tmp_path):
    cfg = EvaluationConfig.from_dict({"profile": "p", "engine": "endpoint", "base_url": "http://127.0.0.1:9",
                                      "served_model": "tiny"})
    with pytest.raises(ValueError, match=r"put \{model\} in served_model"):
        evaluation.evaluate_models(cfg, None, {"sequential": tmp_path, "parallel": tmp_path}, [], TOK)


# ------------------------------------------------------------------------------ a real vllm serve (engines)
NEEDS_VLLM = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
VOLATILE = {"wall_seconds", "engine_seconds", "seconds", "started", "cached_tokens", "latency_seconds"}
KNOBS = {"max_new_tokens": 512, "max_thread_tokens": 128, "batch_size": 2}


@pytest.fixture(scope="module")
def memorised(tmp_path_factory):
    """A tiny model that memorised the parallel CoTs of three problems (it forks on them), saved; the problems."""
    tmp = tmp_path_factory.mktemp("memorised")
    rng = random.Random(5)
    params = ExpressionParams(groups_min=2, groups_max=3, repeats_min=2, repeats_max=3, balanced_fraction=1.0)
    made = [make_problem("expressions", rng, params) for _ in range(3)]
    spec = models.TinyModelSpec(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128,
                                initializer_range=0.2)
    model = models.build_tiny_model(TOK, spec, seed=0)
    settings = sft.TrainSettings(max_steps=150, learning_rate=1e-2, warmup_steps=0, save_steps=1000,
                                 lr_scheduler_type="constant", logging_steps=50)
    examples = [{"question": p.question, "text": p.plan.parallel_text()} for p in made]
    sft.train(sft.make_trainer(model, TOK, sft.rows_dataset(sft.trajectory_tries(examples, TOK), max_tokens=4096),
                               tmp / "run", settings))
    folder = models.save_model(model, TOK, tmp / "model")
    problems = [{"id": f"t{i}", "question": p.question, "answer": p.answer, "family": p.family, "shape": p.shape}
                for i, p in enumerate(made)]
    return folder, problems


def _evaluate(tmp_path, folder, problems, **knobs) -> list[dict]:
    """Notebook 05's decoding (`evaluation.evaluate_models`) of the model as ``parallel``, in a fresh run folder."""
    cfg = EvaluationConfig.from_dict({"profile": "t", **KNOBS, **knobs})
    run = RunFolder(cfg, tmp_path, tmp_path / cfg.engine)
    return evaluation.evaluate_models(cfg, run, {"parallel": folder}, problems, TOK)["parallel"]


def _comparable(records: list[dict]) -> list[dict]:
    """The records without their times: responses, token counts, calls (kind, lengths, finish reasons)."""
    return [{k: v for k, v in r.items() if k not in VOLATILE}
            | {"calls": [{k: v for k, v in c.items() if k not in VOLATILE} for c in r["calls"]]} for r in records]


OFFLINE_VLLM = textwrap.dedent('''
    import json
    import sys

    if __name__ == "__main__":
        sys.path.insert(0, sys.argv[3])
        from test_evaluation_protocol import _evaluate
        from pathlib import Path

        records = _evaluate(Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[4]), engine="vllm")
        print("RESULT " + json.dumps(records), flush=True)
''')


@pytest.mark.engines
@NEEDS_VLLM
def test_endpoint_engine_in_05_is_token_identical_to_the_offline_engines(memorised, tmp_path, monkeypatch):
    from vllm_script import run_vllm_script

    from twlib.engines import EngineError
    from twlib.engines.server import VLLMServer

    folder, problems = memorised
    seconds = {"hf": time.monotonic()}
    hf = _evaluate(tmp_path, folder, problems, engine="hf")
    assert sum(r["num_blocks"] for r in hf) >= 2, "the memorised model should fork"
    monkeypatch.setenv("TW_EVAL_KEY", "k-" + "7" * 20)
    seconds["server start"] = time.monotonic()
    with VLLMServer(folder, model_name="parallel", max_model_len=models.context_length(folder),
                    extra_args=("--api-key", "k-" + "7" * 20)) as server:
        seconds["endpoint"] = time.monotonic()
        endpoint = _evaluate(tmp_path, folder, problems, engine="endpoint", base_url=server.url,
                             api_key_env="TW_EVAL_KEY", endpoint_timeout_s=120.0)
        seconds["wrong key"] = time.monotonic()
        monkeypatch.setenv("TW_EVAL_KEY", "wrong")
        with pytest.raises(EngineError, match="HTTP 401"):
            _evaluate(tmp_path / "nokey", folder, problems[:1], engine="endpoint", base_url=server.url,
                      api_key_env="TW_EVAL_KEY")
        seconds["server stop"] = time.monotonic()
    assert _comparable(endpoint) == _comparable(hf)
    seconds["offline vllm"] = time.monotonic()
    offline = run_vllm_script(tmp_path, OFFLINE_VLLM, str(tmp_path / "offline"), str(folder),
                              str(Path(__file__).parent), json.dumps(problems))
    seconds["end"] = time.monotonic()
    assert _comparable(offline) == _comparable(hf)
    marks = list(seconds.items())
    print("\nrecords:", len(hf), "response tokens:", sum(r["total_tokens"] for r in hf), "blocks:",
          sum(r["num_blocks"] for r in hf), "engine calls:", sum(r["engine_calls"] for r in hf), "| seconds:",
          ", ".join(f"{name} {b - a:.1f}" for (name, a), (_, b) in zip(marks, marks[1:])))
