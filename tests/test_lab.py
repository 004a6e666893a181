"""The JupyterLab door: every notebook executed as Lab does it (a Jupyter kernel through nbclient, working
directory ``notebooks/``, only the parameters cell edited, no papermill) gives the pipeline's effective
parameters and metrics; Run All on a finished stage shows its results without training; a failed start does
not block a run with other parameters."""
import json
import shutil
import time
from pathlib import Path

import nbformat
import pytest

from twlib.bench import lab
from twlib.config import load_profile

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["01_trajectories", "02_trie_sft", "01b_rewriting", "03_self_training", "04_pgrpo", "05_evaluation"]
# Fields that say when and how fast, not what: left out when two runs are compared.
VOLATILE = {"timings", "finished_at", "git_sha", "git_dirty", "packages", "device", "files", "sources",
            "wall_seconds", "engine_seconds", "sequential_wall_seconds", "parallel_wall_seconds",
            "wall_clock_speedup", "parallel_efficiency", "orchestration_overhead", "train_runtime",
            "train_samples_per_second", "train_steps_per_second", "seconds", "started",
            "seq_wall_seconds", "par_wall_seconds", "wall_speedup"}  # notebook 05's per-width wall clock

pytestmark = pytest.mark.notebooks


def run_like_lab(stage: str, output_root: Path, **cell) -> nbformat.NotebookNode:
    """Execute ``notebooks/<stage>.ipynb`` the way JupyterLab's Run All does, with ``profile = "smoke"``,
    ``output_root`` and any other ``name = value`` typed into the parameters cell."""
    return lab.run_like_lab(ROOT / "notebooks" / f"{stage}.ipynb",
                            {"profile": "smoke", "output_root": str(output_root), **cell},
                            save_to=output_root / f"{stage}.lab.ipynb", timeout_s=1800)


def comparable(obj, root: Path):
    """A record with the volatile fields dropped and the output root written as ``ROOT``."""
    if isinstance(obj, dict):
        return {k: comparable(v, root) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [comparable(v, root) for v in obj]
    if isinstance(obj, str):
        return obj.replace(str(root), "ROOT")
    return obj


def record(root: Path, stage: str) -> dict:
    return json.loads((root / "smoke" / stage / "metrics.json").read_text())


def errors(nb) -> list[str]:
    return [f"{o['ename']}: {o['evalue']}" for c in nb.cells if c.cell_type == "code"
            for o in c.get("outputs", []) if o["output_type"] == "error"]


@pytest.fixture(scope="module")
def lab_outputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lab")
    seconds = {}
    for stage in STAGES:
        t0 = time.perf_counter()
        nb = run_like_lab(stage, root)
        seconds[stage] = time.perf_counter() - t0
        assert not errors(nb), (stage, errors(nb))
    return root, seconds


def test_lab_runs_equal_the_pipeline(lab_outputs, smoke_outputs):
    root, seconds = lab_outputs
    pipeline_root = smoke_outputs[0].parent
    for stage in STAGES:
        in_lab, ran = record(root, stage), record(pipeline_root, stage)
        assert in_lab["status"] == "complete"
        params = {k: v for k, v in in_lab["params"].items() if k != "output_root"}
        assert params == {k: v for k, v in ran["params"].items() if k != "output_root"}, stage
        assert in_lab["sources"]["output_root"] == "override" and in_lab["sources"]["seed"] == "profile"
        assert comparable(in_lab["metrics"], root) == comparable(ran["metrics"], pipeline_root), stage


def _stamps(folder: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()
            and p.suffix in (".safetensors", ".json", ".parquet", ".jsonl") and "steps" not in p.parts}


def test_run_all_again_shows_results_without_training(lab_outputs):
    root, first_seconds = lab_outputs
    before = {stage: record(root, stage) for stage in STAGES}
    figures = {p: p.read_bytes() for p in (root / "smoke").rglob("*.png")}
    models = _stamps(root / "smoke" / "02_trie_sft") | _stamps(root / "smoke" / "04_pgrpo")
    runs = list(lab.run(load_profile(ROOT / "params" / "smoke.yaml"), passes=1, output_root=str(root)))
    assert [(r["notebook"], r["pass"]) for r in runs] == [(stage, 1) for stage in STAGES]
    assert all(r["seconds"] > 0 and r["slowest_cells"][0][0] >= r["slowest_cells"][-1][0] for r in runs)
    for stage in STAGES:
        nb = nbformat.read(root / "smoke" / "bench" / "lab" / f"{stage}.pass1.ipynb", as_version=4)
        assert not errors(nb), (stage, errors(nb))
        text = "\n".join(str(o.get("data", {}).get("text/html", "")) for c in nb.cells for o in c.get("outputs", []))
        assert "complete: showing its results" in text, stage
        assert record(root, stage) == before[stage], f"{stage}: metrics.json changed"
    assert {p: p.read_bytes() for p in figures} == figures, "a figure differs when drawn again"
    changed = [p for p, t in (_stamps(root / "smoke" / "02_trie_sft") | _stamps(root / "smoke" / "04_pgrpo")).items()
               if models.get(p) != t and not p.endswith((".jsonl", "histories.json", "loss_history.json"))]
    assert not changed, f"re-opening rewrote {changed[:5]}"


def test_failed_first_run_does_not_block_other_parameters(tmp_path):
    with pytest.raises(Exception, match="StageMissing"):
        run_like_lab("02_trie_sft", tmp_path)  # notebook 01 has not run for this output root
    assert not errors(run_like_lab("01_trajectories", tmp_path))
    nb = run_like_lab("02_trie_sft", tmp_path, max_steps=2, train_sequential=False)
    assert not errors(nb)
    done = record(tmp_path, "02_trie_sft")
    assert done["params"]["max_steps"] == 2 and done["sources"]["max_steps"] == "override"
    assert list(done["metrics"]) == ["parallel"]
    shutil.rmtree(tmp_path / "smoke")


def test_readable_outputs(lab_outputs):
    """What a reader sees: no path echoed, no frozen widget bar, no library chatter, figures as images."""
    root, _ = lab_outputs
    for stage in STAGES:
        nb = nbformat.read(root / f"{stage}.lab.ipynb", as_version=4)
        for cell in nb.cells:
            for o in cell.get("outputs", []):
                plain = str(o.get("data", {}).get("text/plain", "")) + str(o.get("text", ""))
                assert "PosixPath(" not in plain, (stage, plain[:200])
                assert "application/vnd.jupyter.widget-view+json" not in o.get("data", {}), stage
                for noise in ("Generating train split", "Creating parquet", "Writing model shards",
                              "TRL currently supports", "{'loss':"):
                    assert noise not in plain, (stage, noise)
        if stage != "01b_rewriting":  # the rewriting stage reports in tables only
            assert any("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", [])), stage
