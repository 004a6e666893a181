"""Trie-packed SFT on TRL's ``SFTTrainer`` (paper §3.2; docs/design.md §5), and the sequential baseline.

Both models go through the same code: a trajectory becomes a trie (`twlib.trie`), tries are packed
into rows up to a token budget, and a collator turns rows into ids, tree position ids, an additive
4D ancestor mask and pre-shifted labels. The sequential baseline's trajectories have no blocks, so
their trie is a plain path and the mask is plain causal (with packing).

Rows store only 1D arrays (ids, positions, exit times, labels); masks are built per batch. Two
mask kinds (``TrainSettings.attention``): ``"dense"``, the additive ``[B,1,L,L]`` float mask for
eager/sdpa (CPU; O(L²) memory), and ``"flex"``, a flex-attention ``BlockMask`` built from the exit
times on the model's device (GPU; O(L) inputs, fully masked 128×128 tiles skipped), which lets one
packed row of 32k tokens train on one GPU with bf16 and gradient checkpointing.

>>> from twlib.tokenizer import build_char_tokenizer
>>> tok = build_char_tokenizer()
>>> row = trajectory_tries([{"question": "1", "text": "<think>\\n</think>\\n\\n\\\\boxed{1}"}], tok)[0]
>>> row.position_ids[:3], row.labels[-1]
([0, 1, 2], -100)
"""
from __future__ import annotations

import shutil
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Literal, Sequence

import pandas as pd
import torch
from datasets import Dataset
from transformers.trainer_utils import get_last_checkpoint
from trl import SFTConfig, SFTTrainer

from . import format as fmt
from . import launch
from .config import TrieSFTConfig
from .dataset import load_parquet
from .files import replace_dir
from .masks import ancestor_block_mask, collate, row_tensors
from .models import (
    build_tiny_model,
    cpu_has_native_bf16,
    load_model,
    load_pretrained,
    model_spec,
    pretrained_for,
    pretrained_tokenizer,
    resolve_model,
    save_model,
)
from .rewriter.sources import accepted_rows
from .runs import RunFolder
from .show import quiet_trainer
from .tasks.release import release_for_stage
from .tokenizer import load_tokenizer, prompt_ids
from .trie import IGNORE, Objective, PackedTrie, pack_rows, pack_trajectory

ROW_COLUMNS = ("input_ids", "position_ids", "exit", "labels")
Attention = Literal["dense", "flex"]
ATTENTION_KINDS = ("dense", "flex")
# flex attention works in 128×128 tiles; rows padded to a multiple of it keep the compiled kernels few.
FLEX_BLOCK = 128


def trajectory_tries(examples: Iterable[dict], tokenizer, objective: Objective = "corrected") -> list[PackedTrie]:
    """``[{"question", "text"}]`` → one trie each; ``text`` is a strict-format response."""
    out = []
    for ex in examples:
        traj = fmt.parse(ex["text"], strict=True)
        out.append(pack_trajectory(prompt_ids(tokenizer, ex["question"]), traj, tokenizer, objective))
    return out


def dataset_examples(ds, parallel: bool) -> list[dict]:
    """Rows of the 01 dataset → ``{"question", "text"}`` for the parallel or the sequential CoT."""
    column = "completion" if parallel else "sequential_completion"
    return [{"question": r["question"], "text": r[column][0]["content"]} for r in ds]


def rows_dataset(tries: Sequence[PackedTrie], max_tokens: int) -> Dataset:
    """Pack tries into rows of at most ``max_tokens`` positions → HF ``Dataset`` of 1D arrays."""
    rows = pack_rows(tries, max_tokens)
    return Dataset.from_dict({
        "input_ids": [r.input_ids for r in rows], "position_ids": [r.position_ids for r in rows],
        "exit": [r.exit for r in rows], "labels": [r.labels for r in rows],
        "trajectories": [max(r.sequence) + 1 for r in rows],
    })


def row_from_record(record: dict) -> PackedTrie:
    """A dataset row back into a `PackedTrie` (parents are not needed for masks or loss)."""
    n = len(record["input_ids"])
    return PackedTrie(list(record["input_ids"]), list(record["position_ids"]), [-1] * n,
                      list(record["exit"]), [lab != IGNORE for lab in record["labels"]],
                      list(record["labels"]), [0] * n)


