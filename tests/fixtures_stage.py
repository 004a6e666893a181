"""Throwaway stage configs for the pipeline tests.

The test notebooks import this module too (after putting tests/ on sys.path), so the pytest
process and the papermill kernel see the same registered stages.
"""

from dataclasses import dataclass
from typing import ClassVar

from twlib.config import StageConfig, register_stage


@register_stage
@dataclass(frozen=True, kw_only=True)
class DemoConfig(StageConfig):
    stage: ClassVar[str] = "01_demo"
    n: int = 1

    def validate(self) -> None:
        self._check(self.n >= 0, "n", "must be >= 0")


@register_stage
@dataclass(frozen=True, kw_only=True)
class DemoNextConfig(StageConfig):
    stage: ClassVar[str] = "02_demo"
