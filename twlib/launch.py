"""Multi-process training: a stage's job function under ``accelerate launch`` (paper §3.2-3.3 at scale).

The notebooks train in their own process on CPU and on one GPU. Several GPUs need one process per
GPU, which a notebook kernel cannot host, so a stage hands its job to this module: the stage config is
written to ``<run>/launch/<stage>.params.json``, ``accelerate launch -m twlib.launch JOB PARAMS --name NAME``
runs the stage's job function in every process, and the main process writes the job's result to
``<run>/launch/<job>-<name>.json``, which `launch` reads back. Scaling is TRL's and accelerate's own: DDP
or DeepSpeed ZeRO-2/3 from ``configs/accelerate/*.yaml``.

This module is mechanism only; each stage owns its job (`JOBS`), a function ``job(cfg, name, run) -> dict``
that runs the same way in the notebook kernel and in every launched process. Example, 8 GPUs with ZeRO-3::

    accelerate launch --config_file configs/accelerate/deepspeed_zero3.yaml \\
        -m twlib.launch sft params/paper-8b.yaml --name parallel

P-GRPO with rollouts on a separate vLLM server (GPUs 6-7 serve, 0-5 train)::

    CUDA_VISIBLE_DEVICES=6,7 <twlib.pgrpo.rollout_server_command(model, tensor_parallel_size=2)>
    CUDA_VISIBLE_DEVICES=0,1,2,3,4,5 accelerate launch --config_file configs/accelerate/deepspeed_zero3.yaml \\
        --num_processes 6 -m twlib.launch pgrpo params/paper-8b.yaml --name pgrpo   # vllm_mode: server
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch.distributed as dist

from .config import STAGE_CONFIGS, ConfigError, LaunchKnobs, StageConfig, load_profile
from .files import atomic_write_json, project_root, usable_cores
from .runs import RunFolder, stage_dir
from .show import progress

# job name → (stage, the stage's job function as "module:function"). Looked up by name, so this module
# never imports a stage module (they import it).
JOBS = {"sft": ("02_trie_sft", "twlib.sft:sft_job"),
        "retrain": ("03_self_training", "twlib.self_training:retrain_job"),
        "pgrpo": ("04_pgrpo", "twlib.pgrpo:pgrpo_job")}
Job = Callable[[StageConfig, str, RunFolder], dict]


def accelerate_config(name: str) -> Path:
    """``configs/accelerate/<name>.yaml`` of this checkout (``single_gpu``, ``multi_gpu``,
    ``deepspeed_zero2``, ``deepspeed_zero3``), or ``name`` itself when it is a path to a file."""
    if Path(name).is_file():
        return Path(name)
    path = project_root() / "configs" / "accelerate" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise FileNotFoundError(f"no accelerate config {name!r}; known: {', '.join(known)}")
    return path


def accelerate_command(job: str, params: str | Path, name: str, config_file: str | Path,
                       num_processes: int = 0, main_process_port: int | None = None) -> list[str]:
    """The ``accelerate launch`` argv that runs ``job`` (`JOBS`) for ``name`` in every process.

    ``num_processes`` 0 keeps the config's count.

    >>> accelerate_command("sft", "p.json", "parallel", "c.yaml", 8)[-6:]
    ['-m', 'twlib.launch', 'sft', 'p.json', '--name', 'parallel']
    """
    if job not in JOBS:
        raise ValueError(f"job must be one of {sorted(JOBS)}, got {job!r}")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file)]
    if num_processes:
        cmd += ["--num_processes", str(num_processes)]
    if main_process_port is not None:
        cmd += ["--main_process_port", str(main_process_port)]
    return cmd + ["-m", "twlib.launch", job, str(params), "--name", name]


def write_stage_params(cfg: StageConfig, folder: str | Path) -> Path:
    """Dump a stage's typed parameters to ``<folder>/<stage>.params.json`` (what `load_stage` reads)."""
    return atomic_write_json(Path(folder) / f"{cfg.stage}.params.json", {"stage": cfg.stage, "params": cfg.to_dict()})


