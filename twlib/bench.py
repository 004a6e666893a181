"""Benchmarks: ``python -m twlib.bench <name> --params FILE`` prints one JSON line per result.

``trie``: tokens per trajectory for the trie, expanded units and the official flattening, and
SFT throughput trie vs expanded units, side by side in one run (needs notebook 01's data).

``induction``: how many steps the profile's notebook-02 model needs, at the profile's learning rate
and at 3× and 10× it, to copy a random 20-letter string (a task only an induction circuit solves:
find the earlier copy of the current letter and read the one after it). Every lookup in the
synthetic tasks runs on that circuit; too high a learning rate delays it by hundreds of steps.

``orchestrator``: the sequential model (plain decoding) and the parallel model (fork-join orchestrator)
on the same test problems with the same engine, side by side in one run, one problem at a time:
accuracy, token-latency and wall-clock speedups, parallel efficiency, orchestration overhead; one JSON
line per engine (HF always, vLLM where installed; vLLM also logs to stdout, so keep the lines that start
with ``{``). Needs notebooks 01 and 02's outputs.

``rl``: one P-GRPO step on the same rollouts of the parallel SFT model (the profile's notebook-04
prompts per step, rollouts per prompt, temperature and budgets): tokens scored and seconds for the policy-gradient forward + backward
with the trie (one sample per rollout, ancestor mask) vs expanded units (each engine call its own
causal sequence, as the official RL did). Needs notebooks 01 and 02's outputs.

``sft``: notebook 02's training step through the real trainer, fp32 vs bf16 autocast, side by side in one
run on the same rows of the profile's training data (both models): seconds per step after a warm-up,
the first logged losses of each precision, and the seconds to build and pack the tries (needs notebook
01's data).

``gpu``: trie-SFT tokens/s and peak memory at 8k and 32k tokens, flex ``BlockMask`` vs dense mask,
and HF-engine wall-clock speedup of parallel vs sequential decoding (`twlib.bench_gpu`).

``data``: per task family (and per shape): examples, mean sequential vs parallel tokens, mean
critical path, mean ideal speedup (sequential total / parallel critical path), activation rate,
and segment-wise tokenisation drift with the tiny tokenizer and with the Qwen vocabulary.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

from . import config


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


def bench_data(profile: config.Profile) -> Iterator[dict]:
    import pandas as pd

    from . import format as fmt
    from .data import problem_row
    from .tasks import generate_splits
    from .tokenizer import add_tags, build_char_tokenizer, drift, qwen_tokenizer

    cfg = profile.stage_config("01_trajectories")
    t0 = time.perf_counter()
    problems = generate_splits(cfg.task_mix(), cfg.sizes(), cfg.seed)
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


def _time_training(model, batches, repeats: int = 1) -> float:
    """Seconds for forward + backward over ``batches`` (after one warm-up batch)."""
    import torch

    def step(batch):
        out = model(**{k: v for k, v in batch.items() if k != "shift_labels"})
        out.loss.backward()
        model.zero_grad(set_to_none=True)

    step(batches[0])
    t0 = time.perf_counter()
    for _ in range(repeats):
        for batch in batches:
            step(batch)
    return (time.perf_counter() - t0) / repeats


def bench_trie(profile: config.Profile, n_trajectories: int = 48, row_tokens: int = 2048) -> Iterator[dict]:
    """Tokens per trajectory: trie vs expanded units vs the official flattening; SFT throughput."""
    import torch

    from . import format as fmt
    from . import models, trie
    from .data import load_parquet
    from .sft import dataset_examples
    from .tokenizer import build_char_tokenizer, prompt_ids

    cfg = profile.stage_config("01_trajectories")
    folder = config_root(profile) / "01_trajectories" / "data"
    ds = load_parquet(folder)["train"]
    # The target distribution only: the extra short training problems are a learning aid.
    ds = ds.select([i for i, shape in enumerate(ds["shape"]) if not shape.startswith("short-")])
    parallel = [r for r in dataset_examples(ds, parallel=True) if "<Parallel>" in r["text"]][:n_trajectories]
    tok = build_char_tokenizer()
    tries, expanded = [], []
    official = 0
    for ex in parallel:
        prompt = prompt_ids(tok, ex["question"])
        units = trie.units(prompt, fmt.parse(ex["text"]), tok)
        tries.append(trie.build_trie(prompt, units))
        official += len(trie.build_trie(prompt, units, "official"))
        expanded.extend(units)
    n = len(parallel)
    trie_tokens = sum(len(t) for t in tries)
    expanded_tokens = sum(len(u.context) + len(u.completion) for u in expanded)
    yield {"bench": "trie", "profile": profile.name, "trajectories": n,
           "trie_tokens_per_trajectory": round(trie_tokens / n, 1),
           "expanded_tokens_per_trajectory": round(expanded_tokens / n, 1),
           "official_tokens_per_trajectory": round(official / n, 1),
           "trie_over_expanded": round(trie_tokens / expanded_tokens, 3)}

    torch.manual_seed(cfg.seed)
    model = models.build_tiny_model(tok, models.TinyModelSpec())
    rows = trie.pack_rows(tries, row_tokens)
    trie_batches = [trie.collate([r], tok.pad_token_id) for r in rows]
    for b in trie_batches:
        b["labels"] = b["shift_labels"]
    unit_batches = []
    for i in range(0, len(expanded), 8):
        chunk = expanded[i:i + 8]
        L = max(len(u.context) + len(u.completion) for u in chunk)
        ids = torch.full((len(chunk), L), tok.pad_token_id)
        labels = torch.full((len(chunk), L), -100)
        mask = torch.zeros((len(chunk), L), dtype=torch.long)
        for j, u in enumerate(chunk):
            seq = list(u.context) + list(u.completion)
            ids[j, :len(seq)] = torch.tensor(seq)
            labels[j, len(u.context):len(seq)] = torch.tensor(u.completion)
            mask[j, :len(seq)] = 1
        unit_batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    t_trie = _time_training(model, trie_batches)
    t_units = _time_training(model, unit_batches)
    yield {"bench": "trie_sft_throughput", "profile": profile.name, "trajectories": n,
           "trie_trajectories_per_s": round(n / t_trie, 2), "expanded_trajectories_per_s": round(n / t_units, 2),
           "trie_speedup": round(t_units / t_trie, 2), "trie_rows": len(rows), "expanded_sequences": len(expanded)}


def _copy_batch(tokenizer, rng, size: int = 32, length: int = 20):
    import string

    import torch

    ids, labels = [], []
    for _ in range(size):
        letters = "".join(rng.sample(string.ascii_lowercase, length))
        first = tokenizer.encode(letters + "|", add_special_tokens=False)
        second = tokenizer.encode(letters, add_special_tokens=False)
        ids.append(first + second)
        labels.append([-100] * len(first) + second)
    return torch.tensor(ids), torch.tensor(labels)


def bench_induction(profile: config.Profile, steps: int = 600, factors: tuple[float, ...] = (1.0, 3.0, 10.0),
                    solved_error: float = 0.01, every: int = 25) -> Iterator[dict]:
    """Steps until the copy error of the second half drops below ``solved_error``, per learning rate."""
    import random

    import torch
    import torch.nn.functional as F

    from .models import build_tiny_model
    from .tokenizer import build_char_tokenizer

    cfg = profile.stage_config("02_trie_sft")
    tok = build_char_tokenizer()
    for factor in factors:
        lr = cfg.learning_rate * factor
        model = build_tiny_model(tok, cfg.model_spec(), seed=cfg.seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        rng, solved_at, error, t0 = random.Random(cfg.seed), None, 1.0, time.perf_counter()
        for step in range(1, steps + 1):
            ids, labels = _copy_batch(tok, rng)
            logits = model(input_ids=ids).logits[:, :-1]
            target = labels[:, 1:]
            F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step % every == 0:
                scored = target != -100
                error = float(((logits.argmax(-1) != target) & scored).sum() / scored.sum())
                if error < solved_error:
                    solved_at = step
                    break
        yield {"bench": "induction", "profile": profile.name, "learning_rate": lr, "lr_factor": factor,
               "solved_at_step": solved_at, "max_steps": steps, "copy_error": round(error, 3),
               "seconds": round(time.perf_counter() - t0, 1)}


def bench_orchestrator(profile: config.Profile, n_problems: int = 100) -> Iterator[dict]:
    """DESIGN §7 summary of both models on the first ``n_problems`` test problems, per engine."""
    import importlib.util

    from .data import load_parquet
    from .engines.hf import HFEngine
    from .evaluation import evaluate, summarize
    from .models import load_model
    from .orchestrator import Orchestrator
    from .tokenizer import load_tokenizer

    root = config_root(profile)
    test = load_parquet(root / "01_trajectories" / "data")["test"]
    problems = [dict(r) for r in test.select(range(min(n_problems, len(test))))]
    paths = {kind: root / "02_trie_sft" / f"{kind}_model" for kind in ("sequential", "parallel")}
    tok = load_tokenizer(paths["parallel"])
    engines = {"hf": lambda path: HFEngine(load_model(path), tok.eos_token_id)}
    if importlib.util.find_spec("vllm") is not None:
        from .engines.vllm import VLLMEngine

        engines["vllm"] = lambda path: VLLMEngine.from_pretrained(path, tok.eos_token_id, max_model_len=2048)
    for name, make in engines.items():
        records = {kind: evaluate(Orchestrator(make(path), tok), problems, tok) for kind, path in paths.items()}
        summary = summarize(records["sequential"], records["parallel"])
        yield {"bench": "orchestrator", "engine": name, "profile": profile.name,
               **{k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()}}


def bench_rl(profile: config.Profile, repeats: int = 3) -> Iterator[dict]:
    """Trie vs expanded units for one RL step of the profile's notebook-04 settings (prompts per step,
    rollouts per prompt, temperature, budgets) on rollouts of its parallel SFT model and, once notebook 04
    has run, of the P-GRPO model (the policies at the start and the end of RL; DESIGN §8)."""
    root = config_root(profile)
    path = root / "02_trie_sft" / "parallel_model"
    if not path.is_dir():
        raise SystemExit(f"no parallel model at {path}: run notebooks 01 and 02 of this profile first")
    policies = {"parallel_sft": path}
    if (root / "04_pgrpo" / "pgrpo_model").is_dir():  # the policy at the end of RL, when notebook 04 has run
        policies["pgrpo"] = root / "04_pgrpo" / "pgrpo_model"
    for policy, model_path in policies.items():
        yield from _bench_rl_policy(profile, policy, model_path, repeats)


def _bench_rl_policy(profile: config.Profile, policy: str, path, repeats: int) -> Iterator[dict]:
    import torch

    from .data import load_parquet
    from .engines import Sampling
    from .engines.hf import HFEngine
    from .models import context_length, load_model
    from .orchestrator import Orchestrator, OrchestratorConfig
    from .pgrpo import rollout_sample, tree_log_probs, tree_tensors
    from .tokenizer import load_tokenizer, prompt_ids

    root = config_root(profile)
    train = load_parquet(root / "01_trajectories" / "data")["train"]
    rl = (profile.stage_config("04_pgrpo") if "04_pgrpo" in profile.stages
          else config.PGRPOConfig.from_dict({"profile": profile.name}))
    questions = [r["question"] for r in train.select(range(rl.prompts_per_step))]
    tok = load_tokenizer(path)
    model = load_model(path)
    torch.manual_seed(rl.seed)
    orch = Orchestrator(HFEngine(model, tok.eos_token_id), tok, OrchestratorConfig(
        max_new_tokens=rl.max_new_tokens, max_thread_tokens=rl.max_thread_tokens, max_context=context_length(path),
        sampling=Sampling(temperature=rl.temperature, top_p=rl.top_p, seed=rl.seed)))
    t0 = time.perf_counter()
    results = orch.run([prompt_ids(tok, q) for q in questions for _ in range(rl.num_generations)])
    rollout_seconds = time.perf_counter() - t0
    model.train()
    advantages = torch.randn(len(results))

    samples = [rollout_sample(r) for r in results]
    P, C = max(len(s.prompt_ids) for s in samples), max(len(s.completion_ids) for s in samples)
    ids = torch.full((len(samples), P + C), tok.pad_token_id)
    completion = torch.full((len(samples), C), tok.pad_token_id)
    scored = torch.zeros((len(samples), C))
    for b, s in enumerate(samples):
        ids[b, P - len(s.prompt_ids):P + len(s.completion_ids)] = torch.tensor(s.prompt_ids + s.completion_ids)
        completion[b, :len(s.completion_ids)] = torch.tensor(s.completion_ids)
        scored[b, :len(s.scored)] = torch.tensor(s.scored, dtype=torch.float)
    tree = tree_tensors(samples, P, C)

    def trie_step():
        logps, _ = tree_log_probs(model, ids, completion, scored, tree)
        (-(advantages[:, None] * logps * scored).sum() / scored.sum()).backward()

    units = [(u, a) for r, a in zip(results, advantages) for u in r.units if u.completion]
    L = max(len(u.context) + len(u.completion) for u, _ in units)
    uids = torch.full((len(units), L), tok.pad_token_id)
    umask = torch.zeros((len(units), L), dtype=torch.long)
    ulabels = torch.zeros((len(units), L), dtype=torch.long)
    uscored = torch.zeros((len(units), L))
    uadv = torch.tensor([float(a) for _, a in units])
    for j, (u, _) in enumerate(units):
        seq = list(u.context) + list(u.completion)
        uids[j, :len(seq)] = torch.tensor(seq)
        umask[j, :len(seq)] = 1
        ulabels[j, len(u.context) - 1:len(seq) - 1] = torch.tensor(u.completion)
        uscored[j, len(u.context) - 1:len(seq) - 1] = 1

    def units_step():
        for start in range(0, len(units), 16):  # bounded memory, like a micro-batched trainer
            sl = slice(start, start + 16)
            logps = torch.log_softmax(model(input_ids=uids[sl], attention_mask=umask[sl]).logits.float(), -1)
            lp = logps.gather(-1, ulabels[sl].unsqueeze(-1)).squeeze(-1)
            (-(uadv[sl, None] * lp * uscored[sl]).sum() / uscored.sum()).backward()

    def timed(step) -> float:
        step()
        model.zero_grad(set_to_none=True)
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            step()
            best = min(best, time.perf_counter() - t)
            model.zero_grad(set_to_none=True)
        return best

    trie_tokens = sum(len(s.prompt_ids) + len(s.completion_ids) for s in samples)
    unit_tokens = sum(len(u.context) + len(u.completion) for u, _ in units)
    t_trie, t_units = timed(trie_step), timed(units_step)
    yield {"bench": "rl", "profile": profile.name, "policy": policy, "rollouts": len(results),
           "activation": round(sum(r.metrics["activated"] for r in results) / len(results), 3),
           "trie_tokens": trie_tokens, "expanded_tokens": unit_tokens,
           "trie_over_expanded": round(trie_tokens / unit_tokens, 3), "expanded_sequences": len(units),
           "trie_step_seconds": round(t_trie, 3), "expanded_step_seconds": round(t_units, 3),
           "trie_speedup": round(t_units / t_trie, 2), "rollout_seconds": round(rollout_seconds, 1)}


def bench_sft(profile: config.Profile, n_trajectories: int = 1000, steps: int = 30, warmup: int = 5) -> Iterator[dict]:
    """Notebook 02's trainer step in fp32 and under bf16 autocast on the same packed rows, both models."""
    import dataclasses
    import tempfile

    from . import models, sft
    from .bench_gpu import step_clock
    from .data import load_parquet
    from .tokenizer import load_tokenizer

    cfg = profile.stage_config("02_trie_sft")
    root = config_root(profile) / "01_trajectories"
    if not (root / "data").is_dir():
        raise SystemExit(f"no training data at {root / 'data'}: run notebook 01 of this profile first")
    tok = load_tokenizer(root / "tokenizer")
    ds = load_parquet(root / "data", splits=("train",))["train"]
    ds = ds.select(range(min(n_trajectories, len(ds))))

    for kind in ("sequential", "parallel"):
        t0 = time.perf_counter()
        tries = sft.trajectory_tries(sft.dataset_examples(ds, parallel=kind == "parallel"), tok)
        t1 = time.perf_counter()
        rows = sft.rows_dataset(tries, cfg.row_tokens)
        t2 = time.perf_counter()
        record = {"bench": "sft", "profile": profile.name, "model": kind, "trajectories": len(tries),
                  "rows": len(rows), "build_tries_seconds": round(t1 - t0, 2), "pack_rows_seconds": round(t2 - t1, 2),
                  "steps_timed": steps - warmup}
        for precision in ("fp32", "bf16"):
            model = models.build_tiny_model(tok, cfg.model_spec(), seed=cfg.seed)
            settings = dataclasses.replace(cfg.train_settings(), max_steps=steps, logging_steps=1,
                                           save_steps=steps + 1, bf16=precision == "bf16", warmup_steps=0)
            with tempfile.TemporaryDirectory() as out:
                trainer = sft.make_trainer(model, tok, rows, out, settings)
                clock = step_clock()
                trainer.add_callback(clock)
                log = sft.train(trainer)
            record[f"{precision}_seconds_per_step"] = round(sum(clock.times[warmup:]) / (steps - warmup), 4)
            record[f"{precision}_first_losses"] = [round(r["loss"], 4) for r in log if "loss" in r][:3]
        record["bf16_speedup"] = round(record["fp32_seconds_per_step"] / record["bf16_seconds_per_step"], 2)
        yield record


def config_root(profile: config.Profile):
    from .runs import project_root

    root = Path(profile.output_root)
    return (root if root.is_absolute() else project_root() / root) / profile.name


def bench_gpu(profile: config.Profile) -> Iterator[dict]:
    from .bench_gpu import bench_gpu as run

    yield from run(profile)


BENCHES: dict[str, Callable[[config.Profile], Iterator[dict]]] = {"data": bench_data, "trie": bench_trie,
                                                                    "induction": bench_induction,
                                                                    "orchestrator": bench_orchestrator, "rl": bench_rl,
                                                                    "sft": bench_sft,
                                                                    "gpu": bench_gpu}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m twlib.bench", description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted(BENCHES))
    parser.add_argument("--params", required=True, help="params/<profile>.yaml")
    args = parser.parse_args(argv)
    profile = config.load_profile(args.params)
    for record in BENCHES[args.name](profile):
        print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
