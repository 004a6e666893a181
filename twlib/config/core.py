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
import math
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Self, TypeVar

import yaml

from ..files import project_root

__all__ = ["ConfigError", "KnobGroup", "StageConfig", "STAGE_CONFIGS", "register_stage", "describe", "Profile",
           "load_profile", "profile_path"]

# No size, count or step budget of the kit needs more: a larger value is a typo (1e20 for 1e2) that would
# otherwise run until killed or exhaust memory.
MAX_INT = 2**31

# Keys every notebook's parameters cell carries besides its stage's knobs.
NOTEBOOK_KEYS = ("profile", "params_file", "output_root", "force")
_PROFILE_KEYS = ("profile", "output_root", "stages", "description")


class ConfigError(ValueError):
    """A parameter or params file is wrong; the message names the parameter and where it came from."""


def describe(value: Any) -> str:
    """``type repr`` of a value, shortened, for error messages."""
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

    def __init__(self, name: str, tp: Any, value: Any, what: str | None = None):
        super().__init__(f"parameter '{name}' must be {what or _type_name(tp)}, got {describe(value)}")


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
            if abs(value) > MAX_INT:
                raise _Mismatch(name, tp, value, f"an int of at most {MAX_INT:,} (no count in the kit comes near it)")
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise _Mismatch(name, tp, value, "a finite float")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported parameter annotation {_type_name(tp)} for '{name}'")
    raise _Mismatch(name, tp, value)


