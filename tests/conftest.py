"""Fixtures several test modules share."""
from pathlib import Path

import pytest
import yaml

from twlib import pipeline

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def smoke_outputs(tmp_path_factory):
    """The smoke profile's notebooks run once through the real pipeline into a temporary output root:
    ``(outputs/smoke folder, the profile as a dict)``."""
    out = tmp_path_factory.mktemp("outputs")
    params = tmp_path_factory.mktemp("params") / "smoke.yaml"
    spec = yaml.safe_load((ROOT / "params" / "smoke.yaml").read_text())
    spec["output_root"] = str(out)
    params.write_text(yaml.safe_dump(spec))
    assert pipeline.main([str(params)]) == 0
    return out / "smoke", spec
