"""What several benchmarks share: where a profile's outputs are, a trainer step clock, a timed training loop."""
from __future__ import annotations

import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from ..config import Profile
from ..runs import profile_dir


def outputs(profile: Profile) -> Path:
    """The profile's output folder ``<output_root>/<profile>`` (each stage's folder is below it)."""
    return profile_dir(profile.output_root, profile.name)


class StepClock(TrainerCallback):
    """Appends each optimiser step's seconds to ``times`` (CUDA synchronised when ``cuda``)."""

    def __init__(self, cuda: bool = False):
        self.cuda = cuda
        self.times: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        if self.cuda:
            torch.cuda.synchronize()
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.cuda:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self.t0)


def time_training(model, batches, repeats: int = 1) -> float:
    """Seconds for forward + backward over ``batches`` (after one warm-up batch)."""

    def step(batch):
        out = model(**{k: v for k, v in batch.items() if k != "shift_labels"})
        out.loss.backward()
        model.zero_grad(set_to_none=True)

    step(batches[0])
    t0 = time.perf_counter()
    for _ in range(repeats):
        for batch in batches:
            step(batch)
    return (time.perf_counter() - t0) / repeats
