"""The API against a real job store (SQLite and PostgreSQL), without Ray or MLflow: validation,
problem+json errors, idempotency, pagination, cancellation, auth. The end-to-end tests in
tests/e2e drive the whole service."""
from __future__ import annotations

import dataclasses
import threading

import pytest
from fastapi.testclient import TestClient

from api.app import MAX_BODY_BYTES, create_app
from orchestrator.service import Service
from orchestrator.settings import Settings

RUN = {"kind": "run", "config": {"method": "ibp", "dataset": "digits-8x8", "model": "mlp2x100",
                                 "eps": 0.05, "epochs": 2, "train_limit": 100, "test_limit": 10}}


@pytest.fixture
def service(db_url, tmp_path):
    settings = dataclasses.replace(Settings.from_env(), home=tmp_path, db_url=db_url,
                                   runs_dir=tmp_path / "runs", api_key=None,
                                   mlflow_tracking_uri=None)
    service = Service(settings, with_dispatcher=False)  # not started: no Ray, no MLflow
    yield service
    service.store.close()


@pytest.fixture
def client(service):
    with TestClient(create_app(service)) as client:
        yield client


def job_count(service) -> int:
    total, cursor = 0, None
    while True:
        jobs, cursor = service.store.list_jobs(limit=100, cursor=cursor)
        total += len(jobs)
        if not cursor:
            return total


def assert_problem(response, status: int, *parts: str):
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status and body["title"] and body["detail"]
    text = response.text
    for part in parts:
        assert part in text, text
    return body


def test_run_job_is_accepted_with_location_and_resolved_config(client):
    response = client.post("/jobs", json=RUN)
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/jobs/{job['id']}"
    assert job["kind"] == "run" and job["status"] == "queued" and len(job["rows"]) == 1
    row = job["rows"][0]
    assert row["status"] == "queued" and row["attempts"] == 0
    assert row["progress"] == {"epoch": 0, "epochs": 2}
    assert row["config"]["schedule"]["warmup_epochs"] is not None  # resolved before storing
    assert client.get(f"/jobs/{job['id']}").json()["id"] == job["id"]
    table = client.get(f"/jobs/{job['id']}/table", params={"format": "md"})
    assert table.status_code == 200 and "ibp mlp2x100 on digits-8x8" in table.text


def test_table_job_has_one_row_per_selected_row_and_seed(client):
    response = client.post("/jobs", json={"kind": "table", "spec": "demo/digits",
                                          "rows": ["ibp", "nominal"], "seeds": [0, 1]})
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["spec"] == "demo/digits" and job["profile"] == "quick"
    assert sorted((r["name"], r["seed"]) for r in job["rows"]) == [
        ("ibp", 0), ("ibp", 1), ("nominal", 0), ("nominal", 1)]
    for fmt in ("md", "csv", "latex", "html", "json"):
        table = client.get(f"/jobs/{job['id']}/table", params={"format": fmt})
        assert table.status_code == 200 and "ibp" in table.text.lower()
    assert_problem(client.get(f"/jobs/{job['id']}/table", params={"format": "pdf"}), 422,
                   "md, csv, latex, html, json")


@pytest.mark.parametrize("body, status, parts", [
    ({"kind": "table", "spec": "nope/table9"}, 422, ["spec", "demo/digits"]),
    ({"kind": "table", "spec": "demo/digits", "rows": ["ghost"]}, 422, ["rows", "ghost", "ibp"]),
    ({"kind": "table", "spec": "demo/digits", "profile": "huge"}, 422, ["profile", "quick"]),
    ({"kind": "run", "config": {"method": "magic"}}, 422, ["config.method", "known: bcp, cap"]),
    ({"kind": "run", "config": {"dataset": "imagenet"}}, 422, ["config.dataset", "digits"]),
    ({"kind": "run", "config": {"model": "resnet"}}, 422, ["config.model", "small"]),
    ({"kind": "run", "config": {"epochs": "many"}}, 422, ["config.epochs"]),
    ({"kind": "run", "config": {"eps": 30}}, 422, ["config.eps", "[0, 1]"]),
    ({"kind": "run", "config": {"colour": "red"}}, 422, ["config.colour", "unknown field"]),
    ({"kind": "run"}, 422, ["config", "Field required"]),
    ({"kind": "sweep", "config": {}}, 422, ["config", "give the base configuration"]),
    ({"kind": "dance"}, 422, ["kind"]),
    ({"kind": "table", "spec": "demo/digits", "seeds": "0"}, 422, ["seeds"]),
    ({"kind": "table", "spec": "demo/digits", "seeds": [-1]}, 422, ["seeds"]),
    ([1, 2, 3], 422, ["object"]),
])
def test_bad_bodies_are_problems_naming_the_field_and_change_nothing(client, service, body,
                                                                     status, parts):
    before = job_count(service)
    assert_problem(client.post("/jobs", json=body), status, *parts)
    assert job_count(service) == before


