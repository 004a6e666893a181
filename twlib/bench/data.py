"""``python -m twlib.bench data``: per task family (and shape) the examples, mean sequential vs parallel tokens,
mean critical path, mean ideal speedup, activation rate, and segment-wise tokenisation drift with the tiny
tokenizer and with the Qwen vocabulary."""
from __future__ import annotations

import time
from typing import Iterator

import pandas as pd

from .. import format as fmt
from ..config import Profile
from ..dataset import problem_row
from ..tasks import generate_splits, task_mix
from ..tokenizer import add_tags, build_char_tokenizer, drift, qwen_tokenizer


def _summaries(df, keys: list[str]) -> Iterator[dict]:
    for key, g in df.groupby(keys):
        key = key if isinstance(key, tuple) else (key,)
        yield {**dict(zip(keys, key)), "examples": int(len(g)),
               "seq_tokens_mean": round(float(g.seq_tokens.mean()), 2),
               "par_total_tokens_mean": round(float(g.par_total_tokens.mean()), 2),
               "par_critical_tokens_mean": round(float(g.par_critical_tokens.mean()), 2),
               "ideal_speedup_mean": round(float(g.ideal_speedup.mean()), 3),
               "ideal_speedup_ratio_of_means": round(float(g.seq_tokens.mean() / g.par_critical_tokens.mean()), 3),
               "activation_rate": round(float((g.num_blocks > 0).mean()), 3),
               "drift_examples": int((g.drift_tokens >= 0).sum()),
               "qwen_drift_examples": int((g.qwen_drift_tokens >= 0).sum())}


def run(profile: Profile) -> Iterator[dict]:
    cfg = profile.stage_config("01_trajectories")
    t0 = time.perf_counter()
    problems = generate_splits(task_mix(cfg), cfg.sizes(), cfg.seed)
    tok = build_char_tokenizer()
    qwen = qwen_tokenizer()
    add_tags(qwen)
    rows = []
    for split, items in problems.items():
        for i, p in enumerate(items):
            row = problem_row(p, tok, split, i)
            d = drift(fmt.parse(p.plan.parallel_text()), qwen)
            row["qwen_drift_tokens"] = -1 if d.first_mismatch is None else d.first_mismatch
            rows.append(row)
    df = pd.DataFrame(rows)
    seconds = round(time.perf_counter() - t0, 2)
    common = {"bench": "data", "profile": profile.name, "seconds": seconds}
    for row in _summaries(df, ["family"]):
        yield {**common, **row, "shape": "all"}
    for row in _summaries(df, ["family", "shape"]):
        yield {**common, **row}
