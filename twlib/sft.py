"""Trie-packed SFT on TRL's ``SFTTrainer`` (paper §3.2; DESIGN §5), and the sequential baseline.

Both models go through the same code: a trajectory becomes a trie (`twlib.trie`), tries are packed
into rows up to a token budget, and a collator turns rows into ids, tree position ids, an additive
4D ancestor mask and pre-shifted labels. The sequential baseline's trajectories have no blocks, so
their trie is a plain path and the mask is plain causal (with packing).

Rows store only 1D arrays (ids, positions, exit times, labels); masks are built per batch.

>>> from twlib.tokenizer import build_char_tokenizer
>>> tok = build_char_tokenizer()
>>> row = trajectory_tries([{"question": "1", "text": "<think>\\n</think>\\n\\n\\\\boxed{1}"}], tok)[0]
>>> row.position_ids[:3], row.labels[-1]
([0, 1, 2], -100)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from . import format as fmt
from .trie import IGNORE, Objective, PackedTrie, collate, pack_rows, pack_trajectory
from .tokenizer import prompt_ids

ROW_COLUMNS = ("input_ids", "position_ids", "exit", "labels")


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


def rows_dataset(tries: Sequence[PackedTrie], max_tokens: int):
    """Pack tries into rows of at most ``max_tokens`` positions → HF ``Dataset`` of 1D arrays."""
    from datasets import Dataset

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


@dataclass
class TrieCollator:
    """Rows → ``input_ids``, ``position_ids``, 4D float ``attention_mask``, ``labels``/``shift_labels``.

    ``labels`` and ``shift_labels`` are the same pre-shifted tensor: transformers computes the loss
    only when ``labels`` is given and then uses ``shift_labels`` as is (no flat-order shift).
    """
    pad_token_id: int
    dtype: str = "float32"
    pad_to_multiple_of: int = 8

    def __call__(self, records: list[dict]) -> dict:
        import torch

        rows = [row_from_record(r) for r in records]
        length = max(len(r) for r in rows)
        length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = collate(rows, self.pad_token_id, length, getattr(torch, self.dtype))
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


def make_trainer(model, tokenizer, train_rows, output_dir: str | Path, settings: TrainSettings,
                 use_cpu: bool = True):
    """TRL ``SFTTrainer`` over pre-packed rows with the trie collator."""
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        output_dir=str(output_dir), max_steps=settings.max_steps,
        per_device_train_batch_size=settings.per_device_train_batch_size,
        learning_rate=settings.learning_rate, warmup_steps=settings.warmup_steps,
        weight_decay=settings.weight_decay, lr_scheduler_type=settings.lr_scheduler_type,
        logging_steps=settings.logging_steps, save_steps=settings.save_steps, save_total_limit=2,
        seed=settings.seed, data_seed=settings.seed, bf16=settings.bf16, use_cpu=use_cpu,
        # Rows are already tokenised, packed trees: TRL must neither re-tokenise nor drop columns.
        dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False, max_length=None,
        gradient_checkpointing=False, report_to="none", dataloader_num_workers=0,
    )
    return SFTTrainer(model=model, args=args, train_dataset=train_rows, processing_class=tokenizer,
                      data_collator=TrieCollator(tokenizer.pad_token_id, "bfloat16" if settings.bf16 else "float32"))


def last_checkpoint(output_dir: str | Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(output_dir)) if Path(output_dir).is_dir() else None


def train(trainer) -> list[dict]:
    """Train, resuming from the newest checkpoint in ``output_dir`` if one exists; returns the log."""
    trainer.train(resume_from_checkpoint=last_checkpoint(trainer.args.output_dir))
    return [dict(r) for r in trainer.state.log_history]


def loss_history(log: list[dict]):
    """``step``, ``loss``, ``learning_rate`` rows of a trainer log (pandas)."""
    import pandas as pd

    rows = [{"step": r["step"], "loss": r["loss"], "learning_rate": r.get("learning_rate")}
            for r in log if "loss" in r]
    return pd.DataFrame(rows)


def train_model(kind: str, cfg, tokenizer, train_ds, run) -> dict:
    """Train the ``"parallel"`` or ``"sequential"`` model of notebook 02 end to end.

    Checkpoints go to ``<run>/<kind>_checkpoints`` (an interrupted run resumes from the newest);
    the final model to ``<run>/<kind>_model`` (HF format, loadable by transformers and vLLM).
    Returns ``{"log", "model_path", "parameters", "rows", "trajectories", "trained_tokens"}``.
    """
    from .models import build_tiny_model, count_parameters, save_model

    examples = dataset_examples(train_ds, parallel=kind == "parallel")
    objective = cfg.objective if kind == "parallel" else "corrected"
    rows = rows_dataset(trajectory_tries(examples, tokenizer, objective), cfg.row_tokens)
    model = build_tiny_model(tokenizer, cfg.model_spec(), seed=cfg.seed)
    trainer = make_trainer(model, tokenizer, rows, run.path(f"{kind}_checkpoints"), cfg.train_settings())
    with run.timer(f"train_{kind}"):
        log = train(trainer)
    path = save_model(model, tokenizer, run.path(f"{kind}_model"), overwrite=True)
    trained = sum(sum(1 for lab in r if lab != IGNORE) for r in rows["labels"])
    return {"log": log, "model_path": str(path), "parameters": count_parameters(model), "rows": len(rows),
            "trajectories": len(examples), "trained_tokens": trained}


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
    import torch

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
    import pandas as pd

    from .models import load_model

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


def example_with_block(ds, index: int = 0) -> dict:
    """The shortest parallel CoT with a block among the 20 rows from ``index`` (for drawing a trie)."""
    rows = [r for r in ds.select(range(index, min(len(ds), index + 20))) if r["num_blocks"] > 0]
    if not rows:
        raise ValueError(f"no parallel trajectory among training rows {index}..{index + 19}")
    row = min(rows, key=lambda r: r["par_total_tokens"])
    return {"question": row["question"], "text": row["completion"][0]["content"]}