def set_attention(model, attention: Attention) -> None:
    """Switch a transformers model to the attention kernel a mask kind needs (flex: ``flex_attention``).

    Dense masks run on whatever the model was loaded with (eager or sdpa); a flex ``BlockMask`` only
    on ``flex_attention``.
    """
    if attention not in ATTENTION_KINDS:
        raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {attention!r}")
    if attention == "flex" and model.config._attn_implementation != "flex_attention":
        model.set_attn_implementation("flex_attention")


@dataclass
class TrieCollator:
    """Rows → ``input_ids``, ``position_ids``, a mask, ``labels``/``shift_labels``.

    ``labels`` and ``shift_labels`` are the same pre-shifted tensor: transformers computes the loss
    only when ``labels`` is given and then uses ``shift_labels`` as is (no flat-order shift).
    The mask is the 4D float ``attention_mask`` (``attention="dense"``) or, for ``"flex"``, the exit
    times ``tree_exit`` from which the trainer builds a ``BlockMask`` on the model's device.
    """
    pad_token_id: int
    dtype: str = "float32"
    pad_to_multiple_of: int = 8
    attention: Attention = "dense"

    def __call__(self, records: list[dict]) -> dict:
        rows = [row_from_record(r) for r in records]
        length = max(len(r) for r in rows)
        length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        if self.attention == "flex":
            batch = row_tensors(rows, self.pad_token_id, length)
        elif self.attention == "dense":
            batch = collate(rows, self.pad_token_id, length, getattr(torch, self.dtype))
        else:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
        batch["labels"] = batch["shift_labels"]
        return batch


@dataclass(frozen=True)
class TrainSettings:
    """Optimiser and schedule (TRL ``SFTConfig`` fields by their own names)."""
    max_steps: int = 300
    per_device_train_batch_size: int = 8
    learning_rate: float = 2e-3
    warmup_steps: int = 30
    weight_decay: float = 0.0
    lr_scheduler_type: str = "cosine"
    logging_steps: int = 10
    save_steps: int = 100
    seed: int = 0
    bf16: bool = False
    # Scale switches (GPU profiles); the defaults are the CPU demo's.
    use_cpu: bool = True
    attention: Attention = "dense"
    gradient_checkpointing: bool = False
    gradient_accumulation_steps: int = 1

    def __post_init__(self):
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
        if self.gradient_accumulation_steps < 1:
            raise ValueError(f"gradient_accumulation_steps must be >= 1, got {self.gradient_accumulation_steps}")


def train_settings(cfg: TrieSFTConfig) -> TrainSettings:
    """Notebook 02's optimiser, schedule and scale switches.

    >>> train_settings(TrieSFTConfig(profile="p", batch_rows=2)).per_device_train_batch_size
    2
    """
    return TrainSettings(max_steps=cfg.max_steps, per_device_train_batch_size=cfg.batch_rows,
                         learning_rate=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
                         logging_steps=cfg.logging_steps, save_steps=cfg.save_steps, seed=cfg.seed, bf16=cfg.bf16,
                         use_cpu=cfg.use_cpu, attention=cfg.attention,
                         gradient_checkpointing=cfg.gradient_checkpointing,
                         gradient_accumulation_steps=cfg.gradient_accumulation_steps)


