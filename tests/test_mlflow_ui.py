"""The MLflow UI in a real browser: Debian's chromium, driven by playwright, on the store a
finished digits study leaves, opened at the URL the run prints.

It checks what a user sees: the runs table opens on the trials with their metrics (no
run to expand); following docs/mlflow-ui.md's first step (one click on *Model training*),
a trial and the breadcrumb back stay in the training pages; a refit's Overview shows the
lines that load its model, and the Models tab its model with its test accuracy; the chart
tab shows dtp_search's fronts section: the trials' and the refits' fronts against their
sparsity, the CV and the test scatters and the grid of front images. Screenshots go to
the test's folder, or with ``DTP_SEARCH_UI_SHOTS=docs/img`` to the docs
(docs/mlflow-ui.md uses them).

Both views are checked by one test, on one study built in this process the way the
command line builds it (``inprocess.run_here``): under pytest-xdist two tests could each
build the module's study on a worker of their own.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from inprocess import run_here

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# As in the machine notes: headless, and no background traffic (the network is closed).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
STUDY = [
    "search.n_trials=4",
    "cv.folds=2",
    "train.epochs=3",
    "train.finetune_epochs=1",
    "front.points=4",
    "console.progress=false",
    "refit.top_k=1",
]

OTHER_STUDY = [
    "study.name=other-study",
    "tracking.experiment=digits-lenet300-agp",
    "policy=constant",
    "search.n_trials=1",
    "cv.folds=2",
    "train.epochs=1",
    "train.finetune_epochs=0",
    "front.points=2",
    "console.progress=false",
    "refit.enabled=false",
]

pytestmark = pytest.mark.slow


def _need_browser() -> None:
    missing = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright package")
    if not Path(CHROMIUM).exists():
        missing.append("Debian's chromium")
    if missing:
        if os.environ.get("CI"):  # .ci/run installs both: a skip there would hide a failure
            pytest.fail(f"missing {', '.join(missing)}")
        pytest.skip(
            f"missing {', '.join(missing)} (apt-get install chromium; pip install playwright)"
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """A finished study and ``mlflow ui`` on its store: (base URL, tracker-like info)."""
    _need_browser()
    root = tmp_path_factory.mktemp("ui") / "runs"
    proc = run_here(root, *STUDY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # A second study in the same experiment, run last: the first study's printed links
    # must still show its own runs and columns only.
    other = run_here(root, *OTHER_STUDY)
    assert other.returncode == 0, other.stderr[-3000:]
    port = _free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    # The printed command, on this test's port, with one uvicorn worker instead of four
    # and no job runner (the pages are the same; four start-ups and the runner's seven
    # huey consumers, each importing MLflow, cost tens of CPU-seconds: the runner serves
    # GenAI evaluation jobs, which these pages never submit). In a session of its own,
    # stopped as a group, so that nothing it started outlives the test.
    server = subprocess.Popen(
        [
            str(mlflow),
            "ui",
            "--backend-store-uri",
            f"sqlite:///{root}/mlflow.db",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dict(
            os.environ,
            MLFLOW_DISABLE_TELEMETRY="true",
            MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
        ),
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(base, timeout=2)
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    pytest.fail("mlflow ui did not start")
                time.sleep(1)
        yield base, root, proc.stdout
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)


@pytest.fixture
def page(ui):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1500, "height": 1000})
        yield page
        browser.close()


def _shot(page, tmp_path: Path, name: str) -> None:
    page.screenshot(path=str(tmp_path / name))
    target = os.environ.get("DTP_SEARCH_UI_SHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(target) / name))


def _copy_shot(tmp_path: Path, name: str) -> None:
    target = os.environ.get("DTP_SEARCH_UI_SHOTS")
    if target:
        shutil.copy(tmp_path / name, Path(target) / name)


def _experiment_id(url: str) -> str:
    return url.split("#/experiments/", 1)[1].split("/", 1)[0].split("?", 1)[0]


def _printed_url(stdout: str, base: str, marker: str) -> str:
    """The URL the run printed after ``marker``, pointed at this test's server."""
    line = next(ln for ln in stdout.splitlines() if marker in ln)
    return base + line.split("http://127.0.0.1:5000", 1)[1].strip()


def _close_assistant(page) -> None:
    """MLflow 3's assistant panel opens beside the runs; close it so the runs get the room."""
    close = page.locator("button[aria-label='Close']").first
    if close.count() and close.is_visible():
        close.click()


