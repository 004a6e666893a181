"""The knob groups several stages share, declared and checked once (docs/design.md §10).

A stage config inherits a group to carry its knobs; a stage may give them other defaults.

>>> RewardKnobs().clip
0.2
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from .core import Check, KnobGroup

__all__ = ["OrchestratorLimits", "RewardKnobs", "LaunchKnobs"]


@dataclass(frozen=True, kw_only=True)
class OrchestratorLimits(KnobGroup):
    """The orchestrator's guards (docs/design.md §6); budgets count response tokens, inserted ones included.

    Stages that run the orchestrator (03, 04, 05) carry these knobs; a stage may give them other defaults.
    """
    max_new_tokens: int = 1024
    max_thread_tokens: int = 512
    max_threads: int = 8
    max_blocks: int = 8

    def knob_checks(self) -> Iterator[Check]:
        yield from super().knob_checks()
        for name in ("max_new_tokens", "max_thread_tokens", "max_threads"):
            yield getattr(self, name) >= 1, name, "must be >= 1"
        yield self.max_blocks >= 0, "max_blocks", "must be >= 0"


@dataclass(frozen=True, kw_only=True)
class RewardKnobs(KnobGroup):
    """The P-GRPO reward (docs/design.md §8): ``r = 1 + rho · min(acceleration_ratio, clip)`` when correct,
    else ``incorrect_reward``."""
    rho: float = 0.5
    clip: float = 0.2
    incorrect_reward: float = 0.0

    def knob_checks(self) -> Iterator[Check]:
        yield from super().knob_checks()
        yield self.rho >= 0, "rho", "must be >= 0"
        yield 0 <= self.clip <= 1, "clip", "must be in [0, 1] (an acceleration ratio)"


@dataclass(frozen=True, kw_only=True)
class LaunchKnobs(KnobGroup):
    """Training in several processes (docs/design.md §10): empty ``accelerate_config`` trains in the notebook's
    own process; a name of ``configs/accelerate/`` or a file hands the job to ``accelerate launch``. On CPU,
    ``concurrent_jobs`` > 1 trains that many of a stage's models side by side, each in a process of its own
    with an equal share of the cores (a small model uses two cores poorly)."""
    accelerate_config: str = ""
    num_processes: int = 0
    concurrent_jobs: int = 1

    def knob_checks(self) -> Iterator[Check]:
        yield from super().knob_checks()
        yield self.num_processes >= 0, "num_processes", "must be >= 0 (0: the accelerate config's count)"
        yield (self.num_processes == 0 or bool(self.accelerate_config), "num_processes",
               "needs an accelerate_config (several processes are started by accelerate launch)")
        yield self.concurrent_jobs >= 1, "concurrent_jobs", "must be >= 1 (1: one model after the other)"
        yield (self.concurrent_jobs == 1 or not self.accelerate_config, "concurrent_jobs",
               "must be 1 with an accelerate_config (each launched job already uses every device)")
