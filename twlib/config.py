"""Typed parameters for the notebooks and the params/<profile>.yaml files that feed them.

Each notebook stage has a frozen dataclass registered under its stage name; papermill parameters,
a notebook's ``globals()`` and a YAML profile section all go through ``from_dict``, which fails
with a message naming the bad parameter:

>>> @register_stage
... @dataclass(frozen=True, kw_only=True)
... class DemoConfig(StageConfig):
...     stage: ClassVar[str] = "00_demo"
...     n: int = 1
>>> DemoConfig.from_dict({"profile": "smoke", "n": 3}).n
3
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Self, TypeVar

import yaml

__all__ = [
    "ConfigError", "StageConfig", "STAGE_CONFIGS", "register_stage", "Profile", "load_profile",
]

_COMMON_KEYS = ("profile", "output_root")
_PROFILE_KEYS = ("profile", "output_root", "stages", "description")


class ConfigError(ValueError):
    """A parameter or params file is wrong; the message names the parameter and where it came from."""


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("None" if a is type(None) else _type_name(a) for a in args)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp))


class _Mismatch(Exception):
    """Internal: a value does not fit a type; carries the (possibly nested) parameter name."""

    def __init__(self, name: str, tp: Any, value: Any):
        super().__init__(f"parameter '{name}' must be {_type_name(tp)}, got {_describe(value)}")


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Return ``value`` checked against ``tp`` (int widened to float, tuples to lists)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Literal:
        # `True == 1`, so compare types too: a bool must not pass for Literal[1].
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise _Mismatch(name, tp, value)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, name)
            except _Mismatch:
                pass
        raise _Mismatch(name, tp, value)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch(name, tp, value)
        (item_tp,) = args
        return [_coerce(v, item_tp, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _Mismatch(name, tp, value)
        key_tp, val_tp = args
        return {_coerce(k, key_tp, f"{name} key"): _coerce(v, val_tp, f"{name}[{k!r}]")
                for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported parameter annotation {_type_name(tp)} for '{name}'")
    raise _Mismatch(name, tp, value)


@dataclass(frozen=True, kw_only=True)
class StageConfig:
    """Parameters every stage shares; subclass per notebook and decorate with ``@register_stage``.

    Fields are keyword-only so subclasses may add fields without defaults.
    """

    stage: ClassVar[str] = ""

    profile: str
    output_root: str = "outputs"
    force: bool = False
    seed: int = 0

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, d: typing.Mapping[str, Any]) -> Self:
        """Build and validate from a mapping; unknown or mistyped keys raise ConfigError."""
        known = cls.names()
        for key in d:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ConfigError(f"{cls.stage}: unknown parameter '{key}'{hint}; "
                                  f"known parameters: {', '.join(known)}")
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name in d:
                value = d[f.name]
            elif f.default is not dataclasses.MISSING:
                value = f.default
            elif f.default_factory is not dataclasses.MISSING:
                value = f.default_factory()
            else:
                raise ConfigError(f"{cls.stage}: missing parameter '{f.name}'")
            # Defaults go through the same coercion so that `lr: float = 1` still yields a float.
            try:
                values[f.name] = _coerce(value, hints[f.name], f.name)
            except _Mismatch as e:
                raise ConfigError(f"{cls.stage}: {e}") from None
        cfg = cls(**values)
        cfg._validate_common()
        cfg.validate()
        return cfg

    @classmethod
    def from_namespace(cls, ns: typing.Mapping[str, Any]) -> Self:
        """Pick this stage's parameters out of a notebook's ``globals()`` and validate them."""
        missing = [n for n in cls.names() if n not in ns]
        if missing:
            raise ConfigError(f"{cls.stage}: parameter(s) {', '.join(repr(m) for m in missing)} "
                              "not defined in the notebook; are they in the parameters cell?")
        return cls.from_dict({n: ns[n] for n in cls.names()})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Range checks; subclasses override with ``self._check(...)`` calls."""

    def _validate_common(self) -> None:
        self._check(bool(self.profile.strip()), "profile", "must not be empty")
        self._check(bool(self.output_root.strip()), "output_root", "must not be empty")
        self._check(self.seed >= 0, "seed", "must be >= 0")

    def _check(self, cond: bool, name: str, msg: str) -> None:
        if not cond:
            raise ConfigError(f"{self.stage}: parameter '{name}' {msg}, "
                              f"got {getattr(self, name, '?')!r}")


