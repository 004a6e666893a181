"""The configuration machinery: typed stage parameters checked by name, and params profiles.

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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Self, TypeVar

import yaml

__all__ = [
    "ConfigError", "KnobGroup", "StageConfig", "STAGE_CONFIGS", "register_stage", "Profile", "load_profile",
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


Check = tuple[bool, str, str]  # (holds, parameter name, what it must be)


@dataclass(frozen=True, kw_only=True)
class KnobGroup:
    """Fields several configs share, declared and checked once (docs/design.md §10).

    A group (the orchestrator's limits, the reward settings) is mixed into every stage config that
    exposes its knobs and into the module settings that use them (`twlib.orchestrator.OrchestratorConfig`,
    `twlib.rewards.RewardConfig`). ``knob_checks`` yields ``(holds, name, must)``; a stage config reports a
    failed check as a `ConfigError` naming the stage, any other holder when it is built.
    """

    def knob_checks(self) -> Iterator[Check]:
        return iter(())

    def __post_init__(self) -> None:
        if not isinstance(self, StageConfig):
            for holds, name, must in self.knob_checks():
                if not holds:
                    raise ConfigError(f"{type(self).__name__}: parameter '{name}' {must}, got {getattr(self, name)!r}")


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
        if isinstance(self, KnobGroup):
            for holds, name, must in self.knob_checks():
                self._check(holds, name, must)

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
