"""Bad numbers, bad files and loose ends of the pipeline: each refused or handled with a message that names
the parameter, the file or the stage."""
import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

from twlib import config, dataset, pipeline
from twlib.config import ConfigError, load_profile

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.faults


def _profile(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path


def _smoke(tmp_path: Path, **changes) -> Path:
    """params/smoke.yaml with its output root in ``tmp_path`` and ``{"stage.knob": value}`` changes."""
    spec = yaml.safe_load((ROOT / "params" / "smoke.yaml").read_text())
    spec["output_root"] = str(tmp_path / "outputs")
    for key, value in changes.items():
        stage, knob = key.split(".")
        spec[stage][knob] = value
    path = tmp_path / "smoke.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize("stage, knob, value, match", [
    ("02_trie_sft", "learning_rate", float("inf"), "'learning_rate' must be a finite float, got float inf"),
    ("02_trie_sft", "learning_rate", float("nan"), "'learning_rate' must be a finite float"),
    ("04_pgrpo", "clip", float("-inf"), "'clip' must be a finite float"),
    ("01_trajectories", "n_train", 10**20, "'n_train' must be an int of at most 2,147,483,648"),
    ("02_trie_sft", "max_steps", -3, "'max_steps' must be >= 1"),
    ("01_trajectories", "n_train", 2**31, r"'n_train' \(with .* rows\) needs about [\d,]+ GiB in memory"),
    ("03_self_training", "n_prompts", 2**30, r"'n_prompts' × samples_per_prompt .* needs about [\d,]+ GiB"),
])
def test_bad_numbers_are_refused_by_name(tmp_path, stage, knob, value, match):
    profile = load_profile(_smoke(tmp_path, **{f"{stage}.{knob}": value}))
    with pytest.raises(ConfigError, match=match):
        profile.stage_config(stage)


def test_duplicate_key_and_missing_section_are_refused(tmp_path):
    text = (ROOT / "params" / "smoke.yaml").read_text()
    dup = text.replace("  max_steps: 4\n", "  max_steps: 4\n  max_steps: 400\n", 1)
    with pytest.raises(ConfigError, match=r"duplicate key 'max_steps' \(first on line \d+, again on line \d+\)"):
        load_profile(_profile(tmp_path, dup).rename(tmp_path / "smoke.yaml"))
    spec = yaml.safe_load(text)
    del spec["04_pgrpo"]
    path = tmp_path / "smoke.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match="no section for stage.* 04_pgrpo"):
        load_profile(path)


def test_list_validates_every_stage(tmp_path, capsys):
    path = _smoke(tmp_path, **{"03_self_training.top_p": 2.0})
    assert pipeline.main([str(path), "--list"]) == 2
    out = capsys.readouterr().out
    assert "03_self_training" in out and "problem: " in out and "'top_p' must be in (0, 1]" in out
    assert pipeline.main([str(_smoke(tmp_path)), "--list"]) == 0


@pytest.fixture(scope="module")
def trajectories(tmp_path_factory):
    """Notebook 01 of the smoke profile, run by the pipeline into a temporary output root."""
    tmp = tmp_path_factory.mktemp("faults")
    path = _smoke(tmp)
    assert pipeline.main([str(path), "--stages", "01_trajectories"]) == 0
    return tmp, path


@pytest.mark.notebooks
@pytest.mark.parametrize("damage", ["truncate", "empty", "delete"])
def test_damaged_dataset_names_the_file_and_the_stage(trajectories, tmp_path, damage, capsys):
    tmp, path = trajectories
    data = tmp / "outputs" / "smoke" / "01_trajectories" / "data"
    copy = tmp_path / "data"
    copy.mkdir()
    train = copy / "train.parquet"
    train.write_bytes((data / "train.parquet").read_bytes())
    {"truncate": lambda: train.write_bytes(train.read_bytes()[:200]), "empty": lambda: train.write_bytes(b""),
     "delete": train.unlink}[damage]()
    with pytest.raises(dataset.DatasetError) as e:
        dataset.load_parquet(copy, splits=("train",))
    assert str(train) in str(e.value) and ("cannot be read" in str(e.value) or "is missing" in str(e.value))
    # In place, the run's manifest notices it: --list says damaged, and stage 02 refuses to start.
    original = (data / "train.parquet").read_bytes()
    try:
        (data / "train.parquet").write_bytes(original[:200])
        assert pipeline.main([str(path), "--list"]) == 2
        out = capsys.readouterr().out
        assert "01_trajectories          damaged" in out and "train.parquet has 200 bytes" in out
    finally:
        (data / "train.parquet").write_bytes(original)
    assert pipeline.main([str(path), "--list"]) == 0


def test_interrupt_after_the_last_cell_keeps_the_executed_notebook(tmp_path, monkeypatch):
    path = _smoke(tmp_path)
    profile = load_profile(path)
    folder = tmp_path / "outputs" / "smoke" / "01_trajectories"

    def finished_then_interrupted(source, partial, **kwargs):
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps({"status": "complete"}))
        nbformat.write(nbformat.v4.new_notebook(), partial)
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.papermill, "execute_notebook", finished_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        pipeline._run_stage(profile, "01_trajectories", ROOT, force=False)
    assert (folder / "01_trajectories.ipynb").is_file() and not (folder / "01_trajectories.failed.ipynb").exists()


def test_notebook_left_by_a_killed_run_is_kept_as_evidence(tmp_path, monkeypatch):
    path = _smoke(tmp_path)
    profile = load_profile(path)
    stale = tmp_path / "outputs" / "smoke" / ".01_trajectories.running.ipynb"
    stale.parent.mkdir(parents=True)
    stale.write_text("{}")
    monkeypatch.setattr(pipeline.papermill, "execute_notebook", lambda *a, **k: (_ for _ in ()).throw(OSError("no")))
    with pytest.raises(OSError):
        pipeline._run_stage(profile, "01_trajectories", ROOT, force=False)
    kept = list((tmp_path / "outputs" / "smoke" / "01_trajectories").glob("01_trajectories.killed-*.ipynb"))
    assert len(kept) == 1 and kept[0].read_text() == "{}" and not stale.exists()


@pytest.mark.notebooks
def test_params_file_outside_the_repository_from_another_directory(tmp_path):
    """The notebooks are found from the installed package, wherever the params file and the cwd are."""
    elsewhere = tmp_path / "somewhere" / "else"
    elsewhere.mkdir(parents=True)
    path = _smoke(tmp_path)
    run = subprocess.run([sys.executable, "-m", "twlib.pipeline", str(path), "--stages", "01_trajectories"],
                         cwd=elsewhere, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert config.load_profile(path).name == "smoke"
    assert (tmp_path / "outputs" / "smoke" / "01_trajectories" / "metrics.json").is_file()
    assert "without encryption" not in run.stdout + run.stderr


def test_list_into_a_closed_pipe_ends_quietly(tmp_path):
    cmd = f"{sys.executable} -m twlib.pipeline {ROOT / 'params' / 'smoke.yaml'} --list | head -1"
    run = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env=os.environ | {"PYTHONUNBUFFERED": "1"})
    assert run.stdout.startswith("01_trajectories") and len(run.stdout.splitlines()) == 1
    assert "Traceback" not in run.stderr and "BrokenPipeError" not in run.stderr
