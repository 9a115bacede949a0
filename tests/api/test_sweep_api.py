"""Sweep job requests against a real job store, without Ray or MLflow: what is accepted, what it
stores, and the 422s of bad search spaces, metrics and schedulers (each naming the field, what is
wrong and what is allowed; nothing written)."""
from __future__ import annotations

import pytest

from tests.api.test_api import assert_problem, client, job_count, service  # noqa: F401 (fixtures)

BASE = {"method": "ibp", "dataset": "digits-8x8", "model": "mlp2x100", "eps": 0.05, "epochs": 3,
        "train_limit": 100, "test_limit": 10}


def sweep(**fields) -> dict:
    body = {"kind": "sweep", "config": BASE, "metric": "verified_acc.ibp", "mode": "max",
            "search_space": {"optimizer.lr": {"grid": [1e-3, 1e-2]}}}
    body.update(fields)
    return {k: v for k, v in body.items() if v is not None}


def test_sweep_job_is_accepted_with_its_checked_settings(client):
    response = client.post("/jobs", json=sweep(
        search_space={"optimizer.lr": {"loguniform": [1e-4, 1e-2]},
                      "eps_train": {"grid": [0.05, 0.1]},
                      "method_options.kappa_final": {"choice": [0.0, 0.5]}},
        num_samples=3, max_concurrent_trials=2, resources_per_trial={"cpu": 1, "gpu": 0.25},
        scheduler={"name": "asha", "grace_period": 1}))
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["kind"] == "sweep" and job["status"] == "queued"
    assert len(job["rows"]) == 1 and job["rows"][0]["name"] == "sweep"
    assert job["rows"][0]["config"]["method"] == "ibp"  # resolved base config
    assert job["sweep"]["trials"] == 6  # 3 samples x 2 grid points
    assert job["sweep"]["scheduler"] == {"name": "asha", "max_t": 3, "grace_period": 1,
                                         "reduction_factor": 2.0}
    assert job["trials"] == [] and job["best"] is None
    stored = client.get(f"/jobs/{job['id']}").json()
    assert stored["body"]["_sweep"]["resources_per_trial"] == {"cpu": 1.0, "gpu": 0.25}
    listed = client.get("/jobs", params={"kind": "sweep"}).json()["jobs"]
    assert [j["id"] for j in listed] == [job["id"]]


@pytest.mark.parametrize("fields, where, words", [
    ({"search_space": {"optimizer.lrx": {"grid": [1e-3]}}}, "search_space.optimizer.lrx",
     ["unknown field", "allowed: name, lr"]),
    ({"search_space": {"nonsense": {"uniform": [0, 1]}}}, "search_space.nonsense",
     ["unknown field", "allowed: method, dataset"]),
    ({"search_space": {"method_options.kappa": {"choice": [0.5]}}},
     "search_space.method_options.kappa", ["unknown field", "kappa_final"]),
    ({"search_space": {"eps_train": {"choice": []}}}, "search_space.eps_train",
     ["empty", "at least one value"]),
    ({"search_space": {"optimizer.lr": {"uniform": [0.1, 0.01]}}}, "search_space.optimizer.lr",
     ["low (0.1) is greater than high (0.01)"]),
    ({"search_space": {"optimizer.lr": {"loguniform": [0, 0.01]}}},
     "search_space.optimizer.lr", ["0 < low"]),
    ({"search_space": {"batch_size": {"randint": {"low": 64, "high": 16}}}},
     "search_space.batch_size", ["greater than high"]),
    ({"search_space": {"optimizer.lr": {"gaussian": [0, 1]}}}, "search_space.optimizer.lr",
     ["unknown sampler 'gaussian'", "grid, choice, uniform, loguniform, randint"]),
    ({"search_space": {"eps_train": {"grid": [0.1, 3.0]}}}, "search_space.eps_train",
     ["out of range", "value 3.0"]),
    ({"search_space": {}}, "search_space", ["non-empty"]),
    ({"num_samples": -2}, "num_samples", ["greater than or equal to 1"]),
    ({"num_samples": 0}, "num_samples", ["greater than or equal to 1"]),
    ({"metric": "verified_acc.crown"}, "metric", ["needs certifier 'crown'", "clean_acc"]),
    ({"mode": "maximize"}, "mode", ["'max' or 'min'"]),
    ({"scheduler": {"name": "hyperband"}}, "scheduler.name",
     ["unknown scheduler 'hyperband'", "asha"]),
    ({"scheduler": {"name": "asha", "grace_period": 5, "max_t": 2}}, "scheduler",
     ["grace_period (5) is greater than max_t (2)"]),
    ({"scheduler": {"name": "asha", "max_t": 10}}, "scheduler", ["greater than the config's epochs"]),
    ({"scheduler": {"name": "asha", "reduction_factor": 1}}, "scheduler", ["> 1"]),
    ({"resources_per_trial": {"cpu": 1, "gpu": -1}}, "resources_per_trial.gpu",
     ["greater than or equal to 0"]),
    ({"search_space": {"optimizer.lr|eps_train": {"uniform": [0, 1]}}},
     "search_space.optimizer.lr|eps_train", ["takes grid or choice"]),
    ({"config": None}, "config", ["give the base configuration"]),
    ({"spec": "demo/digits", "config": None}, "spec", ["not a sweep", "nominal, pgd, ibp"]),
    ({"spec": "nope/table1"}, "spec", ["unknown spec 'nope/table1'"]),
    ({"spec": "demo/digits", "row": "missing"}, "row", ["unknown rows 'missing'"]),
    ({"bogus": 1}, "bogus", ["Extra inputs are not permitted"]),
])
def test_bad_sweeps_are_422_naming_the_field(client, service, fields, where, words):
    before = job_count(service)
    body = assert_problem(client.post("/jobs", json=sweep(**fields)), 422, *words)
    assert where in [e["field"] for e in body["errors"]], body
    assert job_count(service) == before  # nothing half-written


def test_sweep_of_a_table_row(client):
    response = client.post("/jobs", json=sweep(
        config={"epochs": 2, "train_limit": 50, "test_limit": 10}, spec="demo/digits",
        row="ibp", search_space={"eps_train": {"grid": [0.1, 0.2]}}))
    assert response.status_code == 202, response.text
    job = response.json()
    config = job["rows"][0]["config"]
    assert config["method"] == "ibp" and config["dataset"] == "digits" and config["epochs"] == 2
    assert job["body"]["_sweep"]["source"] == {"kind": "spec", "spec": "demo/digits",
                                                "row": "ibp", "profile": "quick"}


def test_joint_grid_of_two_fields(client):
    response = client.post("/jobs", json=sweep(search_space={
        "method_options.kappa_final|eps_train": {"grid": [[0.5, 0.1], [0.0, 0.2]]}}))
    assert response.status_code == 202, response.text
    assert response.json()["sweep"]["trials"] == 2
