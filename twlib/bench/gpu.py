"""``python -m twlib.bench gpu --params FILE``: what one GPU gives the trie SFT and the HF engine.

``sft`` records (paper §3.2 at scale): real trainer steps (forward, backward and AdamW; bf16
autocast over float32 weights, gradient checkpointing, TRL's fused LM head) of a random-init model the size of a
hub Qwen3 (`twlib.models.QWEN3_SHAPES`, no download) on one packed trie row of 8k and of 32k
tokens, with the flex-attention ``BlockMask`` and with the dense additive mask: tokens per second
and peak GPU memory, or ``"status": "oom"`` where the dense L×L mask does not fit.

``decode`` records (paper §4, wall clock): the same model decoding T tokens sequentially vs K
threads of T/K tokens from one shared prefix through `twlib.engines.hf.HFEngine` (prefix KV computed
once, threads batched): wall-clock speedup against the ideal K. ``orchestrator`` records: where the
profile's notebook-02 models exist, their evaluation summary with the HF engine on the GPU.

Without CUDA the same code runs on CPU with the dense mask only (flex attention has no CPU
backward), which is what the CPU tests exercise on a tiny shape.
"""
from __future__ import annotations

import gc
import random
import tempfile
import time
from typing import Iterator, Sequence

import torch
from datasets import Dataset
from transformers import Qwen3Config, Qwen3ForCausalLM

from .. import trie
from ..config import Profile
from ..dataset import load_parquet
from ..engines import Request
from ..engines.hf import HFEngine
from ..evaluation import evaluate, summarize
from ..models import QWEN3_VOCAB, load_model, qwen3_stand_in
from ..orchestrator import Orchestrator
from ..sft import TrainSettings, make_trainer, trajectory_tries
from ..tasks import ProductParams, make_problem
from ..tokenizer import build_char_tokenizer, load_tokenizer
from .common import StepClock, outputs

TINY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=32, tie_word_embeddings=True)


def _model(shape: str, max_len: int, device: str, dtype: str, seed: int):
    if shape != "tiny":
        return qwen3_stand_in(shape, max_position_embeddings=max_len, seed=seed, dtype=dtype, device=device)
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(Qwen3Config(vocab_size=QWEN3_VOCAB, max_position_embeddings=max_len,
                                        **TINY_SHAPE)).to(device=device, dtype=getattr(torch, dtype))


def packed_row(length: int, seed: int = 0):
    """One packed trie row of synthetic parallel trajectories filling at least 85% of ``length``.

    Character-tokenizer ids (all below Qwen3's vocabulary size), so any Qwen3-shaped model reads them.
    """

    tok = build_char_tokenizer()
    rng = random.Random(seed)
    # Long products (2k-8k trie tokens each, threads of hundreds of tokens) for long rows; short ones,
    # which fill a row closely, for the small rows of CPU checks.
    if length >= 8192:
        params = ProductParams(factors_min=4, factors_max=8, factor_min=10, factor_max=999)
    elif length >= 1024:
        params = ProductParams()
    else:
        params = ProductParams(factors_min=2, factors_max=2, factor_min=2, factor_max=9)
    tries, total = [], 0
    for _ in range(100_000):
        if total >= length * 1.5:
            break
        p = make_problem("products", rng, params)
        t = trajectory_tries([{"question": p.question, "text": p.plan.parallel_text()}], tok)[0]
        if len(t) <= length:
            tries.append(t)
            total += len(t)
    row = max(trie.pack_rows(tries, length), key=len)
    if len(row) < 0.85 * length:
        raise RuntimeError(f"packing filled only {len(row)} of {length} tokens")
    return row, tok




