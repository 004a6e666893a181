"""The typed parameters of each notebook stage, and the knob groups several stages share.

One frozen dataclass per notebook, registered under the stage name; `twlib.config.core` builds and checks
them from a params profile, papermill's parameters or a notebook's namespace. This module holds values and
their checks only: each stage module turns its config into what it needs (``twlib.sft.train_settings(cfg)``,
``twlib.orchestrator.OrchestratorConfig.for_stage(cfg, ...)``, ...), so nothing here imports a stage module.

>>> EvaluationConfig.from_dict({"profile": "p", "max_threads": 4}).max_threads
4
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import ClassVar

from ..engines import VLLM_CPU_HEAD_DIMS
from ..tasks import FAMILIES
from ..tasks.expressions import MAX_GROUPS, MAX_REPEATS
from ..tasks.math_data import MathDataError, resolve_name
from .core import ConfigError, StageConfig, register_stage
from .knobs import LaunchKnobs, OrchestratorLimits, RewardKnobs

__all__ = ["TrajectoriesConfig", "RewritingConfig", "TrieSFTConfig",
           "SelfTrainingConfig", "PGRPOConfig", "EvaluationConfig"]


# A synthetic trajectory row holds three CoT texts and their statistics: a few KiB in memory (measured about
# 3 KiB on the cpu-demo data; rounded up).
ROW_BYTES = 8 * 1024


def physical_memory() -> int:
    """Bytes of memory of this machine (a large value where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 2**50


# ------------------------------------------------------------------------------ stage configs
@register_stage
@dataclass(frozen=True, kw_only=True)
class TrajectoriesConfig(StageConfig):
    """Parameters of notebooks/01_trajectories.ipynb (task mix, difficulty, split sizes).

    ``source="math"`` builds real-math prompts instead (Polaris-53K train/validation, six benchmarks
    as test); then ``n_train`` caps the training prompts and ``n_test`` each benchmark (0: all).
    """

    stage: ClassVar[str] = "01_trajectories"

    n_train: int = 4000
    n_validation: int = 200
    n_test: int = 300
    families: list[str] = dataclasses.field(default_factory=lambda: ["expressions", "products"])
    family_weights: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.1])
    expr_balanced_fraction: float = 0.75
    expr_groups_min: int = 3
    expr_groups_max: int = 4
    expr_repeats_min: int = 6
    expr_repeats_max: int = 9
    expr_chain_repeats_min: int = 6
    expr_chain_repeats_max: int = 9
    n_train_short: int = 0
    short_repeats_max: int = 3
    short_groups_max: int = 4
    coarse_fraction: float = 0.0
    prod_factors_min: int = 3
    prod_factors_max: int = 4
    prod_factor_min: int = 2
    prod_factor_max: int = 20
    examples_per_shape: int = 1
    source: str = "synthetic"
    math_train: str = "polaris"
    math_benchmarks: list[str] = dataclasses.field(
        default_factory=lambda: ["aime24", "aime25", "amc23", "math500", "minerva", "olympiadbench"])
    math_data_dir: str = ""
    math_validation: int = 200
    math_drop_empty: bool = False

    def validate(self) -> None:
        self._check(self.source in ("synthetic", "math"), "source", "must be 'synthetic' or 'math'")
        self._check_memory()
        self._validate_math()
        if self.source == "synthetic":
            for name in ("n_train", "n_validation", "n_test"):
                self._check(getattr(self, name) >= 1, name, "must be >= 1")
        else:  # real math: n_train caps the training prompts and n_test each benchmark, 0 meaning all
            for name in ("n_train", "n_test"):
                self._check(getattr(self, name) >= 0, name, "must be >= 0 (0: all) when source is 'math'")
        self._check(bool(self.families), "families", "must name at least one family")
        for f in self.families:
            self._check(f in FAMILIES, "families", f"has unknown family {f!r} (known: {sorted(FAMILIES)})")
        self._check(len(set(self.families)) == len(self.families), "families", "repeats a family")
        self._check(len(self.family_weights) == len(self.families), "family_weights",
                    "must have one weight per family")
        self._check(all(w >= 0 for w in self.family_weights) and sum(self.family_weights) > 0,
                    "family_weights", "must be >= 0 with a positive sum")
        self._check(0.0 <= self.expr_balanced_fraction <= 1.0, "expr_balanced_fraction", "must be in [0, 1]")
        self._check(1 <= self.expr_groups_min <= self.expr_groups_max <= MAX_GROUPS, "expr_groups_min",
                    f"must satisfy 1 <= expr_groups_min <= expr_groups_max <= {MAX_GROUPS} "
                    "(three key letters per sub-expression)")
        self._check(1 <= self.expr_repeats_min <= self.expr_repeats_max <= MAX_REPEATS, "expr_repeats_min",
                    f"must satisfy 1 <= expr_repeats_min <= expr_repeats_max <= {MAX_REPEATS}")
        self._check(1 <= self.expr_chain_repeats_min <= self.expr_chain_repeats_max <= MAX_REPEATS,
                    "expr_chain_repeats_min",
                    f"must satisfy 1 <= expr_chain_repeats_min <= expr_chain_repeats_max <= {MAX_REPEATS}")
        self._check(self.n_train_short >= 0, "n_train_short", "must be >= 0")
        self._check(1 <= self.short_repeats_max <= MAX_REPEATS, "short_repeats_max",
                    f"must satisfy 1 <= short_repeats_max <= {MAX_REPEATS}")
        self._check(self.expr_groups_min <= self.short_groups_max <= MAX_GROUPS, "short_groups_max",
                    f"must satisfy expr_groups_min <= short_groups_max <= {MAX_GROUPS}")
        self._check(0.0 <= self.coarse_fraction <= 1.0, "coarse_fraction", "must be in [0, 1]")
        self._check(self.n_train_short == 0 or "expressions" in self.families, "n_train_short",
                    "needs the expressions family")
        self._check(2 <= self.prod_factors_min <= self.prod_factors_max, "prod_factors_min",
                    "must satisfy 2 <= prod_factors_min <= prod_factors_max")
        self._check(0 <= self.prod_factor_min <= self.prod_factor_max, "prod_factor_min",
                    "must satisfy 0 <= prod_factor_min <= prod_factor_max")
        self._check(self.examples_per_shape >= 0, "examples_per_shape", "must be >= 0")

    def _validate_math(self) -> None:
        """The real-math fields (checked whatever ``source`` is): dataset names read loosely by
        `twlib.tasks.math_data.resolve_name`, e.g. ``"MATH-500"`` is ``math500``."""
        def resolve(field: str, name: str) -> str:
            try:
                return resolve_name(name)
            except MathDataError as err:
                raise ConfigError(f"{self.stage}: parameter '{field}' names an {err}; "
                                  f"got {getattr(self, field)!r}") from None

        train = resolve("math_train", self.math_train)
        self._check(bool(self.math_benchmarks), "math_benchmarks", "must name at least one benchmark")
        benchmarks = [resolve("math_benchmarks", b) for b in self.math_benchmarks]
        self._check(len(set(benchmarks)) == len(benchmarks), "math_benchmarks", "repeats a benchmark")
        self._check(train not in benchmarks, "math_train",
                    f"is also in math_benchmarks ({train!r}); training and test prompts would overlap")
        self._check(self.math_data_dir == self.math_data_dir.strip(), "math_data_dir",
                    "must not start or end with spaces (empty: download from the hub)")
        self._check(self.math_validation >= 1, "math_validation", "must be >= 1")

    def sizes(self) -> dict[str, int]:
        return {"train": self.n_train, "validation": self.n_validation, "test": self.n_test}

    def _check_memory(self) -> None:
        """Refuse split sizes whose rows cannot fit in this machine's memory, with the estimate."""
        rows = self.n_train + self.n_validation + self.n_test + self.n_train_short
        need, have = rows * ROW_BYTES, physical_memory()
        self._check(need <= have, "n_train", f"(with n_validation, n_test and n_train_short: {rows:,} rows) needs "
                    f"about {need / 2**30:,.0f} GiB in memory ({ROW_BYTES // 1024} KiB a row), more than this "
                    f"machine's {have / 2**30:,.0f} GiB")


