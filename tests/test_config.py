from dataclasses import dataclass, field
from typing import ClassVar, Literal

import pytest

from twlib import pgrpo
from twlib.config import STAGE_CONFIGS, ConfigError, StageConfig, load_profile, register_stage


@register_stage
@dataclass(frozen=True, kw_only=True)
class TrainCfg(StageConfig):
    stage: ClassVar[str] = "91_train"
    n_train: int = 10
    lr: float = 1e-3
    mode: Literal["seq", "par"] = "par"
    layers: list[int] = field(default_factory=lambda: [1, 2])
    tags: list[str] = field(default_factory=list)
    weights: dict[str, float] = field(default_factory=dict)
    note: str | None = None
    limit: int | None = None

    def validate(self) -> None:
        self._check(self.n_train > 0, "n_train", "must be > 0")


def make(**kw):
    return TrainCfg.from_dict({"profile": "p", **kw})


def test_defaults_common_fields_and_registry():
    cfg = make()
    assert cfg.profile == "p" and cfg.output_root == "outputs" and cfg.force is False and cfg.seed == 0
    assert cfg.n_train == 10 and cfg.layers == [1, 2] and cfg.note is None
    assert STAGE_CONFIGS["91_train"] is TrainCfg
    assert TrainCfg.names()[:4] == ["profile", "output_root", "force", "seed"]
    assert "weights" in TrainCfg.names()


def test_unknown_key_suggests_close_match():
    with pytest.raises(ConfigError) as e:
        make(n_trian=5)
    msg = str(e.value)
    assert msg.startswith("91_train: unknown parameter 'n_trian'")
    assert "did you mean 'n_train'?" in msg
    assert "known parameters: profile, output_root, force, seed, n_train" in msg


def test_str_for_int_message_is_exact():
    with pytest.raises(ConfigError, match=r"^91_train: parameter 'n_train' must be int, got str '10'$"):
        make(n_train="10")


@pytest.mark.parametrize("value,got", [(True, "bool True"), (10.0, "float 10.0"), (None, "NoneType None")])
def test_bool_float_none_are_not_int(value, got):
    with pytest.raises(ConfigError, match=rf"parameter 'n_train' must be int, got {got}"):
        make(n_train=value)


def test_int_is_widened_to_float_but_bool_is_not():
    cfg = make(lr=1, weights={"a": 2})
    assert cfg.lr == 1.0 and type(cfg.lr) is float
    assert cfg.weights == {"a": 2.0} and type(cfg.weights["a"]) is float
    with pytest.raises(ConfigError, match="parameter 'lr' must be float, got bool False"):
        make(lr=False)


def test_literal_violation_lists_choices():
    with pytest.raises(ConfigError, match=r"parameter 'mode' must be one of 'seq', 'par', got str 'tree'"):
        make(mode="tree")


def test_container_items_are_checked_with_their_position():
    assert make(layers=(3, 4)).layers == [3, 4]
    with pytest.raises(ConfigError, match=r"parameter 'layers\[1\]' must be int, got str 'x'"):
        make(layers=[3, "x"])
    with pytest.raises(ConfigError, match=r"parameter 'tags' must be list\[str\], got str 'abc'"):
        make(tags="abc")
    with pytest.raises(ConfigError, match=r"parameter 'weights\['a'\]' must be float, got str 'high'"):
        make(weights={"a": "high"})


def test_optional_fields():
    assert make(limit=None).limit is None
    assert make(limit=5, note="hi").limit == 5
    with pytest.raises(ConfigError, match=r"parameter 'limit' must be int \| None, got str '5'"):
        make(limit="5")


def test_range_check_from_subclass_validate():
    with pytest.raises(ConfigError, match=r"^91_train: parameter 'n_train' must be > 0, got 0$"):
        make(n_train=0)
    with pytest.raises(ConfigError, match=r"parameter 'seed' must be >= 0, got -1"):
        make(seed=-1)


def test_missing_required_profile():
    with pytest.raises(ConfigError, match="91_train: missing parameter 'profile'"):
        TrainCfg.from_dict({"n_train": 3})


def test_round_trip():
    cfg = make(n_train=7, lr=0.5, mode="seq", layers=[5], tags=["a"], weights={"x": 1.5}, note="n", seed=3)
    again = TrainCfg.from_dict(cfg.to_dict())
    assert again == cfg
    assert cfg.to_dict()["weights"] == {"x": 1.5}


def test_from_namespace_picks_only_fields():
    ns = {n: getattr(make(), n) for n in TrainCfg.names()} | {"In": [], "np": object(), "n_train": 4}
    assert TrainCfg.from_namespace(ns).n_train == 4
    del ns["lr"], ns["seed"]
    with pytest.raises(ConfigError, match=r"91_train: parameter\(s\) 'seed', 'lr' not defined"):
        TrainCfg.from_namespace(ns)