def load_stage(params: str | Path, stage: str) -> StageConfig:
    """A stage's config from a profile file or from a `write_stage_params` dump."""
    params = Path(params)
    if params.suffix == ".json":
        record = json.loads(params.read_text(encoding="utf-8"))
        if record.get("stage") != stage:
            raise ConfigError(f"{params} holds parameters of stage {record.get('stage')!r}, not {stage!r}")
        return STAGE_CONFIGS[stage].from_dict(record["params"])
    return load_profile(params).stage_config(stage)


def result_path(cfg: StageConfig, job: str, name: str) -> Path:
    return stage_dir(cfg.output_root, cfg.profile, cfg.stage) / "launch" / f"{job}-{name}.json"


def launch(job: str, cfg: StageConfig, name: str, config_file: str | Path, num_processes: int = 0,
           env: dict | None = None, echo=print) -> dict:
    """Run ``job`` for ``name`` under ``accelerate launch`` and return what its main process wrote.

    ``cfg`` is dumped next to the run, the command's output is echoed line by line (``echo``), and a failed
    launch raises with its last lines. Example (notebook 02, 8 GPUs)::

        result = launch("sft", cfg, "parallel", accelerate_config("deepspeed_zero3"))
    """
    params = write_stage_params(cfg, stage_dir(cfg.output_root, cfg.profile, cfg.stage) / "launch")
    out = result_path(cfg, job, name)
    if out.exists():
        out.unlink()  # a stale result must never pass for this run's
    cmd = accelerate_command(job, params, name, config_file, num_processes)
    tail: list[str] = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=os.environ | (env or {})) as proc:
        for line in proc.stdout:
            tail = (tail + [line.rstrip()])[-40:]
            if echo:
                echo(line.rstrip())
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n" + "\n".join(tail))
    return json.loads(out.read_text(encoding="utf-8"))


def run_job(job: str, fn: Job, cfg: StageConfig, name: str, run: RunFolder, knobs: LaunchKnobs | None = None) -> dict:
    """A stage's job for ``name``: ``fn(cfg, name, run)`` in this process, or, when ``knobs`` (default: ``cfg``)
    name an ``accelerate_config``, in one process per GPU under ``accelerate launch`` (the same function,
    `worker`), returning the same record. The record is kept as the run's step ``<job>-<name>`` (`RunFolder.once`):
    a resumed run does not redo a finished job and a re-opened complete run shows it."""
    knobs = cfg if knobs is None else knobs
    if not knobs.accelerate_config:
        return run.once(f"{job}-{name}", lambda: fn(cfg, name, run))
    return run.once(f"{job}-{name}", lambda: launch(job, cfg, name, accelerate_config(knobs.accelerate_config),
                                                    knobs.num_processes))


def run_jobs(job: str, fn: Job, cfg: StageConfig, names: Sequence[str], run: RunFolder,
             knobs: LaunchKnobs | None = None) -> dict[str, dict]:
    """`run_job` for each of ``names``; with ``concurrent_jobs`` > 1 (and no ``accelerate_config``) up to that many
    run side by side (`side_by_side`), each kept as its step when it ends, so a failed or interrupted stage resumes
    with the jobs that had not finished. ``train_<name>`` in the run's timings is each job's wall clock."""
    knobs = cfg if knobs is None else knobs
    if knobs.accelerate_config or knobs.concurrent_jobs <= 1:
        return {name: run_job(job, fn, cfg, name, run, knobs) for name in names}
    pending = [name for name in names if not run.has_step(f"{job}-{name}")]

    def keep(name: str, result: dict, seconds: float) -> None:
        run.once(f"{job}-{name}", lambda: result)
        run.timings[f"train_{name}"] = seconds

    if pending and not run.complete:
        side_by_side(job, cfg, pending, knobs.concurrent_jobs, keep)
    return {name: run_job(job, fn, cfg, name, run, knobs) for name in names}  # each one kept now


