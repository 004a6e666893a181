"""Typed parameters for the notebooks and the params/<profile>.yaml files that feed them.

The bottom of the kit's configuration flow (docs/design.md §10): `core` holds the machinery (a frozen
dataclass per stage, checked with errors that name the parameter, and the profile loader); `knobs`
holds the knob groups several stages share; `stages` the stage configs. Neither imports a stage module.

>>> from twlib.config import STAGE_CONFIGS
>>> STAGE_CONFIGS["02_trie_sft"].from_dict({"profile": "smoke", "max_steps": 4}).max_steps
4
"""
from .core import (
                   NOTEBOOK_KEYS,
                   STAGE_CONFIGS,
                   ConfigError,
                   KnobGroup,
                   Profile,
                   StageConfig,
                   load_profile,
                   profile_path,
                   register_stage,
)
from .knobs import LaunchKnobs, OrchestratorLimits, RewardKnobs
from .stages import (
                   EvaluationConfig,
                   PGRPOConfig,
                   RewritingConfig,
                   SelfTrainingConfig,
                   TrajectoriesConfig,
                   TrieSFTConfig,
)

__all__ = ["ConfigError", "KnobGroup", "StageConfig", "STAGE_CONFIGS", "register_stage", "Profile", "load_profile",
           "profile_path", "NOTEBOOK_KEYS",
           "OrchestratorLimits", "RewardKnobs", "LaunchKnobs", "TrajectoriesConfig", "RewritingConfig", "TrieSFTConfig",
           "SelfTrainingConfig", "PGRPOConfig", "EvaluationConfig"]
