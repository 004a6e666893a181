"""Evaluation of the sequential baseline and the parallel model (paper §4, docs/design.md §7).

Both models run through the same orchestrator on the same engine (``hf``, offline ``vllm``, or an
OpenAI-compatible ``endpoint``): the sequential model simply never opens a block, so its one call per problem is
plain decoding. Problems are decoded one at a time by default, so wall time is per-problem latency, as the paper
reports it.

**Samples.** With ``samples_per_problem`` = n (the official evaluation: n = 16, temperature 0.6, top_p 0.95),
sample j of every problem is decoded in pass j, a resumable step of its own. Accuracy is avg@n: each problem's
share of correct samples, averaged over problems; its standard error is the standard deviation over problems
of those per-problem means, divided by √problems (problems are the sampled unit; each mean's own sampling noise
is part of that spread). Speedups are per parallel sample, against the sequential model's MEAN over its n samples
of the same problem (pairing sample j with sample j would only add the baseline's sampling noise to every ratio,
and inflate the max); the max speedup is over correct parallel samples of problems the sequential model solves
(at least half its samples right). With n = 1 all of this is the single-answer protocol.

**Two latency conventions** (docs/design.md §7). *Ours* counts response tokens, each thread's
``<Thread>``/``</Thread>`` in that thread (`twlib.format.TrajectoryStats`). The *official* code adds the prompt
to the total and to the longest path, and counts every thread's two tags in the block's sequential part:
official longest = critical path + Σ_blocks 2(K−1) + prompt, official total = total + prompt. Worked example
(one problem, baseline total 300, prompt 20; the parallel answer has total 320, critical path 150, blocks of 2
and 3 threads): ours, speedup 300 / 150 = 2.0 and acceleration ratio 1 − 150/320 = 0.53; official, longest
150 + 2 + 4 + 20 = 176, speedup (300 + 20) / 176 = 1.82, acceleration ratio 1 − 176/340 = 0.48. The paper's
numbers are official ones, so comparisons with them use that table.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd
import torch

from . import format as fmt
from .config import EvaluationConfig
from .engines import Sampling
from .engines.local import endpoint_engine, local_server, make_engine
from .grading import grade
from .models import context_length
from .orchestrator import Orchestrator, OrchestratorConfig
from .show import progress
from .tasks.math_data import BENCHMARKS
from .tokenizer import prompt_ids

# The paper's headline (Qwen3-8B, mean over AIME24, AIME25, AMC23, MATH500, Minerva, OlympiadBench; official
# latency convention, avg@16).
PAPER_HEADLINE = {"seq_accuracy": 0.722, "par_accuracy": 0.719, "seq_latency": 15100, "par_latency": 13200,
                  "mean_speedup": 1.22}
SIX_MEAN = "mean of six benchmarks"
CONVENTIONS = {"ours": "ours: response tokens, a thread's own tags in that thread",
               "official": "official: prompt included, every thread's tags in the block's sequential part"}
# Frame columns of each convention: sequential latency, parallel latency, per-sample speedup, acceleration ratio.
FRAME_COLUMNS = {"ours": ("seq_tokens", "par_critical_tokens", "speedup", "acceleration"),
                 "official": ("seq_official_tokens", "par_official_longest", "official_speedup", "official_acceleration")}


# ------------------------------------------------------------------------------------------------ decoding
def engine_for(cfg: EvaluationConfig, model_path: str | Path, tokenizer, name: str = "model", base_url: str = ""):
    """The engine of ``cfg`` for one model: the saved folder on ``hf``/``vllm``, or the server of ``base_url`` (the
    config's unless given) that serves it as ``served_model`` (``{model}`` in either replaced by ``name``)."""
    if cfg.engine == "endpoint":
        return endpoint_engine((base_url or cfg.base_url).format(model=name), cfg.served_model.format(model=name),
                               tokenizer.eos_token_id, cfg.api_key_env, timeout_s=cfg.endpoint_timeout_s,
                               concurrency=cfg.endpoint_concurrency)
    return make_engine(cfg.engine, model_path, tokenizer.eos_token_id, cfg.dtype, cfg.tensor_parallel_size)


def _serving(cfg: EvaluationConfig, model_path: str | Path, name: str, stack: contextlib.ExitStack) -> str:
    """``base_url`` for one model: the config's, or with ``engine: endpoint`` and none given, the URL of a local
    ``vllm serve`` of the model started now and stopped when ``stack`` closes."""
    if cfg.engine != "endpoint" or cfg.base_url:
        return ""
    return stack.enter_context(local_server(model_path, cfg.served_model.format(model=name), cfg.dtype)).url


def orchestrator(cfg: EvaluationConfig, model_path: str | Path, tokenizer, name: str = "model",
                 engine=None) -> Orchestrator:
    """Notebook 05's fork-join orchestrator over one model, with the limits and sampling of ``cfg``. Requests
    carry no seed: a fixed per-request seed would replay the same random numbers in every call of a trajectory
    (threads of one block, the continuation after the join); `evaluate_models` seeds each pass instead."""
    sampling = Sampling(temperature=cfg.temperature, top_p=cfg.top_p)
    limits = OrchestratorConfig.for_stage(cfg, context_length(model_path), sampling)
    return Orchestrator(engine if engine is not None else engine_for(cfg, model_path, tokenizer, name), tokenizer, limits)


def evaluate_models(cfg: EvaluationConfig, run, model_paths: dict[str, Path], problems: Sequence[dict],
                    tokenizer) -> dict[str, list[dict]]:
    """Notebook 05's records of every model on ``problems``, ``cfg.samples_per_problem`` per problem in
    problem-major order, each (model, sample) pass decoded once per run, also written to ``<run>/<model>.jsonl``."""
    shared = cfg.engine == "endpoint" and cfg.base_url  # one server for every model (none given: one each)
    if shared and len(model_paths) > 1 and "{model}" not in cfg.base_url + cfg.served_model:
        raise ValueError(f"{len(model_paths)} models would all be sent to the one served model "
                         f"{cfg.served_model!r}; put {{model}} in served_model or base_url (e.g. served_model: "
                         "'{model}', each model served under its name: " + ", ".join(model_paths) + ")")
    records = {}
    for kind, path in model_paths.items():
        records[kind] = _model_records(cfg, run, kind, path, problems, tokenizer)
        run.write_jsonl(f"{kind}.jsonl", records[kind])
    return records


def _model_records(cfg: EvaluationConfig, run, kind: str, path: Path, problems: Sequence[dict], tokenizer,
                   step: str = "records") -> list[dict]:
    """One model's passes; the engine (and a server the kit runs for it) is built at the first pass that decodes (a
    re-opened run decodes none) and closed after the last."""
    built: list = []

    def decode(sample: int, stack: contextlib.ExitStack) -> list[dict]:
        if not built:
            with run.timer(f"load_{step}_{kind}"):  # the engine's start-up, apart from the decoding it serves
                engine = engine_for(cfg, path, tokenizer, kind, _serving(cfg, path, kind, stack))
                built.append(orchestrator(cfg, path, tokenizer, kind, engine=engine))
        torch.manual_seed(cfg.seed + sample)  # what the transformers engine samples with: pass j replays exactly
        label = kind if cfg.samples_per_problem == 1 else f"{kind} sample {sample + 1}/{cfg.samples_per_problem}"
        with run.timer(f"{step.replace('records', 'evaluate')}_{kind}"), progress(len(problems), label) as bar:
            return evaluate(built[0], problems, tokenizer, cfg.batch_size, bar.update, sample=sample)

    with contextlib.ExitStack() as stack:
        # Sample 0 keeps the single-answer step name, so an n = 1 run reads as before.
        passes = [run.once(f"{step}-{kind}" + (f"-sample{s}" if s else ""), lambda s=s: decode(s, stack))
                  for s in range(cfg.samples_per_problem)]
        if built and hasattr(built[0].engine, "close"):
            built[0].engine.close()
    return [r for rows in zip(*passes) for r in rows]


def check_records(cfg: EvaluationConfig, run, model_path: Path, problems: Sequence[dict], tokenizer) -> list[dict]:
    """Notebook 05's engine check: the parallel model decoded once more, on ``cfg.check_engine`` (a kit-served
    ``vllm serve`` for ``endpoint`` without ``base_url``), once per run; also written to
    ``<run>/parallel.<check_engine>.jsonl``."""
    records = _model_records(dataclasses.replace(cfg, engine=cfg.check_engine), run, "parallel", model_path, problems,
                             tokenizer, step=f"check-{cfg.check_engine}")
    run.write_jsonl(f"parallel.{cfg.check_engine}.jsonl", records)
    return records


def engine_agreement(records: Sequence[dict], checked: Sequence[dict]) -> dict:
    """How many answers two engines wrote alike (the same response text and token counts), and the first one that
    differs; under greedy decoding all should agree (docs/design.md §6).

    >>> engine_agreement([{"id": "a", "response": "x", "total_tokens": 3, "critical_path_tokens": 3}] * 2,
    ...                  [{"id": "a", "response": "x", "total_tokens": 3, "critical_path_tokens": 3}, {"id": "b"}])
    {'answers': 2, 'identical': 1, 'first_difference': 'b'}
    """
    keys = ("response", "total_tokens", "critical_path_tokens")
    same = [all(a.get(k) == b.get(k) for k in keys) for a, b in zip(records, checked, strict=True)]
    first = next((b.get("id", i) for i, (b, ok) in enumerate(zip(checked, same)) if not ok), None)
    return {"answers": len(same), "identical": sum(same), "first_difference": first}


def evaluate(orchestrator, problems: Sequence[dict], tokenizer, batch_size: int = 1,
             progress: Callable[[int], None] | None = None, sample: int = 0) -> list[dict]:
    """One record per problem (``problems`` rows need ``question`` and ``answer``; ``family``, ``shape`` and ``id``
    are carried over when present, and a real-math ``source`` becomes the family), tagged with the problem's
    index and ``sample``, holding ``prompt_tokens`` and ``threads_per_block`` for the official convention."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    records = []
    for start in range(0, len(problems), batch_size):
        chunk = problems[start:start + batch_size]
        t0 = time.perf_counter()
        results = orchestrator.run([prompt_ids(tokenizer, p["question"]) for p in chunk])
        wall = (time.perf_counter() - t0) / len(chunk)
        for i, (p, r) in enumerate(zip(chunk, results), start):
            g = grade(r.text, str(p["answer"]))
            records.append({
                **{k: p[k] for k in ("id", "family", "shape") if k in p},
                # Real-math problems: the benchmark plays the family's part in the tables.
                **({"family": p["source"]} if "source" in p and "family" not in p else {}),
                "problem": i, "sample": sample, "prompt_tokens": len(r.prompt_ids),
                "gold": str(p["answer"]), "answer": g.answer, "correct": g.correct,
                "total_tokens": r.metrics["total_tokens"], "critical_path_tokens": r.metrics["critical_path_tokens"],
                "num_blocks": r.metrics["num_blocks"], "threads_per_block": r.metrics["threads_per_block"],
                "engine_calls": r.metrics["engine_calls"], "flags": dict(r.flags),
                "format_correct": format_correct(r, tokenizer),
                # With batch_size > 1 both times are the problem's share of its batch.
                "wall_seconds": wall, "engine_seconds": r.engine_seconds / len(chunk),
                "response": r.text, "calls": [dataclasses.asdict(c) for c in r.calls]})
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


def examples(frame, records: dict[str, list[dict]], problems: Sequence[dict], model: str = "parallel") -> list[dict]:
    """Two test answers of ``model`` to show: the fastest forked one both models got right, and the first that
    stayed sequential; ``{"title", "question", "response", "calls"}`` (what `twlib.viewer.report` takes)."""
    forked = frame[(frame.num_blocks > 0) & frame.par_correct & frame.seq_correct].sort_values("speedup").tail(1)
    stayed = frame[frame.num_blocks == 0].head(1)
    out = []
    for what, rows in (("forked", forked), ("stayed sequential", stayed)):
        for i in rows.index:
            r, p = records[model][i], problems[int(frame.problem[i])]
            sample = f", sample {r['sample'] + 1}" if frame["sample"].max() > 0 else ""
            out.append({"title": f"{what}: {p.get('id', i)} ({p.get('shape', p.get('source', ''))}{sample}), "
                                 f"speedup {frame.speedup[i]:.2f}",
                        "question": p["question"], "response": r["response"], "calls": r.get("calls", [])})
    return out


# ----------------------------------------------------------------------------------- per-record latencies
def official_latency(record: dict) -> tuple[int, int]:
    """``(longest path, total)`` of a record in the official convention (module docstring).

    >>> official_latency({"total_tokens": 320, "critical_path_tokens": 150, "threads_per_block": [2, 3],
    ...                   "prompt_tokens": 20})
    (176, 340)
    """
    tags = sum(2 * (k - 1) for k in record["threads_per_block"])
    # Records written before prompt_tokens was kept: the first engine call's context is the prompt.
    prompt = record["prompt_tokens"] if "prompt_tokens" in record else record["calls"][0]["prompt_tokens"]
    return record["critical_path_tokens"] + tags + prompt, record["total_tokens"] + prompt


def _has_official(record: dict) -> bool:
    """Whether a record tells its prompt length and threads per block (what the official convention adds)."""
    return "threads_per_block" in record and ("prompt_tokens" in record or bool(record.get("calls")))


def costs(record: dict, convention: str = "ours") -> tuple[float, float]:
    """``(total, latency)`` of a record: ours (response tokens, critical path) or official (longest path)."""
    if convention == "ours":
        return record["total_tokens"], record["critical_path_tokens"]
    if convention != "official":
        raise ValueError(f"convention must be 'ours' or 'official', got {convention!r}")
    longest, total = official_latency(record)
    return total, longest


def acceleration_ratio(record: dict, convention: str = "ours") -> float:
    """``1 − latency / total`` of one record; ours reads higher (the prompt and the tags are not counted)."""
    total, latency = costs(record, convention)
    return 1 - latency / total if total else 0.0


# ------------------------------------------------------------------------------------------ aggregation
def _keys(records: Sequence[dict]) -> list:
    """Each record's problem: its ``problem`` index, or its position (records of one sample each)."""
    return [r.get("problem", i) for i, r in enumerate(records)]


def _per_problem(values: Sequence[float], keys: Sequence) -> dict:
    """``{problem: mean of its values}``, problems in first-seen order."""
    groups: dict = {}
    for k, v in zip(keys, values):
        groups.setdefault(k, []).append(float(v))
    return {k: sum(vs) / len(vs) for k, vs in groups.items()}


def _mean(values: Sequence[float], keys: Sequence) -> float:
    """The mean over problems of per-problem means (with n samples of every problem: the plain mean)."""
    means = _per_problem(values, keys)
    return sum(means.values()) / len(means)


def avg_at_n(correct: Sequence[bool], keys: Sequence) -> tuple[float, float | None]:
    """avg@n and its standard error (the std over problems of per-problem accuracy / √problems; None for one).

    >>> avg_at_n([True, False, True, True], ["a", "a", "b", "b"])   # problem a 0.5, b 1.0
    (0.75, 0.25)
    """
    means = list(_per_problem(correct, keys).values())
    mean = sum(means) / len(means)
    if len(means) < 2:
        return mean, None
    var = sum((m - mean) ** 2 for m in means) / (len(means) - 1)
    return mean, math.sqrt(var / len(means))


def speedups(sequential: Sequence[dict], parallel: Sequence[dict], convention: str = "ours") -> list[float]:
    """Per parallel sample: the sequential model's mean total over its samples of the problem / the sample's
    latency, in ``convention``. Two samples of one problem, baseline totals 300 and 200 (mean 250):

    >>> seq = [{"problem": 0, "total_tokens": t, "critical_path_tokens": t} for t in (300, 200)]
    >>> speedups(seq, [{"problem": 0, "total_tokens": 300, "critical_path_tokens": c} for c in (125, 250)])
    [2.0, 1.0]
    """
    base = _per_problem([costs(s, convention)[0] for s in sequential], _keys(sequential))
    return [base[k] / costs(p, convention)[1] for p, k in zip(parallel, _keys(parallel))]


def _check_paired(sequential: Sequence[dict], parallel: Sequence[dict]) -> None:
    if len(sequential) != len(parallel) or not parallel:
        raise ValueError(f"need the same non-empty problem list for both models, got {len(sequential)} "
                         f"and {len(parallel)} records")
    fields = ("id", "problem", "sample")
    if any(s["gold"] != p["gold"] or any(s.get(f) != p.get(f) for f in fields) for s, p in zip(sequential, parallel)):
        raise ValueError("the two record lists are not over the same problems in the same order")


def _token_summary(sequential: Sequence[dict], parallel: Sequence[dict], convention: str) -> dict:
    """Latency and speedup entries of `summarize` in one convention (official ones prefixed ``official_``)."""
    keys = _keys(parallel)
    mean = lambda values: _mean(values, keys)  # noqa: E731 (one problem list for every entry)
    ratios = speedups(sequential, parallel, convention)
    solved = _per_problem([s["correct"] for s in sequential], keys)
    both = [x for x, p, k in zip(ratios, parallel, keys) if p["correct"] and solved[k] >= 0.5]
    seq_total = mean([costs(s, convention)[0] for s in sequential])
    par_latency = mean([costs(p, convention)[1] for p in parallel])
    prefix, path = ("", "critical_path") if convention == "ours" else ("official_", "longest_path")
    return {f"{prefix}{k}": v for k, v in {
        "sequential_tokens_mean": seq_total, "parallel_total_tokens_mean": mean([costs(p, convention)[0] for p in parallel]),
        f"parallel_{path}_mean": par_latency, "mean_speedup": mean(ratios),
        "speedup_of_means": seq_total / par_latency, "max_speedup_both_correct": max(both) if both else None,
        "acceleration_ratio": mean([acceleration_ratio(p, convention) for p in parallel])}.items()}


def summarize(sequential: Sequence[dict], parallel: Sequence[dict]) -> dict:
    """docs/design.md §7 summary of two record lists over the same problems and samples, in the same order: avg@n
    accuracies with standard errors, tokens and speedups in our convention and, when the records hold
    ``prompt_tokens`` and ``threads_per_block``, the official one (``official_*``), activation and wall clock."""
    _check_paired(sequential, parallel)
    keys = _keys(parallel)
    seq_acc, seq_se = avg_at_n([r["correct"] for r in sequential], keys)
    par_acc, par_se = avg_at_n([r["correct"] for r in parallel], keys)
    out = {"problems": len(set(keys)), "samples_per_problem": len(parallel) // len(set(keys)),
           "sequential_accuracy": seq_acc, "sequential_accuracy_se": seq_se,
           "parallel_accuracy": par_acc, "parallel_accuracy_se": par_se,
           **_token_summary(sequential, parallel, "ours"),
           "activation_ratio": _mean([r["num_blocks"] > 0 for r in parallel], keys)}
    if all(_has_official(r) for r in [*sequential, *parallel]):
        out |= _token_summary(sequential, parallel, "official")
    seq_wall = sum(r["wall_seconds"] for r in sequential)
    par_wall = sum(r["wall_seconds"] for r in parallel)
    wall_speedup = seq_wall / par_wall if par_wall else float("nan")
    return out | {
        "sequential_wall_seconds": seq_wall, "parallel_wall_seconds": par_wall, "wall_clock_speedup": wall_speedup,
        "parallel_efficiency": wall_speedup / out["speedup_of_means"],
        "orchestration_overhead": 1 - sum(r["engine_seconds"] for r in parallel) / par_wall if par_wall else None}


# ------------------------------------------------------------------------------------------------ tables
def paired_frame(sequential: Sequence[dict], parallel: Sequence[dict]):
    """One row per parallel sample with both models' outcome (the sequential model's same-index sample) and the
    per-sample speedups and acceleration ratios in both conventions (pandas)."""
    _check_paired(sequential, parallel)
    keys = _keys(parallel)
    solved = _per_problem([s["correct"] for s in sequential], keys)
    ours, official = speedups(sequential, parallel), speedups(sequential, parallel, "official")
    return pd.DataFrame([{
        "id": p.get("id"), "problem": k, "sample": p.get("sample", 0),
        "family": p.get("family", "all"), "shape": p.get("shape", "all"),
        "seq_correct": s["correct"], "par_correct": p["correct"], "seq_solved": solved[k] >= 0.5,
        "seq_tokens": s["total_tokens"], "par_total_tokens": p["total_tokens"],
        "par_critical_tokens": p["critical_path_tokens"], "speedup": x,
        "acceleration": acceleration_ratio(p), "seq_official_tokens": costs(s, "official")[0],
        "par_official_total": costs(p, "official")[0], "par_official_longest": costs(p, "official")[1],
        "official_speedup": y, "official_acceleration": acceleration_ratio(p, "official"),
        "num_blocks": p["num_blocks"], "threads_per_block": list(p["threads_per_block"]),
        "seq_wall_seconds": s["wall_seconds"], "par_wall_seconds": p["wall_seconds"]}
        for s, p, k, x, y in zip(sequential, parallel, keys, ours, official)])


def paired_frames(records: dict[str, list[dict]], baseline: str = "sequential") -> dict:
    """`paired_frame` of the baseline with every other model: ``{model: frame}``."""
    return {name: paired_frame(records[baseline], recs) for name, recs in records.items() if name != baseline}


def _table_row(g, convention: str) -> dict:
    """One benchmark's row: avg@n accuracies with standard errors, mean latencies and speedups (means over problems
    of per-problem means), the max speedup over correct samples of problems the baseline solves, activation."""
    seq_latency, par_latency, speedup, acceleration = FRAME_COLUMNS[convention]
    per = g.groupby("problem", sort=False)
    solved = g[g.par_correct & g.seq_solved]
    return {"problems": per.ngroups, "samples": len(g) // per.ngroups,
            "seq_accuracy": per.seq_correct.mean().mean(), "seq_accuracy_se": per.seq_correct.mean().sem(),
            "par_accuracy": per.par_correct.mean().mean(), "par_accuracy_se": per.par_correct.mean().sem(),
            "seq_latency": per[seq_latency].mean().mean(), "par_latency": per[par_latency].mean().mean(),
            "mean_speedup": per[speedup].mean().mean(),
            "max_speedup": solved[speedup].max() if len(solved) else float("nan"),
            "acceleration_ratio": per[acceleration].mean().mean(),
            "activation": (g.num_blocks > 0).groupby(g.problem, sort=False).mean().mean()}


def _six_mean(rows: list[dict]) -> dict:
    """The paper's "Avg" row: the mean over the six benchmarks (not over problems); standard errors combine as
    √(Σ se²) / 6, the max speedup is the largest of the six."""
    frame = pd.DataFrame(rows)
    out = {c: frame[c].mean() for c in ("seq_accuracy", "par_accuracy", "seq_latency", "par_latency", "mean_speedup",
                                         "acceleration_ratio", "activation")}
    for c in ("seq_accuracy_se", "par_accuracy_se"):
        out[c] = math.sqrt((frame[c] ** 2).sum(skipna=False)) / len(frame)  # undefined for one: undefined here
    return {"family": SIX_MEAN, "shape": "all", "problems": int(frame.problems.sum()), "samples": int(frame.samples.min()),
            **out, "max_speedup": frame.max_speedup.max()}


def paper_table(frame, convention: str = "ours"):
    """The paper's results table in ``convention`` (``ours`` or ``official``): one row per benchmark (the family;
    for synthetic data family and shape), then the mean over the paper's six benchmarks when those are the
    benchmarks, else all problems pooled (family "all"). Columns: problems, samples, avg@n accuracy of both models
    with standard errors, token latency of both, mean and max speedup, acceleration ratio, activation (pandas)."""
    if convention not in FRAME_COLUMNS:
        raise ValueError(f"convention must be 'ours' or 'official', got {convention!r}")
    rows = [{"family": f, "shape": s, **_table_row(g, convention)}
            for (f, s), g in frame.groupby(["family", "shape"], sort=True)]
    if set(frame.family) == set(BENCHMARKS) and set(frame["shape"]) == {"all"}:
        rows.append(_six_mean(rows))
    else:
        rows.append({"family": "all", "shape": "all", **_table_row(frame, convention)})
    return pd.DataFrame(rows)


def paper_comparison(table):
    """This run's summary row (the six-benchmark mean, or all problems) next to the paper's headline; pass the
    ``official`` table, the convention of the paper's numbers (pandas)."""
    ours = table[table.family.isin([SIX_MEAN, "all"]) & (table["shape"] == "all")].iloc[-1]
    return pd.DataFrame([{"run": "paper: Qwen3-8B, six benchmarks", **PAPER_HEADLINE},
                         {"run": f"this run ({ours.family})", **{k: float(ours[k]) for k in PAPER_HEADLINE}}]).set_index("run")


def latency_conventions(frame):
    """All problems pooled, one row per latency convention: mean latencies, speedups and acceleration ratio, so the
    two read side by side (ours reads higher: the prompt and the threads' tags are left out of the latency)."""
    keep = ["seq_latency", "par_latency", "mean_speedup", "max_speedup", "acceleration_ratio"]
    rows = {CONVENTIONS[c]: {k: _table_row(frame, c)[k] for k in keep} for c in FRAME_COLUMNS}
    return pd.DataFrame(rows).T.rename_axis("latency convention")


def json_table(table, by_index: bool = False) -> list[dict] | dict[str, dict]:
    """A table for metrics.json: its rows (``by_index``: ``{index: row}``), NaN (an undefined standard error or
    max) written as null, e.g. ``[{"family": "all", "max_speedup": None}]``."""
    def plain(row: dict) -> dict:
        return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}

    if by_index:
        return {str(name): plain(row) for name, row in table.to_dict("index").items()}
    return [plain(row) for row in table.to_dict("records")]


def model_table(records: dict, baseline: str = "sequential"):
    """One row per evaluated model (SFT and RL alike): avg@n accuracy and its standard error, mean total and
    critical-path tokens, mean per-sample speedup against ``baseline``'s mean total on the same problem (ours and,
    when the records allow, official), activation ratio (pandas).

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
        keys = _keys(recs)
        mean = lambda values: _mean(values, keys)  # noqa: E731 (one problem list for every entry)
        accuracy, se = avg_at_n([r["correct"] for r in recs], keys)
        rows[name] = {"accuracy": accuracy, "accuracy_se": se, "total_tokens": mean([r["total_tokens"] for r in recs]),
                      "critical_path_tokens": mean([r["critical_path_tokens"] for r in recs]),
                      "mean_speedup": mean(speedups(base, recs)), "activation": mean([r["num_blocks"] > 0 for r in recs])}
        if all(_has_official(r) for r in [*base, *recs]):
            rows[name]["official_mean_speedup"] = mean(speedups(base, recs, "official"))
        if all("format_correct" in r for r in recs):
            rows[name]["format_correct_rate"] = mean([r["format_correct"] for r in recs])
    return pd.DataFrame(rows).T