class TrieSFTTrainer(SFTTrainer):
    """TRL's ``SFTTrainer`` whose mask is built per batch on the model's device.

    The batch's mask (dense ``attention_mask`` or flex ``tree_exit``) is taken out of the inputs
    before TRL sees them and handed to the model's forward by a pre-hook: TRL counts a batch's
    tokens as ``attention_mask.sum()``, which means nothing for an additive 4D mask and fails on a
    ``BlockMask``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._mask = None
        self.model.register_forward_pre_hook(self._inject_mask, with_kwargs=True)

    def _inject_mask(self, module, args, kwargs):
        if self._mask is not None and kwargs.get("attention_mask") is None:
            kwargs["attention_mask"] = self._mask
        return args, kwargs

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        exits = inputs.pop("tree_exit", None)
        mask = inputs.pop("attention_mask", None)
        self._mask = ancestor_block_mask(exits) if exits is not None else mask
        try:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                         num_items_in_batch=num_items_in_batch)
        finally:
            self._mask = None


def warn_emulated_bf16(settings: TrainSettings, use_cpu: bool) -> None:
    """bf16 autocast on a CPU without bf16 instructions is emulated: 3.69 s per cpu-demo step against 0.42 s in
    float32 on such a CPU (`python -m twlib.bench sft`, side by side), so the run is kept as asked but the reader
    is told how to make it fast."""
    if settings.bf16 and use_cpu and cpu_has_native_bf16() is False:
        warnings.warn("bf16 is on, but this CPU has no bf16 instructions (no avx512_bf16, amx_bf16 or bf16 flag): "
                      "PyTorch emulates them, which makes each training step many times slower. Set bf16: false in "
                      "the params file (or bf16 = False in the parameters cell) to train in float32.", stacklevel=2)


def make_trainer(model, tokenizer, train_rows, output_dir: str | Path, settings: TrainSettings,
                 use_cpu: bool | None = None):
    """TRL ``SFTTrainer`` over pre-packed rows with the trie collator (``use_cpu`` None: ``settings.use_cpu``).

    ``settings.attention == "flex"`` switches the model to flex attention; gradient checkpointing is
    the non-reentrant kind, which recomputes each layer with the same mask object.
    """
    use_cpu = settings.use_cpu if use_cpu is None else use_cpu
    warn_emulated_bf16(settings, use_cpu)
    set_attention(model, settings.attention)
    args = SFTConfig(
        output_dir=str(output_dir), max_steps=settings.max_steps,
        per_device_train_batch_size=settings.per_device_train_batch_size,
        learning_rate=settings.learning_rate, warmup_steps=settings.warmup_steps,
        weight_decay=settings.weight_decay, lr_scheduler_type=settings.lr_scheduler_type,
        logging_steps=settings.logging_steps, save_steps=settings.save_steps, save_total_limit=2,
        seed=settings.seed, data_seed=settings.seed, bf16=settings.bf16, use_cpu=use_cpu,
        # Rows are already tokenised, packed trees: TRL must neither re-tokenise nor drop columns.
        dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False, max_length=None,
        gradient_checkpointing=settings.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if settings.gradient_checkpointing else None,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        report_to="none", dataloader_num_workers=0,
    )
    collator = TrieCollator(tokenizer.pad_token_id, "bfloat16" if settings.bf16 else "float32",
                            FLEX_BLOCK if settings.attention == "flex" else 8, settings.attention)
    return TrieSFTTrainer(model=model, args=args, train_dataset=train_rows, processing_class=tokenizer,
                           data_collator=collator)


def parameter_count(model) -> int:
    """Parameters of a model, also when ZeRO-3 has partitioned them (``ds_numel`` is the full size)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def save_trained(trainer, tokenizer, path: str | Path, distributed: bool | None = None) -> Path:
    """Save a trained model and its tokenizer into one folder, atomically (HF format: transformers, vLLM).

    One plain process saves the model object directly (`twlib.models.save_model`). Under several
    processes, DeepSpeed or FSDP (``distributed`` None: detected) every process must call this: the
    trainer gathers the shards (ZeRO-3 needs ``zero3_save_16bit_model: true``) and only the main
    process writes, into a temporary sibling that then replaces ``path``.
    """
    acc = trainer.accelerator
    if distributed is None:
        distributed = acc.num_processes > 1 or trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled
    path = Path(path)
    if not distributed:
        return save_model(trainer.model, tokenizer, path, overwrite=True)
    # Every process writes its shards to one agreed folder; the main process swaps it in.
    tmp = path.parent / f".{path.name}.tmp-gathered"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crashed save
    acc.wait_for_everyone()
    trainer.save_model(str(tmp))
    if acc.is_main_process:
        tokenizer.save_pretrained(tmp)
        replace_dir(tmp, path)
    acc.wait_for_everyone()
    return path


