"""Multi-process training from a params file: ``accelerate launch … -m twlib.launch {sft,pgrpo} PARAMS``.

The notebooks train in their own process on CPU and on one GPU. Several GPUs need one process per
GPU, which a notebook kernel cannot host, so notebooks 02 and 04 hand the same work to this entry
point through ``accelerate launch`` (`launch`) and read back what the main process wrote. Scaling
is TRL's and accelerate's own: DDP or DeepSpeed ZeRO-2/3 from ``configs/accelerate/*.yaml``, and
P-GRPO rollouts from TRL's vLLM, colocated in every training process or served apart (paper §3.3;
8×80 GB in the paper).

``PARAMS`` is a profile (``params/<profile>.yaml``) or a ``*.json`` dump of one stage's typed
parameters (`write_stage_params`; what a notebook passes, since papermill may have overridden the
profile's values). Every process runs the same function (`sft_job`, `pgrpo_job`); the main process
writes the result to ``<run>/launch/<job>-<name>.json``. Example, 8 GPUs with ZeRO-3::

    accelerate launch --config_file configs/accelerate/deepspeed_zero3.yaml \\
        -m twlib.launch sft params/paper-8b.yaml --name parallel

P-GRPO with rollouts on a separate vLLM server (GPUs 6-7 serve, 0-5 train)::

    CUDA_VISIBLE_DEVICES=6,7 <rollout_server_command(model, tensor_parallel_size=2)>
    CUDA_VISIBLE_DEVICES=0,1,2,3,4,5 accelerate launch --config_file configs/accelerate/deepspeed_zero3.yaml \\
        --num_processes 6 -m twlib.launch pgrpo params/paper-8b.yaml --name pgrpo   # vllm_mode: server
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from . import config

JOBS = {"sft": "02_trie_sft", "retrain": "03_self_training", "pgrpo": "04_pgrpo"}
VLLM_MODES = ("none", "colocate", "server")


def accelerate_config(name: str) -> Path:
    """``configs/accelerate/<name>.yaml`` of this checkout (``single_gpu``, ``multi_gpu``,
    ``deepspeed_zero2``, ``deepspeed_zero3``), or ``name`` itself when it is a path to a file."""
    from .runs import project_root

    if Path(name).is_file():
        return Path(name)
    path = project_root() / "configs" / "accelerate" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise FileNotFoundError(f"no accelerate config {name!r}; known: {', '.join(known)}")
    return path


def accelerate_command(job: str, params: str | Path, name: str, config_file: str | Path,
                       num_processes: int = 0, main_process_port: int | None = None) -> list[str]:
    """The ``accelerate launch`` argv that runs ``job`` (``sft``/``pgrpo``) for ``name`` in every process.

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


def write_stage_params(cfg: config.StageConfig, folder: str | Path) -> Path:
    """Dump a stage's typed parameters to ``<folder>/<stage>.params.json`` (what `load_stage` reads)."""
    from .runs import atomic_write_json

    return atomic_write_json(Path(folder) / f"{cfg.stage}.params.json", {"stage": cfg.stage, "params": cfg.to_dict()})


def load_stage(params: str | Path, stage: str) -> config.StageConfig:
    """A stage's config from a profile file or from a `write_stage_params` dump."""
    params = Path(params)
    if params.suffix == ".json":
        record = json.loads(params.read_text(encoding="utf-8"))
        if record.get("stage") != stage:
            raise config.ConfigError(f"{params} holds parameters of stage {record.get('stage')!r}, not {stage!r}")
        return config.STAGE_CONFIGS[stage].from_dict(record["params"])
    return config.load_profile(params).stage_config(stage)


def result_path(cfg: config.StageConfig, job: str, name: str) -> Path:
    from .runs import stage_dir

    return stage_dir(cfg.output_root, cfg.profile, cfg.stage) / "launch" / f"{job}-{name}.json"


def launch(job: str, cfg: config.StageConfig, name: str, config_file: str | Path, num_processes: int = 0,
           env: dict | None = None, echo=print) -> dict:
    """Run ``job`` for ``name`` under ``accelerate launch`` and return what its main process wrote.

    For notebooks: ``cfg`` is dumped next to the run, the command's output is echoed line by line
    (``echo``), and a failed launch raises with its last lines. Example (notebook 02, 8 GPUs)::

        result = launch("sft", cfg, "parallel", accelerate_config("deepspeed_zero3"))
    """
    from .runs import stage_dir

    folder = stage_dir(cfg.output_root, cfg.profile, cfg.stage) / "launch"
    params = write_stage_params(cfg, folder)
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


# ------------------------------------------------------------------------------------- workers
def _worker_run(cfg: config.StageConfig):
    """The stage's run folder, as every process sees it (the notebook that launched it opened it)."""
    from .runs import RunFolder, project_root, stage_dir

    return RunFolder(cfg, project_root(), stage_dir(cfg.output_root, cfg.profile, cfg.stage))