def _sft_step(shape: str, length: int, attention: str, device: str, steps: int, seed: int) -> dict:
    """``steps`` + 1 real trainer steps (AdamW included) on one row; the first one (compiling) is not timed."""

    cuda = device == "cuda"
    row, tok = packed_row(length, seed)
    model = _model(shape, length, device, "float32", seed)
    settings = TrainSettings(max_steps=steps + 1, per_device_train_batch_size=1, learning_rate=1e-5, warmup_steps=0,
                             logging_steps=1, save_steps=10**6, bf16=cuda, use_cpu=not cuda, attention=attention,
                             gradient_checkpointing=True)
    rows = Dataset.from_dict({"input_ids": [row.input_ids], "position_ids": [row.position_ids],
                              "exit": [row.exit], "labels": [row.labels]})
    record = {"row_tokens": len(row), "trained_tokens": sum(1 for lab in row.labels if lab != -100)}
    clock = StepClock(cuda)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as out:
        trainer = make_trainer(model, tok, rows, out, settings)
        trainer.data_collator.pad_to_multiple_of = length  # one shape for every step: flex compiles once
        trainer.add_callback(clock)
        try:
            trainer.train()
        except torch.OutOfMemoryError:
            return {**record, "status": "oom"}
        losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
        del trainer
    times = clock.times
    seconds = sum(times[1:]) / max(1, len(times) - 1)
    record |= {"status": "ok", "steps_timed": len(times) - 1, "loss": round(float(losses[-1]), 4),
               "step_seconds": round(seconds, 4), "tokens_per_s": round(length / seconds, 1),
               "first_step_seconds": round(times[0], 2)}
    if cuda:
        record["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return record


def bench_sft(shape: str = "qwen3-0.6b", lengths: Sequence[int] = (8192, 32768),
              attentions: Sequence[str] = ("flex", "dense"), steps: int = 3, seed: int = 0) -> Iterator[dict]:
    """One record per (length, attention) of trie-SFT steps; see the module docstring."""

    device = "cuda" if torch.cuda.is_available() else "cpu"
    for length in lengths:
        for attention in attentions:
            common = {"bench": "gpu_sft", "device": _device_name(device), "shape": shape, "length": length,
                      "attention": attention}
            if attention == "flex" and device == "cpu":
                yield {**common, "status": "skipped", "reason": "flex attention has no backward on CPU"}
                continue
            record = _sft_step(shape, length, attention, device, steps, seed)
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
            yield {**common, **record}


def bench_decode(shape: str = "qwen3-0.6b", prefix: int = 1024, tokens: int = 1024,
                 threads: Sequence[int] = (2, 4, 8), seed: int = 0, repeats: int = 2) -> Iterator[dict]:
    """Sequential decoding of ``tokens`` tokens vs K threads of ``tokens // K`` after a shared prefix."""

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = _model(shape, prefix + tokens + 16, device, "bfloat16" if device == "cuda" else "float32", seed)
    # An id the model can never produce: every request decodes exactly its budget.
    engine = HFEngine(model, eos_token_id=-1)
    rng = random.Random(seed)
    context = tuple(rng.randrange(1000, 100000) for _ in range(prefix))

    def timed(requests) -> float:
        best = float("inf")
        for _ in range(repeats):  # the best of a few: other work on the machine only ever adds time
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = engine.generate(requests)
            if device == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
            if any(len(c.ids) != r.max_new_tokens for c, r in zip(out, requests)):
                raise RuntimeError("a request stopped before its budget; the comparison needs exact lengths")
        return best

    timed([Request(context, 8)])  # warm-up: kernels, allocator
    sequential = timed([Request(context + (11, 12, 13), tokens)])
    for k in threads:
        # The orchestrator's thread headers differ only in the thread number: same length, shared head.
        parallel = timed([Request(context + (11, 12, 100 + j), tokens // k) for j in range(k)])
        yield {"bench": "gpu_decode", "device": _device_name(device), "shape": shape, "prefix_tokens": prefix,
               "sequential_tokens": tokens, "threads": k, "thread_tokens": tokens // k,
               "sequential_seconds": round(sequential, 3), "parallel_seconds": round(parallel, 3),
               "wall_clock_speedup": round(sequential / parallel, 3),
               "token_latency_speedup": round(tokens / (tokens // k), 3),
               "parallel_efficiency": round(sequential / parallel / (tokens / (tokens // k)), 3)}


def bench_orchestrator_gpu(profile, n_problems: int = 50) -> Iterator[dict]:
    """docs/design.md §7 summary of the profile's two SFT models with the HF engine on the GPU (if both exist)."""

    root = outputs(profile)
    paths = {kind: root / "02_trie_sft" / f"{kind}_model" for kind in ("sequential", "parallel")}
    if not all(p.is_dir() for p in paths.values()) or not torch.cuda.is_available():
        return
    test = load_parquet(root / "01_trajectories" / "data")["test"]
    problems = [dict(r) for r in test.select(range(min(n_problems, len(test))))]
    tok = load_tokenizer(paths["parallel"])
    records = {}
    for kind, path in paths.items():
        engine = HFEngine(load_model(path, dtype="bfloat16").to("cuda"), tok.eos_token_id)
        t0 = time.perf_counter()
        records[kind] = evaluate(Orchestrator(engine, tok), problems, tok)
        records[kind + "_seconds"] = time.perf_counter() - t0
    summary = summarize(records["sequential"], records["parallel"])
    yield {"bench": "gpu_orchestrator", "engine": "hf", "device": _device_name("cuda"), "profile": profile.name,
           "sequential_seconds": round(records["sequential_seconds"], 2),
           "parallel_seconds": round(records["parallel_seconds"], 2),
           **{k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()}}


def run(profile: Profile) -> Iterator[dict]:
    """Everything above with the defaults: Qwen3-0.6B shape, 8k and 32k rows, 1k-token decoding."""
    seed = profile.stage_config("02_trie_sft").seed if "02_trie_sft" in profile.stages else 0
    yield from bench_sft(seed=seed)
    yield from bench_decode(seed=seed)
    yield from bench_orchestrator_gpu(profile)


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"