def last_checkpoint(output_dir: str | Path) -> str | None:
    return get_last_checkpoint(str(output_dir)) if Path(output_dir).is_dir() else None


def train(trainer) -> list[dict]:
    """Train, resuming from the newest checkpoint in ``output_dir`` if one exists; returns the log."""
    trainer.train(resume_from_checkpoint=last_checkpoint(trainer.args.output_dir))
    return [dict(r) for r in trainer.state.log_history]


def loss_history(log: list[dict]):
    """``step``, ``loss``, ``learning_rate`` rows of a trainer log (pandas)."""
    rows = [{"step": r["step"], "loss": r["loss"], "learning_rate": r.get("learning_rate")}
            for r in log if "loss" in r]
    return pd.DataFrame(rows)


def starting_model(tokenizer, sft_cfg: TrieSFTConfig, attention: Attention = "dense", seed: int | None = None,
                   init_model: str | Path | None = None):
    """The model a trie-SFT run starts from: the saved model ``init_model`` if given; else notebook 02's
    ``base_model`` (a hub id or folder; the tags added, checked against ``tokenizer`` by
    `twlib.models.pretrained_for`) in ``model_dtype``; else a tiny Qwen3 of notebook 02's sizes, seeded
    with ``seed`` (None: notebook 02's). Notebook 03 retrains from here too, so both stages choose alike."""
    attn = "flex_attention" if attention == "flex" else "sdpa"
    if init_model is not None:
        return load_model(init_model, attn_implementation=attn)
    if sft_cfg.base_model:
        return pretrained_for(tokenizer, sft_cfg.base_model, dtype=sft_cfg.model_dtype, attn_implementation=attn)
    return build_tiny_model(tokenizer, model_spec(sft_cfg), seed=sft_cfg.seed if seed is None else seed)


def train_rows(examples: Sequence[dict], tokenizer, row_tokens: int, objective: Objective = "corrected") -> Dataset:
    """Trie-SFT rows of ``{"question", "text"}`` examples, packed up to ``row_tokens`` positions."""
    if not examples:
        raise ValueError("no examples to train on")
    return rows_dataset(trajectory_tries(examples, tokenizer, objective), row_tokens)


def fit_rows(model, tokenizer, rows: Dataset, settings: TrainSettings, run, name: str) -> dict:
    """Train ``model`` on ``rows`` with checkpoints in ``<run>/<name>_checkpoints`` (an interrupted run resumes
    from the newest) and save it to ``<run>/<name>_model`` (HF format: transformers and vLLM load it).
    Returns ``{"log", "model_path", "parameters", "rows", "label_tokens", "epochs"}``: ``label_tokens`` counts the
    trained positions of all the rows, ``epochs`` how many times the steps went through them (e.g. 1,400 steps of
    2 rows over 16,629 rows: 0.168)."""
    trainer = quiet_trainer(make_trainer(model, tokenizer, rows, run.path(f"{name}_checkpoints"), settings),
                            f"train {name}")
    with run.timer(f"train_{name}"):
        log = train(trainer)
    path = save_trained(trainer, tokenizer, run.path(f"{name}_model"))
    labelled = sum(sum(1 for lab in r if lab != IGNORE) for r in rows["labels"])
    rows_seen = (trainer.state.global_step * settings.per_device_train_batch_size
                 * settings.gradient_accumulation_steps * trainer.args.world_size)
    return {"log": log, "model_path": str(path), "parameters": parameter_count(model), "rows": len(rows),
            "label_tokens": labelled, "epochs": round(rows_seen / len(rows), 3)}


def train_model(kind: str, cfg: TrieSFTConfig, tokenizer, train_ds, run, base_model: str | None = None) -> dict:
    """Train the ``"parallel"`` or ``"sequential"`` model of notebook 02 end to end (`starting_model`,
    `fit_rows`); ``base_model`` overrides the config's. Returns `fit_rows`'s record plus ``trajectories``."""
    if base_model is not None:
        cfg = replace(cfg, base_model=base_model)
    settings = train_settings(cfg)
    examples = dataset_examples(train_ds, parallel=kind == "parallel")
    rows = train_rows(examples, tokenizer, cfg.row_tokens, cfg.objective if kind == "parallel" else "corrected")
    model = starting_model(tokenizer, cfg, settings.attention)
    return {**fit_rows(model, tokenizer, rows, settings, run, kind), "trajectories": len(examples)}


