"""Stage 2 of the data pipeline: self-training on the parallel SFT model's own rollouts (paper §3.2).

The first parallel SFT model writes trajectories with the fork-join orchestrator on training prompts
(several samples each). A rollout is kept only if the orchestrator never had to step in (no guard
flag), it passes the strict format check (the same check stage 1 ends with), the ids it generated are
exactly the ids its canonical text trains on (so the retrained model sees what it wrote), and its
answer is correct. Kept rollouts are deduplicated, merged with the stage-1 data, and trie SFT runs
again. The paper grows ~1k rewritten trajectories to ~17k this way.

Worked example of the yield: 3 prompts × 2 samples = 6 rollouts; one hits a guard, one is wrong,
two are the same text → ``{"kept": 3, "guard": 1, "incorrect": 1, "duplicate": 1}``, yield 3/6 = 0.5.
"""
from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd
import torch

from . import format as fmt
from . import launch
from .config import SelfTrainingConfig, TrieSFTConfig
from .engines import GREEDY, Sampling
from .engines.local import make_engine
from .evaluation import evaluate
from .files import atomic_write_text
from .grading import grade
from .models import context_length
from .orchestrator import Orchestrator, OrchestratorConfig
from .rewriter.sources import accepted_examples
from .runs import RunFolder, is_complete
from .sft import TrainSettings, dataset_examples, fit_rows, starting_model, train_rows, training_data, with_base_model
from .sft import train_settings as sft_train_settings
from .show import progress
from .tokenizer import load_tokenizer, prompt_ids, segment_ids

REASONS = ("kept", "guard", "format", "drift", "incorrect", "duplicate")
REWRITING_STAGE = "01b_rewriting"


def verdict(result, gold: str, tokenizer) -> tuple[str, str | None]:
    """``(reason, training_text)`` of one orchestrator `Result`: ``reason`` is one of `REASONS`
    (``"duplicate"`` is decided later, across rollouts); ``training_text`` is the canonical text of
    a kept rollout, else None.

    Checks run from cheapest to dearest and the first failure names the rollout's fate.
    """
    if any(result.flags.values()):
        return "guard", None
    try:
        traj = fmt.parse_ids(result.response_ids, tokenizer, strict=True)
    except fmt.FormatError:
        return "format", None
    if not traj.eos or segment_ids(traj, tokenizer).ids != list(result.response_ids):
        return "drift", None
    text = traj.render()
    if not grade(text, gold).correct:
        return "incorrect", None
    return "kept", text


def rollout_record(problem: dict, sample: int, result, tokenizer) -> dict:
    """One JSON-able line of ``rollouts.jsonl``: the problem, the sample number, the fate, the metrics."""
    reason, text = verdict(result, str(problem["answer"]), tokenizer)
    m = result.metrics
    return {"id": problem.get("id"), "question": problem["question"], "answer": str(problem["answer"]),
            "shape": problem.get("shape"), "sample": sample, "reason": reason, "text": text,
            "correct": grade(result.text, str(problem["answer"])).correct, "flags": dict(result.flags),
            "total_tokens": m["total_tokens"], "critical_path_tokens": m["critical_path_tokens"],
            "num_blocks": m["num_blocks"], "threads_per_block": m["threads_per_block"], "response": result.text}


