"""Run a vLLM script in its own process (vLLM starts workers; the script needs a __main__ guard)."""
import json
import os
import subprocess
import sys


def run_vllm_script(tmp_path, source: str, *args: str):
    """Write ``source`` to a file, run it with ``args``, return the JSON it printed after ``RESULT ``."""
    script = tmp_path / "vllm_script.py"
    script.write_text(source)
    proc = subprocess.run([sys.executable, str(script), *args], env=os.environ | {"VLLM_CPU_KVCACHE_SPACE": "1"},
                          timeout=600, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])
