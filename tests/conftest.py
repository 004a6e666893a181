"""Fixtures several test modules share."""

import pytest
from profile_runs import run_profile_into_tmp


@pytest.fixture(scope="session")
def smoke_outputs(tmp_path_factory):
    """The smoke profile's notebooks run once through the real pipeline into a temporary output root:
    ``(outputs/smoke folder, the profile as a dict)``."""
    return run_profile_into_tmp(tmp_path_factory, "smoke")