def roll_out(orchestrator, problems: Sequence[dict], tokenizer, samples: int, folder: str | Path,
             chunk_size: int = 32, seed: int = 0, progress: Callable[[int], None] | None = None) -> list[dict]:
    """``samples`` rollouts of every problem, ``rollout_record`` each, in problem order.

    Work is done in chunks of ``chunk_size`` rollouts; each finished chunk is written atomically to
    ``<folder>/chunk-NNNNN.jsonl`` and skipped when the call is repeated, so an interrupted run resumes
    where it stopped. Chunk ``k`` seeds torch with ``seed + k``, so a resumed run samples what an
    uninterrupted one would. The orchestrator's sampling must be stochastic with no per-request seed
    (a fixed seed would make the samples of one prompt identical).
    """
    sampling = orchestrator.config.sampling
    if sampling.greedy or sampling.seed is not None:
        raise ValueError("self-training rollouts need temperature > 0 and no per-request seed; "
                         f"got {sampling}")
    if samples < 1 or chunk_size < 1:
        raise ValueError(f"samples and chunk_size must be >= 1, got {samples} and {chunk_size}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(p, s) for p in problems for s in range(samples)]
    records: list[dict] = []
    for k, start in enumerate(range(0, len(jobs), chunk_size)):
        chunk = jobs[start:start + chunk_size]
        path = folder / f"chunk-{k:05d}.jsonl"
        if path.exists():
            done = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
            if [(r["question"], r["sample"]) for r in done] != [(p["question"], s) for p, s in chunk]:
                raise ValueError(f"{path} holds other rollouts than this run would make (different problems, "
                                 "samples or chunk_size); remove the folder or restore the old parameters")
            records += done
        else:
            torch.manual_seed(seed + k)
            results = orchestrator.run([prompt_ids(tokenizer, p["question"]) for p, _ in chunk])
            done = [rollout_record(p, s, r, tokenizer) for (p, s), r in zip(chunk, results)]
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in done))
            records += done
        if progress:
            progress(len(chunk))
    return records


def mark_duplicates(records: list[dict]) -> list[dict]:
    """Re-label a kept rollout whose (question, text) was kept before as ``"duplicate"`` (in place)."""
    seen: set[tuple[str, str]] = set()
    for r in records:
        if r["reason"] != "kept":
            continue
        key = (r["question"], r["text"])
        if key in seen:
            r["reason"] = "duplicate"
        else:
            seen.add(key)
    return records


def yield_report(records: Sequence[dict]) -> dict:
    """Counts by fate and the rates a reader wants, over all rollouts.

    ``format_correct_rate`` counts rollouts that passed the guards and the strict format check;
    ``accuracy`` is the share of rollouts with a correct answer (whatever their format).

    >>> yield_report([{"reason": "kept", "correct": True, "num_blocks": 1, "question": "q"},
    ...               {"reason": "incorrect", "correct": False, "num_blocks": 0, "question": "q"}])["yield"]
    0.5
    """
    n = len(records)
    if not n:
        raise ValueError("no rollouts to report on")
    counts = Counter(r["reason"] for r in records)
    kept = [r for r in records if r["reason"] == "kept"]
    format_ok = sum(counts[k] for k in ("kept", "drift", "incorrect", "duplicate"))
    return {"rollouts": n, "problems": len({r["question"] for r in records}),
            "counts": {k: counts.get(k, 0) for k in REASONS},
            "yield": len(kept) / n, "format_correct_rate": format_ok / n,
            "accuracy": sum(bool(r["correct"]) for r in records) / n,
            "kept_activation": sum(r["num_blocks"] > 0 for r in kept) / len(kept) if kept else 0.0,
            "problems_with_kept": len({r["question"] for r in kept})}


def kept_examples(records: Sequence[dict]) -> list[dict]:
    """Kept rollouts as trie-SFT examples ``{"question", "text"}``."""
    return [{"question": r["question"], "text": r["text"]} for r in records if r["reason"] == "kept"]


def merged_examples(kept: Sequence[dict], stage1: Sequence[dict], seed: int = 0) -> list[dict]:
    """Self-generated and stage-1 examples in one shuffled list; a stage-1 example with the same
    (question, text) as a kept rollout is dropped (it would be trained twice)."""
    have = {(e["question"], e["text"]) for e in kept}
    out = list(kept) + [e for e in stage1 if (e["question"], e["text"]) not in have]
    random.Random(seed).shuffle(out)
    return out


def orchestrator(cfg: SelfTrainingConfig, model_path: str | Path, tokenizer, greedy: bool = False) -> Orchestrator:
    """The fork-join orchestrator of notebook 03 over the saved model: sampled rollouts (no per-request seed,
    so the samples of one prompt differ), or ``greedy`` for the before/after check."""
    sampling = GREEDY if greedy else Sampling(temperature=cfg.temperature, top_p=cfg.top_p)
    limits = OrchestratorConfig.for_stage(cfg, context_length(model_path), sampling)
    return Orchestrator(make_engine(cfg.engine, model_path, tokenizer.eos_token_id), tokenizer, limits)