def _accepts_none(tp: Any) -> bool:
    return tp is Any or (typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp))


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
        """This stage's parameters from a notebook's ``globals()``: the profile is the source of values.

        The parameters cell names ``profile`` (and optionally ``params_file``, a params file elsewhere); every
        knob left at ``None`` takes its value from that profile's section, and a knob given a value — in the
        cell, or injected by papermill — overrides it. `sources` records where each value came from
        (``profile``, ``override``, or ``default`` for a knob the section does not list). A cell whose knobs
        all have values needs no params file. A notebook's namespace (a dict) gets the effective values
        written back, so a later cell reading ``max_steps`` sees the value the run uses, not ``None``.
        """
        missing = [n for n in cls.names() if n not in ns]
        if missing:
            raise ConfigError(f"{cls.stage}: parameter(s) {', '.join(repr(m) for m in missing)} "
                              "not defined in the notebook; are they in the parameters cell?")
        hints = typing.get_type_hints(cls)
        # None means "from the profile" for a knob that cannot be None; an Optional knob's None is a value.
        given = {n: ns[n] for n in cls.names() if ns[n] is not None or _accepts_none(hints[n])}
        if len(given) == len(cls.names()) and not ns.get("params_file"):
            cfg = cls._with_sources(cls.from_dict(given), dict.fromkeys(given, "override"))
        else:
            cfg = cls._from_profile(ns, given)
        if isinstance(ns, dict):
            ns.update(cfg.to_dict())
        return cfg

    @classmethod
    def _from_profile(cls, ns: typing.Mapping[str, Any], given: dict[str, Any]) -> Self:
        profile = load_profile(profile_path(str(ns["profile"]), ns.get("params_file") or ""))
        if profile.name != ns["profile"]:
            raise ConfigError(f"{cls.stage}: profile is {ns['profile']!r} but params_file {profile.path} holds "
                              f"profile {profile.name!r}")
        base = profile.stage_params(cls.stage)
        values = {**base, **given}
        sources = {n: "override" if n in given else "profile" if n in base else "default" for n in cls.names()}
        try:
            return cls._with_sources(cls.from_dict(values), sources)
        except ConfigError as e:
            raise ConfigError(f"{profile.path}: {e}") from None

    @classmethod
    def _with_sources(cls, cfg: Self, sources: dict[str, str]) -> Self:
        object.__setattr__(cfg, "_sources", dict(sources))  # not a field: it is no parameter of the run
        return cfg

    @property
    def sources(self) -> dict[str, str]:
        """Where each value came from: ``profile``, ``override`` or ``default`` (empty when built directly)."""
        return dict(self.__dict__.get("_sources", {}))

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


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping (plain YAML keeps the last value silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {seen[key] + 1}, again on line "
                    f"{key_node.start_mark.line + 1}): each parameter is set once", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def profile_path(profile: str, params_file: str = "", root: Path | None = None) -> Path:
    """The params file of a notebook run: ``params_file`` if given, else ``params/<profile>.yaml`` of the
    project (found from ``root`` or the working directory, so ``notebooks/`` works as well as the repo root)."""
    if params_file:
        return Path(params_file).expanduser()
    return (root or project_root()) / "params" / f"{profile}.yaml"


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
        """The values the profile gives ``stage``: its section plus ``profile`` and ``output_root``."""
        if stage not in self.stages:
            raise ConfigError(f"{self.path}: stage '{stage}' is not in this profile's stages "
                              f"({', '.join(self.stages)})")
        return {"profile": self.name, "output_root": self.output_root, **self.sections[stage]}

    def stage_config(self, stage: str) -> StageConfig:
        params = self.stage_params(stage)
        cls = STAGE_CONFIGS[stage]
        try:
            cfg = cls.from_dict(params)
        except ConfigError as e:
            raise ConfigError(f"{self.path}: {e}") from None
        return cls._with_sources(cfg, {n: "profile" if n in params else "default" for n in cls.names()})


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read params file: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None


def _profile_header(data: Any, path: Path) -> tuple[str, str, list[str]]:
    """``(output_root, description, stages)`` of a params file, checked."""
    def fail(msg: str) -> typing.NoReturn:
        raise ConfigError(f"{path}: {msg}")

    if not isinstance(data, dict):
        fail(f"must be a mapping with 'profile' and 'stages', got {describe(data)}")
    if "profile" not in data:
        fail(f"missing 'profile' (should be '{path.stem}')")
    if data["profile"] != path.stem:
        fail(f"'profile' is {data['profile']!r} but must equal the file name stem {path.stem!r}")
    output_root = data.get("output_root", "outputs")
    if not isinstance(output_root, str) or not output_root:
        fail(f"'output_root' must be a non-empty str, got {describe(output_root)}")
    description = data.get("description", "")
    if not isinstance(description, str):
        fail(f"'description' must be str, got {describe(description)}")
    stages = data.get("stages")
    if not isinstance(stages, list) or not stages or not all(isinstance(s, str) for s in stages):
        fail(f"'stages' must be a non-empty list of stage names, got {describe(stages)}")
    if len(set(stages)) != len(stages):
        fail(f"'stages' lists a stage twice: {stages}")
    known = sorted(STAGE_CONFIGS) or ["(none registered)"]
    for stage in stages:
        if stage not in STAGE_CONFIGS:
            fail(f"stage '{stage}' in 'stages' has no registered notebook config; known: {', '.join(known)}")
    return output_root, description, stages


def _profile_sections(data: dict, stages: list[str], path: Path) -> dict[str, dict[str, Any]]:
    """The stage sections of a params file: known stages only, mappings, no profile-level keys, one per stage."""
    def fail(msg: str) -> typing.NoReturn:
        raise ConfigError(f"{path}: {msg}")

    known = sorted(STAGE_CONFIGS)
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
            fail(f"section '{key}' must be a mapping of parameters, got {describe(section)}")
        for common in ("profile", "output_root", "force"):
            if common in section:
                fail(f"section '{key}' sets '{common}', which comes from the profile"
                     + (" (use --force on the pipeline)" if common == "force" else ""))
        sections[key] = section
    if missing := [s for s in stages if s not in sections]:
        fail(f"no section for stage(s) {', '.join(missing)}: every stage in 'stages' needs its section of "
             "parameters (the profile is the one source of their values)")
    return sections


def load_profile(path: str | Path) -> Profile:
    """Read and check a params file; stage sections are type-checked by ``stage_config``.

    Refused with a message naming the file and the problem: unreadable or invalid YAML, a key given twice,
    a profile name other than the file's stem, an unknown stage, a stage in ``stages`` without its section.
    """
    path = Path(path)
    data = _read_yaml(path)
    output_root, description, stages = _profile_header(data, path)
    return Profile(name=data["profile"], output_root=output_root, stages=stages,
                   sections=_profile_sections(data, stages, path), path=path, description=description)