STAGE_CONFIGS: dict[str, type[StageConfig]] = {}

_C = TypeVar("_C", bound=type[StageConfig])


def register_stage(cls: _C) -> _C:
    """Class decorator: make ``cls`` the config of the stage named by ``cls.stage``."""
    if not (isinstance(cls, type) and issubclass(cls, StageConfig) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"{cls!r} must be a dataclass subclass of StageConfig")
    if not cls.stage:
        raise TypeError(f"{cls.__name__} must set `stage: ClassVar[str]`")
    previous = STAGE_CONFIGS.get(cls.stage)
    # Re-importing the same module (autoreload) re-registers the same class name; that is fine.
    if previous is not None and (previous.__module__, previous.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"stage '{cls.stage}' is already registered by {previous.__qualname__}")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):  # fail at import, not on the first bad params file
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            continue
        try:
            _coerce(default, hints[f.name], f.name)
        except _Mismatch as e:
            raise TypeError(f"{cls.__name__}: default of {e}") from None
    STAGE_CONFIGS[cls.stage] = cls
    return cls


@dataclass
class Profile:
    """One params/<profile>.yaml: which stages run, in order, and each stage's parameters."""

    name: str
    output_root: str
    stages: list[str]
    sections: dict[str, dict[str, Any]]
    path: Path
    description: str = ""

    def stage_params(self, stage: str) -> dict[str, Any]:
        """The papermill parameters of ``stage``: its section plus profile and output_root."""
        if stage not in self.stages:
            raise ConfigError(f"{self.path}: stage '{stage}' is not in this profile's stages "
                              f"({', '.join(self.stages)})")
        return {"profile": self.name, "output_root": self.output_root, **self.sections.get(stage, {})}

    def stage_config(self, stage: str) -> StageConfig:
        params = self.stage_params(stage)
        try:
            return STAGE_CONFIGS[stage].from_dict(params)
        except ConfigError as e:
            raise ConfigError(f"{self.path}: {e}") from None