class _Lazy:
    """An orchestrator built on its first ``run``: a resumed or re-opened run whose rollouts are all on disk
    never loads the model."""

    def __init__(self, build: Callable[[], Orchestrator], config: OrchestratorConfig):
        self.build, self.config, self._built = build, config, None

    def run(self, prompts, progress=None):
        self._built = self._built or self.build()
        return self._built.run(prompts, progress)

    def close(self) -> None:
        """End the engine, if one was built (vLLM's processes would otherwise outlive the step)."""
        if self._built is not None and hasattr(self._built.engine, "close"):
            self._built.engine.close()


def rollouts(cfg: SelfTrainingConfig, run: RunFolder, problems: Sequence[dict], tokenizer, sft_model: Path) -> list[dict]:
    """Notebook 03's sampled rollouts of the parallel SFT model (`roll_out` in resumable chunks under
    ``<run>/rollouts``), duplicates marked, with a progress bar."""
    sampling = Sampling(temperature=cfg.temperature, top_p=cfg.top_p)
    lazy = _Lazy(lambda: orchestrator(cfg, sft_model, tokenizer),
                 OrchestratorConfig.for_stage(cfg, context_length(sft_model), sampling))
    try:
        with run.timer("rollouts"), progress(len(problems) * cfg.samples_per_prompt, "rollouts") as bar:
            records = roll_out(lazy, problems, tokenizer, cfg.samples_per_prompt, run.path("rollouts"), cfg.chunk_size,
                               cfg.seed, bar.update)
    finally:
        lazy.close()
    return mark_duplicates(records)


def checks(cfg: SelfTrainingConfig, run: RunFolder, tokenizer, problems: Sequence[dict],
           model_paths: dict[str, Path]) -> dict[str, list[dict]]:
    """Greedy evaluation records of each model on ``problems`` (the before/after check), once per run; the problems
    are decoded ``chunk_size`` at a time, as the rollouts are."""
    out = {}
    for name, path in model_paths.items():
        def evaluate_one(path=path, name=name) -> list[dict]:
            with run.timer(f"check_{name}"), progress(len(problems), name) as bar:
                checker = orchestrator(cfg, path, tokenizer, greedy=True)
                try:
                    return evaluate(checker, problems, tokenizer, cfg.chunk_size, progress=bar.update)
                finally:
                    if hasattr(checker.engine, "close"):
                        checker.engine.close()
        out[name] = run.once(f"check-{name}", evaluate_one) if problems else []
    return out


def example_records(records: Sequence[dict]) -> dict[str, dict]:
    """One kept rollout that forks and one rejected rollout (the first of each), to show in the notebook."""
    kept = next((r for r in records if r["reason"] == "kept" and r["num_blocks"]), None)
    rejected = next((r for r in records if r["reason"] not in ("kept", "duplicate")), None)
    return {name: r for name, r in (("kept", kept), ("rejected", rejected)) if r is not None}


def train_settings(cfg: SelfTrainingConfig, sft_cfg: TrieSFTConfig) -> TrainSettings:
    """This stage's optimiser and schedule; the scale switches (device, bf16, mask kind, checkpointing,
    accumulation) are notebook 02's, whose models this stage retrains."""
    return replace(sft_train_settings(sft_cfg), max_steps=cfg.max_steps, per_device_train_batch_size=cfg.batch_rows,
                   learning_rate=cfg.learning_rate, warmup_steps=cfg.warmup_steps, logging_steps=cfg.logging_steps,
                   save_steps=cfg.save_steps, seed=cfg.seed)


TRAIN_EXAMPLES = "data/train.jsonl"


