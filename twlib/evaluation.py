"""Evaluation of the sequential baseline and the parallel model (paper §4, docs/design.md §7).

Both models run through the same orchestrator on the same engine: the sequential model simply never
opens a block, so its one call per problem is plain decoding. Problems are decoded one at a time by
default, so wall time is per-problem latency, as the paper reports it.

Per-problem speedup = baseline total tokens / parallel critical path. Worked example with two
problems: baseline totals (300, 200), parallel critical paths (150, 200) → per-problem speedups
(2.0, 1.0), ``mean_speedup`` 1.5, ``speedup_of_means`` 500 / 350 = 1.43.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd

from . import format as fmt
from .config import EvaluationConfig
from .engines import Sampling
from .engines.local import make_engine
from .grading import grade
from .models import context_length
from .orchestrator import Orchestrator, OrchestratorConfig
from .tokenizer import prompt_ids

# The paper's headline (Qwen3-8B, mean over AIME24, AIME25, AMC23, MATH500, Minerva, OlympiadBench).
PAPER_HEADLINE = {"seq_accuracy": 0.722, "par_accuracy": 0.719, "seq_latency": 15100, "par_latency": 13200,
                  "mean_speedup": 1.22}


def orchestrator(cfg: EvaluationConfig, model_path: str | Path, tokenizer) -> Orchestrator:
    """Notebook 05's fork-join orchestrator over the saved model, on the engine and with the limits of ``cfg``."""
    engine = make_engine(cfg.engine, model_path, tokenizer.eos_token_id, cfg.dtype, cfg.tensor_parallel_size)
    limits = OrchestratorConfig.for_stage(cfg, context_length(model_path),
                                          Sampling(temperature=cfg.temperature, seed=cfg.seed))
    return Orchestrator(engine, tokenizer, limits)