def test_malformed_json_huge_bodies_and_unknown_ids(client, service):
    assert_problem(client.post("/jobs", content=b"{not json",
                               headers={"content-type": "application/json"}), 400, "not valid JSON")
    huge = b'{"kind": "run", "config": {"x": "' + b"a" * (MAX_BODY_BYTES + 10) + b'"}}'
    assert_problem(client.post("/jobs", content=huge,
                               headers={"content-type": "application/json"}), 413, "at most")
    assert_problem(client.get("/jobs/doesnotexist"), 404, "doesnotexist")
    assert_problem(client.post("/jobs/doesnotexist/cancel"), 404, "doesnotexist")
    assert_problem(client.get("/jobs/doesnotexist/table"), 404, "doesnotexist")
    assert_problem(client.get("/nowhere"), 404)
    assert job_count(service) == 0


def test_idempotency_key(client, service):
    first = client.post("/jobs", json=RUN, headers={"Idempotency-Key": "k1"})
    again = client.post("/jobs", json=RUN, headers={"Idempotency-Key": "k1"})
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    other = dict(RUN, config={**RUN["config"], "seed": 5})
    assert_problem(client.post("/jobs", json=other, headers={"Idempotency-Key": "k1"}), 422,
                   "different body")
    assert job_count(service) == 1


def test_concurrent_requests_with_one_key_make_one_job(service):
    app = create_app(service)
    ids, statuses = [], []

    def post():
        with TestClient(app) as client:
            response = client.post("/jobs", json=RUN, headers={"Idempotency-Key": "same"})
            statuses.append(response.status_code)
            if response.status_code == 202:
                ids.append(response.json()["id"])

    threads = [threading.Thread(target=post) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert set(statuses) <= {202, 409} and ids
    assert len(set(ids)) == 1 and job_count(service) == 1


def test_list_jobs_newest_first_with_cursor_pagination_and_filters(client):
    created = [client.post("/jobs", json=dict(RUN, config={**RUN["config"], "seed": i})).json()["id"]
               for i in range(5)]
    client.post("/jobs", json={"kind": "table", "spec": "demo/digits", "rows": ["ibp"]})
    seen, cursor = [], None
    while True:
        page = client.get("/jobs", params={"limit": 2, "kind": "run"}
                          | ({"cursor": cursor} if cursor else {})).json()
        seen += [job["id"] for job in page["jobs"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == created[::-1]
    assert [j["kind"] for j in client.get("/jobs", params={"kind": "table"}).json()["jobs"]] == ["table"]
    assert len(client.get("/jobs", params={"status": "queued"}).json()["jobs"]) == 6
    assert_problem(client.get("/jobs", params={"status": "sleeping"}), 422, "queued, running")
    assert_problem(client.get("/jobs", params={"cursor": "garbage"}), 422, "cursor")
    assert_problem(client.get("/jobs", params={"limit": 1000}), 422, "limit")


def test_cancel_a_queued_job(client):
    job = client.post("/jobs", json=RUN).json()
    cancelled = client.post(f"/jobs/{job['id']}/cancel")
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["rows"][0]["status"] == "cancelled"


def test_experiments(client):
    names = [spec["name"] for spec in client.get("/experiments").json()["experiments"]]
    assert {"demo/digits", "ibp/table3", "ibp/table4"} <= set(names)
    assert client.get("/experiments/ibp/table4").json()["name"] == "ibp/table4"
    assert_problem(client.get("/experiments/ibp/table99"), 404, "ibp/table4")


def test_auth_when_a_key_is_set(service):
    service.settings = dataclasses.replace(service.settings, api_key="s3cret")
    with TestClient(create_app(service)) as client:
        assert client.get("/healthz").status_code == 200
        assert_problem(client.get("/jobs"), 401, "X-API-Key")
        assert_problem(client.post("/jobs", json=RUN, headers={"X-API-Key": "wrong"}), 401)
        assert client.get("/jobs", headers={"X-API-Key": "s3cret"}).status_code == 200
        assert client.post("/jobs", json=RUN, headers={"X-API-Key": "s3cret"}).status_code == 202


def test_auth_off_by_default(client):
    assert client.get("/jobs").status_code == 200