def test_register_rejects_bad_default_and_duplicate_stage():
    with pytest.raises(TypeError, match="default of parameter 'k' must be int"):
        @register_stage
        @dataclass(frozen=True, kw_only=True)
        class BadDefault(StageConfig):
            stage: ClassVar[str] = "98_bad"
            k: int = "3"
    assert "98_bad" not in STAGE_CONFIGS
    with pytest.raises(ValueError, match="already registered by TrainCfg"):
        @register_stage
        @dataclass(frozen=True, kw_only=True)
        class Clash(StageConfig):
            stage: ClassVar[str] = "91_train"


def write(tmp_path, name, text):
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


def test_load_profile_and_stage_config(tmp_path):
    path = write(tmp_path, "demo", "profile: demo\nstages: [91_train]\n91_train:\n  n_train: 3\n  lr: 1\n")
    prof = load_profile(path)
    assert prof.name == "demo" and prof.output_root == "outputs" and prof.stages == ["91_train"]
    assert prof.stage_params("91_train") == {"profile": "demo", "output_root": "outputs", "n_train": 3, "lr": 1}
    cfg = prof.stage_config("91_train")
    assert isinstance(cfg, TrainCfg) and cfg.n_train == 3 and cfg.lr == 1.0
    with pytest.raises(ConfigError, match="stage '01_other' is not in this profile's stages"):
        prof.stage_params("01_other")


def test_stage_config_error_names_file_and_parameter(tmp_path):
    path = write(tmp_path, "demo", "profile: demo\nstages: [91_train]\n91_train:\n  n_train: '10'\n")
    with pytest.raises(ConfigError) as e:
        load_profile(path).stage_config("91_train")
    assert str(e.value) == f"{path}: 91_train: parameter 'n_train' must be int, got str '10'"


@pytest.mark.parametrize("text,match", [
    ("profile: other\nstages: [91_train]\n", r"'profile' is 'other' but must equal the file name stem 'demo'"),
    ("stages: [91_train]\n", r"missing 'profile' \(should be 'demo'\)"),
    ("profile: demo\nstages: [91_train]\n91_trian:\n  n_train: 3\n",
     r"section '91_trian' is not a known stage \(did you mean '91_train'\?\)"),
    ("profile: demo\nstages: [91_train\n", r"invalid YAML"),
    ("profile: demo\nstages: [91_train, 99_nowhere]\n", r"stage '99_nowhere' in 'stages' has no registered"),
    ("profile: demo\n", r"'stages' must be a non-empty list"),
    ("profile: demo\nstages: [91_train]\n91_train:\n  force: true\n", r"section '91_train' sets 'force'"),
    ("- a\n- b\n", r"must be a mapping"),
])
def test_load_profile_errors_name_file_and_problem(tmp_path, text, match):
    path = write(tmp_path, "demo", text)
    with pytest.raises(ConfigError, match=match) as e:
        load_profile(path)
    assert str(e.value).startswith(f"{path}: ")


def test_load_profile_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read params file"):
        load_profile(tmp_path / "nope.yaml")


@pytest.mark.parametrize("stage,bad,match", [
    ("04_pgrpo", {"num_generations": 1}, "'num_generations' must be >= 2"),
    ("04_pgrpo", {"clip": 1.5}, r"'clip' must be in \[0, 1\]"),
    ("04_pgrpo", {"temperature": 0.0}, "'temperature' must be > 0"),
    ("04_pgrpo", {"objective": "mine"}, "'objective' must be 'corrected' or 'official'"),
    ("04_pgrpo", {"learning_rate": 0}, "'learning_rate' must be > 0"),
    ("01_trajectories", {"coarse_fraction": 1.2}, r"'coarse_fraction' must be in \[0, 1\]"),
])
def test_stage_range_checks_name_the_parameter(stage, bad, match):
    with pytest.raises(ConfigError, match=match):
        STAGE_CONFIGS[stage].from_dict({"profile": "p", **bad})


def test_pgrpo_config_builds_trainer_settings():
    cfg = STAGE_CONFIGS["04_pgrpo"].from_dict({"profile": "p", "clip": 0.5, "max_blocks": 3, "num_generations": 4,
                                               "prompts_per_step": 2})
    s = pgrpo.settings(cfg, branching=False, max_context=512)
    assert s.rewards.clip == 0.5 and s.orchestrator.max_blocks == 3 and s.orchestrator.max_context == 512
    assert s.branching is False
    args = pgrpo.training_args(cfg, "/tmp/x", std_advantages=True)
    assert args.scale_rewards == "group" and args.per_device_train_batch_size == 8 and args.num_generations == 4
    assert args.beta == 0.0 and args.loss_type == "dapo" and args.num_iterations == 1
    assert pgrpo.training_args(cfg, "/tmp/x").scale_rewards == "none"