def _write_result(cfg, job: str, name: str, result: dict) -> Path:
    from .runs import atomic_write_json

    return atomic_write_json(result_path(cfg, job, name), result)


# The GPU knobs of notebooks 02 and 04, read by these names from the stage config; where a config
# does not carry one yet, the default applies (use_cpu: only when there is no CUDA device).
SFT_KNOBS = ("bf16", "attention", "gradient_checkpointing", "gradient_accumulation_steps", "use_cpu")


def launch_settings(cfg):
    """``cfg.train_settings()`` with the knobs of ``SFT_KNOBS`` the config carries; where it carries
    none: on CUDA when there is one, bf16 when the accelerate config asks for it.

    >>> from twlib.config import TrieSFTConfig
    >>> launch_settings(TrieSFTConfig(profile="p")).attention
    'dense'
    """
    import dataclasses

    import torch

    knobs = {"use_cpu": not torch.cuda.is_available(), "bf16": _launched_bf16()}
    knobs |= {k: getattr(cfg, k) for k in SFT_KNOBS if hasattr(cfg, k)}
    return dataclasses.replace(cfg.train_settings(), **knobs)


def _launched_bf16() -> bool:
    # Under `accelerate launch` the config file's mixed precision reaches every process as this
    # variable; the trainer's bf16 switch (and so the dense mask's dtype) must agree with it.
    return os.environ.get("ACCELERATE_MIXED_PRECISION", "no") == "bf16"


def sft_job(params: str | Path, name: str) -> dict:
    """Notebook 02's training of model ``name`` (``parallel``/``sequential``) in this process.

    Reads notebook 01's tokenizer and data of the same profile, then `twlib.sft.train_model` with
    `launch_settings`.
    """
    from .sft import stage_tokenizer, train_model, training_data

    if name not in ("parallel", "sequential"):
        raise ValueError(f"the SFT model is 'parallel' or 'sequential', got {name!r}")
    cfg = load_stage(params, JOBS["sft"])
    run = _worker_run(cfg)
    tokenizer = stage_tokenizer(cfg, run)
    result = train_model(name, cfg, tokenizer, training_data(cfg, run), run, settings=launch_settings(cfg))
    if _is_main_process():
        _write_result(cfg, "sft", name, result)
    return result