def test_the_printed_urls_open_the_runs_table_and_the_fronts_side_by_side(ui, page, tmp_path):
    base, _, stdout = ui
    # The runs table on the trials and their metrics.
    page.goto(_printed_url(stdout, base, "then open"))
    page.get_by_text("trial-0", exact=True).first.wait_for(timeout=90_000)
    _close_assistant(page)
    page.wait_for_timeout(1000)
    body = page.inner_text("body")
    # Every trial is a row of its own (nothing folded under the study run) ...
    for n in range(4):
        assert f"trial-{n}" in body
    assert "refit-" in body and "matching runs" in body
    # ... with the metric and param columns, the dataset, and no GenAI traces overview.
    for column in ("cv_accuracy", "cv_sparsity", "test_accuracy", "policy.final_sparsity"):
        assert column in body, column
    assert "digits (" in body
    assert "Detect Issues" not in body and "0 traces" not in body
    # The other study of the experiment is filtered out, and its columns are not shown.
    assert "other-study" not in body and "policy.theta" not in body
    _shot(page, tmp_path, "mlflow-runs.png")

    # docs/mlflow-ui.md's first step, once per browser: MLflow 3.17 keeps the view a
    # printed link opens only while the URL says so (a run name's link and the breadcrumb
    # do not), else the one remembered from its GenAI | Model training switch.
    page.get_by_text("trial-0", exact=True).first.click()
    page.get_by_text("Overview", exact=True).first.wait_for(timeout=30_000)
    assert "Evaluation runs" in page.inner_text("body")  # MLflow's GenAI pages, untold
    page.get_by_text("Model training", exact=True).first.click()  # the one click
    page.get_by_text("matching runs").first.wait_for(timeout=30_000)
    # From the printed link again: a trial, then the breadcrumb back: the training runs.
    page.goto(_printed_url(stdout, base, "then open"))
    page.get_by_text("trial-0", exact=True).first.wait_for(timeout=90_000)
    _close_assistant(page)
    page.get_by_text("Override saved view").click()  # (the docs' optional second click)
    page.get_by_text("trial-0", exact=True).first.click()
    page.get_by_text("Overview", exact=True).first.wait_for(timeout=30_000)
    assert "Evaluation runs" not in page.inner_text("body")
    page.locator(f"a[href='#/experiments/{_experiment_id(page.url)}/runs']").last.click()
    page.get_by_text("trial-0", exact=True).first.wait_for(timeout=60_000)
    body = page.inner_text("body")
    assert "matching runs" in body and "Evaluation runs" not in body
    assert "refit-" in body and "other-study" not in body  # dtp_search's view, saved

    # A refit's Overview: its description holds the two lines that load its model.
    page.get_by_text("refit-0", exact=True).first.click()
    page.get_by_text("Show more").first.wait_for(timeout=30_000)
    run_id = page.url.rsplit("/runs/", 1)[1].split("?")[0].split("/")[0]
    page.get_by_text("Show more").first.click()
    body = page.inner_text("body")
    assert f"load_pruned('{run_id}', tracking_uri=" in body, body[:2000]
    _shot(page, tmp_path, "mlflow-refit.png")
    # The Models tab: the refits' models, with their test accuracy.
    page.goto(f"{base}/#/experiments/{_experiment_id(page.url)}/models")
    page.get_by_text("digits-lenet300-agp-refit-0").first.wait_for(timeout=60_000)
    # its first metric column: the figures linked to it (wide: the table scrolls sideways)
    page.set_viewport_size({"width": 2100, "height": 600})
    page.get_by_text("test_accuracy", exact=True).first.wait_for(timeout=30_000)
    page.wait_for_timeout(500)
    _shot(page, tmp_path, "mlflow-models.png")

    # The fronts of every trial, side by side, on the chart tab: the second printed link,
    # in a fresh browser context (nothing kept from the first page's visit).
    page = page.context.browser.new_page(viewport={"width": 1500, "height": 1000})
    page.goto(_printed_url(stdout, base, "fronts of every trial:"))
    section = page.get_by_text("dtp_search: fronts")
    section.wait_for(timeout=90_000)
    _close_assistant(page)
    page.wait_for_timeout(3000)
    # The trials' fronts and the refits' each in a chart of its own, x: the front's
    # sparsity; the CV scatter and the test one beside them ...
    charts = page.locator(".js-plotly-plot")
    charts.nth(3).wait_for(timeout=30_000)
    section = page.inner_text("body")
    for title in (
        "front/accuracy",
        "front/test_accuracy",
        "front/test_sparsity",
        "cv_sparsity vs. cv_accuracy",
        "sparsity vs. test_accuracy",
    ):
        assert title in section, title
    fronts = charts.nth(0).inner_text() + charts.nth(1).inner_text()
    assert "front/sparsity" in fronts and "Step" not in fronts  # the x axis' title
    assert "front/accuracy vs" not in section
    # ... and the image card shows a logged front image that loaded, without params.
    imgs = page.locator("img[src*='get-artifact'], img[src*='images']")
    imgs.first.wait_for(timeout=30_000)
    assert imgs.first.evaluate("img => img.complete && img.naturalWidth > 100")
    card = imgs.first.locator("xpath=ancestor::div[5]")
    assert card.bounding_box()["width"] > 200 and "policy.name" not in card.inner_text()
    _shot(page, tmp_path, "mlflow-fronts.png")
    imgs.first.scroll_into_view_if_needed()
    card.screenshot(path=str(tmp_path / "mlflow-front-images.png"))
    _copy_shot(tmp_path, "mlflow-front-images.png")
