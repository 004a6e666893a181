"""``python -m twlib.bench sft``: notebook 02's training step through the real trainer, fp32 vs bf16 autocast, side
by side in one run on the same rows of the profile's training data (both models): seconds per step after a
warm-up, the first logged losses of each precision, and the seconds to build and pack the tries (needs
notebook 01's data)."""
from __future__ import annotations

import dataclasses
import tempfile
import time
from typing import Iterator

from .. import models, sft
from ..config import Profile
from ..dataset import load_parquet
from ..tokenizer import load_tokenizer
from .common import StepClock, outputs


def run(profile: Profile, n_trajectories: int = 1000, steps: int = 30, warmup: int = 5) -> Iterator[dict]:
    """Notebook 02's trainer step in fp32 and under bf16 autocast on the same packed rows, both models."""

    cfg = profile.stage_config("02_trie_sft")
    root = outputs(profile) / "01_trajectories"
    if not (root / "data").is_dir():
        raise SystemExit(f"no training data at {root / 'data'}: run notebook 01 of this profile first")
    tok = load_tokenizer(root / "tokenizer")
    ds = load_parquet(root / "data", splits=("train",))["train"]
    ds = ds.select(range(min(n_trajectories, len(ds))))

    for kind in ("sequential", "parallel"):
        t0 = time.perf_counter()
        tries = sft.trajectory_tries(sft.dataset_examples(ds, parallel=kind == "parallel"), tok)
        t1 = time.perf_counter()
        rows = sft.rows_dataset(tries, cfg.row_tokens)
        t2 = time.perf_counter()
        record = {"bench": "sft", "profile": profile.name, "model": kind, "trajectories": len(tries),
                  "rows": len(rows), "build_tries_seconds": round(t1 - t0, 2), "pack_rows_seconds": round(t2 - t1, 2),
                  "steps_timed": steps - warmup}
        for precision in ("fp32", "bf16"):
            model = models.build_tiny_model(tok, models.model_spec(cfg), seed=cfg.seed)
            settings = dataclasses.replace(sft.train_settings(cfg), max_steps=steps, logging_steps=1,
                                           save_steps=steps + 1, bf16=precision == "bf16", warmup_steps=0)
            with tempfile.TemporaryDirectory() as out:
                trainer = sft.make_trainer(model, tok, rows, out, settings)
                clock = StepClock()
                trainer.add_callback(clock)
                log = sft.train(trainer)
            record[f"{precision}_seconds_per_step"] = round(sum(clock.times[warmup:]) / (steps - warmup), 4)
            record[f"{precision}_first_losses"] = [round(r["loss"], 4) for r in log if "loss" in r][:3]
        record["bf16_speedup"] = round(record["fp32_seconds_per_step"] / record["bf16_seconds_per_step"], 3)
        yield record