@register_stage
@dataclass(frozen=True, kw_only=True)
class TrieSFTConfig(LaunchKnobs, StageConfig):
    """Parameters of notebooks/02_trie_sft.ipynb (model size, optimiser, packing, objective)."""

    stage: ClassVar[str] = "02_trie_sft"

    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 512
    qk_norm_init: float = 1.0
    rope_theta: float = 10000.0
    max_steps: int = 1400
    batch_rows: int = 4
    row_tokens: int = 1024
    learning_rate: float = 5e-4
    warmup_steps: int = 30
    logging_steps: int = 25
    save_steps: int = 300
    objective: str = "corrected"
    train_sequential: bool = True
    train_parallel: bool = True
    example_index: int = 0
    train_data: str = "01_trajectories"
    release_data: str = "longlian/threadweaver_public_code_reproduced"
    release_subset: str = "sample_964"
    release_limit: int = 0
    base_model: str = ""
    model_dtype: str = "float32"
    bf16: bool = False
    attention: str = "dense"
    gradient_checkpointing: bool = False
    gradient_accumulation_steps: int = 1
    use_cpu: bool = True

    def validate(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                     "max_steps", "batch_rows", "row_tokens", "logging_steps", "save_steps",
                     "gradient_accumulation_steps"):
            self._check(getattr(self, name) >= 1, name, "must be >= 1")
        if not self.base_model:  # the tiny model's sizes; a pretrained model brings its own
            self._check(self.hidden_size % self.num_heads == 0, "num_heads", "must divide hidden_size")
            self._check(self.num_heads % self.num_kv_heads == 0, "num_kv_heads", "must divide num_heads")
            self._check(self.hidden_size // self.num_heads in VLLM_CPU_HEAD_DIMS, "num_heads",
                        f"must give a head size hidden_size/num_heads in {VLLM_CPU_HEAD_DIMS}")
        self._check(self.train_data in ("01_trajectories", "01b_rewriting", "release"), "train_data",
                    "must be '01_trajectories' (the synthetic CoTs), '01b_rewriting' (what the LLM rewriting accepted) "
                    "or 'release' (the authors' released SFT data)")
        self._check(self.train_data != "release" or not self.train_sequential, "train_sequential",
                    "must be false with train_data 'release' (the released data holds parallel trajectories only)")
        self._check(self.release_limit >= 0, "release_limit", "must be >= 0 (0: every accepted row)")
        self._check(self.release_subset in ("sample_964", "sample_964_8x"), "release_subset",
                    "must be 'sample_964' or 'sample_964_8x'")
        self._check(self.base_model == self.base_model.strip(), "base_model", "must not start or end with spaces")
        self._check(self.model_dtype in ("float32", "bfloat16"), "model_dtype", "must be 'float32' or 'bfloat16'")
        self._check(self.attention in ("dense", "flex"), "attention", "must be 'dense' or 'flex'")
        self._check(not (self.attention == "flex" and self.use_cpu), "attention",
                    "flex needs a GPU (set use_cpu false): flex attention has no backward pass on CPU")
        self._check(self.learning_rate > 0, "learning_rate", "must be > 0")
        self._check(self.qk_norm_init > 0, "qk_norm_init", "must be > 0")
        self._check(self.rope_theta > 0, "rope_theta", "must be > 0")
        self._check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        self._check(self.objective in ("corrected", "official"), "objective", "must be 'corrected' or 'official'")
        self._check(self.train_sequential or self.train_parallel, "train_parallel",
                    "or train_sequential must be true")
        self._check(self.example_index >= 0, "example_index", "must be >= 0")


