"""P-GRPO on TRL's ``GRPOTrainer`` (paper §3.3, docs/design.md §8): parallel rollouts scored as tries.

A rollout is one fork-join trajectory from the orchestrator (`twlib.orchestrator`). It becomes one
TRL sample whose completion is the flattened trie of its engine calls (`twlib.trie.build_trie` with
the joined response as main path) and whose loss mask is the trie-SFT mask: every token the model
wrote is scored once, in the context it was written in; orchestrator-inserted tokens never are.
The sample is scored in one forward with the ancestor mask and tree position ids, so shared prefixes
are computed once. TRL does the rest: group advantages ``A = r − mean_group(r)`` (``scale_rewards=
"none"``; ``"group"`` is the std-normalised ablation), broadcast over the sample's scored tokens, and
a token-mean loss over the batch (``loss_type="dapo"``). With ``branching=False`` the orchestrator
never forks (every block is plain text) — the sequential GRPO baseline, same code.

Tiny example: a rollout with one block of two threads ``a`` and ``b`` becomes the completion
``H \\n<Thread>\\n1: a </Thread> … 2: b </Thread>`` (main path) followed by its branch ``2: b </Thread>``;
thread 2 is scored on the branch, where it sees only ``H`` — as at inference.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch
from trl import GRPOConfig, GRPOTrainer

from . import launch
from .config import ConfigError, PGRPOConfig
from .dataset import load_parquet
from .engines import Sampling
from .engines.hf import HFEngine
from .engines.openai import OpenAIEngine
from .masks import ancestor_mask
from .models import context_length, load_model
from .orchestrator import Orchestrator, OrchestratorConfig, Result
from .rewards import RewardConfig, reward_function, score
from .runs import RunFolder
from .sft import last_checkpoint, save_trained
from .show import quiet_trainer
from .tokenizer import load_tokenizer, prompt_ids
from .trie import Objective, build_trie


# ------------------------------------------------------------------------------ rollout → sample
@dataclass
class RolloutSample:
    """One rollout as a TRL sample: ``prompt_ids`` + ``completion_ids`` (the flat trie after the prompt).

    ``sources[i]`` is the flat index whose output predicts completion token i (its trie parent, or the
    flat predecessor under the official objective); ``scored[i]`` says token i carries loss.
    """
    prompt_ids: list[int]
    completion_ids: list[int]
    position_ids: list[int]   # over prompt + completion
    exit: list[int]           # over prompt + completion
    sources: list[int]
    scored: list[int]


def rollout_sample(result: Result, objective: Objective = "corrected") -> RolloutSample:
    """The trie of a rollout's engine calls, split into prompt and completion.

    >>> from twlib.format import TrajectoryStats
    >>> from twlib.trie import Unit
    >>> stats = TrajectoryStats(2, 2, 2, 0, 0, ())
    >>> r = Result([1, 2], [3, 4], "", None, [], Counter(), stats, units=[Unit((1, 2), (3, 4), "sequential")])
    >>> s = rollout_sample(r)
    >>> s.completion_ids, s.sources, s.scored
    ([3, 4], [1, 2], [1, 1])
    """
    prompt = list(result.prompt_ids)
    packed = build_trie(prompt, result.units, objective, main=prompt + list(result.response_ids))
    n = len(prompt)
    if packed.input_ids[:n] != prompt:
        raise ValueError("the flattened trie does not start with the prompt")
    sources = []
    for i in range(n, len(packed)):
        if not packed.trained[i]:
            sources.append(0)
        else:
            sources.append(packed.parent[i] if objective == "corrected" else i - 1)
    return RolloutSample(prompt, packed.input_ids[n:], packed.position_ids, packed.exit, sources,
                         [int(t) for t in packed.trained[n:]])


def tree_tensors(samples: Sequence[RolloutSample], prompt_width: int, completion_width: int) -> dict:
    """Position ids, exit times (``[B, P+C]``) and prediction sources (``[B, C]``) in TRL's padded layout.

    TRL left-pads prompts to ``prompt_width`` and right-pads completions to ``completion_width``; a
    sample's flat index f lands at column ``f + prompt_width − len(prompt)``. Padding has exit −1, so it
    is visible to nobody but itself (`twlib.masks.ancestor_mask`).
    """
    B, L = len(samples), prompt_width + completion_width
    pos = torch.zeros((B, L), dtype=torch.long)
    exit_ = torch.full((B, L), -1, dtype=torch.long)
    src = torch.zeros((B, completion_width), dtype=torch.long)
    for b, s in enumerate(samples):
        off = prompt_width - len(s.prompt_ids)
        n = len(s.position_ids)
        pos[b, off:off + n] = torch.tensor(s.position_ids)
        exit_[b, off:off + n] = torch.tensor(s.exit) + off
        src[b, :len(s.sources)] = torch.tensor(s.sources) + off
    return {"tree_position_ids": pos, "tree_exit": exit_, "tree_sources": src}


def tree_log_probs(model, input_ids, completion_ids, scored, tree: dict, temperature: float = 1.0):
    """Per-token log-probs ``[B, C]`` of the completion tokens, each from its source position.

    One forward over the whole flat trie with the ancestor mask and tree position ids. Works with any
    transformers causal LM; unscored positions get 0.
    """
    dtype = next(model.parameters()).dtype
    mask = ancestor_mask(tree["tree_exit"], dtype).to(input_ids.device)
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=tree["tree_position_ids"].to(input_ids.device),
                use_cache=False)
    src = tree["tree_sources"].to(input_ids.device)
    logits = out.logits.gather(1, src.unsqueeze(-1).expand(-1, -1, out.logits.size(-1))).float() / temperature
    logps = torch.log_softmax(logits, dim=-1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    entropy = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
    keep = scored.bool()
    return logps.masked_fill(~keep, 0.0), entropy.masked_fill(~keep, 0.0)


# ------------------------------------------------------------------------------------- trainer
@dataclass(frozen=True)
class PGRPOSettings:
    """What P-GRPO adds to ``GRPOConfig``: rewards, the orchestrator's guards, the objective, branching."""
    rewards: RewardConfig = RewardConfig()
    orchestrator: OrchestratorConfig = OrchestratorConfig()
    objective: Objective = "corrected"
    branching: bool = True