def stage_tokenizer(cfg: TrieSFTConfig, run):
    """Notebook 02's tokenizer: ``base_model``'s with the tags added, else notebook 01's tiny one."""
    if cfg.base_model:
        return pretrained_tokenizer(resolve_model(run, cfg.base_model))
    return load_tokenizer(run.require_complete("01_trajectories") / "tokenizer")


def with_base_model(cfg: TrieSFTConfig, run) -> TrieSFTConfig:
    """``cfg`` with ``base_model`` as ``from_pretrained`` takes it: a folder of the profile's outputs or the project,
    the stand-in (built when missing), or a hub id (`twlib.models.resolve_model`)."""
    return replace(cfg, base_model=resolve_model(run, cfg.base_model)) if cfg.base_model else cfg


def base_baseline(cfg: TrieSFTConfig, run) -> dict:
    """Without a sequential model to train (``train_sequential`` off, e.g. on the released data, which holds parallel
    trajectories only) but with a pretrained ``base_model``, the base model itself, tags added and not trained,
    is the sequential baseline of notebooks 04 and 05: saved once as ``<run>/sequential_model``. Returns
    ``{"sequential": record}`` in `fit`'s form (no log, nothing trained), or ``{}``."""
    if cfg.train_sequential or not cfg.base_model:
        return {}

    def save() -> dict:
        model, tokenizer = load_pretrained(resolve_model(run, cfg.base_model), dtype=cfg.model_dtype)
        path = save_model(model, tokenizer, run.path("sequential_model"), overwrite=True)
        return {"log": [], "model_path": str(path), "parameters": parameter_count(model), "rows": 0,
                "label_tokens": 0, "epochs": 0.0, "trajectories": 0, "trained": False}

    return {"sequential": run.once("base_baseline", save)}


def training_data(cfg: TrieSFTConfig, run) -> Dataset:
    """The trajectories notebook 02 trains on (``train_data``): the 01 training split, the authors' released data
    (`twlib.tasks.release`), or every trajectory the
    stage-1 rewriting accepted (``question``, ``completion``, ``sequential_completion`` columns)."""
    if cfg.train_data == "release":
        return release_for_stage(cfg, root=run.project)
    if cfg.train_data == "01b_rewriting":
        rows = accepted_rows(run.require_complete("01b_rewriting") / "accepted.jsonl")
        if not rows:
            raise ValueError("01b_rewriting accepted no trajectory: there is nothing to train on "
                             "(see its rejected.jsonl and report)")
        return Dataset.from_list(rows)
    return load_parquet(run.require_complete("01_trajectories") / "data", splits=("train",))["train"]


MODELS = ("sequential", "parallel")


def sft_job(cfg: TrieSFTConfig, name: str, run: RunFolder) -> dict:
    """Notebook 02's training of model ``name`` (``"parallel"``/``"sequential"``) in this process: the notebook
    kernel, or every process under ``accelerate launch`` (`twlib.launch`). Reads notebook 01's tokenizer and
    the training data of the same profile, then `train_model`."""
    if name not in MODELS:
        raise ValueError(f"the SFT model is 'parallel' or 'sequential', got {name!r}")
    return train_model(name, with_base_model(cfg, run), stage_tokenizer(cfg, run), training_data(cfg, run), run)


def fit(cfg: TrieSFTConfig, names: Sequence[str], run: RunFolder) -> dict[str, dict]:
    """`sft_job` for each model of ``names``: here, ``concurrent_jobs`` side by side, or with ``accelerate_config``
    set in one process per GPU (`twlib.launch.run_jobs`)."""
    return launch.run_jobs("sft", sft_job, cfg, names, run)


