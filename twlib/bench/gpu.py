"""``python -m twlib.bench gpu --params FILE``: what one GPU gives the trie SFT and the HF engine.

``sft`` records (paper §3.2 at scale): real trainer steps (forward, backward and AdamW; bf16
autocast over float32 weights, gradient checkpointing, TRL's fused LM head) of a random-init model the size of a
hub Qwen3 (`twlib.models.QWEN3_SHAPES`, no download) on one packed trie row of 8k, 32k and 64k
tokens, with the flex-attention ``BlockMask`` and with the dense additive mask: tokens per second
and peak GPU memory, or ``"status": "oom"`` where the dense L×L mask does not fit.

``flex_dense`` record: the loss and every gradient of one packed row in float32, flex ``BlockMask`` vs
dense mask, as max absolute differences (on CPU the loss only: flex attention has no CPU backward).
``pgrpo`` record: one step of `twlib.pgrpo.ParallelGRPOTrainer` (HF-engine fork-join rollouts on the
policy, tree-scored loss, AdamW) of a random model with a hub Qwen3's body and the character vocabulary:
seconds and whether the loss is finite.

``decode`` records (paper §4, wall clock): the same model decoding T tokens sequentially vs K
threads of T/K tokens from one shared prefix through `twlib.engines.hf.HFEngine` (prefix KV computed
once, threads batched): wall-clock speedup against the ideal K. ``orchestrator`` records: where the
profile's notebook-02 models exist, their evaluation summary with the HF engine on the GPU.

Without CUDA the same code runs on CPU with the dense mask only (flex attention has no CPU
backward), which is what the CPU tests exercise on a tiny shape.
"""
from __future__ import annotations

import gc
import math
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
from ..masks import ancestor_block_mask, ancestor_mask, row_tensors
from ..models import QWEN3_SHAPES, QWEN3_VOCAB, load_model, qwen3_stand_in
from ..orchestrator import Orchestrator, OrchestratorConfig
from ..sft import FLEX_BLOCK, TrainSettings, make_trainer, set_attention, trajectory_tries
from ..tasks import ExpressionParams, ProductParams, make_problem
from ..tokenizer import build_char_tokenizer, load_tokenizer
from .common import StepClock, outputs

TINY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=32, tie_word_embeddings=True)


def _model(shape: str, max_len: int, device: str, dtype: str, seed: int):
    """A random Qwen3: a `QWEN3_SHAPES` key, ``"tiny"`` (Qwen3's vocabulary) or ``"tiny-char"`` (the character
    vocabulary: a 151,936-row LM head dominates a tiny model's step on a CPU, so smoke runs use this one)."""
    if shape == "tiny-char":
        return _char_model("tiny", build_char_tokenizer(), max_len, device, seed).to(getattr(torch, dtype))
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
        _no_checkpoints(trainer)
        try:
            trainer.train()
        except (torch.OutOfMemoryError, MemoryError) as oom:
            # MemoryError: the dense mask is built in host memory by the collator (L² elements).
            where = "host" if isinstance(oom, MemoryError) else "gpu"
            peak = round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None
            return {**record, "status": "oom", "oom_in": where, "peak_memory_gb": peak, "steps_done": len(clock.times)}
        losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
        del trainer
    times = clock.times
    seconds = sum(times[1:]) / max(1, len(times) - 1)
    record |= {"status": "ok", "steps_timed": len(times) - 1, "loss": round(float(losses[-1]), 4),
               "step_seconds": round(seconds, 4), "tokens_per_s": round(length / seconds, 1),
               "first_step_seconds": round(times[0], 2)}
    record["peak_memory_gb"], record["peak_memory_kind"] = _peak_memory(cuda)
    return record


def _no_checkpoints(trainer) -> None:
    """Keep nothing: transformers 5 saves a checkpoint after the last step, weights and AdamW state (~7 GB
    for a 0.6B model in float32), which would cost a benchmark more time than its steps."""
    from transformers.trainer_utils import SaveStrategy

    trainer.args.save_strategy = SaveStrategy.NO


def _peak_memory(cuda: bool) -> tuple[float, str]:
    """GiB of the peak since the last reset: CUDA tensors, or on CPU the process's largest resident set
    (a stand-in that never resets, so it only grows from record to record)."""
    if cuda:
        return round(torch.cuda.max_memory_allocated() / 2**30, 2), "cuda_max_allocated"
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2), "process_max_rss"


