"""Run every notebook of a profile in order with papermill.

    python -m twlib.pipeline params/cpu-demo.yaml [--force] [--stages 01_trajectories,02_trie_sft] [--list]

Each notebook gets only the profile's name and the params file (and ``force``): it reads every knob
from the profile itself, exactly as when a person presses Run All in JupyterLab (docs/design.md §10).
Each stage's executed notebook lands in ``outputs/<profile>/<stage>/<stage>.ipynb``; stages with a
complete ``metrics.json`` are skipped unless ``--force``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import papermill
from papermill.exceptions import PapermillExecutionError

from .config import ConfigError, Profile, load_profile
from .files import find_root
from .runs import damage, is_complete, stage_dir

__all__ = ["main", "run_profile", "stage_status", "kit_root"]


def _say(msg: str) -> None:
    print(msg, flush=True)


def kit_root(params: Path) -> Path:
    """The checkout whose notebooks run: the one holding the params file, else the one holding this package
    (so a params file kept elsewhere works from any directory), else the working directory."""
    return find_root(params.parent) or find_root(Path(__file__).parent) or Path.cwd()


def stage_status(profile: Profile, stage: str, root: Path) -> str:
    """``complete``, ``damaged`` (complete, but a file it wrote changed since), ``incomplete`` (a folder from
    an interrupted or failed run) or ``not run``."""
    folder = stage_dir(profile.output_root, profile.name, stage, root)
    if is_complete(folder.parent, stage):
        return "damaged" if damage(folder) else "complete"
    return "incomplete" if folder.is_dir() else "not run"


def _stage_problems(profile: Profile, stage: str, root: Path) -> list[str]:
    problems = []
    try:
        profile.stage_config(stage)
    except ConfigError as e:
        problems.append(str(e))
    notebook = root / "notebooks" / f"{stage}.ipynb"
    if not notebook.is_file():
        problems.append(f"{stage}: notebook {notebook} not found")
    return problems


def _check_all(profile: Profile, stages: list[str], root: Path) -> list[str]:
    """Every problem that would stop a stage, found before the first (possibly hour-long) stage runs."""
    return [p for stage in stages for p in _stage_problems(profile, stage, root)]


def _failure_summary(err: BaseException) -> str:
    if isinstance(err, PapermillExecutionError):
        return f"cell {err.exec_count} raised {err.ename}: {err.evalue}"
    return f"{type(err).__name__}: {err}"


def _stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def _keep_stale(partial: Path, folder: Path, stage: str) -> None:
    """A partial notebook left by a killed run (SIGKILL skips every handler) is kept as evidence in the
    stage folder, not left to be mistaken for a run in progress."""
    if partial.exists():
        folder.mkdir(parents=True, exist_ok=True)
        os.replace(partial, folder / f"{stage}.killed-{_stamp()}.ipynb")


def _run_stage(profile: Profile, stage: str, root: Path, force: bool) -> tuple[bool, str]:
    """Execute one notebook; returns (ok, message)."""
    folder = stage_dir(profile.output_root, profile.name, stage, root)
    folder.parent.mkdir(parents=True, exist_ok=True)
    # The partial notebook lives beside the run folder, not in it: with force=True the notebook
    # archives (renames) the run folder while papermill is still saving into it.
    partial = folder.parent / f".{stage}.running.ipynb"
    _keep_stale(partial, folder, stage)
    parameters = {"profile": profile.name, "params_file": str(profile.path.resolve()), "force": force}
    try:
        papermill.execute_notebook(
            str(root / "notebooks" / f"{stage}.ipynb"), str(partial), parameters=parameters,
            cwd=str(root), kernel_name="python3", progress_bar=True,
            # The kernel's warning about TCP on localhost would open every run's log; errors still show.
            extra_arguments=["--IPKernelApp.log_level=ERROR"],
        )
    except BaseException as err:  # keep the evidence whatever stopped the run, Ctrl-C included
        if not partial.exists():
            raise
        folder.mkdir(parents=True, exist_ok=True)
        # Stopped after the stage finished (Ctrl-C during the last save): the run is complete.
        done = is_complete(folder.parent, stage)
        kept = folder / (f"{stage}.ipynb" if done else f"{stage}.failed.ipynb")
        os.replace(partial, kept)
        if not isinstance(err, Exception):
            raise
        return False, f"{_failure_summary(err)}\n  executed notebook: {kept}"
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


def _list(profile: Profile, stages: list[str], root: Path) -> int:
    """Status and parameter check of every stage; exit code 2 when a stage's parameters are wrong."""
    bad = 0
    for stage in stages:
        status = stage_status(profile, stage, root)
        _say(f"{stage:<24} {status:<11} {stage_dir(profile.output_root, profile.name, stage, root)}")
        for problem in _stage_problems(profile, stage, root) + damage(stage_dir(profile.output_root, profile.name,
                                                                                stage, root)):
            bad += 1
            _say(f"    problem: {problem}")
    return 2 if bad else 0


def _chosen_stages(profile: Profile, option: str | None) -> list[str]:
    if not option:
        return profile.stages
    stages = [s.strip() for s in option.split(",") if s.strip()]
    unknown = [s for s in stages if s not in profile.stages]
    if unknown:
        raise ConfigError(f"--stages {', '.join(unknown)} not in profile {profile.name} "
                          f"(its stages: {', '.join(profile.stages)})")
    return [s for s in profile.stages if s in stages]  # dependencies need the profile's order


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="python -m twlib.pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("params", type=Path, help="params/<profile>.yaml")
    parser.add_argument("--force", action="store_true",
                        help="rerun complete stages (their old folders are archived, not deleted)")
    parser.add_argument("--stages", default=None,
                        help="comma-separated subset of the profile's stages to run, e.g. 01_trajectories")
    parser.add_argument("--list", action="store_true",
                        help="print the stages, their status and any problem with their parameters; run nothing")
    args = parser.parse_args(argv)
    try:
        profile = load_profile(args.params)
        stages = _chosen_stages(profile, args.stages)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    root = kit_root(args.params)
    if args.list:
        return _list(profile, stages, root)
    problems = _check_all(profile, stages, root)
    if problems:
        print("error: nothing was run:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    return run_profile(profile, stages, root, force=args.force)


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # The reader went away (`--list | head -1`): stop quietly, and keep Python's exit-time flush from
        # raising the same error again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
