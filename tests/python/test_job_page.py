"""The job page in headless Chromium (Debian's, driven by Playwright) against a real cpt-server whose
local worker trains a tiny model: the page asks for the API token and keeps it out of the HTML and
every URL, its loss chart grows as steps arrive, and its cancel button cancels the job."""

import json
import os
import subprocess
import time
import urllib.request

import pytest
from playwright.sync_api import sync_playwright

from test_hf_parity import TARGET, WORKER, imported  # noqa: F401
from test_openapi import free_port, wait_until_ready
from test_peft_parity import english_dataset, tiny_base

SERVER = TARGET / "release/cpt-server"
CHROMIUM = os.environ.get("CPT_CHROMIUM", "/usr/bin/chromium")
TOKEN = "page-test-token-5f2c"
# As the machine's probe started it: no sandbox as root, and no background connections to refuse.
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


def api(base, method, path, body=None, token=TOKEN):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, method=method, data=data,
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request) as response:
        return json.loads(response.read())


@pytest.fixture
def server(tmp_path, imported):  # noqa: F811
    """A cpt-server with both tokens and one local worker, and a tiny model and dataset under its data root."""
    assert SERVER.exists(), f"{SERVER} is missing: cargo build --release"
    base_model = tiny_base(tmp_path, imported, tied=True, seed=0)
    dataset = english_dataset(tmp_path, imported, 16)
    port = free_port()
    process = subprocess.Popen(
        [str(SERVER), "--data-dir", str(tmp_path / "server"), "--bind", f"127.0.0.1:{port}", "--data-roots", str(tmp_path),
         "--local-workers", "1", "--worker-binary", str(WORKER), "--api-token", TOKEN, "--worker-token", TOKEN],
        stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    wait_until_ready(base, process)
    yield base, base_model, dataset
    process.terminate()
    process.wait(timeout=60)


def loss_points(page):
    """The points of the longest line in the loss chart (the page's CSP allows no evaluated script,
    so this reads attributes rather than running JavaScript in the page)."""
    lines = page.locator("[data-chart=loss] svg polyline").all()
    return max([len((line.get_attribute("points") or "").split()) for line in lines], default=0)


def eventually(check, seconds):
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"not within {seconds} s"
        time.sleep(0.2)


def test_the_job_page_follows_a_running_job_and_cancels_it(server, tmp_path):
    base, base_model, dataset = server
    spec = {"name": "page test", "base_model": str(base_model), "train_data": [{"dataset": str(dataset)}],
            "seq_len": 16, "micro_batch_size": 2, "lr": 1e-3, "max_steps": 100000, "eval_every": 0,
            "checkpoint_every": 0}
    job = api(base, "POST", "/v1/jobs", spec)
    urls = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("request", lambda request: urls.append(request.url))
        page.goto(f"{base}/jobs/{job['id']}")
        # Without the token the API refuses, and so does the page: it asks for the token and shows nothing.
        page.wait_for_selector("#login:not([hidden])")
        assert "page test" not in page.inner_text("#main")
        page.fill("#token", TOKEN)
        page.click("#login button")
        eventually(lambda: loss_points(page) >= 3, 120)
        page.wait_for_selector("h1 .state.running")
        assert TOKEN not in page.content()
        page.click("#cancel")
        page.wait_for_selector("h1 .state.cancelling, h1 .state.cancelled")
        assert api(base, "GET", f"/v1/jobs/{job['id']}")["state"] in ("cancelling", "cancelled")
        page.wait_for_selector("h1 .state.cancelled", timeout=60_000)
        page.screenshot(path=str(tmp_path / "job-page.png"), full_page=True)

        # The list shows it; the token stayed in this tab, never in a URL.
        page.goto(base + "/")
        page.wait_for_selector(f"tr[data-job='{job['id']}'] .state.cancelled")

        # A crafted link whose id decodes into another route (a Cancel there would POST to it with
        # this tab's token) is no page: the script asks the API for nothing.
        before = len(urls)
        page.goto(f"{base}/jobs/..%2Fsweeps%2F{job['id']}")
        page.wait_for_selector("#main .error")
        assert not any("/v1/" in url for url in urls[before:]), urls[before:]
        browser.close()
    assert urls and not any(TOKEN in url for url in urls)
