"""``python -m twlib.bench lab --params FILE``: each notebook of the profile executed as JupyterLab's Run All does it,
and what it took.

Lab runs a notebook in a Jupyter kernel with the working directory ``notebooks/`` and nothing but the parameters
cell edited; papermill (the pipeline) injects a cell of its own instead. This benchmark does what Lab does, through
nbclient, for every stage in order, ``--passes`` times (the second pass is Run All on finished stages: results shown,
nothing trained), and prints per notebook and pass the seconds and the slowest cells. ``--output-root`` sends the
runs to another folder (a clean first pass), as typing ``output_root = "..."`` into the parameters cells would.
The executed notebooks go to ``<output_root>/<profile>/bench/lab/<stage>.pass<N>.ipynb``.
"""
from __future__ import annotations

import re
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

import nbformat
from nbclient import NotebookClient

from ..config import Profile
from ..files import project_root
from ..runs import profile_dir


def edit_parameters(nb: nbformat.NotebookNode, values: dict[str, Any]) -> None:
    """Type ``name = value`` into the notebook's ``parameters`` cell for each item, as a person would in Lab.

    Each knob line reads ``name: type = default  # help``; only the default is replaced.
    >>> nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("seed: int = None  # seed",
    ...                                                                  metadata={"tags": ["parameters"]})])
    >>> edit_parameters(nb, {"seed": 3}); nb.cells[0].source
    'seed: int = 3  # seed'
    """
    cell = next((c for c in nb.cells if "parameters" in c.metadata.get("tags", [])), None)
    if cell is None:
        raise ValueError("the notebook has no cell tagged 'parameters'")
    for name, value in values.items():
        cell.source, n = re.subn(rf"^{name}: (\w+) = [^#]*#", f"{name}: \\1 = {value!r}  #", cell.source, flags=re.M)
        if n != 1:
            raise ValueError(f"the parameters cell has no knob line '{name}: type = ...  # ...'")


def run_like_lab(notebook: Path, values: dict[str, Any], save_to: Path | None = None,
                 timeout_s: int = 7200) -> nbformat.NotebookNode:
    """Execute ``notebook`` as Lab's Run All does: a Jupyter kernel, working directory the notebook's folder, the
    parameters cell edited to ``values``; the executed notebook is written to ``save_to`` even when a cell fails."""
    nb = nbformat.read(notebook, as_version=4)
    edit_parameters(nb, values)
    client = NotebookClient(nb, timeout=timeout_s, kernel_name="python3",
                            resources={"metadata": {"path": str(notebook.parent)}})
    try:
        client.execute()
    finally:
        if save_to is not None:
            nbformat.write(nb, save_to)
    return nb


def cell_seconds(nb: nbformat.NotebookNode) -> list[tuple[float, int, str]]:
    """(seconds, index, first line) of every executed code cell, slowest first, from the kernel's timestamps."""
    timed = []
    for i, cell in enumerate(nb.cells):
        stamps = cell.metadata.get("execution", {})
        if "iopub.status.busy" in stamps and "iopub.status.idle" in stamps:
            busy, idle = (datetime.fromisoformat(stamps[k].replace("Z", "+00:00"))
                          for k in ("iopub.status.busy", "iopub.status.idle"))
            timed.append((round((idle - busy).total_seconds(), 1), i, cell.source.splitlines()[0][:80]))
    return sorted(timed, reverse=True)


def add_arguments(group) -> None:
    group.add_argument("--passes", type=int, default=2, help="Run All this many times per notebook (default 2)")
    group.add_argument("--output-root", default=None, help="where the runs go (default: the profile's output_root)")


def run(profile: Profile, passes: int = 2, output_root: str | None = None) -> Iterator[dict]:
    """One record per notebook and pass: seconds and the slowest cells (a failing cell raises, its notebook saved)."""
    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes}")
    root = project_root(profile.path.parent)
    values = {"profile": profile.name, **({"output_root": output_root} if output_root else {})}
    folder = profile_dir(output_root or profile.output_root, profile.name, root) / "bench" / "lab"
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(1, passes + 1):
        for stage in profile.stages:
            start = time.perf_counter()
            nb = run_like_lab(root / "notebooks" / f"{stage}.ipynb", values, folder / f"{stage}.pass{n}.ipynb")
            yield {"bench": "lab", "profile": profile.name, "notebook": stage, "pass": n,
                   "seconds": round(time.perf_counter() - start, 1), "slowest_cells": cell_seconds(nb)[:3]}
