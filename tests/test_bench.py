"""`python -m twlib.bench data` prints one JSON line per family (and shape) with recomputable numbers."""
import json
from pathlib import Path

import pandas as pd
import pytest

from twlib import bench, config
from twlib.dataset import problem_row
from twlib.tasks import generate_splits, task_mix
from twlib.tokenizer import build_char_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def test_bench_data_smoke(capsys):
    params = ROOT / "params" / "smoke.yaml"
    assert bench.main(["data", "--params", str(params)]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    cfg = config.load_profile(params).stage_config("01_trajectories")
    problems = generate_splits(task_mix(cfg), cfg.sizes(), cfg.seed)
    tok = build_char_tokenizer()
    df = pd.DataFrame([problem_row(p, tok, s, i) for s, ps in problems.items() for i, p in enumerate(ps)])
    overall = {r["family"]: r for r in records if r["shape"] == "all"}
    assert set(overall) == set(df.family)
    assert sum(r["examples"] for r in overall.values()) == sum(cfg.sizes().values())
    for r in records:
        sub = df[df.family == r["family"]]
        if r["shape"] != "all":
            sub = sub[sub["shape"] == r["shape"]]
        assert r["examples"] == len(sub)
        assert r["ideal_speedup_mean"] == pytest.approx(sub.ideal_speedup.mean(), abs=1e-3)
        assert r["par_critical_tokens_mean"] == pytest.approx(sub.par_critical_tokens.mean(), abs=0.01)
        assert r["drift_examples"] == 0 and r["qwen_drift_examples"] == 0
        if r["shape"] in ("chain", "pair"):
            assert r["ideal_speedup_mean"] == 1.0 and r["activation_rate"] == 0.0


def test_bench_rejects_unknown_name():
    with pytest.raises(SystemExit):
        bench.main(["nope", "--params", str(ROOT / "params" / "smoke.yaml")])


def test_bench_induction_copy_is_learnt_at_the_demo_learning_rate():
    profile = config.load_profile(ROOT / "params" / "cpu-demo.yaml")
    (record,) = bench.benchmark("induction")(profile, steps=200, factors=(1.0,))
    assert record["learning_rate"] == profile.stage_config("02_trie_sft").learning_rate
    assert record["solved_at_step"] is not None and record["copy_error"] < 0.01
