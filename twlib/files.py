"""Files the kit writes: atomic writes of bytes, text, JSON and whole folders, and the project root.

The bottom of the kit's layering (docs/design.md §11): it imports nothing of the kit, so every other
module may use it. A reader never sees half a file or half a checkpoint folder: the new content goes to
a temporary sibling first and replaces the old one in one rename.

>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> atomic_write_json(d / "a.json", {"x": 1}).read_text()
'{\\n  "x": 1\\n}\\n'
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["find_root", "project_root", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "json_default",
           "json_line", "atomic_dir", "replace_dir"]


def find_root(start: Path) -> Path | None:
    """The nearest folder at or above ``start`` holding ``pyproject.toml`` and ``notebooks/``, else None."""
    start = Path(start).resolve()
    for d in (start, *start.parents):
        if (d / "pyproject.toml").is_file() and (d / "notebooks").is_dir():
            return d
    return None


def project_root(start: str | Path | None = None) -> Path:
    """The nearest folder holding ``pyproject.toml`` and ``notebooks/`` at or above ``start``, then
    above the cwd; the cwd itself if neither has one.

    JupyterLab runs notebooks in ``notebooks/`` and papermill in the repo root; both must land
    in the same ``outputs/``.
    """
    found = find_root(Path(start)) if start is not None else None
    return found or find_root(Path.cwd()) or Path.cwd()


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS reports one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` so that readers see either the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def json_default(obj: Any) -> Any:
    """``json.dumps(default=...)`` for paths, numpy/torch scalars and arrays, and sets."""
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # numpy / torch scalars and arrays
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def json_line(record: Any) -> str:
    """One JSON Lines record, newline included."""
    return json.dumps(record, default=json_default) + "\n"


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, default=json_default) + "\n")


def replace_dir(new: str | Path, path: str | Path) -> Path:
    """Move the finished folder ``new`` to ``path``, replacing what is there in one rename.

    A folder cannot be ``os.replace``'d onto a non-empty one, so the old one is swapped out first and
    removed only after the new one is in place.
    """
    new, path = Path(new), Path(path)
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(path, old)
    os.replace(new, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; it becomes ``path`` only if the block succeeds.

    >>> with atomic_dir(run.path("model")) as tmp:   # doctest: +SKIP
    ...     model.save_pretrained(tmp)
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, path)
