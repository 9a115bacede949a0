"""The report page and the figures: a table job whose row really trained (run_row, not a fake
result), served by the real app over HTTP and opened in a real headless browser (Debian's
chromium driven by playwright; `.ci/run` installs chromium)."""
from __future__ import annotations

import dataclasses
import shutil
import socket
import threading
import time

import pytest
import uvicorn
from fastapi.testclient import TestClient

import experiments
from api.app import create_app
from orchestrator import figures
from orchestrator.service import Service
from orchestrator.settings import Settings
from workers.runner import run_row

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ROW = "mnist-eps0.1-ibp"  # a row of ibp/table4 with the paper's numbers beside it
OWNER = "test-worker"


def make_service(tmp_path, api_key=None) -> Service:
    settings = dataclasses.replace(Settings.from_env(), home=tmp_path,
                                   db_url=f"sqlite:///{tmp_path / 'jobs.db'}",
                                   runs_dir=tmp_path / "runs", api_key=api_key,
                                   mlflow_tracking_uri=None)
    return Service(settings, with_dispatcher=False)  # the test plays the dispatcher's part


def submit_table(client, headers=None) -> dict:
    response = client.post("/jobs", json={"kind": "table", "spec": "ibp/table4",
                                          "rows": [ROW], "profile": "quick"}, headers=headers)
    assert response.status_code == 202, response.text
    return response.json()


def run_claimed_row(service, tmp_path) -> None:
    """What the dispatcher does for a row, with the row's config cut down to seconds."""
    (row,) = service.store.claim_rows(OWNER, lease_seconds=600, limit=1, max_attempts=3)
    # The quick profile reads mnist-idx (../shared); digits ships with scikit-learn.
    config = dict(row.config, dataset="digits", data_root=None, epochs=2, train_limit=300,
                  test_limit=40, attack={"steps": 5, "restarts": 1})
    result = run_row(config, tmp_path / "work")
    assert service.store.complete_row(row.id, OWNER, result)


@pytest.fixture
def finished_job(tmp_path):
    service = make_service(tmp_path)
    with TestClient(create_app(service)) as client:
        job = submit_table(client)
        run_claimed_row(service, tmp_path)
        yield service, client, job["id"]
    service.store.close()


def test_figures_are_pngs_and_unknown_names_are_clear_404s(finished_job):
    service, client, job_id = finished_job
    for name in ("training_curves", "seconds_per_epoch", "reproduced_vs_reported"):
        response = client.get(f"/jobs/{job_id}/figures/{name}")
        assert response.status_code == 200, (name, response.text)
        assert response.headers["content-type"] == "image/png"
        assert response.content[:8] == b"\x89PNG\r\n\x1a\n"
    response = client.get(f"/jobs/{job_id}/figures/pie")
    assert response.status_code == 404
    assert "training_curves" in response.json()["detail"]
    assert client.get("/jobs/nope/report").status_code == 404


def test_a_queued_job_reloads_itself_and_has_nothing_to_draw_yet(tmp_path):
    service = make_service(tmp_path)
    with TestClient(create_app(service)) as client:
        job_id = submit_table(client)["id"]
        page = client.get(f"/jobs/{job_id}/report")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert 'http-equiv="refresh"' in page.text and "<script" not in page.text
        assert client.get(f"/jobs/{job_id}/figures/training_curves").status_code == 404
    service.store.close()


def test_the_api_key_may_come_as_a_query_parameter_for_the_browser(tmp_path):
    service = make_service(tmp_path, api_key="s3cret")
    with TestClient(create_app(service)) as client:
        job_id = submit_table(client, headers={"X-API-Key": "s3cret"})["id"]
        assert client.get(f"/jobs/{job_id}/report").status_code == 401
        assert client.get(f"/jobs/{job_id}/report?key=wrong").status_code == 401
        page = client.get(f"/jobs/{job_id}/report?key=s3cret")
        assert page.status_code == 200
        run_claimed_row(service, tmp_path)
        page = client.get(f"/jobs/{job_id}/report?key=s3cret")
        assert 'src="figures/training_curves?key=s3cret"' in page.text
        assert client.get(f"/jobs/{job_id}/figures/training_curves?key=s3cret").status_code == 200
    service.store.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served(finished_job):
    service, _, job_id = finished_job
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the app did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", job_id
    server.should_exit = True
    thread.join(timeout=10)


def test_report_page_in_a_real_browser(served):
    playwright = pytest.importorskip("playwright.sync_api")
    if not shutil.which(CHROMIUM):
        pytest.fail(f"no chromium at {CHROMIUM}: install Debian's chromium (.ci/run does)")
    base, job_id = served
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            response = page.goto(f"{base}/jobs/{job_id}/report")
            assert response.status == 200
            assert "ibp/table4" in page.title()
            assert page.inner_text("#job-status") == "succeeded"
            headers = page.locator("#results th").all_inner_texts()
            assert "paper" in headers and "ours" in headers
            first = page.locator("#results tr").nth(2).locator("td").all_inner_texts()
            assert first[1] == "succeeded"
            # The paper's test error for this row (Table 4: 1.06 %) sits in its column.
            assert "1.06" in first
            images = page.locator("img")
            assert images.count() == 3
            page.wait_for_load_state("networkidle")
            for i in range(images.count()):
                width = images.nth(i).evaluate("img => img.complete ? img.naturalWidth : 0")
                assert width > 100, images.nth(i).get_attribute("src")
            assert page.locator("meta[http-equiv=refresh]").count() == 0  # finished: static
        finally:
            browser.close()


def test_curves_over_eps_of_a_figure_spec(tmp_path):
    """BCP Figure 4's first panel: one trained configuration certified at several eps (smoke
    profile, real runs) gives a curve per method over eps."""
    service = make_service(tmp_path)
    spec = "bcp/figure4"
    panel = [row for row in experiments.load_spec(spec).rows
             if row.config.get("method") == "cap"][:2]
    with TestClient(create_app(service)) as client:
        response = client.post("/jobs", json={"kind": "table", "spec": spec, "profile": "smoke",
                                              "rows": [row.id for row in panel]})
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        for index in range(len(panel)):
            (row,) = service.store.claim_rows(OWNER, lease_seconds=600, limit=1, max_attempts=3)
            result = run_row(row.config, tmp_path / f"work{index}")
            assert service.store.complete_row(row.id, OWNER, result)
        job = service.store.get_job(job_id)
        table = service.job_table(job)
        assert "curves_over_eps" in figures.available(job, table)
        figure = figures.FIGURES.get("curves_over_eps")(job, table)
        lines = [line for axis in figure.axes for line in axis.get_lines()]
        assert lines and all(len(line.get_xdata()) == 2 for line in lines)
        assert sorted(lines[0].get_xdata()) == sorted(row.config["eps"] for row in panel)
        page = client.get(f"/jobs/{job_id}/report").text
        assert 'src="figures/curves_over_eps"' in page
    service.store.close()