def reference_match(model, tokenizer, examples: Sequence[dict], objective: Objective = "corrected",
                    batch_size: int = 16, progress=None) -> list[bool]:
    """For each ``{"question", "text"}``: would greedy decoding write the reference text token for token?

    Every trained token of the trie is scored in the context it is generated in (the orchestrator's
    context for a thread, the plain prefix otherwise), so the reference is reproduced exactly when the
    model's argmax equals the reference at every trained token — one forward per batch instead of a
    decoding loop. A model can also reach the right answer another way, so this is a lower bound on
    greedy accuracy.

    >>> from twlib.tokenizer import build_char_tokenizer
    >>> from twlib.models import build_tiny_model
    >>> tok = build_char_tokenizer()
    >>> reference_match(build_tiny_model(tok), tok, [{"question": "1", "text": "<think>\\n</think>\\n\\n\\\\boxed{1}"}])
    [False]
    """
    tries = trajectory_tries(examples, tokenizer, objective)
    out: list[bool] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(tries), batch_size):
                chunk = tries[start:start + batch_size]
                batch = collate(chunk, tokenizer.pad_token_id, None, next(model.parameters()).dtype)
                labels = batch.pop("shift_labels")
                batch = {k: v.to(model.device) for k, v in batch.items()}
                predicted = model(**batch).logits.argmax(-1).cpu()
                trained = labels != IGNORE
                out.extend(bool((predicted[i][trained[i]] == labels[i][trained[i]]).all()) for i in range(len(chunk)))
                if progress:
                    progress(len(chunk))
    finally:
        model.train(was_training)
    return out


def reference_scores(model_paths: dict, tokenizer, ds, progress=None):
    """Share of ``ds`` rows each trained model reproduces exactly (`reference_match`), by family and shape.

    A parallel row counts as reproduced when the model writes its CoT or its ``coarse_completion``.

    ``model_paths`` maps ``"sequential"``/``"parallel"`` to a saved model; returns a pandas frame with
    one row per model, family and shape, plus an ``all`` row per model.
    """
    if "completion" not in ds.column_names:  # real-math prompts carry no reference CoT to reproduce
        return pd.DataFrame(columns=["model", "family", "shape", "problems", "reproduced"])
    frames = []
    for kind, path in model_paths.items():
        model = load_model(path)
        ok = reference_match(model, tokenizer, dataset_examples(ds, parallel=kind == "parallel"), progress=progress)
        if kind == "parallel" and "coarse_completion" in ds.column_names:
            # Either granularity of the same plan is the reference (a model may have learnt both).
            coarse = [{"question": r["question"], "text": r["coarse_completion"][0]["content"]} for r in ds]
            ok = [a or b for a, b in zip(ok, reference_match(model, tokenizer, coarse))]
        frames.append(pd.DataFrame({"model": kind, "family": ds["family"], "shape": ds["shape"], "reproduced": ok}))
    rows = pd.concat(frames, ignore_index=True)
    by_shape = rows.groupby(["model", "family", "shape"]).reproduced.agg(["size", "mean"]).reset_index()
    overall = rows.groupby("model").reproduced.agg(["size", "mean"]).reset_index().assign(family="all", shape="all")
    return (pd.concat([by_shape, overall], ignore_index=True)
            .rename(columns={"size": "problems", "mean": "reproduced"}))


def validation_scores(run: RunFolder, model_paths: dict, tokenizer, ds) -> pd.DataFrame:
    """`reference_scores` of notebook 02's trained models on ``ds``, computed once per run (a re-opened run
    shows the stored scores)."""
    def score() -> list[dict]:
        with run.timer("reference_scores"):
            return reference_scores(model_paths, tokenizer, ds).to_dict("records")

    return pd.DataFrame(run.once("reference_scores", score),
                        columns=["model", "family", "shape", "problems", "reproduced"])


def results_frame(results: dict) -> pd.DataFrame:
    """One row per trained model of `fit`'s records, the training log left out."""
    return pd.DataFrame({kind: {k: v for k, v in r.items() if k != "log"} for kind, r in results.items()}).T


def reproduced_share(scores, kind: str) -> float | None:
    """The overall share of `reference_scores` for one model, None where nothing was scored."""
    row = scores[(scores.model == kind) & (scores.family == "all")]
    return float(row.reproduced.iloc[0]) if len(row) else None