def load_profile(path: str | Path) -> Profile:
    """Read and check a params file; stage sections are type-checked later by ``stage_config``."""
    path = Path(path)

    def fail(msg: str) -> typing.NoReturn:
        raise ConfigError(f"{path}: {msg}")

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        fail(f"cannot read params file: {e.strerror or e}")
    except yaml.YAMLError as e:
        fail(f"invalid YAML: {e}")
    if not isinstance(data, dict):
        fail(f"must be a mapping with 'profile' and 'stages', got {_describe(data)}")
    if "profile" not in data:
        fail(f"missing 'profile' (should be '{path.stem}')")
    if data["profile"] != path.stem:
        fail(f"'profile' is {data['profile']!r} but must equal the file name stem {path.stem!r}")
    output_root = data.get("output_root", "outputs")
    if not isinstance(output_root, str) or not output_root:
        fail(f"'output_root' must be a non-empty str, got {_describe(output_root)}")
    description = data.get("description", "")
    if not isinstance(description, str):
        fail(f"'description' must be str, got {_describe(description)}")
    stages = data.get("stages")
    if not isinstance(stages, list) or not stages or not all(isinstance(s, str) for s in stages):
        fail(f"'stages' must be a non-empty list of stage names, got {_describe(stages)}")
    if len(set(stages)) != len(stages):
        fail(f"'stages' lists a stage twice: {stages}")
    known = sorted(STAGE_CONFIGS) or ["(none registered)"]
    for stage in stages:
        if stage not in STAGE_CONFIGS:
            fail(f"stage '{stage}' in 'stages' has no registered notebook config; known: {', '.join(known)}")
    sections: dict[str, dict[str, Any]] = {}
    for key, section in data.items():
        if key in _PROFILE_KEYS:
            continue
        if key not in STAGE_CONFIGS:
            close = difflib.get_close_matches(str(key), known + list(_PROFILE_KEYS), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            fail(f"section '{key}' is not a known stage{hint}; known stages: {', '.join(known)}")
        section = {} if section is None else section
        if not isinstance(section, dict):
            fail(f"section '{key}' must be a mapping of parameters, got {_describe(section)}")
        for common in (*_COMMON_KEYS, "force"):
            if common in section:
                fail(f"section '{key}' sets '{common}', which comes from the profile"
                     + (" (use --force on the pipeline)" if common == "force" else ""))
        sections[key] = section
    return Profile(name=data["profile"], output_root=output_root, stages=stages,
                   sections=sections, path=path, description=description)


def make_engine(engine: str, model_path, eos_token_id: int, dtype: str = "float32", tensor_parallel_size: int = 1):
    """``"hf"`` or ``"vllm"`` engine over a saved model (vLLM is imported only when asked for)."""
    if engine == "vllm":
        from .engines.vllm import VLLMEngine

        return VLLMEngine.from_pretrained(model_path, eos_token_id, dtype=dtype,
                                          tensor_parallel_size=tensor_parallel_size)
    from .engines.hf import HFEngine
    from .models import load_model

    return HFEngine(load_model(model_path, dtype=dtype), eos_token_id)


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
        from .tasks import FAMILIES

        self._check(self.source in ("synthetic", "math"), "source", "must be 'synthetic' or 'math'")
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
        from .tasks.expressions import MAX_GROUPS, MAX_REPEATS

        self._check(2 <= self.expr_groups_min <= self.expr_groups_max <= MAX_GROUPS, "expr_groups_min",
                    f"must satisfy 2 <= expr_groups_min <= expr_groups_max <= {MAX_GROUPS} "
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
        from .tasks.math_data import MathDataError, resolve_name

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

    def math_dataset(self, root: str | Path = ".", cache_dir: str | None = None):
        """The real-math splits of this config (`twlib.tasks.math_data.build_math_dataset`); a relative
        ``math_data_dir`` is read from ``root``, e.g. ``tests/fixtures/math`` under the project root."""
        from .tasks.math_data import build_math_dataset

        data_dir = Path(root) / self.math_data_dir if self.math_data_dir else None
        return build_math_dataset(self.math_train, self.math_benchmarks, data_dir=data_dir, n_train=self.n_train,
                                  n_validation=self.math_validation, n_test=self.n_test, seed=self.seed,
                                  drop_empty=self.math_drop_empty, cache_dir=cache_dir)

    def task_mix(self):
        from .tasks import ExpressionParams, ProductParams, TaskMix

        params = {
            "expressions": ExpressionParams(
                balanced_fraction=self.expr_balanced_fraction, groups_min=self.expr_groups_min,
                groups_max=self.expr_groups_max, repeats_min=self.expr_repeats_min,
                repeats_max=self.expr_repeats_max, chain_repeats_min=self.expr_chain_repeats_min,
                chain_repeats_max=self.expr_chain_repeats_max),
            "products": ProductParams(factors_min=self.prod_factors_min, factors_max=self.prod_factors_max,
                                      factor_min=self.prod_factor_min, factor_max=self.prod_factor_max),
        }
        return TaskMix(list(self.families), list(self.family_weights), params)

    def short_task_mix(self):
        """Expression problems of 1..short_repeats_max additions per sub-expression and
        expr_groups_min..short_groups_max sub-expressions (extra training data)."""
        from .tasks import ExpressionParams, TaskMix

        n = self.short_repeats_max
        return TaskMix(["expressions"], [1.0], {"expressions": ExpressionParams(
            balanced_fraction=self.expr_balanced_fraction, groups_min=self.expr_groups_min,
            groups_max=self.short_groups_max, repeats_min=1, repeats_max=n, chain_repeats_min=1,
            chain_repeats_max=n)})


@register_stage
@dataclass(frozen=True, kw_only=True)
class TrieSFTConfig(StageConfig):
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
    base_model: str = ""
    model_dtype: str = "float32"
    bf16: bool = False
    attention: str = "dense"
    gradient_checkpointing: bool = False
    gradient_accumulation_steps: int = 1
    use_cpu: bool = True
    accelerate_config: str = ""
    num_processes: int = 0

    def validate(self) -> None:
        from .models import VLLM_CPU_HEAD_DIMS

        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                     "max_steps", "batch_rows", "row_tokens", "logging_steps", "save_steps",
                     "gradient_accumulation_steps"):
            self._check(getattr(self, name) >= 1, name, "must be >= 1")
        if not self.base_model:  # the tiny model's sizes; a pretrained model brings its own
            self._check(self.hidden_size % self.num_heads == 0, "num_heads", "must divide hidden_size")
            self._check(self.num_heads % self.num_kv_heads == 0, "num_kv_heads", "must divide num_heads")
            self._check(self.hidden_size // self.num_heads in VLLM_CPU_HEAD_DIMS, "num_heads",
                        f"must give a head size hidden_size/num_heads in {VLLM_CPU_HEAD_DIMS}")
        self._check(self.train_data in ("01_trajectories", "01b_rewriting"), "train_data",
                    "must be '01_trajectories' (the synthetic CoTs) or '01b_rewriting' (what the LLM rewriting accepted)")
        self._check(self.base_model == self.base_model.strip(), "base_model", "must not start or end with spaces")
        self._check(self.model_dtype in ("float32", "bfloat16"), "model_dtype", "must be 'float32' or 'bfloat16'")
        self._check(self.attention in ("dense", "flex"), "attention", "must be 'dense' or 'flex'")
        self._check(not (self.attention == "flex" and self.use_cpu), "attention",
                    "flex needs a GPU (set use_cpu false): flex attention has no backward pass on CPU")
        self._check(self.num_processes >= 0, "num_processes", "must be >= 0 (0: the accelerate config's count)")
        self._check(self.num_processes == 0 or bool(self.accelerate_config), "num_processes",
                    "needs an accelerate_config (several processes are started by accelerate launch)")
        self._check(self.learning_rate > 0, "learning_rate", "must be > 0")
        self._check(self.qk_norm_init > 0, "qk_norm_init", "must be > 0")
        self._check(self.rope_theta > 0, "rope_theta", "must be > 0")
        self._check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        self._check(self.objective in ("corrected", "official"), "objective", "must be 'corrected' or 'official'")
        self._check(self.train_sequential or self.train_parallel, "train_parallel",
                    "or train_sequential must be true")
        self._check(self.example_index >= 0, "example_index", "must be >= 0")

    def model_spec(self):
        from .models import TinyModelSpec

        return TinyModelSpec(hidden_size=self.hidden_size, num_layers=self.num_layers, num_heads=self.num_heads,
                             num_kv_heads=self.num_kv_heads, intermediate_size=self.intermediate_size,
                             qk_norm_init=self.qk_norm_init, rope_theta=self.rope_theta)

    def train_settings(self):
        from .sft import TrainSettings

        return TrainSettings(max_steps=self.max_steps, per_device_train_batch_size=self.batch_rows,
                             learning_rate=self.learning_rate, warmup_steps=self.warmup_steps,
                             logging_steps=self.logging_steps, save_steps=self.save_steps, seed=self.seed,
                             bf16=self.bf16, use_cpu=self.use_cpu, attention=self.attention,
                             gradient_checkpointing=self.gradient_checkpointing,
                             gradient_accumulation_steps=self.gradient_accumulation_steps)


@register_stage
@dataclass(frozen=True, kw_only=True)
class EvaluationConfig(StageConfig):
    """Parameters of notebooks/05_evaluation.ipynb (engine, test problems, orchestrator guards)."""

    stage: ClassVar[str] = "05_evaluation"

    engine: str = "hf"
    n_test: int = 0
    batch_size: int = 1
    max_new_tokens: int = 2048
    max_thread_tokens: int = 1024
    max_threads: int = 8
    max_blocks: int = 8
    temperature: float = 0.0
    include_self_training: bool = False
    include_rl: bool = False
    dtype: str = "float32"
    tensor_parallel_size: int = 1

    def validate(self) -> None:
        self._check(self.engine in ("hf", "vllm"), "engine", "must be 'hf' or 'vllm'")
        self._check(self.n_test >= 0, "n_test", "must be >= 0 (0: the whole test split)")
        for name in ("batch_size", "max_new_tokens", "max_thread_tokens", "max_threads"):
            self._check(getattr(self, name) >= 1, name, "must be >= 1")
        self._check(self.max_blocks >= 0, "max_blocks", "must be >= 0")
        self._check(self.temperature >= 0, "temperature", "must be >= 0 (0: greedy)")
        self._check(self.dtype in ("float32", "bfloat16"), "dtype", "must be 'float32' or 'bfloat16'")
        self._check(self.tensor_parallel_size >= 1, "tensor_parallel_size", "must be >= 1")
        self._check(self.tensor_parallel_size == 1 or self.engine == "vllm", "tensor_parallel_size",
                    "needs engine 'vllm'")

    def orchestrator_config(self, max_context: int):
        from .engines import Sampling
        from .orchestrator import OrchestratorConfig

        return OrchestratorConfig(max_new_tokens=self.max_new_tokens, max_thread_tokens=self.max_thread_tokens,
                                  max_context=max_context, max_threads=self.max_threads, max_blocks=self.max_blocks,
                                  sampling=Sampling(temperature=self.temperature, seed=self.seed))

    def make_engine(self, model_path, eos_token_id: int):
        """The engine named by ``engine`` for a saved model (vLLM is imported only when asked for)."""
        return make_engine(self.engine, model_path, eos_token_id, self.dtype, self.tensor_parallel_size)


@register_stage
@dataclass(frozen=True, kw_only=True)
class PGRPOConfig(StageConfig):
    """Parameters of notebooks/04_pgrpo.ipynb (rollouts, rewards, optimiser, ablation)."""

    stage: ClassVar[str] = "04_pgrpo"

    max_steps: int = 40
    prompts_per_step: int = 8
    num_generations: int = 4
    learning_rate: float = 1e-5
    temperature: float = 1.0
    top_p: float = 1.0
    rho: float = 0.5
    clip: float = 0.2
    incorrect_reward: float = 0.0
    acceleration_reward: bool = True
    objective: str = "corrected"
    parallel_init: str = "02_trie_sft"
    run_ablation: bool = True
    max_new_tokens: int = 1024
    max_thread_tokens: int = 512
    max_threads: int = 8
    max_blocks: int = 8
    logging_steps: int = 1
    save_steps: int = 10
    use_cpu: bool = True
    bf16: bool = False
    gradient_checkpointing: bool = False
    vllm_mode: str = "none"
    vllm_server_url: str = ""
    vllm_gpu_memory_utilization: float = 0.3
    accelerate_config: str = ""
    num_processes: int = 0

    def validate(self) -> None:
        self._check(not (self.bf16 and self.use_cpu), "bf16", "needs a GPU (set use_cpu false)")
        self._check(self.vllm_mode in ("none", "colocate", "server"), "vllm_mode",
                    "must be 'none' (the orchestrator over the policy, HF), 'colocate' or 'server' (TRL's vLLM)")
        self._check(self.vllm_mode == "none" or not self.use_cpu, "vllm_mode", "needs a GPU (set use_cpu false)")
        self._check(self.vllm_mode != "server" or self.vllm_server_url.startswith(("http://", "https://")),
                    "vllm_server_url", "must be the rollout server's http(s) URL when vllm_mode is 'server'")
        self._check(0 < self.vllm_gpu_memory_utilization <= 1, "vllm_gpu_memory_utilization", "must be in (0, 1]")
        self._check(self.num_processes >= 0, "num_processes", "must be >= 0 (0: the accelerate config's count)")
        self._check(self.num_processes == 0 or bool(self.accelerate_config), "num_processes",
                    "needs an accelerate_config (several processes are started by accelerate launch)")
        for name in ("max_steps", "prompts_per_step", "max_new_tokens", "max_thread_tokens", "max_threads",
                     "logging_steps", "save_steps"):
            self._check(getattr(self, name) >= 1, name, "must be >= 1")
        self._check(self.num_generations >= 2, "num_generations", "must be >= 2 (advantages compare a group)")
        self._check(self.learning_rate > 0, "learning_rate", "must be > 0")
        self._check(self.temperature > 0, "temperature", "must be > 0 (rollouts are sampled)")
        self._check(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        self._check(self.rho >= 0, "rho", "must be >= 0")
        self._check(0 <= self.clip <= 1, "clip", "must be in [0, 1] (an acceleration ratio)")
        self._check(self.objective in ("corrected", "official"), "objective", "must be 'corrected' or 'official'")
        self._check(self.parallel_init in ("02_trie_sft", "03_self_training"), "parallel_init",
                    "must be '02_trie_sft' (the parallel SFT model) or '03_self_training' (the self-trained one)")
        self._check(self.max_blocks >= 0, "max_blocks", "must be >= 0")

    def settings(self, branching: bool, max_context: int):
        from .orchestrator import OrchestratorConfig
        from .pgrpo import PGRPOSettings
        from .rewards import RewardConfig

        return PGRPOSettings(
            rewards=RewardConfig(rho=self.rho, clip=self.clip, incorrect_reward=self.incorrect_reward,
                                 acceleration=self.acceleration_reward),
            orchestrator=OrchestratorConfig(max_new_tokens=self.max_new_tokens, max_thread_tokens=self.max_thread_tokens,
                                            max_context=max_context, max_threads=self.max_threads,
                                            max_blocks=self.max_blocks),
            objective=self.objective, branching=branching)

    def grpo_args(self, output_dir, std_advantages: bool = False):
        from .pgrpo import grpo_args

        args = grpo_args(output_dir, max_steps=self.max_steps, prompts_per_step=self.prompts_per_step,
                         num_generations=self.num_generations, learning_rate=self.learning_rate,
                         temperature=self.temperature, top_p=self.top_p, std_advantages=std_advantages,
                         logging_steps=self.logging_steps, save_steps=self.save_steps, seed=self.seed,
                         max_completion_length=self.max_new_tokens, use_cpu=self.use_cpu, bf16=self.bf16,
                         use_vllm=self.vllm_mode == "colocate",
                         vllm_gpu_memory_utilization=self.vllm_gpu_memory_utilization)
        if self.gradient_checkpointing:
            args.gradient_checkpointing, args.gradient_checkpointing_kwargs = True, {"use_reentrant": False}
        return args


@register_stage
@dataclass(frozen=True, kw_only=True)
class SelfTrainingConfig(StageConfig):
    """Parameters of notebooks/03_self_training.ipynb (stage-2 rollouts, filter, merge, retraining)."""

    stage: ClassVar[str] = "03_self_training"

    n_prompts: int = 400
    samples_per_prompt: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 1024
    max_thread_tokens: int = 512
    max_threads: int = 8
    max_blocks: int = 8
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
        for name in ("n_prompts", "samples_per_prompt", "max_new_tokens", "max_thread_tokens", "max_threads",
                     "chunk_size", "max_steps", "batch_rows", "row_tokens", "logging_steps", "save_steps"):
            self._check(getattr(self, name) >= 1, name, "must be >= 1")
        self._check(self.temperature > 0, "temperature", "must be > 0 (samples of one prompt must differ)")
        self._check(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        self._check(self.max_blocks >= 0, "max_blocks", "must be >= 0")
        self._check(self.merge_synthetic >= 0, "merge_synthetic", "must be >= 0 (0: merge none)")
        self._check(self.retrain_from in ("sft", "scratch"), "retrain_from",
                    "must be 'sft' (continue from the parallel SFT model) or 'scratch' (a fresh model)")
        self._check(self.learning_rate > 0, "learning_rate", "must be > 0")
        self._check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        self._check(self.n_eval >= 0, "n_eval", "must be >= 0 (0: no before/after check)")

    def orchestrator_config(self, max_context: int, greedy: bool = False):
        """Rollouts sample (no per-request seed, so the samples of one prompt differ); checks are greedy."""
        from .engines import GREEDY, Sampling
        from .orchestrator import OrchestratorConfig

        sampling = GREEDY if greedy else Sampling(temperature=self.temperature, top_p=self.top_p)
        return OrchestratorConfig(max_new_tokens=self.max_new_tokens, max_thread_tokens=self.max_thread_tokens,
                                  max_context=max_context, max_threads=self.max_threads, max_blocks=self.max_blocks,
                                  sampling=sampling)

    def make_engine(self, model_path, eos_token_id: int):
        return make_engine(self.engine, model_path, eos_token_id)

    def train_settings(self, sft_cfg=None):
        """This stage's optimiser and schedule; the scale switches (device, bf16, mask kind, checkpointing,
        accumulation) are notebook 02's, whose models this stage retrains."""
        import dataclasses

        from .sft import TrainSettings

        base = sft_cfg.train_settings() if sft_cfg is not None else TrainSettings()
        return dataclasses.replace(base, max_steps=self.max_steps, per_device_train_batch_size=self.batch_rows,
                                   learning_rate=self.learning_rate, warmup_steps=self.warmup_steps,
                                   logging_steps=self.logging_steps, save_steps=self.save_steps, seed=self.seed)


@register_stage
@dataclass(frozen=True, kw_only=True)
class RewritingConfig(StageConfig):
    """Parameters of notebooks/01b_rewriting.ipynb (stage-1 LLM rewriting of sequential traces)."""

    stage: ClassVar[str] = "01b_rewriting"

    llm_engine: str = "hf"
    llm_model: str = "02_trie_sft/sequential_model"
    llm_base_url: str = ""
    llm_api_key: str = ""
    llm_max_tokens_field: str = "max_tokens"
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
        if self.llm_engine == "endpoint":
            self._check(self.llm_base_url.startswith(("http://", "https://")), "llm_base_url",
                        "must be the endpoint's http(s) URL when llm_engine is 'endpoint'")
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

    def settings(self):
        from .datagen import Stage1Settings

        return Stage1Settings(max_retries=self.max_retries, min_diversity=self.min_diversity,
                              max_tokens=self.max_tokens, temperature=self.temperature)
