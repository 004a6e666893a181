import json
from pathlib import Path

import fixtures_stage  # noqa: F401  registers 01_demo and 02_demo in this process
import nbformat
import pytest

from twlib import pipeline

TESTS = Path(__file__).resolve().parent

SETUP = f"""import sys
sys.path.insert(0, {str(TESTS)!r})
import fixtures_stage
from twlib.files import atomic_write_text
from twlib.runs import RunFolder"""

STAGE1 = """cfg = fixtures_stage.DemoConfig.from_namespace(globals())
run = RunFolder.open(cfg)
if n == 13:
    raise ValueError("unlucky n")
atomic_write_text(run.path("n.txt"), str(n))
run.finish({"n": n})"""

STAGE2 = """cfg = fixtures_stage.DemoNextConfig.from_namespace(globals())
run = RunFolder.open(cfg)
m = int((run.require_complete("01_demo") / "n.txt").read_text())
run.finish({"n_times_2": 2 * m})"""

PARAMS = ('profile: str = "x"\nparams_file: str = ""\noutput_root: str = None\nforce: bool = False\n'
          'seed: int = None')


def notebook(params: str, *cells: str) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(params, metadata={"tags": ["parameters"]})]
    nb.cells += [nbformat.v4.new_code_cell(c) for c in cells]
    return nb


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A fake repo: pyproject.toml, two notebooks, params/demo.yaml; cwd is elsewhere on purpose."""
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    (tmp_path / "notebooks").mkdir()
    nbformat.write(notebook(PARAMS + "\nn: int = None", SETUP, STAGE1), tmp_path / "notebooks" / "01_demo.ipynb")
    nbformat.write(notebook(PARAMS, SETUP, STAGE2), tmp_path / "notebooks" / "02_demo.ipynb")
    (tmp_path / "params").mkdir()
    set_n(tmp_path, 7)
    elsewhere = tmp_path.parent / f"{tmp_path.name}-cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return tmp_path


def set_n(root: Path, n) -> Path:
    path = root / "params" / "demo.yaml"
    path.write_text(f"profile: demo\nstages: [01_demo, 02_demo]\n01_demo:\n  n: {n}\n02_demo: {{}}\n")
    return path


def metrics(root: Path, stage: str) -> dict:
    return json.loads((root / "outputs" / "demo" / stage / "metrics.json").read_text())


@pytest.mark.notebooks
def test_runs_skips_and_forces(project, capsys):
    params = str(project / "params" / "demo.yaml")
    assert pipeline.main([params]) == 0
    out = project / "outputs" / "demo"
    assert metrics(project, "01_demo")["metrics"] == {"n": 7}
    assert metrics(project, "02_demo")["metrics"] == {"n_times_2": 14}
    executed = nbformat.read(out / "01_demo" / "01_demo.ipynb", as_version=4)
    injected = [c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])]
    # Only the profile and its file are injected: the notebook reads every knob from the profile itself.
    assert len(injected) == 1 and 'profile = "demo"' in injected[0].source and "n = " not in injected[0].source
    assert f'params_file = "{project / "params" / "demo.yaml"}"' in injected[0].source
    assert metrics(project, "01_demo")["sources"]["n"] == "profile"
    assert (out / "02_demo" / "02_demo.ipynb").is_file()
    assert sorted(p.name for p in out.iterdir()) == ["01_demo", "02_demo"]  # no partial notebooks left

    first_finish = metrics(project, "01_demo")["finished_at"]
    capsys.readouterr()
    assert pipeline.main([params]) == 0
    printed = capsys.readouterr().out
    assert printed.count("skipped, already complete") == 2
    assert metrics(project, "01_demo")["finished_at"] == first_finish

    assert pipeline.main([params, "--force", "--stages", "01_demo"]) == 0
    archives = sorted(p for p in out.iterdir() if p.name.startswith("01_demo.previous-"))
    assert len(archives) == 1
    assert (archives[0] / "n.txt").read_text() == "7" and (archives[0] / "01_demo.ipynb").is_file()
    assert metrics(project, "01_demo")["params"]["force"] is True
    assert (out / "01_demo" / "01_demo.ipynb").is_file()
    assert not any(p.name.startswith("02_demo.previous-") for p in out.iterdir())


@pytest.mark.notebooks
def test_failing_notebook_is_kept_and_stops_the_profile(project, capsys):
    params = set_n(project, 13)
    assert pipeline.main([str(params)]) == 1
    err = capsys.readouterr().err
    assert "01_demo: FAILED" in err and "ValueError: unlucky n" in err
    folder = project / "outputs" / "demo" / "01_demo"
    assert (folder / "01_demo.failed.ipynb").is_file() and not (folder / "01_demo.ipynb").exists()
    assert not (project / "outputs" / "demo" / "02_demo").exists()
    assert not list((project / "outputs" / "demo").glob(".*"))


def test_validates_every_stage_before_running(project, capsys):
    params = set_n(project, "'7'")
    (project / "notebooks" / "02_demo.ipynb").unlink()
    assert pipeline.main([str(params)]) == 2
    err = capsys.readouterr().err
    assert "01_demo: parameter 'n' must be int, got str '7'" in err
    assert "02_demo: notebook" in err and "02_demo.ipynb not found" in err
    assert not (project / "outputs").exists()


def test_bad_profile_and_unknown_stage_exit_2(project, capsys):
    params = set_n(project, 7)
    assert pipeline.main([str(params), "--stages", "01_demo,03_demo"]) == 2
    assert "--stages 03_demo not in profile demo" in capsys.readouterr().err
    params.write_text("profile: wrong\nstages: [01_demo]\n")
    assert pipeline.main([str(params)]) == 2
    assert "must equal the file name stem 'demo'" in capsys.readouterr().err


def test_list_shows_status(project, capsys):
    params = str(project / "params" / "demo.yaml")
    done = project / "outputs" / "demo" / "01_demo"
    done.mkdir(parents=True)
    (done / "metrics.json").write_text(json.dumps({"status": "complete"}))
    (project / "outputs" / "demo" / "02_demo").mkdir()
    assert pipeline.main([params, "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["01_demo", "complete"]
    assert lines[1].split()[:2] == ["02_demo", "incomplete"]
    (done / "metrics.json").unlink()
    assert pipeline.main([params, "--list"]) == 0
    assert capsys.readouterr().out.splitlines()[0].split()[1] == "incomplete"
