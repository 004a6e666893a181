"""Rewards for P-GRPO (paper §3.3, docs/design.md §8): correctness plus an acceleration bonus when correct.

``r = r_correct + rho * min(acceleration_ratio, clip)`` if the answer is right, else
``incorrect_reward``. ``acceleration_ratio = 1 - critical_path_tokens / total_tokens`` (docs/design.md §7), so
a sequential answer earns no bonus and the bonus saturates at ``rho * clip`` (0.1 by default).

>>> cfg = RewardConfig()
>>> score("<think>\\nx\\n</think>\\n\\n\\\\boxed{7}", "7", acceleration_ratio=0.45, config=cfg).total
1.1
>>> score("<think>\\nx\\n</think>\\n\\n\\\\boxed{3}", "7", acceleration_ratio=0.45, config=cfg).total
0.0
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .config import PGRPOConfig, RewardKnobs
from .grading import grade


@dataclass(frozen=True, kw_only=True)
class RewardConfig(RewardKnobs):
    """The reward knobs (``rho``, ``clip``, ``incorrect_reward``: 0, where the official code used -1) plus
    ``acceleration=False``, the ablation without the bonus, and ``strip_commas``, which reads ``1,000`` as ``1000``."""
    acceleration: bool = True
    strip_commas: bool = False

    @classmethod
    def for_stage(cls, cfg: PGRPOConfig) -> "RewardConfig":
        """The reward of notebook 04's parameters (`twlib.config.PGRPOConfig`)."""
        return cls(rho=cfg.rho, clip=cfg.clip, incorrect_reward=cfg.incorrect_reward,
                   acceleration=cfg.acceleration_reward)


@dataclass(frozen=True)
class RewardParts:
    """One sample's reward and its components (what the trainer logs per sample)."""
    correct: bool
    correctness: float
    acceleration: float

    @property
    def total(self) -> float:
        return round(self.correctness + self.acceleration, 12)


def score(response_text: str, gold: str, acceleration_ratio: float, config: RewardConfig) -> RewardParts:
    """Reward of one response; ``acceleration_ratio`` comes from the orchestrator's §7 metrics."""
    correct = grade(response_text, gold, strip_commas=config.strip_commas).correct
    if not correct:
        return RewardParts(False, config.incorrect_reward, 0.0)
    bonus = config.rho * min(max(acceleration_ratio, 0.0), config.clip) if config.acceleration else 0.0
    return RewardParts(True, 1.0, bonus)


def reward_function(config: RewardConfig):
    """A TRL reward function: ``f(prompts, completions, completion_ids, **columns) -> list[float]``.

    It reads the rollout's joined ``response_text`` and ``acceleration_ratio`` (extra fields of the
    P-GRPO rollout) and the dataset's ``answer`` column — TRL's ``completions`` hold the flattened trie,
    which is not the text a reader would grade. Components go to TRL's per-sample log when it offers one.
    """
    def parallel_reward(prompts, completions, completion_ids, answer: Sequence[str],
                        response_text: Sequence[str], acceleration_ratio: Sequence[float],
                        log_extra=None, log_metric=None, **_) -> list[float]:
        parts = [score(t, a, r, config) for t, a, r in zip(response_text, answer, acceleration_ratio)]
        if log_extra is not None:
            log_extra("correct", [p.correct for p in parts])
            log_extra("acceleration_reward", [p.acceleration for p in parts])
        if log_metric is not None:
            log_metric("accuracy", sum(p.correct for p in parts) / len(parts))
            log_metric("acceleration_reward", sum(p.acceleration for p in parts) / len(parts))
        return [p.total for p in parts]

    return parallel_reward
