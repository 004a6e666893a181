"""A person in JupyterLab, in a real browser: Debian's Chromium driven by Playwright (no browser download).

JupyterLab serves a copy of the repository's notebooks, params and project file from a temporary folder on
127.0.0.1. Opening notebook 01 must not modify it on disk; with ``profile = "smoke"`` typed into its
parameters cell, Run All through the menu finishes every cell without an error output and renders figures.
A screenshot is saved in the test's temporary folder. The `browser` marker's tests fail, not skip, when
Chromium is missing: `make test` installs it from Debian's packages.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Flags for a headless Chromium on a machine without network or display (its background services fail).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]

pytestmark = [pytest.mark.browser, pytest.mark.notebooks]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab on 127.0.0.1 over a copy of the repository's notebooks, params and pyproject.toml."""
    if not Path(CHROMIUM).is_file():
        pytest.fail("Chromium is missing: install Debian's package (apt-get install -y chromium); `make test` does")
    home = tmp_path_factory.mktemp("lab-root")
    for name in ("notebooks", "params"):
        shutil.copytree(ROOT / name, home / name)
    shutil.copy(ROOT / "pyproject.toml", home)
    port, token = _free_port(), "tw-test-token"
    log = open(home / "lab.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root", "--ip=127.0.0.1",
                             f"--port={port}", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={home}",
                             "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
                            stdout=log, stderr=subprocess.STDOUT, env=os.environ | {"JUPYTER_PLATFORM_DIRS": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.5)
    try:
        yield home, url, token
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _run_all_and_save(page) -> None:
    page.click("text=Run", timeout=30_000)
    page.click("text=Run All Cells", timeout=30_000)
    page.wait_for_timeout(2000)
    # Every input prompt shows its number once executed; "[*]" while running, " " before.
    page.wait_for_function("""() => {
        const prompts = [...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt')];
        return prompts.length > 0 && prompts.every(p => /\\[\\d+\\]/.test(p.textContent));
    }""", timeout=900_000, polling=2000)
    page.keyboard.press("Control+s")
    page.wait_for_timeout(3000)


def test_notebook_01_in_jupyterlab(lab, tmp_path):
    from playwright.sync_api import sync_playwright

    home, url, token = lab
    notebook = home / "notebooks" / "01_trajectories.ipynb"
    committed = notebook.read_bytes()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{url}/lab/tree/notebooks/01_trajectories.ipynb?token={token}", timeout=120_000)
        page.wait_for_selector(".jp-Notebook .jp-CodeCell", timeout=120_000)
        page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000)
        page.wait_for_timeout(5000)  # let Lab settle (kernel info, metadata) before looking at the file
        assert notebook.read_bytes() == committed, "merely opening the notebook modified it on disk"
        params = page.locator(".jp-CodeCell").nth(0).locator(".cm-content")
        params.click()
        page.keyboard.press("Control+Home")
        page.keyboard.press("Shift+End")
        page.keyboard.insert_text('profile: str = "smoke"  # the CI-sized profile')
        _run_all_and_save(page)
        images = page.locator(".jp-OutputArea-output img").count()
        if page.locator("text=Would you like to get notified").count():
            page.locator(".jp-Notification-Toast-Close:visible, button:has-text('No'):visible").first.click()
        page.locator(".jp-OutputArea-output img").first.scroll_into_view_if_needed()
        page.screenshot(path=str(tmp_path / "lab-notebook-01.png"))
        browser.close()
    saved = json.loads(notebook.read_text())
    outputs = [o for c in saved["cells"] if c["cell_type"] == "code" for o in c["outputs"]]
    assert not [o for o in outputs if o["output_type"] == "error"], "a cell failed"
    assert images >= 2 and sum("image/png" in o.get("data", {}) for o in outputs) >= 2
    metrics = json.loads((home / "outputs" / "smoke" / "01_trajectories" / "metrics.json").read_text())
    assert metrics["status"] == "complete" and metrics["params"]["profile"] == "smoke"
    assert metrics["params"]["n_train"] == 60 and metrics["sources"]["n_train"] == "profile"
    assert (tmp_path / "lab-notebook-01.png").stat().st_size > 10_000