def side_by_side(job: str, cfg: StageConfig, names: Sequence[str], at_once: int,
                 done: Callable[[str, dict, float], None], poll_s: float = 1.0) -> None:
    """Run ``job`` for each of ``names``, ``at_once`` at a time, each as ``python -m twlib.launch`` in a process
    of its own with ``cores // at_once`` threads; its output goes to ``<run>/launch/<job>-<name>.log``, one
    progress bar follows every job's training steps, and ``done(name, result, seconds)`` is called as each one
    ends. Failed jobs are reported together once the others have ended; an interrupt stops every job."""
    folder = stage_dir(cfg.output_root, cfg.profile, cfg.stage) / "launch"
    params = write_stage_params(cfg, folder)
    cores = usable_cores()
    threads = str(max(1, cores // at_once))
    env = os.environ | {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false"}
    queue, running, failures = list(names), {}, []
    steps = {name: (0, 0) for name in names}  # (step, steps) of each job's trainer, once it has started
    bar = progress(0, f"{len(names)} jobs, {min(at_once, len(names))} at a time", unit="step")
    try:
        while queue or running:
            while queue and len(running) < at_once:
                name = queue.pop(0)
                result_path(cfg, job, name).unlink(missing_ok=True)  # a stale result must never pass for this run's
                log = folder / f"{job}-{name}.log"
                cmd = [sys.executable, "-m", "twlib.launch", job, str(params), "--name", name]
                with open(log, "w", encoding="utf-8") as out:
                    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=project_root())
                running[name] = (proc, log, time.perf_counter())
            time.sleep(poll_s)
            for name, (proc, log, start) in list(running.items()):
                steps[name] = _trainer_steps(log) or steps[name]
                if proc.poll() is None:
                    continue
                del running[name]
                out = result_path(cfg, job, name)
                if proc.returncode == 0 and out.exists():
                    done(name, json.loads(out.read_text(encoding="utf-8")), time.perf_counter() - start)
                else:
                    tail = log.read_text(encoding="utf-8", errors="replace").replace("\r", "\n").splitlines()[-30:]
                    failures.append(f"{job} {name!r} failed (exit {proc.returncode}; whole output in {log}):\n"
                                    + "\n".join(tail))
            bar.total, bar.n = sum(t for _, t in steps.values()), sum(s for s, _ in steps.values())
            bar.set_postfix_str(", ".join(f"{n} {steps[n][0]}/{steps[n][1]}" for n in running if steps[n][1]),
                                refresh=False)
            bar.refresh()
    finally:
        bar.close()
        for proc, *_ in running.values():  # an interrupt or an error here: leave no job behind
            proc.terminate()
        for proc, *_ in running.values():
            proc.wait()
    if failures:
        raise RuntimeError("\n\n".join(failures))


_TRAINER_STEP = re.compile(r"(\d+)/(\d+) \[[^\]]*step")  # a `show.TrainingProgress` bar (unit: step)


def _trainer_steps(log: Path) -> tuple[int, int] | None:
    """The last ``(step, steps)`` a job's training bar wrote to its log, or None before training starts.

    >>> import tempfile; p = Path(tempfile.mkdtemp()) / "job.log"
    >>> _ = p.write_text("rows: 5/9 [00:01<00:01, 3.1it/s]\\rSFT: 12/300 [00:02<00:40, 7.00step/s]")
    >>> _trainer_steps(p)
    (12, 300)
    """
    with open(log, "rb") as f:
        f.seek(max(0, log.stat().st_size - 4096))
        found = _TRAINER_STEP.findall(f.read().decode("utf-8", errors="replace"))
    return tuple(map(int, found[-1])) if found else None


def is_main_process() -> bool:
    """Whether this is the process that writes shared files (rank 0, or the only process)."""
    return not dist.is_available() or not dist.is_initialized() or dist.get_rank() == 0


def worker(job: str, params: str | Path, name: str) -> dict:
    """One launched process: the stage's config from ``params``, its run folder as the notebook opened it,
    the stage's job function; the main process writes the result where `launch` reads it."""
    if job not in JOBS:
        raise ValueError(f"job must be one of {sorted(JOBS)}, got {job!r}")
    stage, target = JOBS[job]
    module, function = target.split(":")
    fn: Job = getattr(importlib.import_module(module), function)
    cfg = load_stage(params, stage)
    result = fn(cfg, name, RunFolder.existing(cfg))
    if is_main_process():
        atomic_write_json(result_path(cfg, job, name), result)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m twlib.launch", description=__doc__.splitlines()[0])
    parser.add_argument("job", choices=sorted(JOBS))
    parser.add_argument("params", help="params/<profile>.yaml, or a <stage>.params.json dump")
    parser.add_argument("--name", required=True, help="sft: parallel | sequential; pgrpo: a run of twlib.pgrpo.RUNS")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # P-GRPO's rollout_func is marked experimental
    worker(args.job, args.params, args.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
