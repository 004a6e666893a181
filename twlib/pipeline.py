"""Run every notebook of a profile in order with papermill.

    python -m twlib.pipeline params/cpu-demo.yaml [--force] [--stages 01_trajectories,02_trie_sft] [--list]

Each stage's executed notebook lands in ``outputs/<profile>/<stage>/<stage>.ipynb``; stages with a
complete ``metrics.json`` are skipped unless ``--force``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import papermill
from papermill.exceptions import PapermillExecutionError

from .config import ConfigError, Profile, load_profile
from .files import project_root
from .runs import is_complete, stage_dir

__all__ = ["main", "run_profile", "stage_status"]


def _say(msg: str) -> None:
    print(msg, flush=True)


def stage_status(profile: Profile, stage: str, root: Path) -> str:
    """``complete``, ``incomplete`` (a folder from an interrupted or failed run) or ``not run``."""
    folder = stage_dir(profile.output_root, profile.name, stage, root)
    if is_complete(folder.parent, stage):
        return "complete"
    return "incomplete" if folder.is_dir() else "not run"


def _check_all(profile: Profile, stages: list[str], root: Path) -> list[str]:
    """Every problem that would stop a stage, found before the first (possibly hour-long) stage runs."""
    problems = []
    for stage in stages:
        try:
            profile.stage_config(stage)
        except ConfigError as e:
            problems.append(str(e))
        notebook = root / "notebooks" / f"{stage}.ipynb"
        if not notebook.is_file():
            problems.append(f"{stage}: notebook {notebook} not found")
    return problems


def _failure_summary(err: BaseException) -> str:
    if isinstance(err, PapermillExecutionError):
        return f"cell {err.exec_count} raised {err.ename}: {err.evalue}"
    return f"{type(err).__name__}: {err}"


def _run_stage(profile: Profile, stage: str, root: Path, force: bool) -> tuple[bool, str]:
    """Execute one notebook; returns (ok, message)."""
    folder = stage_dir(profile.output_root, profile.name, stage, root)
    folder.parent.mkdir(parents=True, exist_ok=True)
    # The partial notebook lives beside the run folder, not in it: with force=True the notebook
    # archives (renames) the run folder while papermill is still saving into it.
    partial = folder.parent / f".{stage}.running.ipynb"
    try:
        papermill.execute_notebook(
            str(root / "notebooks" / f"{stage}.ipynb"), str(partial),
            parameters=profile.stage_params(stage) | {"force": force},
            cwd=str(root), kernel_name="python3", progress_bar=True,
        )
    except BaseException as err:  # keep the evidence whatever stopped the run, Ctrl-C included
        if not partial.exists():
            raise
        folder.mkdir(parents=True, exist_ok=True)
        failed = folder / f"{stage}.failed.ipynb"
        os.replace(partial, failed)
        if not isinstance(err, Exception):
            raise
        return False, f"{_failure_summary(err)}\n  executed notebook: {failed}"
    folder.mkdir(parents=True, exist_ok=True)
    executed = folder / f"{stage}.ipynb"
    os.replace(partial, executed)
    if not is_complete(folder.parent, stage):
        return False, (f"the notebook ran but wrote no complete metrics.json in {folder} "
                       f"(does it end with run.finish(...)?)\n  executed notebook: {executed}")
    return True, str(folder / "metrics.json")


def run_profile(profile: Profile, stages: list[str], root: Path, force: bool = False) -> int:
    """Run ``stages`` of ``profile`` in order; returns the process exit code (0 ok, 1 a stage failed)."""
    total = time.perf_counter()
    for i, stage in enumerate(stages, 1):
        tag = f"[{i}/{len(stages)}] {stage}"
        if not force and stage_status(profile, stage, root) == "complete":
            _say(f"{tag}: skipped, already complete in "
                 f"{stage_dir(profile.output_root, profile.name, stage, root)} (--force reruns it)")
            continue
        _say(f"{tag}: running notebooks/{stage}.ipynb" + (" (forced)" if force else ""))
        t0 = time.perf_counter()
        ok, msg = _run_stage(profile, stage, root, force)
        elapsed = time.perf_counter() - t0
        if not ok:
            print(f"{tag}: FAILED after {elapsed:.1f} s: {msg}", file=sys.stderr, flush=True)
            return 1
        _say(f"{tag}: done in {elapsed:.1f} s -> {msg}")
    _say(f"profile {profile.name}: {len(stages)} stage(s) ok in {time.perf_counter() - total:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m twlib.pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("params", type=Path, help="params/<profile>.yaml")
    parser.add_argument("--force", action="store_true",
                        help="rerun complete stages (their old folders are archived, not deleted)")
    parser.add_argument("--stages", default=None,
                        help="comma-separated subset of the profile's stages to run, e.g. 01_trajectories")
    parser.add_argument("--list", action="store_true", help="print the stages and their status, run nothing")
    args = parser.parse_args(argv)

    try:
        profile = load_profile(args.params)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # Resolve from the params file first so the command works from any cwd.
    root = project_root(args.params.parent)
    stages = profile.stages
    if args.stages:
        stages = [s.strip() for s in args.stages.split(",") if s.strip()]
        unknown = [s for s in stages if s not in profile.stages]
        if unknown:
            print(f"error: --stages {', '.join(unknown)} not in profile {profile.name} "
                  f"(its stages: {', '.join(profile.stages)})", file=sys.stderr)
            return 2
        stages = [s for s in profile.stages if s in stages]  # dependencies need the profile's order

    if args.list:
        for stage in stages:
            _say(f"{stage:<24} {stage_status(profile, stage, root):<11} "
                 f"{stage_dir(profile.output_root, profile.name, stage, root)}")
        return 0

    problems = _check_all(profile, stages, root)
    if problems:
        print("error: nothing was run:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    return run_profile(profile, stages, root, force=args.force)


if __name__ == "__main__":
    raise SystemExit(main())
