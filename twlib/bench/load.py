"""``python -m twlib.bench load --params FILE [--concurrency 1,2,4,8,16] [--problems N]``: serving under load.

The sequential model (notebook 02) and the P-GRPO model (notebook 04) of the profile's run, each behind its own
``vllm serve`` (the kit's `VLLMServer`: CPU build, prefix caching, ``--enable-prompt-tokens-details``, block
size ``--block-size``), decode the same test problems at each concurrency, once per schedule of the orchestrator
(docs/design.md §6): *lockstep* rounds and *event-driven*. Concurrency is the number of problems in flight
(``OrchestratorConfig.max_active``); the engine may have ``concurrency × max_threads`` requests in flight, so
that one problem's threads run side by side even at concurrency 1. The prefix cache is emptied before each
run (``/reset_prefix_cache``, a development endpoint the servers here enable), so every run starts cold.

Runs are short on small profiles and a CPU server's step times vary, so each (concurrency, schedule) runs
``--repeats`` times (3), schedules alternating, and the run of median wall time is reported.

One JSON line per (model, concurrency, schedule): throughput (problems/s and generated tokens/s), per-problem
latency p50/p95 (from the problem's start to its end), accuracy, mean total and critical-path tokens, the
server's engine steps and tokens per step (how well it batched: wall times on a shared CPU are noisy), and the
**prefix-cache share** of the calls by kind (sequential, thread 1, threads 2..K): prompt tokens the server
reports cached over prompt tokens, beside the block-granularity maximum (`block_max`). A last line holds the
target verdicts (`TARGETS`); a table goes to stdout after the JSON lines, and ``load.json`` plus
``latency_vs_throughput.png`` to ``<output_root>/<profile>/bench/load/``.
"""
from __future__ import annotations

import dataclasses
import json
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Iterator, Sequence

import httpx

from ..config import Profile
from ..dataset import load_parquet
from ..engines.openai import OpenAIEngine
from ..engines.server import VLLMServer
from ..files import atomic_write_json
from ..grading import grade
from ..orchestrator import Orchestrator, OrchestratorConfig, Result
from ..runs import profile_dir
from ..tokenizer import load_tokenizer, prompt_ids

# model → (the stage that saves it, its folder in that stage's run)
MODELS = {"sequential": ("02_trie_sft", "sequential_model"), "pgrpo": ("04_pgrpo", "pgrpo_model")}
SCHEDULES = ("lockstep", "events")
KINDS = ("sequential", "thread_1", "threads_2_K")
TARGETS = {
    "wall_vs_token_speedup_c1": "at concurrency 1, parallel wall-clock speedup >= 0.95 x its token speedup",
    "thread_cache_vs_block_max": "threads 2..K: cached share within 2 points of the block maximum",
    "thread_cache_share": "threads 2..K: cached share >= 85% overall",
    "events_vs_lockstep_throughput": "event-driven throughput >= 1.2 x lockstep at the highest concurrency (P-GRPO)",
}


def add_arguments(parser) -> None:
    parser.add_argument("--concurrency", type=_counts, default=(1, 2, 4, 8, 16),
                        help="problems in flight, comma-separated (default 1,2,4,8,16)")
    parser.add_argument("--problems", type=int, default=None, help="the first N test problems (default: all)")
    parser.add_argument("--block-size", type=int, default=32, help="the servers' KV block size (default 32)")
    parser.add_argument("--schedules", type=lambda v: tuple(v.split(",")), default=SCHEDULES,
                        help="lockstep,events (default both)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs per concurrency and schedule, alternating; the median one is reported (default 3)")