def retrain_job(cfg: SelfTrainingConfig, name: str, run: RunFolder) -> dict:
    """Notebook 03's retraining in this process (the notebook kernel, or every process under ``accelerate
    launch``): trie SFT on the merged examples the notebook wrote to ``<run>/data/train.jsonl``, from the
    parallel SFT model or, with ``retrain_from: scratch``, from a fresh start as the paper does (notebook 02's
    base model, or a tiny model of its sizes). The model goes to ``<run>/<name>_model``.
    Returns ``{"log", "model_path", "parameters", "rows", "label_tokens", "epochs", "trajectories"}``."""
    lines = (run.folder / TRAIN_EXAMPLES).read_text(encoding="utf-8").splitlines()
    examples = [json.loads(line) for line in lines]
    if not examples:
        raise ValueError("no examples to retrain on: no rollout was kept and no stage-1 data was merged")
    sft_cfg = with_base_model(run.stage_config("02_trie_sft"), run)
    sft_model = run.require_complete("02_trie_sft") / "parallel_model"
    tokenizer = load_tokenizer(sft_model)
    settings = train_settings(cfg, sft_cfg)
    model = starting_model(tokenizer, sft_cfg, settings.attention, seed=cfg.seed,
                           init_model=None if cfg.retrain_from == "scratch" else sft_model)
    rows = train_rows(examples, tokenizer, cfg.row_tokens)
    return {**fit_rows(model, tokenizer, rows, settings, run, name), "trajectories": len(examples)}


def fit(cfg: SelfTrainingConfig, run: RunFolder) -> dict:
    """`retrain_job` here, or where notebook 02 trained under ``accelerate launch``, the same way."""
    return launch.run_job("retrain", retrain_job, cfg, "parallel", run, knobs=run.stage_config("02_trie_sft"))


def stage1_examples(run, train_ds, n_synthetic: int, use_rewritten: bool, seed: int = 0) -> dict[str, list[dict]]:
    """The stage-1 data the kept rollouts are merged with, by origin: ``n_synthetic`` parallel
    trajectories of the 01 training split (shuffled with ``seed``) and, with ``use_rewritten``, every trajectory
    the LLM rewriting accepted (a complete `REWRITING_STAGE` in this profile) and, when notebook 02 trained on the
    authors' released data, those trajectories."""
    if n_synthetic and "completion" not in train_ds.column_names:
        raise ValueError(f"merge_synthetic is {n_synthetic}, but the 01 training split holds prompts only (real-math "
                         "data has no parallel CoT to merge): set merge_synthetic to 0")
    shuffled = train_ds.shuffle(seed=seed)
    out = {"synthetic": dataset_examples(shuffled.select(range(min(n_synthetic, len(shuffled)))), parallel=True)}
    if use_rewritten and is_complete(run.profile_root, REWRITING_STAGE):
        out["rewritten"] = accepted_examples(run.stage_path(REWRITING_STAGE, "accepted.jsonl"))
    sft_done = is_complete(run.profile_root, "02_trie_sft")
    if use_rewritten and sft_done and (sft_cfg := run.stage_config("02_trie_sft")).train_data == "release":
        out["release"] = dataset_examples(training_data(sft_cfg, run), parallel=True)
    return out


def before_after(checks: dict[str, Sequence[dict]], problems: Sequence[dict]):
    """One row per model of `twlib.evaluation.evaluate` records on the same ``problems``: accuracy,
    format-correct rate, mean total and critical-path tokens, and the mean per-problem speedup over the
    problem's sequential CoT length (``seq_tokens`` of the 01 data; NaN where problems have none) (pandas).

    >>> rec = {"gold": "1", "correct": True, "format_correct": True, "total_tokens": 60, "critical_path_tokens": 40}
    >>> float(before_after({"m": [rec]}, [{"seq_tokens": 80}]).loc["m", "mean_speedup"])
    2.0
    """
    rows = {}
    for name, recs in checks.items():
        if len(recs) != len(problems):
            raise ValueError(f"{name}: {len(recs)} records for {len(problems)} problems")
        n = len(recs)
        rows[name] = {"accuracy": sum(r["correct"] for r in recs) / n,
                      "format_correct_rate": sum(r["format_correct"] for r in recs) / n,
                      "total_tokens": sum(r["total_tokens"] for r in recs) / n,
                      "critical_path_tokens": sum(r["critical_path_tokens"] for r in recs) / n,
                      # Real-math problems have no reference sequential CoT to measure a speedup against.
                      "mean_speedup": (sum(p["seq_tokens"] / r["critical_path_tokens"] for r, p in zip(recs, problems)) / n
                                       if all("seq_tokens" in p for p in problems) else float("nan"))}
    return pd.DataFrame(rows).T