@register_stage
@dataclass(frozen=True, kw_only=True)
class EvaluationConfig(OrchestratorLimits, StageConfig):
    """Parameters of notebooks/05_evaluation.ipynb (engine, test problems, sampling, orchestrator guards). ``engine:
    endpoint`` decodes through an OpenAI-compatible server (docs/design.md §6); ``{model}`` in ``base_url`` or
    ``served_model`` becomes each model's name; the key is read from the variable ``api_key_env`` names (§10); an
    empty ``base_url`` has the kit serve each model itself. ``check_engine`` decodes the parallel model once more on
    another engine, to compare.

    >>> EvaluationConfig.from_dict({"profile": "p", "engine": "endpoint", "base_url": "http://127.0.0.1:8000"}).served_model
    '{model}'
    """

    stage: ClassVar[str] = "05_evaluation"

    engine: str = "hf"
    check_engine: str = ""
    base_url: str = ""
    served_model: str = "{model}"
    api_key_env: str = ""
    endpoint_timeout_s: float = 600.0
    endpoint_concurrency: int = 64
    n_test: int = 0
    batch_size: int = 1
    # Evaluation answers need more room than rollouts: the group's defaults, doubled.
    max_new_tokens: int = 2048
    max_thread_tokens: int = 1024
    temperature: float = 0.0
    top_p: float = 1.0
    samples_per_problem: int = 1
    include_self_training: bool = False
    include_rl: bool = False
    dtype: str = "float32"
    tensor_parallel_size: int = 1

    def validate(self) -> None:
        self._check(self.engine in ("hf", "vllm", "endpoint"), "engine", "must be 'hf', 'vllm' or 'endpoint' (a server)")
        self._check_secrets()
        self._check(self.base_url.startswith(("http://", "https://")) or not self.base_url, "base_url",
                    "must be the server's http(s) URL (e.g. http://127.0.0.1:8000), or empty (with engine 'endpoint': the "
                    "kit serves each model itself with a local `vllm serve`)")
        self._check(self.check_engine in ("", "hf", "vllm", "endpoint") and self.check_engine != self.engine,
                    "check_engine", "must be empty (no check) or an engine other than 'engine' ('hf', 'vllm', 'endpoint')")
        for name in ("base_url", "served_model"):
            self._check(not set("{}") & set(getattr(self, name).replace("{model}", "")), name,
                        "may hold {model} (the evaluated model's name) and no other {...} field")
        self._check(self.engine != "endpoint" or bool(self.served_model.strip()), "served_model", "must name the served model")
        self._check(self.endpoint_timeout_s > 0, "endpoint_timeout_s", "must be > 0 (seconds a request attempt may take)")
        self._check(self.endpoint_concurrency >= 1, "endpoint_concurrency", "must be >= 1")
        self._check(self.n_test >= 0, "n_test", "must be >= 0 (0: the whole test split)")
        self._check(self.batch_size >= 1, "batch_size", "must be >= 1")
        self._check(self.temperature >= 0, "temperature", "must be >= 0 (0: greedy)")
        self._check(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        self._check(self.samples_per_problem == 1 or self.samples_per_problem > 1 and self.temperature > 0,
                    "samples_per_problem", "must be >= 1, and 1 when temperature is 0 (greedy samples are all the same)")
        self._check(self.dtype in ("float32", "bfloat16"), "dtype", "must be 'float32' or 'bfloat16'")
        self._check(self.tensor_parallel_size >= 1, "tensor_parallel_size", "must be >= 1")
        self._check(self.tensor_parallel_size == 1 or self.engine == "vllm", "tensor_parallel_size", "needs engine 'vllm'")

    def _check_secrets(self) -> None:
        """A key in ``api_key_env`` (``sk-...``, over 64 characters, not a variable name) or credentials in ``base_url``
        (``https://me:pw@host``) are refused WITHOUT being repeated: parameters go to run.json."""
        url, name, prefixes = self.base_url, self.api_key_env, RewritingConfig.KEY_PREFIXES
        bad_name = bool(name) and (name.startswith(prefixes) or len(name) > 64 or not (name.isascii() and name.isidentifier()))
        bad_url = "@" in url.split("://", 1)[-1].split("/", 1)[0] or url.startswith(prefixes)
        for field, bad, must in (("base_url", bad_url, "must be a bare URL"),  # no user:password@, no key
                                 ("api_key_env", bad_name, "must be the NAME of an environment variable, e.g. OPENAI_API_KEY")):
            if bad:  # the length only: the value may be the key
                size = len(getattr(self, field))
                raise ConfigError(f"{self.stage}: parameter '{field}' {must} (it looks like a key; the value, {size} "
                                  "characters, is not shown): keys go in the environment variable api_key_env names")


@register_stage
@dataclass(frozen=True, kw_only=True)
class PGRPOConfig(LaunchKnobs, RewardKnobs, OrchestratorLimits, StageConfig):
    """Parameters of notebooks/04_pgrpo.ipynb (rollouts, rewards, optimiser, ablation)."""

    stage: ClassVar[str] = "04_pgrpo"

    max_steps: int = 40
    prompts_per_step: int = 8
    num_generations: int = 4
    learning_rate: float = 1e-5
    temperature: float = 1.0
    top_p: float = 1.0
    acceleration_reward: bool = True
    objective: str = "corrected"
    parallel_init: str = "02_trie_sft"
    run_ablation: bool = True
    logging_steps: int = 1
    save_steps: int = 10
    use_cpu: bool = True
    bf16: bool = False
    gradient_checkpointing: bool = False
    vllm_mode: str = "none"
    vllm_server_url: str = ""
    vllm_gpu_memory_utilization: float = 0.3

    def validate(self) -> None:
        self._check(not (self.bf16 and self.use_cpu), "bf16", "needs a GPU (set use_cpu false)")
        self._check(self.vllm_mode in ("none", "colocate", "server"), "vllm_mode",
                    "must be 'none' (the orchestrator over the policy, HF), 'colocate' or 'server' (TRL's vLLM)")
        self._check(self.vllm_mode == "none" or not self.use_cpu, "vllm_mode", "needs a GPU (set use_cpu false)")
        self._check(self.vllm_mode != "server" or self.vllm_server_url.startswith(("http://", "https://")),
                    "vllm_server_url", "must be the rollout server's http(s) URL when vllm_mode is 'server'")
        self._check(0 < self.vllm_gpu_memory_utilization <= 1, "vllm_gpu_memory_utilization", "must be in (0, 1]")
        for name in ("max_steps", "prompts_per_step", "logging_steps", "save_steps"):
            self._check(getattr(self, name) >= 1, name, "must be >= 1")
        self._check(self.num_generations >= 2, "num_generations", "must be >= 2 (advantages compare a group)")
        self._check(self.learning_rate > 0, "learning_rate", "must be > 0")
        self._check(self.temperature > 0, "temperature", "must be > 0 (rollouts are sampled)")
        self._check(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        self._check(self.objective in ("corrected", "official"), "objective", "must be 'corrected' or 'official'")
        self._check(self.parallel_init in ("02_trie_sft", "03_self_training"), "parallel_init",
                    "must be '02_trie_sft' (the parallel SFT model) or '03_self_training' (the self-trained one)")


@register_stage
@dataclass(frozen=True, kw_only=True)
class SelfTrainingConfig(OrchestratorLimits, StageConfig):
    """Parameters of notebooks/03_self_training.ipynb (stage-2 rollouts, filter, merge, retraining)."""

    stage: ClassVar[str] = "03_self_training"

    n_prompts: int = 400
    samples_per_prompt: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    chunk_size: int = 64
    merge_synthetic: int = 2000
    merge_rewritten: bool = True
    retrain_from: str = "sft"
    max_steps: int = 300
    batch_rows: int = 4
    row_tokens: int = 1024
    learning_rate: float = 2e-4
    warmup_steps: int = 10
    logging_steps: int = 25
    save_steps: int = 100
    n_eval: int = 100
    engine: str = "hf"

    def validate(self) -> None:
        self._check(self.engine in ("hf", "vllm"), "engine", "must be 'hf' or 'vllm'")
        for name in ("n_prompts", "samples_per_prompt", "chunk_size", "max_steps", "batch_rows", "row_tokens",
                     "logging_steps", "save_steps"):
            self._check(getattr(self, name) >= 1, name, "must be >= 1")
        self._check(self.temperature > 0, "temperature", "must be > 0 (samples of one prompt must differ)")
        self._check(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        self._check(self.merge_synthetic >= 0, "merge_synthetic", "must be >= 0 (0: merge none)")
        self._check(self.retrain_from in ("sft", "scratch"), "retrain_from",
                    "must be 'sft' (continue from the parallel SFT model) or 'scratch' (a fresh model)")
        self._check(self.learning_rate > 0, "learning_rate", "must be > 0")
        self._check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        self._check(self.n_eval >= 0, "n_eval", "must be >= 0 (0: no before/after check)")
        rollouts = self.n_prompts * self.samples_per_prompt
        need, have = rollouts * ROW_BYTES, physical_memory()
        self._check(need <= have, "n_prompts", f"× samples_per_prompt ({rollouts:,} rollouts) needs about "
                    f"{need / 2**30:,.0f} GiB in memory, more than this machine's {have / 2**30:,.0f} GiB")


@register_stage
@dataclass(frozen=True, kw_only=True)
class RewritingConfig(StageConfig):
    """Parameters of notebooks/01b_rewriting.ipynb (stage-1 LLM rewriting of sequential traces, docs/design.md §9).

    The endpoint's API key is never a parameter (docs/design.md §10): ``llm_api_key_env`` names the environment
    variable holding it, read when the client is built, so the key is in no record and rotating it resumes a run.

    >>> RewritingConfig.from_dict({"profile": "p", "llm_api_key_env": "OPENAI_API_KEY"}).llm_api_key_env
    'OPENAI_API_KEY'
    """

    stage: ClassVar[str] = "01b_rewriting"
    # Prefixes of common API keys: such a value is a key pasted where the variable's name belongs.
    KEY_PREFIXES: ClassVar[tuple[str, ...]] = ("sk-", "sk_", "hf_", "ghp_", "gho_", "github_pat_", "gsk_", "xai-", "AIza")

    llm_engine: str = "hf"
    llm_model: str = "02_trie_sft/sequential_model"
    llm_base_url: str = ""
    llm_api_key_env: str = ""
    llm_max_tokens_field: str = "max_tokens"
    llm_timeout_s: float = 300.0
    llm_retries: int = 3
    n_traces: int = 50
    traces_from: str = "dataset"
    trace_model: str = ""
    trace_engine: str = "hf"
    trace_max_new_tokens: int = 4096
    max_retries: int = 2
    min_diversity: int = 200
    max_tokens: int = 4096
    temperature: float = 0.0

    def validate(self) -> None:
        self._check(self.llm_engine in ("hf", "vllm", "endpoint"), "llm_engine",
                    "must be 'hf' or 'vllm' (a local model) or 'endpoint' (an OpenAI-compatible chat endpoint)")
        self._check(bool(self.llm_model.strip()), "llm_model", "must name a model (a folder, a hub id, or the "
                    "model an endpoint serves)")
        if self.llm_engine == "endpoint":  # no URL: the kit serves llm_model itself with a local `vllm serve`
            self._check(self.llm_base_url.startswith(("http://", "https://")) or not self.llm_base_url, "llm_base_url",
                        "must be the endpoint's http(s) URL, or empty (the kit serves llm_model locally), when "
                        "llm_engine is 'endpoint'")
        self._check_key_env()
        self._check(0 < self.llm_timeout_s < float("inf"), "llm_timeout_s",
                    "must be a finite number of seconds > 0 (the wall-clock limit of one request attempt)")
        self._check(0 <= self.llm_retries <= 10, "llm_retries", "must be in 0..10 (attempts after the first)")
        self._check(self.n_traces >= 1, "n_traces", "must be >= 1")
        self._check(self.traces_from in ("dataset", "model"), "traces_from",
                    "must be 'dataset' (the sequential CoTs of the 01 training split) or 'model' (generated)")
        if self.traces_from == "model":
            self._check(bool(self.trace_model.strip()), "trace_model", "must name the model that writes the "
                        "sequential traces when traces_from is 'model'")
        self._check(self.trace_engine in ("hf", "vllm"), "trace_engine", "must be 'hf' or 'vllm'")
        self._check(self.llm_max_tokens_field in ("max_tokens", "max_completion_tokens"), "llm_max_tokens_field",
                    "must be 'max_tokens' or 'max_completion_tokens' (what the endpoint calls the answer budget)")
        for name in ("trace_max_new_tokens", "max_tokens"):
            self._check(getattr(self, name) >= 1, name, "must be >= 1")
        self._check(self.max_retries >= 0, "max_retries", "must be >= 0")
        self._check(self.min_diversity >= 0, "min_diversity", "must be >= 0")
        self._check(self.temperature >= 0, "temperature", "must be >= 0 (0: greedy)")

    def _check_key_env(self) -> None:
        """``llm_api_key_env`` is empty or an environment variable's name; a bad value is refused WITHOUT being
        repeated (it may be the key itself), e.g. ``sk-...`` or anything over 64 characters."""
        name = self.llm_api_key_env
        if not name:
            return
        key_like = name.startswith(self.KEY_PREFIXES) or len(name) > 64
        if key_like or not (name.isascii() and name.isidentifier()):
            what = "looks like an API key itself" if key_like else "is not an environment variable name"
            raise ConfigError(f"{self.stage}: parameter 'llm_api_key_env' {what} (the value, {len(name)} characters, "
                              "is not shown): it must be the NAME of an environment variable holding the key, e.g. "
                              "OPENAI_API_KEY (letters, digits and _); put the key in that variable, never in a params file")