def _counts(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


# ----------------------------------------------------------------------------------------- prefix cache
def block_max(prompt_tokens: int, shared_prefix: int, block_size: int) -> int:
    """The most prompt tokens a block-granular prefix cache can serve: the whole blocks of the prefix shared
    with an earlier request, and never the prompt's last token (a server computes at least one).

    >>> block_max(142, 141, 32), block_max(142, 142, 32), block_max(31, 500, 32)
    (128, 128, 0)
    """
    return min(shared_prefix, prompt_tokens - 1) // block_size * block_size


class PrefixIndex:
    """Token sequences seen so far, as a trie: ``shared(ids)`` is the longest common prefix of ``ids`` with any.

    >>> index = PrefixIndex(); index.add([1, 2, 3]); index.add([1, 5])
    >>> index.shared([1, 2, 4]), index.shared([7])
    (2, 0)
    """

    def __init__(self) -> None:
        self.root: dict = {}

    def add(self, ids: Sequence[int]) -> None:
        node = self.root
        for i in ids:
            node = node.setdefault(i, {})

    def shared(self, ids: Sequence[int]) -> int:
        node, n = self.root, 0
        for i in ids:
            if i not in node:
                break
            node, n = node[i], n + 1
        return n


def call_kind(call) -> str:
    return "sequential" if call.kind == "sequential" else "thread_1" if call.thread == 1 else "threads_2_K"


def cache_shares(results: Sequence[Result], block_size: int) -> dict[str, dict]:
    """Per call kind: calls, prompt tokens, cached tokens the server reported and the block maximum, in tokens and
    as shares of the prompt tokens. Calls are taken in the order they were sent; what an earlier call left in
    the cache is its prompt and its completion but the last token (whose KV is never computed)."""
    calls = sorted(((c.started, p, k, c, u) for p, r in enumerate(results) for k, (c, u) in enumerate(zip(r.calls, r.units))),
                   key=lambda t: t[:3])
    index, sums = PrefixIndex(), {kind: dict.fromkeys(("calls", "prompt", "cached", "block_max", "unreported"), 0)
                                  for kind in KINDS}
    for _, _, _, call, unit in calls:
        prompt = list(unit.context)
        row = sums[call_kind(call)]
        row["calls"] += 1
        row["prompt"] += len(prompt)
        row["block_max"] += block_max(len(prompt), index.shared(prompt), block_size)
        if call.cached_tokens is None:
            row["unreported"] += 1
        else:
            row["cached"] += call.cached_tokens
        index.add(prompt + list(unit.completion[:-1]))
    return {kind: {**row, "cached_share": _share(row["cached"], row["prompt"]),
                   "block_max_share": _share(row["block_max"], row["prompt"])} for kind, row in sums.items()}


def _share(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


# ---------------------------------------------------------------------------------------------- running
def model_paths(root: Path, profile: str) -> dict[str, Path]:
    """The saved models the bench serves; a missing one is an error naming the stage that makes it."""
    paths = {}
    for kind, (stage, folder) in MODELS.items():
        paths[kind] = root / stage / folder
        if not (paths[kind] / "config.json").is_file():
            raise FileNotFoundError(f"no {kind} model at {paths[kind]}: run stage {stage} of profile {profile!r} first "
                                    f"(python -m twlib.pipeline params/{profile}.yaml --stages {stage})")
    return paths


def reset_prefix_cache(url: str, tries: int = 20) -> None:
    """Empty the server's prefix cache (it refuses while requests hold blocks: asked again)."""
    for _ in range(tries):
        response = httpx.post(f"{url}/reset_prefix_cache", timeout=30.0)
        if response.status_code == 404:
            raise RuntimeError(f"{url} has no /reset_prefix_cache: start it with VLLM_SERVER_DEV_MODE=1")
        if response.status_code == 200 and response.json().get("success"):
            return
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not reset its prefix cache after {tries} tries")


def engine_steps(url: str) -> tuple[float, float]:
    """The server's engine steps so far and the tokens they computed (``vllm:iteration_tokens_total`` histogram),
    from ``/metrics``: how well it batched, whatever else the machine was doing."""
    count = total = 0.0
    for line in httpx.get(f"{url}/metrics", timeout=30.0).text.splitlines():
        if line.startswith("vllm:iteration_tokens_total_count"):
            count += float(line.split()[-1])
        elif line.startswith("vllm:iteration_tokens_total_sum"):
            total += float(line.split()[-1])
    return count, total


def measure(url: str, name: str, tok, problems: list[dict], limits: OrchestratorConfig, concurrency: int,
            schedule: str, block_size: int) -> dict:
    """One run of every problem at ``concurrency`` problems in flight under ``schedule``, as a record."""
    reset_prefix_cache(url)
    steps_before, tokens_before = engine_steps(url)
    engine = OpenAIEngine(url, name, tok.eos_token_id, concurrency=concurrency * limits.max_threads, timeout_s=600.0,
                          retries=2)
    config = dataclasses.replace(limits, schedule=schedule, max_active=concurrency)
    start = time.perf_counter()
    try:
        results = Orchestrator(engine, tok, config).run([prompt_ids(tok, p["question"]) for p in problems])
    finally:
        engine.close()
    wall = time.perf_counter() - start
    steps, tokens = (after - before for after, before in zip(engine_steps(url), (steps_before, tokens_before)))
    latencies = sorted(r.latency_seconds for r in results)
    generated = sum(c.generated_tokens for r in results for c in r.calls)
    return {"bench": "load", "model": name, "concurrency": concurrency, "schedule": schedule,
            "requests_bound": engine.concurrency, "problems": len(problems), "wall_s": round(wall, 3),
            "problems_per_s": round(len(problems) / wall, 4), "generated_tokens_per_s": round(generated / wall, 2),
            "latency_p50_s": round(_quantile(latencies, 0.5), 4), "latency_p95_s": round(_quantile(latencies, 0.95), 4),
            "accuracy": round(sum(grade(r.text, str(p["answer"])).correct for r, p in zip(results, problems))
                              / len(problems), 4),
            "total_tokens_mean": round(sum(r.stats.total_tokens for r in results) / len(results), 2),
            "critical_path_tokens_mean": round(sum(r.stats.critical_path_tokens for r in results) / len(results), 2),
            "engine_calls": sum(len(r.calls) for r in results),
            "blocks": sum(r.stats.num_blocks for r in results), "server_steps": int(steps),
            "server_tokens_per_step": round(tokens / steps, 2) if steps else None,
            "cache": cache_shares(results, block_size)}


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default).

    >>> _quantile([1.0, 2.0, 3.0, 4.0], 0.5), round(_quantile([1.0, 2.0, 3.0, 4.0], 0.95), 6)
    (2.5, 3.85)
    """
    position = (len(sorted_values) - 1) * q
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def start_servers(paths: dict[str, Path], limits: OrchestratorConfig, block_size: int, stack: ExitStack) -> dict:
    """One server per model, started side by side (start-up is mostly imports; an idle server takes no CPU),
    each stopped when ``stack`` closes, also when another fails to start."""
    servers = {name: VLLMServer(path, model_name=name, max_model_len=limits.max_context,
                                extra_args=("--block-size", str(block_size)), env={"VLLM_SERVER_DEV_MODE": "1"})
               for name, path in paths.items()}
    for server in servers.values():
        stack.callback(server.stop)  # idempotent, and nothing to do for a server that never started
    with ThreadPoolExecutor(max_workers=len(servers)) as pool:
        list(pool.map(VLLMServer.start, servers.values()))
    return servers


def measure_model(url: str, name: str, tok, problems, limits, concurrency, schedules, block_size,
                  repeats: int = 1) -> list[dict]:
    """Every (concurrency, schedule) run of one model, one after the other, after one warm-up problem; with
    ``repeats`` > 1 the schedules alternate run by run and the run of median wall time is reported (its
    record lists every run's wall time)."""
    measure(url, name, tok, problems[:1], limits, 1, schedules[0], block_size)  # not reported
    out = []
    for c in concurrency:
        runs = {schedule: [] for schedule in schedules}
        for _ in range(repeats):
            for schedule in schedules:
                runs[schedule].append(measure(url, name, tok, problems, limits, c, schedule, block_size))
        for schedule, records in runs.items():
            records.sort(key=lambda r: r["wall_s"])
            out.append({**records[(len(records) - 1) // 2], "repeats": repeats,
                        "wall_s_runs": [r["wall_s"] for r in records]})
    return out


def limits_for(profile: Profile, paths: dict[str, Path]) -> OrchestratorConfig:
    """The evaluation stage's orchestrator limits, for the shorter context of the two models."""
    context = min(json.loads((p / "config.json").read_text())["max_position_embeddings"] for p in paths.values())
    return OrchestratorConfig.for_stage(profile.stage_config("05_evaluation"), context)


def run(profile: Profile, concurrency: Sequence[int] = (1, 2, 4, 8, 16), problems: int | None = None,
        block_size: int = 32, schedules: Sequence[str] = SCHEDULES, repeats: int = 3) -> Iterator[dict]:
    """One record per (model, concurrency, schedule), then the verdicts; writes the JSON and the figure."""
    if not concurrency or min(concurrency) < 1 or block_size < 1 or repeats < 1 or not set(schedules) <= set(SCHEDULES):
        raise ValueError(f"need concurrencies >= 1, block_size >= 1, repeats >= 1 and schedules among {SCHEDULES}")
    root = profile_dir(profile.output_root, profile.name)
    paths = model_paths(root, profile.name)
    test = load_parquet(root / "01_trajectories" / "data", splits=("test",))["test"]
    rows = [dict(r) for r in test.select(range(min(problems or len(test), len(test))))]
    tok = load_tokenizer(paths["pgrpo"])
    limits = limits_for(profile, paths)
    records = []
    with ExitStack() as stack:
        servers = start_servers(paths, limits, block_size, stack)
        for name, server in servers.items():  # one model at a time: the other server idles
            for record in measure_model(server.url, name, tok, rows, limits, sorted(concurrency), tuple(schedules),
                                        block_size, repeats):
                record["profile"] = profile.name
                records.append(record)
                yield record
    summary = {"bench": "load_verdicts", "profile": profile.name, "block_size": block_size,
               "verdicts": verdicts(records)}
    yield summary
    out = root / "bench" / "load"
    atomic_write_json(out / "load.json", {"records": records, **summary})
    save_figure(records, out / "latency_vs_throughput.png")
    print(table(records, summary["verdicts"]), flush=True)


# --------------------------------------------------------------------------------------------- reporting
def _pick(records: Sequence[dict], model: str, schedule: str | None = None, concurrency: int | None = None) -> list[dict]:
    return [r for r in records if r["model"] == model and schedule in (None, r["schedule"])
            and concurrency in (None, r["concurrency"])]


def _verdict(value: float | None, met: bool | None, **detail) -> dict:
    return {"value": None if value is None else round(value, 4), "met": met, **detail}


def verdicts(records: Sequence[dict]) -> dict[str, dict]:
    """Each target of `TARGETS`: its measured value and whether it is met (None: not measurable in this run)."""
    out = {}
    low, high = min(r["concurrency"] for r in records), max(r["concurrency"] for r in records)
    schedule = "events" if any(r["schedule"] == "events" for r in records) else "lockstep"
    seq, par = (_pick(records, m, schedule, 1) for m in ("sequential", "pgrpo"))
    if seq and par:
        token = seq[0]["total_tokens_mean"] / par[0]["critical_path_tokens_mean"]
        wall = seq[0]["wall_s"] / par[0]["wall_s"]
        out["wall_vs_token_speedup_c1"] = _verdict(wall / token, wall >= 0.95 * token, wall_speedup=round(wall, 4),
                                                   token_speedup=round(token, 4), schedule=schedule)
    else:
        out["wall_vs_token_speedup_c1"] = _verdict(None, None, note=f"no run at concurrency 1 (lowest: {low})")
    out.update(_cache_verdicts(_pick(records, "pgrpo")))
    events, lockstep = _pick(records, "pgrpo", "events", high), _pick(records, "pgrpo", "lockstep", high)
    if events and lockstep:
        ratio = events[0]["problems_per_s"] / lockstep[0]["problems_per_s"]
        out["events_vs_lockstep_throughput"] = _verdict(ratio, ratio >= 1.2, concurrency=high)
    else:
        out["events_vs_lockstep_throughput"] = _verdict(None, None, note="needs both schedules")
    return {name: {"target": TARGETS[name], **v} for name, v in out.items()}


def _cache_verdicts(records: Sequence[dict]) -> dict[str, dict]:
    rows = [r["cache"]["threads_2_K"] for r in records]
    prompt, cached, best = (sum(row[k] for row in rows) for k in ("prompt", "cached", "block_max"))
    if not prompt:
        none = _verdict(None, None, note="the P-GRPO model opened no block with two threads or more")
        return {"thread_cache_vs_block_max": none, "thread_cache_share": none}
    share, best_share = cached / prompt, best / prompt
    return {"thread_cache_vs_block_max": _verdict(best_share - share, best_share - share <= 0.02,
                                                  cached_share=round(share, 4), block_max_share=round(best_share, 4)),
            "thread_cache_share": _verdict(share, share >= 0.85, calls=sum(row["calls"] for row in rows))}


def table(records: Sequence[dict], verdict: dict[str, dict]) -> str:
    """The records as a fixed-width table (`results_frame`), then one line per verdict."""
    frame = results_frame({"records": records})
    lines = [frame.to_string(float_format=lambda v: f"{v:.3g}", na_rep="-"), ""]
    for v in verdict.values():
        mark = {True: "MET", False: "NOT MET", None: "n/a"}[v["met"]]
        lines.append(f"{mark:<8} {v['target']} (value {v['value']})")
    return "\n".join(lines)


def save_figure(records: Sequence[dict], path: Path) -> Path:
    """Median latency against throughput, one line per model and schedule, points labelled by concurrency."""
    from ..plots import figure_axes

    fig, ax = figure_axes((7, 4.5))
    for (model, schedule) in dict.fromkeys((r["model"], r["schedule"]) for r in records):
        points = sorted(_pick(records, model, schedule), key=lambda r: r["concurrency"])
        ax.plot([r["problems_per_s"] for r in points], [r["latency_p50_s"] for r in points], marker="o",
                linestyle="-" if schedule == "events" else "--", label=f"{model}, {schedule}")
        for r in points:
            ax.annotate(str(r["concurrency"]), (r["problems_per_s"], r["latency_p50_s"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
    ax.set(xlabel="throughput (problems / s)", ylabel="median latency per problem (s)",
           title="Latency vs throughput (labels: problems in flight)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


# ------------------------------------------------------------------------------- reading a stored report
def stored(output_root: str | Path, profile: str) -> dict | None:
    """The load benchmark's last report of ``profile`` (``<output_root>/<profile>/bench/load/load.json``, with
    ``figure``: the latency-vs-throughput PNG's path), or None when the benchmark has not run; notebook 05 shows
    it without running anything."""
    folder = profile_dir(output_root, profile) / "bench" / "load"
    if not (folder / "load.json").is_file():
        return None
    report = json.loads((folder / "load.json").read_text(encoding="utf-8"))
    return {**report, "figure": folder / "latency_vs_throughput.png"}


def results_frame(report: dict):
    """One row per (model, problems in flight, schedule) of a report: throughput, latency, accuracy, tokens, the
    server's engine steps and the prefix-cache share of each kind of call beside its block maximum (printed by
    the benchmark, shown by notebook 05)."""
    import pandas as pd

    rows = [{"model": r["model"], "in flight": r["concurrency"], "schedule": r["schedule"],
             "problems/s": r["problems_per_s"], "tokens/s": r["generated_tokens_per_s"],
             "latency p50 s": r["latency_p50_s"], "latency p95 s": r["latency_p95_s"], "accuracy": r["accuracy"],
             "total tokens": r["total_tokens_mean"], "critical path": r["critical_path_tokens_mean"],
             "server steps": r["server_steps"], "sequential cached": r["cache"]["sequential"]["cached_share"],
             "thread 1 cached": r["cache"]["thread_1"]["cached_share"],
             "thread 1 block max": r["cache"]["thread_1"]["block_max_share"],
             "threads 2..K cached": r["cache"]["threads_2_K"]["cached_share"],
             "threads 2..K block max": r["cache"]["threads_2_K"]["block_max_share"]} for r in report["records"]]
    return pd.DataFrame(rows).set_index(["model", "in flight", "schedule"])


def verdict_frame(report: dict):
    """The stored report's targets: measured value and verdict."""
    import pandas as pd

    mark = {True: "met", False: "not met", None: "n/a"}
    return pd.DataFrame([{"target": v["target"], "value": v["value"], "verdict": mark[v["met"]]}
                         for v in report["verdicts"].values()]).set_index("target")