def retrain_job(params: str | Path, name: str = "parallel") -> dict:
    """Notebook 03's retraining in this process: the merged examples the notebook wrote to
    ``<run>/data/train.jsonl``, with notebook 02's model kind and `launch_settings`."""
    import dataclasses

    from .self_training import retrain
    from .tokenizer import load_tokenizer

    cfg = load_stage(params, JOBS["retrain"])
    run = _worker_run(cfg)
    sft_cfg = run.stage_config(JOBS["sft"])
    sft_model = run.require_complete(JOBS["sft"]) / "parallel_model"
    examples = [json.loads(line) for line in (run.folder / "data" / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    settings = dataclasses.replace(launch_settings(sft_cfg), **{
        k: getattr(cfg.train_settings(sft_cfg), k) for k in
        ("max_steps", "per_device_train_batch_size", "learning_rate", "warmup_steps", "logging_steps",
         "save_steps", "seed")})
    scratch = cfg.retrain_from == "scratch"
    result = retrain(examples, load_tokenizer(sft_model), None if scratch else sft_model, settings, cfg.row_tokens,
                     run, name, spec=sft_cfg.model_spec(), seed=cfg.seed, base_model=sft_cfg.base_model)
    if _is_main_process():
        _write_result(cfg, "retrain", name, result)
    return result


def _is_main_process() -> bool:
    import torch.distributed as dist

    return not dist.is_available() or not dist.is_initialized() or dist.get_rank() == 0


def rollout_server_command(model: str | Path, port: int = 8000, tensor_parallel_size: int = 1,
                           gpu_memory_utilization: float = 0.9, max_model_len: int | None = None,
                           dtype: str = "bfloat16") -> tuple[list[str], dict]:
    """``(argv, env)`` of the vLLM server P-GRPO rolls out on in server mode: TRL's own ``vllm serve``
    line (NCCL weight transfer from the trainer, prefix caching on) and its dev-mode environment.

    Start it on GPUs the trainer does not use; `pgrpo_job` talks to it at ``vllm_server_url``.
    """
    from trl.scripts.vllm_serve import ScriptArguments, build_command

    args = ScriptArguments(model=str(model), port=port, tensor_parallel_size=tensor_parallel_size,
                           gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                           enable_prefix_caching=True, dtype=dtype)
    return build_command(args), {"VLLM_SERVER_DEV_MODE": "1"}


def server_trainer_class():
    """``ParallelGRPOTrainer`` for server mode: every process rolls out through the shared server.

    TRL pushes the new weights from the main process only; the others wait for it here, so that no
    rollout reads the previous step's weights.
    """
    from .pgrpo import make_trainer_class

    base = make_trainer_class()

    class ServerRolloutGRPOTrainer(base):
        def _rollout(self, prompts: list, trainer) -> dict:
            self.accelerator.wait_for_everyone()
            return super()._rollout(prompts, trainer)

    return ServerRolloutGRPOTrainer


def pgrpo_job(params: str | Path, name: str) -> dict:
    """Notebook 04's RL run ``name`` (`twlib.pgrpo.RUNS`) in this process, from the SFT model of notebook 02
    (the parallel one from ``cfg.parallel_init``'s stage).

    The stage's ``vllm_mode`` picks the rollout engine: ``none`` (HF, the policy itself), ``colocate``
    (TRL's vLLM inside every process, weights synced each step) or ``server`` (the vLLM server at
    ``vllm_server_url``, started with `rollout_server_command` on the SFT model, weights pushed by TRL
    each step; the kit's `twlib.engines.openai.OpenAIEngine` talks to it). Saving goes through
    `twlib.sft.save_trained`, so ZeRO-3 shards are gathered into one loadable folder.
    """
    from . import pgrpo
    from .data import load_parquet
    from .engines.openai import OpenAIEngine
    from .models import context_length
    from .sft import last_checkpoint, save_trained
    from .tokenizer import load_tokenizer

    cfg = load_stage(params, JOBS["pgrpo"])
    if name not in pgrpo.RUNS:
        raise ValueError(f"the RL run is one of {sorted(pgrpo.RUNS)}, got {name!r}")
    mode = getattr(cfg, "vllm_mode", "none")
    if mode not in VLLM_MODES:
        raise config.ConfigError(f"vllm_mode must be one of {VLLM_MODES}, got {mode!r}")
    if mode == "none" and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3":
        raise config.ConfigError("under ZeRO-3 no process holds whole weights to decode with: roll out with "
                                 "vLLM (vllm_mode 'colocate' or 'server')")
    run = _worker_run(cfg)
    trajectories = run.require_complete("01_trajectories")
    trained = run.require_complete("02_trie_sft")
    tokenizer = load_tokenizer(trained / "parallel_model")
    prompts = pgrpo.prompt_dataset(load_parquet(trajectories / "data")["train"],
                                   cfg.max_steps * cfg.prompts_per_step, cfg.seed)
    kind, branching, std = pgrpo.RUNS[name]
    # As notebook 04: the parallel run may start from the self-trained model instead of notebook 02's.
    init = (run.require_complete(getattr(cfg, "parallel_init", "02_trie_sft")) if kind == "parallel"
            else trained) / f"{kind}_model"
    args = cfg.grpo_args(run.path(f"{name}_checkpoints"), std)
    # Read when the trainer starts, so they may follow the constructor.
    args.use_vllm, args.vllm_mode = mode != "none", "server" if mode == "server" else "colocate"
    engine, Trainer = None, pgrpo.make_trainer_class()
    if mode == "server":
        url = getattr(cfg, "vllm_server_url", "")
        if not url:
            raise config.ConfigError("vllm_mode 'server' needs vllm_server_url (e.g. http://10.0.0.7:8000)")
        args.vllm_server_base_url = url
        # The server names the model by the path it was started with (rollout_server_command(init)).
        engine = OpenAIEngine(url, str(init), tokenizer.eos_token_id, concurrency=64, timeout_s=600.0)
        Trainer = server_trainer_class()
    trainer = Trainer(str(init), tokenizer, prompts, args, cfg.settings(branching, context_length(init)),
                      engine=engine)
    trainer.train(resume_from_checkpoint=last_checkpoint(args.output_dir))
    path = save_trained(trainer, tokenizer, run.path(f"{name}_model"))
    result = {"log": [dict(r) for r in trainer.state.log_history], "model_path": str(path),
              "guard_counts": dict(trainer.guard_counts)}
    if trainer.accelerator.is_main_process:
        _write_result(cfg, "pgrpo", name, result)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m twlib.launch", description=__doc__.splitlines()[0])
    parser.add_argument("job", choices=sorted(JOBS))
    parser.add_argument("params", help="params/<profile>.yaml, or a <stage>.params.json dump")
    parser.add_argument("--name", required=True, help="sft: parallel | sequential; pgrpo: a run of twlib.pgrpo.RUNS")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # P-GRPO's rollout_func is marked experimental
    {"sft": sft_job, "retrain": retrain_job, "pgrpo": pgrpo_job}[args.job](args.params, args.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