def bench_sft(shape: str = "qwen3-0.6b", lengths: Sequence[int] = (8192, 32768, 65536),
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
    # Ordinary ids of the model's vocabulary: Qwen3's, or the character one (112 rows) of ``tiny-char``.
    low, high = (1000, 100000) if model.config.vocab_size > 100000 else (3, 100)
    context = tuple(rng.randrange(low, high) for _ in range(prefix))

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
        yield {"bench": "gpu_decode", "status": "ok", "device": _device_name(device), "shape": shape, "prefix_tokens": prefix,
               "sequential_tokens": tokens, "threads": k, "thread_tokens": tokens // k,
               "sequential_seconds": round(sequential, 3), "parallel_seconds": round(parallel, 3),
               "wall_clock_speedup": round(sequential / parallel, 3),
               "token_latency_speedup": round(tokens / (tokens // k), 3),
               "parallel_efficiency": round(sequential / parallel / (tokens / (tokens // k)), 3)}



def _max_abs_diff(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


def bench_flex_dense(shape: str = "tiny", length: int = 4096, seed: int = 0) -> dict:
    """Loss and gradients of one packed row with the dense mask (sdpa) and the flex ``BlockMask``, float32.

    The same model and row for both, so any difference is the kernels': ~1e-6 when the masks agree,
    ~1e-1 when one tile is wrong. On CPU only the loss is compared (flex attention has no CPU backward).
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    row, tok = packed_row(length, seed)
    L = -(-len(row) // FLEX_BLOCK) * FLEX_BLOCK  # flex attends in 128-token tiles
    batch = {k: v.to(device) for k, v in row_tensors([row], tok.pad_token_id, L).items()}
    model = _model(shape, L, device, "float32", seed)
    model.set_attn_implementation("sdpa")
    mask_of = {"dense": ancestor_mask(batch["tree_exit"]), "flex": ancestor_block_mask(batch["tree_exit"])}
    losses, grads = {}, {}
    for kind in ("dense", "flex"):
        set_attention(model, kind)
        model.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(device == "cuda"):
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                           attention_mask=mask_of[kind]).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch["shift_labels"].flatten(),
                                                     ignore_index=-100)
            if device == "cuda":
                loss.backward()
                grads[kind] = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        losses[kind] = loss.detach()
    record = {"bench": "gpu_flex_dense", "device": _device_name(device), "shape": shape, "row_tokens": len(row),
              "padded_tokens": L, "dtype": "float32", "loss_dense": round(float(losses["dense"]), 6),
              "loss_flex": round(float(losses["flex"]), 6),
              "loss_max_abs_diff": _max_abs_diff(losses["flex"], losses["dense"])}
    if grads:
        diffs = {n: _max_abs_diff(grads["flex"][n], g) for n, g in grads["dense"].items()}
        worst = max(diffs, key=diffs.get)
        record |= {"status": "ok", "gradients_compared": len(diffs), "grad_max_abs_diff": diffs[worst],
                   "grad_worst_parameter": worst,
                   "grad_max_abs": max(float(g.abs().max()) for g in grads["dense"].values())}
    else:
        record |= {"status": "ok", "gradients_compared": 0, "grad_max_abs_diff": None,
                   "grad_note": "flex attention has no backward on CPU: loss only"}
    return record


def _char_model(shape: str, tok, max_len: int, device: str, seed: int):
    """A random Qwen3 with ``shape``'s body (``"tiny"`` or a `QWEN3_SHAPES` key) and ``tok``'s vocabulary:
    rollouts decode to text, which a 151,936-row head over a character tokenizer would not."""
    body = TINY_SHAPE if shape == "tiny" else QWEN3_SHAPES[shape]
    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=-(-len(tok) // 16) * 16, max_position_embeddings=max_len, rope_theta=1e6,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None, **body)
    model = Qwen3ForCausalLM(config).to(device)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = tok.eos_token_id, tok.pad_token_id
    return model


def bench_pgrpo_step(shape: str = "qwen3-0.6b", prompts: int = 2, generations: int = 4, max_new_tokens: int = 128,
                     seed: int = 0) -> dict:
    """One `twlib.pgrpo.ParallelGRPOTrainer` step: rollouts through the orchestrator and the HF engine on the
    policy, the tree-scored loss, AdamW (bf16 autocast on CUDA). Seconds of the whole step, loss finite."""
    from ..pgrpo import ParallelGRPOTrainer, PGRPOSettings, grpo_args

    cuda = torch.cuda.is_available()
    tok = build_char_tokenizer()
    rng = random.Random(seed)
    params = ExpressionParams(balanced_fraction=1.0, groups_min=2, groups_max=3, repeats_min=1, repeats_max=3)
    problems = [make_problem("expressions", rng, params) for _ in range(prompts)]
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": p.question}] for p in problems],
                              "answer": [p.answer for p in problems], "question": [p.question for p in problems]})
    model = _char_model(shape, tok, 2048, "cuda" if cuda else "cpu", seed)
    orchestrator = OrchestratorConfig(max_new_tokens=max_new_tokens, max_thread_tokens=max_new_tokens // 2,
                                      max_context=1024)
    with tempfile.TemporaryDirectory() as out:
        args = grpo_args(out, max_steps=1, prompts_per_step=prompts, num_generations=generations, learning_rate=1e-6,
                         save_steps=10**6, seed=seed, use_cpu=not cuda, bf16=cuda, max_completion_length=max_new_tokens)
        trainer = ParallelGRPOTrainer(model, tok, data, args, PGRPOSettings(orchestrator=orchestrator))
        _no_checkpoints(trainer)
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
        (log,) = [r for r in trainer.state.log_history if "loss" in r]
    loss = float(log["loss"])
    return {"bench": "gpu_pgrpo", "device": _device_name("cuda" if cuda else "cpu"), "shape": shape,
            "vocabulary": "char", "parameters": sum(p.numel() for p in model.parameters()), "prompts": prompts,
            "generations": generations, "max_new_tokens": max_new_tokens, "status": "ok",
            "step_seconds": round(seconds, 2), "rollout_tokens": log.get("rollout/total_tokens"),
            "reward": log.get("reward"), "grad_norm": log.get("grad_norm"),
            "loss": loss, "loss_finite": math.isfinite(loss)}


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
    """Everything above with the defaults: flex = dense on a 4k row, one P-GRPO step, Qwen3-0.6B shape,
    8k, 32k and 64k rows, 1k-token decoding."""
    seed = profile.stage_config("02_trie_sft").seed if "02_trie_sft" in profile.stages else 0
    yield bench_flex_dense(seed=seed)
    yield bench_pgrpo_step(seed=seed)
    yield from bench_sft(seed=seed)
    yield from bench_decode(seed=seed)
    yield from bench_orchestrator_gpu(profile)


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"
