import json
import os
import subprocess
from dataclasses import dataclass
from typing import ClassVar

import pytest

from twlib import files
from twlib.config import ConfigError, StageConfig, register_stage
from twlib.files import atomic_dir, atomic_write_bytes, atomic_write_json, atomic_write_text, project_root
from twlib.runs import RunFolder, StageMissing, damage, is_complete


@register_stage
@dataclass(frozen=True, kw_only=True)
class RunCfg(StageConfig):
    stage: ClassVar[str] = "92_runs"
    n: int = 1


@register_stage
@dataclass(frozen=True, kw_only=True)
class NextCfg(StageConfig):
    stage: ClassVar[str] = "93_next"


@pytest.fixture
def project(tmp_path, monkeypatch):
    root = tmp_path / "proj"
    (root / "notebooks").mkdir(parents=True)
    (root / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    monkeypatch.chdir(root)
    return root


def cfg(**kw):
    return RunCfg.from_dict({"profile": "demo", **kw})


def test_atomic_writes_leave_no_temp_files(tmp_path):
    atomic_write_text(tmp_path / "a" / "t.txt", "héllo")
    atomic_write_json(tmp_path / "a" / "m.json", {"x": 1, "p": tmp_path})
    atomic_write_bytes(tmp_path / "a" / "b.bin", b"\x00\x01")
    atomic_write_text(tmp_path / "a" / "t.txt", "again")
    assert sorted(os.listdir(tmp_path / "a")) == ["b.bin", "m.json", "t.txt"]
    assert (tmp_path / "a" / "t.txt").read_text(encoding="utf-8") == "again"
    assert json.loads((tmp_path / "a" / "m.json").read_text()) == {"x": 1, "p": str(tmp_path)}


def test_failed_atomic_write_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "t.txt"
    atomic_write_text(target, "old")

    def boom(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(files.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["t.txt"]


def test_atomic_dir(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        assert tmp != target and tmp.parent == tmp_path and not target.exists()
        (tmp / "w.bin").write_bytes(b"1")
    assert (target / "w.bin").read_bytes() == b"1"
    with pytest.raises(FileExistsError, match="overwrite=True"):
        with atomic_dir(target):
            pass
    with pytest.raises(RuntimeError):
        with atomic_dir(target, overwrite=True) as tmp:
            (tmp / "w.bin").write_bytes(b"2")
            raise RuntimeError("save failed")
    assert (target / "w.bin").read_bytes() == b"1"
    with atomic_dir(target, overwrite=True) as tmp:
        (tmp / "v.bin").write_bytes(b"2")
    assert sorted(os.listdir(target)) == ["v.bin"]
    assert os.listdir(tmp_path) == ["model"]


def test_project_root_from_nested_cwd(project, tmp_path, monkeypatch):
    nested = project / "notebooks" / "deep"
    nested.mkdir()
    monkeypatch.chdir(nested)
    assert project_root() == project
    assert project_root(nested) == project
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert project_root() == elsewhere
    assert project_root(nested) == project


def test_open_from_notebooks_dir_uses_repo_outputs(project, monkeypatch):
    monkeypatch.chdir(project / "notebooks")
    run = RunFolder.open(cfg())
    assert run.folder == project / "outputs" / "demo" / "92_runs"
    meta = json.loads((run.folder / "run.json").read_text())
    assert meta["params"] == cfg().to_dict() and meta["stage"] == "92_runs"


def test_absolute_output_root(project, tmp_path):
    run = RunFolder.open(cfg(output_root=str(tmp_path / "out")))
    assert run.folder == tmp_path / "out" / "demo" / "92_runs"


def test_complete_stage_reopens_to_show_results_and_force_archives(project):
    run = RunFolder.open(cfg())
    run.path("data", "a.txt").write_text("old")
    calls = []
    assert run.once("score", lambda: calls.append(1) or {"acc": 0.5}) == {"acc": 0.5}
    record = run.finish({"acc": 0.5})
    assert is_complete(run.profile_root, "92_runs")
    view = RunFolder.open(cfg())  # Run All on a finished stage: its results, nothing redone
    assert view.complete and view.archived is None and view.has("data/a.txt")
    assert view.once("score", lambda: calls.append(2) or {"acc": 0.0}) == {"acc": 0.5} and calls == [1]
    assert view.finish({"acc": 0.0}) == record == json.loads((run.folder / "metrics.json").read_text())
    with pytest.raises(StageMissing, match="'other'.*force=True"):
        view.once("other", lambda: 1)
    with pytest.raises(ConfigError) as e:
        RunFolder.open(cfg(n=5))
    assert "complete run with other parameters (n: 1 → 5)" in str(e.value) and "force=True" in str(e.value)

    again = RunFolder.open(cfg(force=True))
    assert again.folder == run.folder and not again.has("data/a.txt") and not again.has("metrics.json")
    archived = again.archived
    assert archived.parent == run.profile_root and archived.name.startswith("92_runs.previous-")
    assert (archived / "data" / "a.txt").read_text() == "old"
    assert json.loads((archived / "metrics.json").read_text())["metrics"] == {"acc": 0.5}
    assert not is_complete(run.profile_root, "92_runs")


def test_resume_keeps_files(project):
    run = RunFolder.open(cfg(n=2))
    run.path("step1.json").write_text("{}")
    resumed = RunFolder.open(cfg(n=2))
    assert resumed.has("step1.json") and resumed.archived is None
    meta = json.loads(resumed.path("run.json").read_text())
    assert len(meta["resumed_at"]) == 1


def test_param_change_on_interrupted_run_names_the_key(project):
    run = RunFolder.open(cfg(n=2, force=True))
    run.path("step1.json").write_text("{}")
    assert RunFolder.open(cfg(n=2)).has("step1.json")  # `force` alone is no parameter change
    with pytest.raises(ConfigError) as e:
        RunFolder.open(cfg(n=3, seed=1))
    msg = str(e.value)
    assert "n: 2 → 3" in msg and "seed: 0 → 1" in msg and "force=True" in msg
    assert "output_root" not in msg
    fresh = RunFolder.open(cfg(n=3, seed=1, force=True))
    assert not fresh.has("step1.json") and (fresh.archived / "step1.json").exists()


def test_finish_record(project):
    run = RunFolder.open(cfg(n=4))
    with run.timer("work"):
        pass
    with run.timer("work"):
        sum(range(10000))
    record = run.finish({"acc": 0.75})
    on_disk = json.loads(run.path("metrics.json").read_text())
    assert on_disk == record
    for key in ("status", "stage", "profile", "params", "metrics", "timings", "git_sha", "git_dirty",
                "packages", "device", "finished_at"):
        assert key in record
    assert record["status"] == "complete" and record["stage"] == "92_runs" and record["profile"] == "demo"
    assert record["params"] == cfg(n=4).to_dict() and record["metrics"] == {"acc": 0.75}
    assert record["timings"]["work"] > 0 and record["timings"]["total"] >= record["timings"]["work"]
    assert record["git_sha"] is None  # tmp project is not a git repository
    assert record["packages"]["python"].startswith("3.") and "torch" in record["packages"]
    assert record["device"]["cpu_count"] >= 1


def test_finish_records_git_sha(project):
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "pyproject.toml"], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    record = RunFolder.open(cfg()).finish({})
    assert record["git_sha"] == sha and record["git_dirty"] is False


def test_require_complete_and_stage_path(project):
    later = RunFolder.open(NextCfg.from_dict({"profile": "demo"}))
    with pytest.raises(StageMissing, match=r"run notebooks/92_runs\.ipynb first"):
        later.require_complete("92_runs")
    first = RunFolder.open(cfg())
    first.write_json("out.json", {"v": 1})
    with pytest.raises(StageMissing):
        later.require_complete("92_runs")  # files but no metrics.json: still incomplete
    first.finish({})
    assert later.require_complete("92_runs") == first.folder
    assert json.loads(later.stage_path("92_runs", "out.json").read_text()) == {"v": 1}


def test_save_figure(project):
    from matplotlib.figure import Figure

    fig = Figure()
    fig.add_subplot().plot([0, 1], [1, 0])
    run = RunFolder.open(cfg())
    assert run.save_figure(fig, "curve") is None  # a cell ending with it echoes no path
    path = run.folder / "curve.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in run.folder.iterdir()) == ["curve.png", "run.json"]


def test_failed_start_leaves_nothing_that_blocks_other_parameters(project):
    RunFolder.open(cfg(n=2))  # the stage then fails before writing anything (e.g. an earlier stage is missing)
    (project / "outputs" / "demo" / "92_runs" / "92_runs.failed.ipynb").write_text("{}")
    run = RunFolder.open(cfg(n=3))  # other parameters: a fresh start, not "an interrupted run"
    assert json.loads((run.folder / "run.json").read_text())["params"]["n"] == 3 and run.archived is None


def test_resumed_run_skips_finished_steps(project):
    run = RunFolder.open(cfg())
    assert run.once("rows", lambda: [1, 2]) == [1, 2]
    resumed = RunFolder.open(cfg())
    assert resumed.once("rows", lambda: pytest.fail("recomputed")) == [1, 2]


def test_damage_names_changed_files_and_require_complete_refuses(project):
    first = RunFolder.open(NextCfg.from_dict({"profile": "demo"}))
    first.path("data", "train.parquet").write_bytes(b"PAR1" * 100)
    first.finish({})
    assert damage(first.folder) == []
    (first.folder / "data" / "train.parquet").write_bytes(b"")
    assert damage(first.folder) == [f"{first.folder / 'data' / 'train.parquet'} has 0 bytes, 400 when the run finished"]
    later = RunFolder.open(cfg())
    with pytest.raises(StageMissing, match="train.parquet has 0 bytes.*--stages 93_next --force"):
        later.require_complete("93_next")