ROLLOUT_METRICS = ("acceleration_ratio", "critical_path_tokens", "total_tokens", "activated")


class ParallelGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` whose rollouts go through the fork-join orchestrator and are scored as tries.

    ``engine`` defaults to `twlib.engines.hf.HFEngine` over the policy itself, or, with ``use_vllm``
    (colocate), to `twlib.engines.vllm.VLLMEngine` over TRL's in-process ``vllm.LLM``, whose weights TRL
    syncs from the policy before each rollout; pass any engine to replace it.
    """

    def __init__(self, model, tokenizer, train_dataset, args, settings: PGRPOSettings = PGRPOSettings(),
                 engine=None, callbacks=None):
        if args.num_iterations != 1 or args.beta != 0.0:
            raise ValueError("P-GRPO scores rollouts on-policy only: set num_iterations=1 and beta=0.0")
        if args.mask_truncated_completions:
            raise ValueError("mask_truncated_completions must be False: a flattened trie does not end at EOS")
        self.settings, self._engine = settings, engine
        self._rollout_samples: list[RolloutSample] | None = None
        self._last_samples: list[RolloutSample] = []
        self._tree_batch: dict | None = None
        self.guard_counts: Counter = Counter()
        super().__init__(model=model, reward_funcs=[reward_function(settings.rewards)], args=args,
                         train_dataset=train_dataset, processing_class=tokenizer, callbacks=callbacks,
                         rollout_func=self._rollout)

    # ---------------------------------------------------------------- rollouts (TRL's rollout_func)
    def _orchestrator(self) -> Orchestrator:
        cfg = self.settings.orchestrator
        cfg = replace(cfg, sampling=Sampling(temperature=self.args.temperature, top_p=self.args.top_p),
                      max_blocks=cfg.max_blocks if self.settings.branching else 0)
        eos = self.processing_class.eos_token_id
        if self._engine is not None:
            engine = self._engine
        elif self.use_vllm:
            if self.vllm_mode != "colocate":
                raise ValueError("P-GRPO rollouts use TRL's vLLM in vllm_mode='colocate'; for a separate "
                                 "server pass engine=OpenAIEngine(...) of a server that follows the policy")
            from .engines.vllm import VLLMEngine

            engine = VLLMEngine(self.vllm_generation.llm, eos)  # TRL syncs its weights before each rollout
        else:
            engine = HFEngine(self.accelerator.unwrap_model(self.model), eos)
        return Orchestrator(engine, self.processing_class, cfg)

    def _rollout(self, prompts: list, trainer) -> dict:
        tok = self.processing_class
        ids = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) if not isinstance(p, str) else p
               for p in prompts]
        ids = [tok.encode(text, add_special_tokens=False) for text in ids]
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        try:
            results = self._orchestrator().run(ids)
        finally:
            model.train(was_training)
        samples = [rollout_sample(r, self.settings.objective) for r in results]
        self._rollout_samples = samples
        self._log_rollouts(results)
        return {
            "prompt_ids": [s.prompt_ids for s in samples],
            "completion_ids": [s.completion_ids for s in samples],
            "env_mask": [s.scored for s in samples],
            "logprobs": None,
            "response_text": [r.text for r in results],
            "acceleration_ratio": [r.metrics["acceleration_ratio"] for r in results],
        }

    def _log_rollouts(self, results: list[Result]) -> None:
        mode = "train" if self.model.training else "eval"
        n = len(results)
        for name in ROLLOUT_METRICS:
            self._metrics[mode][f"rollout/{name}"].append(sum(float(r.metrics[name]) for r in results) / n)
        blocks = [k for r in results for k in r.metrics["threads_per_block"]]
        self._metrics[mode]["rollout/threads_per_block"].append(sum(blocks) / len(blocks) if blocks else 0.0)
        hit = [r for r in results if r.flags]
        self._metrics[mode]["rollout/guard_hit_ratio"].append(len(hit) / n)
        for r in results:
            self.guard_counts.update(r.flags)

    # ------------------------------------------------------------- scoring with the tree
    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        samples, self._rollout_samples = self._rollout_samples, None
        self._last_samples = samples
        output.update(tree_tensors(samples, output["prompt_ids"].size(1), output["completion_ids"].size(1)))
        return output

    def _compute_loss(self, model, inputs):
        self._tree_batch = {k: inputs[k] for k in ("tree_position_ids", "tree_exit", "tree_sources")}
        self._tree_batch["scored"] = inputs["completion_mask"] * inputs.get("tool_mask", 1)
        self._tree_batch["completion_ids"] = inputs["completion_ids"]
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self._tree_batch = None

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                           batch_size=None, compute_entropy=False, **kwargs):
        tree = self._tree_batch
        if tree is None:
            raise RuntimeError("P-GRPO scores only on-policy batches it built itself (no tree data here)")
        with self.accelerator.autocast():
            logps, entropy = tree_log_probs(model, input_ids, tree["completion_ids"], tree["scored"], tree,
                                            self.temperature)
        return logps, (entropy if compute_entropy else None), None


def grpo_args(output_dir, *, max_steps: int, prompts_per_step: int, num_generations: int, learning_rate: float,
              temperature: float = 1.0, top_p: float = 1.0, std_advantages: bool = False, logging_steps: int = 1,
              save_steps: int = 50, seed: int = 0, use_cpu: bool = True, bf16: bool = False, max_completion_length: int = 2048,
              use_vllm: bool = False, vllm_gpu_memory_utilization: float = 0.3):
    """``GRPOConfig`` for P-GRPO: mean-centred advantages, token-mean loss, no KL, plain on-policy steps."""
    return GRPOConfig(
        output_dir=str(output_dir), max_steps=max_steps, learning_rate=learning_rate,
        per_device_train_batch_size=prompts_per_step * num_generations, num_generations=num_generations,
        gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1, beta=0.0,
        scale_rewards="group" if std_advantages else "none", loss_type="dapo",
        temperature=temperature, top_p=top_p, max_completion_length=max_completion_length,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.01, max_grad_norm=1.0,
        logging_steps=logging_steps, save_steps=save_steps, save_total_limit=2, seed=seed, data_seed=seed,
        use_cpu=use_cpu, bf16=bf16, gradient_checkpointing=False, report_to="none", dataloader_num_workers=0,
        mask_truncated_completions=False, log_completions=False,
        use_vllm=use_vllm, vllm_mode="colocate", vllm_gpu_memory_utilization=vllm_gpu_memory_utilization,
        # The orchestrator samples the rollouts; TRL's importance-sampling correction needs vLLM's own
        # per-token log-probs of a single call, which a multi-call rollout does not have.
        vllm_importance_sampling_correction=False,
    )


# ------------------------------------------------------------------------------- notebook 04
RUNS = {  # name → (SFT model it starts from, branching, std-normalised advantages)
    "pgrpo": ("parallel", True, False),
    "grpo_sequential": ("sequential", False, False),
    "pgrpo_std": ("parallel", True, True),
}


def prompt_dataset(train_ds, n: int, seed: int, columns: Sequence[str] = ("prompt", "answer", "question")):
    """``n`` training prompts of the target distribution (no ``short-`` problems), shuffled, with ``columns``
    (by default the ``prompt``, ``answer``, ``question`` columns TRL needs)."""
    if "shape" in train_ds.column_names:  # real-math data has no shapes, and no short problems
        train_ds = train_ds.select([i for i, shape in enumerate(train_ds["shape"]) if not shape.startswith("short-")])
    ds = train_ds.shuffle(seed=seed)
    return ds.select(range(min(n, len(ds)))).select_columns([c for c in columns if c in ds.column_names])


def settings(cfg: PGRPOConfig, branching: bool, max_context: int) -> PGRPOSettings:
    """What P-GRPO adds to TRL's config, from notebook 04's parameters, for a model of ``max_context`` tokens."""
    return PGRPOSettings(rewards=RewardConfig.for_stage(cfg), orchestrator=OrchestratorConfig.for_stage(cfg, max_context),
                         objective=cfg.objective, branching=branching)


def training_args(cfg: PGRPOConfig, output_dir: str | Path, std_advantages: bool = False) -> GRPOConfig:
    """TRL's ``GRPOConfig`` of notebook 04's parameters (`grpo_args`); ``std_advantages`` is the ablation."""
    args = grpo_args(output_dir, max_steps=cfg.max_steps, prompts_per_step=cfg.prompts_per_step,
                     num_generations=cfg.num_generations, learning_rate=cfg.learning_rate,
                     temperature=cfg.temperature, top_p=cfg.top_p, std_advantages=std_advantages,
                     logging_steps=cfg.logging_steps, save_steps=cfg.save_steps, seed=cfg.seed,
                     max_completion_length=cfg.max_new_tokens, use_cpu=cfg.use_cpu, bf16=cfg.bf16,
                     use_vllm=cfg.vllm_mode != "none", vllm_gpu_memory_utilization=cfg.vllm_gpu_memory_utilization)
    args.vllm_mode = "server" if cfg.vllm_mode == "server" else "colocate"
    if cfg.vllm_mode == "server":
        args.vllm_server_base_url = cfg.vllm_server_url
    if cfg.gradient_checkpointing:
        args.gradient_checkpointing, args.gradient_checkpointing_kwargs = True, {"use_reentrant": False}
    return args


class ServerRolloutGRPOTrainer(ParallelGRPOTrainer):
    """Server mode: every process rolls out through the shared vLLM server. TRL pushes the new weights from
    the main process only; the others wait for it here, so that no rollout reads the previous step's weights."""

    def _rollout(self, prompts: list, trainer) -> dict:
        self.accelerator.wait_for_everyone()
        return super()._rollout(prompts, trainer)


def rollout_server_command(model: str | Path, port: int = 8000, tensor_parallel_size: int = 1,
                           gpu_memory_utilization: float = 0.9, max_model_len: int | None = None,
                           dtype: str = "bfloat16") -> tuple[list[str], dict]:
    """``(argv, env)`` of the vLLM server P-GRPO rolls out on in server mode: TRL's own ``vllm serve``
    line (NCCL weight transfer from the trainer, prefix caching on) and its dev-mode environment.

    Start it on GPUs the trainer does not use, on the model P-GRPO starts from; `pgrpo_job` talks to it at
    ``vllm_server_url``.
    """
    from trl.scripts.vllm_serve import ScriptArguments, build_command  # TRL's server script, for GPU hosts only

    args = ScriptArguments(model=str(model), port=port, tensor_parallel_size=tensor_parallel_size,
                           gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                           enable_prefix_caching=True, dtype=dtype)
    return build_command(args), {"VLLM_SERVER_DEV_MODE": "1"}


def starting_models(cfg: PGRPOConfig, run: RunFolder) -> dict[str, Path]:
    """The SFT model each kind of run starts from: notebook 02's sequential model, and the parallel model of
    ``parallel_init``'s stage (02, or 03 for the paper's order: SFT, self-training, then RL)."""
    return {"sequential": run.require_complete("02_trie_sft") / "sequential_model",
            "parallel": run.require_complete(cfg.parallel_init) / "parallel_model"}


def pgrpo_job(cfg: PGRPOConfig, name: str, run: RunFolder) -> dict:
    """Notebook 04's RL run ``name`` (`RUNS`) in this process: the notebook kernel, or every process under
    ``accelerate launch``. Checkpoints go to ``<run>/<name>_checkpoints`` (an interrupted run resumes from the
    newest), the model to ``<run>/<name>_model`` (`twlib.sft.save_trained` gathers ZeRO-3 shards).

    ``vllm_mode`` picks the rollout engine: ``none`` (the orchestrator over the policy, HF), ``colocate``
    (TRL's vLLM inside every process, weights synced each step) or ``server`` (the vLLM server at
    ``vllm_server_url``, started with `rollout_server_command`). Returns ``{"log", "model_path", "guard_counts"}``.
    """
    if name not in RUNS:
        raise ValueError(f"the RL run is one of {sorted(RUNS)}, got {name!r}")
    zero3 = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"
    if cfg.vllm_mode == "none" and zero3:
        raise ConfigError("under ZeRO-3 no process holds whole weights to decode with: roll out with "
                          "vLLM (vllm_mode 'colocate' or 'server')")
    kind, branching, std = RUNS[name]
    init = starting_models(cfg, run)[kind]
    tokenizer = load_tokenizer(run.require_complete("02_trie_sft") / "parallel_model")
    train = load_parquet(run.require_complete("01_trajectories") / "data", splits=("train",))["train"]
    prompts = prompt_dataset(train, cfg.max_steps * cfg.prompts_per_step, cfg.seed)
    args = training_args(cfg, run.path(f"{name}_checkpoints"), std)
    engine, trainer_cls = None, ParallelGRPOTrainer
    if cfg.vllm_mode == "server":
        # The server names the model by the path it was started with (rollout_server_command(init)).
        engine = OpenAIEngine(cfg.vllm_server_url, str(init), tokenizer.eos_token_id, concurrency=64, timeout_s=600.0)
        trainer_cls = ServerRolloutGRPOTrainer
    # Under ZeRO-3 the weights must be partitioned as they load, which only loading by path does.
    model = str(init) if zero3 else load_model(init)
    trainer = quiet_trainer(trainer_cls(model, tokenizer, prompts, args, settings(cfg, branching, context_length(init)),
                                        engine=engine), f"RL {name}")
    with run.timer(f"train_{name}"):
        trainer.train(resume_from_checkpoint=last_checkpoint(args.output_dir))
    path = save_trained(trainer, tokenizer, run.path(f"{name}_model"))
    return {"log": [dict(r) for r in trainer.state.log_history], "model_path": str(path),
            "guard_counts": dict(trainer.guard_counts)}


def fit(cfg: PGRPOConfig, names: Sequence[str], run: RunFolder) -> dict[str, dict]:
    """`pgrpo_job` for each run of ``names``: here, ``concurrent_jobs`` side by side, or with ``accelerate_config``
    set in one process per GPU (`twlib.launch.run_jobs`)."""
    return launch.run_jobs("pgrpo", pgrpo_job, cfg, names, run)


HISTORY_COLUMNS = {"reward": "reward", "accuracy": "accuracy", "rollout/acceleration_ratio": "acceleration_ratio",
                   "rollout/critical_path_tokens": "critical_path_tokens", "rollout/total_tokens": "total_tokens",
                   "rollout/activated": "activation_ratio", "rollout/threads_per_block": "threads_per_block",
                   "rollout/guard_hit_ratio": "guard_hit_ratio", "loss": "loss"}


def history(log: list[dict]):
    """Per-step rollout statistics of a run's trainer log (pandas), one row per logged step."""
    rows = [{"step": r["step"], **{short: r.get(key) for key, short in HISTORY_COLUMNS.items()}}
            for r in log if "reward" in r]
    return pd.DataFrame(rows)


def final_summary(histories: dict, share: float = 0.25):
    """Mean of each statistic over the last ``share`` of the logged steps, one row per run (pandas)."""
    rows = {}
    for name, df in histories.items():
        tail = df.tail(max(1, int(round(len(df) * share))))
        rows[name] = tail.drop(columns=["step", "loss"]).mean()
    return pd.DataFrame(rows).T


def example_rollout(cfg: PGRPOConfig, run: RunFolder, tokenizer, row: dict) -> dict:
    """`describe_rollout` of the parallel model P-GRPO starts from, once per run."""
    return run.once("example_rollout", lambda: describe_rollout(starting_models(cfg, run)["parallel"], tokenizer,
                                                                  row, cfg))


def describe_rollout(model_path, tokenizer, row: dict, cfg: PGRPOConfig) -> dict:
    """One sampled rollout of a saved model on ``row`` (``question``, ``answer``): its text, reward, and
    the tokens its trie holds vs the tokens of its engine calls scored one by one."""
    run_settings = settings(cfg, branching=True, max_context=context_length(model_path))
    orch_cfg = replace(run_settings.orchestrator,
                       sampling=Sampling(temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed))
    result = Orchestrator(HFEngine(load_model(model_path), tokenizer.eos_token_id), tokenizer, orch_cfg).run(
        [prompt_ids(tokenizer, row["question"])])[0]
    parts = score(result.text, row["answer"], result.metrics["acceleration_ratio"], run_settings.rewards)
    sample = rollout_sample(result, run_settings.objective)
    return {"text": result.text, "correct": parts.correct, "reward": parts.total,
            "acceleration_ratio": round(result.metrics["acceleration_ratio"], 3),
            "engine_calls": len(result.units), "flags": dict(result.flags),
            "trie_tokens": len(sample.prompt_ids) + len(sample.completion_ids),
            "expanded_tokens": sum(len(u.context) + len(u.completion) for u in result.units),
            "scored_tokens": sum(sample.scored)}
