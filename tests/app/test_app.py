"""The demo app (examples/app.py) driven by a real headless Chromium.

For each UI (Gradio, and the standard-library fallback) the app is started in a subprocess on a
free 127.0.0.1 port with the tiny offline pipeline; Chromium types a prompt, clicks Generate and
waits for the image, the plan text and the memory report. Every request the page makes to a host
other than 127.0.0.1 is blocked and recorded, and the test fails if there was one: the app must work
offline. A screenshot is saved under tests/app/artifacts/ (gitignored).

Needs Debian's ``chromium`` (``apt-get install -y chromium``; or set ``VRAMKIT_CHROMIUM`` to another
Chromium/Chrome binary) and the ``playwright`` Python package (``pip install playwright``; no
``playwright install``: the system Chromium is used). Skips with the reason when either is missing.
The Gradio case also needs ``gradio`` (``pip install "vramkit[app]"``).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "examples" / "app.py"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
START_TIMEOUT = 120  # seconds for the app to import torch/diffusers/gradio and serve on 2 cores
GENERATE_TIMEOUT = 60_000  # ms for a click to produce the image


def _chromium() -> str | None:
    for candidate in (os.environ.get("VRAMKIT_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser"), shutil.which("google-chrome")):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


CHROMIUM = _chromium()
HAVE_PLAYWRIGHT = importlib.util.find_spec("playwright") is not None
HAVE_GRADIO = importlib.util.find_spec("gradio") is not None

pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium: apt-get install -y chromium (or set VRAMKIT_CHROMIUM)"),
    pytest.mark.skipif(not HAVE_PLAYWRIGHT, reason="the playwright package is missing: pip install playwright"),
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               GRADIO_SERVER_NAME="127.0.0.1")
    import vramkit

    src = str(Path(vramkit.__file__).resolve().parents[1])  # works for an installed or a source checkout
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _wait_until_serving(proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the app exited with {proc.returncode} before serving:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    pytest.fail(f"the app did not serve {url} within {START_TIMEOUT} s:\n{log.read_text()[-4000:]}")


def _listening_addresses(pid: int) -> set[str]:
    import psutil

    procs = [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
    return {c.laddr.ip for p in procs for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}


@pytest.fixture
def app_server(request: pytest.FixtureRequest):
    ui = request.param
    ARTIFACTS.mkdir(exist_ok=True)
    port = _free_port()
    log = ARTIFACTS / f"app_{ui}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, str(APP), "--port", str(port), "--ui", ui],
                                cwd=ROOT, env=_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/"
        _wait_until_serving(proc, url, log)
        yield ui, url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


def _drive(page, ui: str) -> tuple[str, str]:
    """Type a prompt, click Generate, wait for the image; return (plan text, memory text)."""
    if ui == "gradio":
        page.locator("#prompt textarea").fill("a lighthouse at dusk, oil painting")
        page.locator("#generate").click()
        page.locator("#result img").first.wait_for(state="visible", timeout=GENERATE_TIMEOUT)
        page.wait_for_function(
            "() => (document.querySelector('#plan textarea')?.value || '').includes('vramkit plan')",
            timeout=GENERATE_TIMEOUT,
        )
        return page.locator("#plan textarea").input_value(), page.locator("#memory textarea").input_value()
    page.locator("#prompt").fill("a lighthouse at dusk, oil painting")
    page.locator("#generate").click()
    page.wait_for_function(
        "() => document.querySelector('#result').src.startsWith('data:image/png')"
        " && document.querySelector('#plan').textContent.includes('vramkit plan')",
        timeout=GENERATE_TIMEOUT,
    )
    return page.locator("#plan").inner_text(), page.locator("#memory").inner_text()


@pytest.mark.parametrize(
    "app_server",
    [
        pytest.param("gradio", marks=pytest.mark.skipif(not HAVE_GRADIO, reason="gradio is missing: "
                                                         "pip install 'vramkit[app]'")),
        "stdlib",
    ],
    indirect=True,
)
def test_app_in_headless_chromium(app_server) -> None:
    from playwright.sync_api import sync_playwright

    ui, url, proc = app_server
    assert _listening_addresses(proc.pid) <= {"127.0.0.1"}, "the app must listen on 127.0.0.1 only"
    external: list[str] = []

    def offline_only(route, req) -> None:  # type: ignore[no-untyped-def]
        host = urlsplit(req.url).hostname
        if req.url.startswith(("data:", "blob:")) or host in ("127.0.0.1", "localhost"):
            route.continue_()
        else:
            external.append(req.url)
            route.abort()

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            page.route("**/*", offline_only)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(url, wait_until="load", timeout=60_000)
            plan_text, memory_text = _drive(page, ui)
            page.screenshot(path=str(ARTIFACTS / f"app_{ui}.png"), full_page=True)
            natural = page.evaluate(
                "(sel) => { const i = document.querySelector(sel); return [i.naturalWidth, i.naturalHeight]; }",
                "#result img" if ui == "gradio" else "#result",
            )
        finally:
            browser.close()
    assert "vramkit plan" in plan_text
    assert "Resident" in plan_text or "no steps" in plan_text  # the tiny pipeline fits the stand-in budget
    assert "full-size flux-dev" in plan_text  # the comparison plan for the real model
    assert "denoising_step" in memory_text
    assert list(natural) == [32, 32], f"the image is {natural}, expected the tiny default 32x32"
    assert not external, f"the page tried to reach other hosts (blocked): {external}"
    assert not errors, f"JavaScript errors on the page: {errors}"