def evaluate(orchestrator, problems: Sequence[dict], tokenizer, batch_size: int = 1,
             progress: Callable[[int], None] | None = None) -> list[dict]:
    """One record per problem (``problems`` rows need ``question`` and ``answer``; ``family``,
    ``shape`` and ``id`` are carried over when present, and a real-math ``source`` becomes the family)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    records = []
    for start in range(0, len(problems), batch_size):
        chunk = problems[start:start + batch_size]
        t0 = time.perf_counter()
        results = orchestrator.run([prompt_ids(tokenizer, p["question"]) for p in chunk])
        wall = (time.perf_counter() - t0) / len(chunk)
        for p, r in zip(chunk, results):
            g = grade(r.text, str(p["answer"]))
            records.append({
                **{k: p[k] for k in ("id", "family", "shape") if k in p},
                # Real-math problems: the benchmark plays the family's part in the tables.
                **({"family": p["source"]} if "source" in p and "family" not in p else {}),
                "gold": str(p["answer"]), "answer": g.answer, "correct": g.correct,
                "total_tokens": r.metrics["total_tokens"], "critical_path_tokens": r.metrics["critical_path_tokens"],
                "num_blocks": r.metrics["num_blocks"], "threads_per_block": r.metrics["threads_per_block"],
                "engine_calls": r.metrics["engine_calls"], "flags": dict(r.flags),
                "format_correct": format_correct(r, tokenizer),
                # With batch_size > 1 both times are the problem's share of its batch.
                "wall_seconds": wall, "engine_seconds": r.engine_seconds / len(chunk),
                "response": r.text})
        if progress:
            progress(len(chunk))
    return records


def format_correct(result, tokenizer) -> bool:
    """No orchestrator guard fired and the response passes the strict format check (paper's data filter)."""
    if any(result.flags.values()):
        return False
    try:
        fmt.parse_ids(result.response_ids, tokenizer, strict=True)
    except fmt.FormatError:
        return False
    return True


def summarize(sequential: Sequence[dict], parallel: Sequence[dict]) -> dict:
    """docs/design.md §7 summary of two record lists over the same problems, in the same order."""
    if len(sequential) != len(parallel) or not parallel:
        raise ValueError(f"need the same non-empty problem list for both models, got {len(sequential)} "
                         f"and {len(parallel)} records")
    if any(s.get("id") != p.get("id") or s["gold"] != p["gold"] for s, p in zip(sequential, parallel)):
        raise ValueError("the two record lists are not over the same problems in the same order")
    n = len(parallel)
    speedups = [s["total_tokens"] / p["critical_path_tokens"] for s, p in zip(sequential, parallel)]
    both = [x for x, s, p in zip(speedups, sequential, parallel) if s["correct"] and p["correct"]]
    seq_wall = sum(r["wall_seconds"] for r in sequential)
    par_wall = sum(r["wall_seconds"] for r in parallel)
    token_speedup = sum(r["total_tokens"] for r in sequential) / sum(r["critical_path_tokens"] for r in parallel)
    wall_speedup = seq_wall / par_wall if par_wall else float("nan")
    return {
        "problems": n,
        "sequential_accuracy": sum(r["correct"] for r in sequential) / n,
        "parallel_accuracy": sum(r["correct"] for r in parallel) / n,
        "sequential_tokens_mean": sum(r["total_tokens"] for r in sequential) / n,
        "parallel_total_tokens_mean": sum(r["total_tokens"] for r in parallel) / n,
        "parallel_critical_path_mean": sum(r["critical_path_tokens"] for r in parallel) / n,
        "mean_speedup": sum(speedups) / n,
        "speedup_of_means": token_speedup,
        "max_speedup_both_correct": max(both) if both else None,
        "activation_ratio": sum(r["num_blocks"] > 0 for r in parallel) / n,
        "sequential_wall_seconds": seq_wall, "parallel_wall_seconds": par_wall,
        "wall_clock_speedup": wall_speedup,
        "parallel_efficiency": wall_speedup / token_speedup,
        "orchestration_overhead": 1 - sum(r["engine_seconds"] for r in parallel) / par_wall if par_wall else None,
    }


def paired_frame(sequential: Sequence[dict], parallel: Sequence[dict]):
    """One row per problem with both models' outcome and the per-problem speedup (pandas)."""
    summarize(sequential, parallel)  # same problems, same order
    return pd.DataFrame([{
        "id": p.get("id"), "family": p.get("family", "all"), "shape": p.get("shape", "all"),
        "seq_correct": s["correct"], "par_correct": p["correct"],
        "seq_tokens": s["total_tokens"], "par_total_tokens": p["total_tokens"],
        "par_critical_tokens": p["critical_path_tokens"], "speedup": s["total_tokens"] / p["critical_path_tokens"],
        "num_blocks": p["num_blocks"], "threads_per_block": list(p["threads_per_block"]),
        "seq_wall_seconds": s["wall_seconds"], "par_wall_seconds": p["wall_seconds"]}
        for s, p in zip(sequential, parallel)])


def paper_table(frame):
    """The paper's results table per family and shape (and overall): accuracy and token latency of both
    models, mean and max speedup (max over problems both answer correctly)."""
    def row(g) -> dict:
        both = g[g.seq_correct & g.par_correct]
        return {"problems": len(g), "seq_accuracy": g.seq_correct.mean(), "par_accuracy": g.par_correct.mean(),
                "seq_latency": g.seq_tokens.mean(), "par_latency": g.par_critical_tokens.mean(),
                "mean_speedup": g.speedup.mean(), "max_speedup": both.speedup.max() if len(both) else float("nan"),
                "activation": (g.num_blocks > 0).mean()}

    rows = [{"family": f, "shape": s, **row(g)} for (f, s), g in frame.groupby(["family", "shape"])]
    rows.append({"family": "all", "shape": "all", **row(frame)})
    return pd.DataFrame(rows)


def paper_comparison(table):
    """This run's overall row next to the paper's headline numbers (pandas)."""
    ours = table[(table.family == "all") & (table["shape"] == "all")].iloc[0]
    return pd.DataFrame([{"run": "paper: Qwen3-8B, six benchmarks", **PAPER_HEADLINE},
                         {"run": "this run", **{k: float(ours[k]) for k in PAPER_HEADLINE}}]).set_index("run")


def model_table(records: dict, baseline: str = "sequential"):
    """One row per evaluated model (SFT and RL alike): accuracy, mean total and critical-path tokens, mean
    per-problem speedup against ``baseline``'s total tokens on the same problem, activation ratio (pandas).

    >>> base = [{"gold": "1", "correct": True, "total_tokens": 300, "critical_path_tokens": 300, "num_blocks": 0}]
    >>> par = [{"gold": "1", "correct": True, "total_tokens": 320, "critical_path_tokens": 150, "num_blocks": 1}]
    >>> float(model_table({"sequential": base, "parallel": par}).loc["parallel", "mean_speedup"])
    2.0
    """
    base = records[baseline]
    rows = {}
    for name, recs in records.items():
        if len(recs) != len(base) or any(r["gold"] != b["gold"] for r, b in zip(recs, base)):
            raise ValueError(f"{name} was not evaluated on the same problems as {baseline}")
        n = len(recs)
        rows[name] = {"accuracy": sum(r["correct"] for r in recs) / n,
                      "total_tokens": sum(r["total_tokens"] for r in recs) / n,
                      "critical_path_tokens": sum(r["critical_path_tokens"] for r in recs) / n,
                      "mean_speedup": sum(b["total_tokens"] / r["critical_path_tokens"] for r, b in zip(recs, base)) / n,
                      "activation": sum(r["num_blocks"] > 0 for r in recs) / n}
        if all("format_correct" in r for r in recs):
            rows[name]["format_correct_rate"] = sum(r["format_correct"] for r in recs) / n
    return pd.DataFrame(rows).T
