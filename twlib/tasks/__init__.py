"""Synthetic task families and their datasets (docs/design.md §9).

Every family turns an RNG into a `Problem` whose `Plan` renders both CoTs. Splits are assigned by
a hash of the question, so the same question can never land in two splits, whatever the seed.

>>> import random
>>> p = make_problem("products", random.Random(0), ProductParams(factors_min=2, factors_max=2))
>>> p.shape, p.answer == str(eval(p.question))
('pair', True)
"""
from __future__ import annotations

import dataclasses
import hashlib
import random
from dataclasses import dataclass, field
from typing import Callable

from .expressions import ExpressionParams, make_expression_problem
from .plan import Fork, Group, Plan
from .problem import Problem
from .products import ProductParams, make_product_problem

FAMILIES: dict[str, Callable] = {"expressions": make_expression_problem, "products": make_product_problem}
SPLITS = ("train", "validation", "test")


def make_problem(family: str, rng: random.Random, params) -> Problem:
    if family not in FAMILIES:
        raise ValueError(f"unknown task family {family!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[family](rng, params)


def split_of(question: str, fractions: tuple[float, float, float]) -> str:
    """Deterministic split from a hash of the question text."""
    h = int.from_bytes(hashlib.sha256(question.encode()).digest()[:8], "big") / 2 ** 64
    acc = 0.0
    for name, f in zip(SPLITS, fractions):
        acc += f
        if h < acc:
            return name
    return SPLITS[-1]


@dataclass
class TaskMix:
    """Which families, in which proportions, with which parameters."""
    families: list[str]
    weights: list[float]
    params: dict[str, object] = field(default_factory=dict)

    def __post_init__(self):
        for f in self.families:
            if f not in FAMILIES:
                raise ValueError(f"unknown task family {f!r}; known: {sorted(FAMILIES)}")
        if len(self.weights) != len(self.families):
            raise ValueError("family_weights must have one weight per family")

    def sample(self, rng: random.Random) -> Problem:
        family = rng.choices(self.families, weights=self.weights)[0]
        return make_problem(family, rng, self.params[family])


def task_mix(cfg) -> TaskMix:
    """The task mix of notebook 01's parameters (`twlib.config.TrajectoriesConfig`).

    >>> from twlib.config import TrajectoriesConfig
    >>> task_mix(TrajectoriesConfig(profile="p")).families
    ['expressions', 'products']
    """
    params = {
        "expressions": ExpressionParams(
            balanced_fraction=cfg.expr_balanced_fraction, groups_min=cfg.expr_groups_min,
            groups_max=cfg.expr_groups_max, repeats_min=cfg.expr_repeats_min,
            repeats_max=cfg.expr_repeats_max, chain_repeats_min=cfg.expr_chain_repeats_min,
            chain_repeats_max=cfg.expr_chain_repeats_max),
        "products": ProductParams(factors_min=cfg.prod_factors_min, factors_max=cfg.prod_factors_max,
                                  factor_min=cfg.prod_factor_min, factor_max=cfg.prod_factor_max),
    }
    return TaskMix(list(cfg.families), list(cfg.family_weights), params)


def short_task_mix(cfg) -> TaskMix:
    """Notebook 01's extra short training problems: 1..``short_repeats_max`` additions per sub-expression and
    ``expr_groups_min``..``short_groups_max`` sub-expressions."""
    n = cfg.short_repeats_max
    return TaskMix(["expressions"], [1.0], {"expressions": ExpressionParams(
        balanced_fraction=cfg.expr_balanced_fraction, groups_min=cfg.expr_groups_min,
        groups_max=cfg.short_groups_max, repeats_min=1, repeats_max=n, chain_repeats_min=1,
        chain_repeats_max=n)})


def generate_splits(mix: TaskMix, sizes: dict[str, int], seed: int,
                    progress: Callable[[int], None] | None = None,
                    max_tries_factor: int = 200) -> dict[str, list[Problem]]:
    """Draw problems until every split has its size; duplicates are dropped, splits are disjoint.

    Hash fractions follow the requested sizes so few draws are wasted.
    """
    total = sum(sizes.values())
    fractions = tuple(sizes[s] / total for s in SPLITS)
    rng = random.Random(seed)
    out: dict[str, list[Problem]] = {s: [] for s in SPLITS}
    seen: set[str] = set()
    for _ in range(max_tries_factor * max(total, 1)):
        if all(len(out[s]) >= sizes[s] for s in SPLITS):
            break
        p = mix.sample(rng)
        if p.question in seen:
            continue
        seen.add(p.question)
        split = split_of(p.question, fractions)
        if len(out[split]) < sizes[split]:
            out[split].append(p)
            if progress:
                progress(1)
    else:
        short = {s: (len(out[s]), sizes[s]) for s in SPLITS if len(out[s]) < sizes[s]}
        raise ValueError(f"could not draw enough distinct problems (have, want): {short}; "
                         "the task parameters allow too few distinct questions")
    return out


def short_training_problems(problems: dict[str, list[Problem]], sizes: dict[str, int], mix: TaskMix, n: int,
                            seed: int, progress: Callable[[int], None] | None = None,
                            max_tries_factor: int = 200) -> list[Problem]:
    """``n`` extra training problems drawn from ``mix``, their shape prefixed ``short-``.

    Short problems carry the same lookups in a fraction of the context (a denser training signal for
    them; the README's learnability section measures the effect). Each one hashes to the train split under
    the fractions of ``sizes`` and is new, so the splits stay disjoint.

    >>> mix = TaskMix(["expressions"], [1.0], {"expressions": ExpressionParams(repeats_max=2, repeats_min=1)})
    >>> extra = short_training_problems({"train": []}, {"train": 9, "validation": 1, "test": 0}, mix, 3, seed=0)
    >>> len(extra), extra[0].shape.startswith("short-")
    (3, True)
    """
    total = sum(sizes.values())
    fractions = tuple(sizes[s] / total for s in SPLITS)
    seen = {p.question for items in problems.values() for p in items}
    rng = random.Random(f"short-{seed}")
    out: list[Problem] = []
    for _ in range(max_tries_factor * max(n, 1)):
        if len(out) >= n:
            return out
        p = mix.sample(rng)
        if p.question in seen or split_of(p.question, fractions) != "train":
            continue
        seen.add(p.question)
        out.append(dataclasses.replace(p, shape=f"short-{p.shape}"))
        if progress:
            progress(1)
    if len(out) < n:
        raise ValueError(f"could not draw {n} distinct short training problems (have {len(out)}); "
                         "raise short_repeats_max or lower n_train_short")
    return out


def coarsen_threads(problems: list[Problem], fraction: float, seed: int) -> list[Problem]:
    """A ``fraction`` of ``problems`` (drawn with ``seed``) get `Plan.coarsened` parallel CoTs, shape
    suffixed ``-coarse``. Training on both granularities leaves the choice to the model, so RL's
    acceleration reward has a finer split to prefer (paper §3.3: RL raises parallelism).

    >>> mix = TaskMix(["expressions"], [1.0], {"expressions": ExpressionParams(balanced_fraction=1.0)})
    >>> out = coarsen_threads([mix.sample(random.Random(0))], 1.0, seed=0)
    >>> out[0].shape, out[0].plan.max_threads
    ('balanced-coarse', 2)
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"coarse fraction must be in [0, 1], got {fraction}")
    rng = random.Random(f"coarse-{seed}")
    out = []
    for p in problems:
        if rng.random() < fraction and p.plan.coarsened() != p.plan:
            p = dataclasses.replace(p, plan=p.plan.coarsened(), shape=f"{p.shape}-coarse")
        out.append(p)
    return out


def check_disjoint(questions_by_split: dict[str, list[str]]) -> None:
    """Raise if any question appears in two splits (or twice in one)."""
    owner: dict[str, str] = {}
    for split, qs in questions_by_split.items():
        for q in qs:
            if q in owner:
                raise ValueError(f"question {q!r} appears in {owner[q]} and {split}")
            owner[q] = split


__all__ = ["ExpressionParams", "ProductParams", "Problem", "Plan", "Fork", "Group", "TaskMix", "task_mix", "short_task_mix",
           "FAMILIES", "SPLITS", "make_problem", "generate_splits", "short_training_problems", "coarsen_threads", "split_of",
           "check_disjoint"]
