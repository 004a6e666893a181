"""A profile run by the real pipeline into a temporary output root (shared by conftest and the rehearsal test)."""
from pathlib import Path

import yaml

from twlib import pipeline

ROOT = Path(__file__).resolve().parents[1]


def run_profile_into_tmp(tmp_path_factory, profile: str) -> tuple[Path, dict]:
    """``params/<profile>.yaml`` run by the real pipeline into a temporary output root:
    ``(outputs/<profile> folder, the profile as a dict)``."""
    out = tmp_path_factory.mktemp("outputs")
    params = tmp_path_factory.mktemp("params") / f"{profile}.yaml"
    spec = yaml.safe_load((ROOT / "params" / f"{profile}.yaml").read_text())
    spec["output_root"] = str(out)
    params.write_text(yaml.safe_dump(spec))
    assert pipeline.main([str(params)]) == 0
    return out / profile, spec
