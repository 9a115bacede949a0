"""Shared trainings: which rows train the same model (the training key), how a table job is
planned into trainers and certify-only rows, how the job store holds them back until their
trainer has ended, and the certify-only task body on a real checkpoint."""
from __future__ import annotations

import json
import time

import pytest

from orchestrator.execution import execute_certify
from orchestrator.jobs import plan_table
from orchestrator.shared_training import (CERTIFY_ONLY, assign_trainers,
                                          certification_overrides, training_key)
from orchestrator.store import JobStore, NewRow
from workers.core.config import resolve
from workers.core.data import load_split
from workers.core.train import train
from workers.runner import run_row

BASE = {"method": "ibp", "dataset": "digits-8x8", "model": "mlp2x100", "eps": 0.1,
        "eps_train": 0.2, "epochs": 1, "batch_size": 32, "train_limit": 64, "test_limit": 8,
        "seed": 0, "attack": {"steps": 2, "restarts": 1}}


def with_(**changes) -> dict:
    return {**BASE, **changes}


# --------------------------------------------------------------------------------------------
# The training key


@pytest.mark.parametrize("changes", [
    {"eps": 0.3},
    {"certifiers": ["ibp", "crown_ibp"]},
    {"test_limit": 4},
    {"attack": {"steps": 7, "restarts": 2}},
    {"certify_batch_size": 17},
    {"device": "cuda"},
    {"data_root": "/elsewhere"},
    {"eps": 0.05, "certifiers": ["crown_ibp"], "test_limit": 3},
], ids=lambda c: ",".join(c))
def test_rows_that_differ_only_in_certification_share_a_training(changes):
    assert training_key(with_(**changes)) == training_key(BASE)


@pytest.mark.parametrize("changes", [
    {"eps_train": 0.3},
    {"seed": 1},
    {"epochs": 2},
    {"method": "pgd"},
    {"model": "small", "dataset": "digits"},
    {"batch_size": 16},
    {"train_limit": 32},
    {"norm": "l2"},
    {"optimizer": {"lr": 0.01}},
    {"schedule": {"warmup_epochs": 0.5}},
    {"method_options": {"kappa_final": 0.0}},
    {"augment": True},
], ids=lambda c: ",".join(c))
def test_rows_that_train_differently_do_not_share(changes):
    assert training_key(with_(**changes)) != training_key(BASE)


def test_an_unset_eps_train_is_the_row_eps_so_different_eps_do_not_share():
    unset = {k: v for k, v in BASE.items() if k != "eps_train"}
    assert training_key({**unset, "eps": 0.1}) != training_key({**unset, "eps": 0.2})
    # resolved first: unset at eps 0.2 trains exactly what eps_train 0.2 trains
    assert training_key({**unset, "eps": 0.2}) == training_key(with_(eps=0.1, eps_train=0.2))


def test_trainers_are_the_first_row_of_each_group():
    configs = [with_(eps=0.1), with_(eps=0.2), with_(eps_train=0.3), with_(eps=0.3),
               with_(eps_train=0.3, eps=0.4), with_(seed=1)]
    assert assign_trainers(configs) == [None, 0, None, 0, 2, None]


def test_the_overrides_over_the_trainers_config_give_the_rows_own_config():
    trainer, row = with_(eps=0.1), with_(eps=0.3, certifiers=["crown_ibp"], test_limit=5)
    merged = {**resolve(trainer).model_dump(), **certification_overrides(row)}
    assert resolve(merged).model_dump() == resolve(row).model_dump()
    assert set(CERTIFY_ONLY) <= set(certification_overrides(row))


def test_figure_specs_train_each_model_once():
    plan = plan_table("ibp/figure3", None, "paper", [0])
    trainers = [row for row in plan.rows if row.trained_by is None]
    assert (len(plan.rows), len(trainers)) == (128, 32)
    for row in plan.rows:
        if row.trained_by is not None:
            trainer = plan.rows[row.trained_by]
            assert trainer.trained_by is None and trainer.seed == row.seed
            assert trainer.config["eps_train"] == row.config["eps_train"]
            assert trainer.config["model"] == row.config["model"]
            assert trainer.config["method"] == row.config["method"]
    plan = plan_table("bcp/figure4", None, "paper", [0, 1])
    assert (len(plan.rows), sum(r.trained_by is None for r in plan.rows)) == (110, 22)
    # a run of two seeds never shares across seeds
    assert all(plan.rows[r.trained_by].seed == r.seed for r in plan.rows if r.trained_by)


# --------------------------------------------------------------------------------------------
# The job store


@pytest.fixture
def store(db_url):
    s = JobStore(db_url)
    yield s
    s.close()


def shared_job(store: JobStore) -> tuple[str, list[str]]:
    rows = [NewRow("train", with_(eps=0.1)), NewRow("other", with_(eps_train=0.4)),
            NewRow("at-0.2", with_(eps=0.2), trained_by=0),
            NewRow("at-0.3", with_(eps=0.3), trained_by=0)]
    job, _ = store.create_job("table", {"spec": "test"}, rows)
    return job.id, [row.id for row in job.rows]


def claim(store: JobStore, owner: str = "d1") -> list[str]:
    return [r.name for r in store.claim_rows(owner, lease_seconds=60, limit=10, max_attempts=2)]


def test_waiting_rows_are_not_claimed_until_their_trainer_succeeded(store):
    job_id, ids = shared_job(store)
    job = store.get_job(job_id)
    waiting = job.rows[2]
    assert waiting.trained_by == {"row_id": ids[0], "row": "train", "seed": 0}
    assert waiting.progress["waiting_for"]["row"] == "train"
    assert "waiting for row train's training" in waiting.progress["note"]
    assert claim(store) == ["train", "other"]
    assert claim(store) == []  # they wait: no lease, no attempt, no capacity taken
    store.complete_row(ids[0], "d1", {"metrics": {}, "checkpoint": "/x/checkpoint.pt"})
    assert "waiting_for" not in store.get_row(ids[2]).progress
    claimed = store.claim_rows("d1", lease_seconds=60, limit=10, max_attempts=2)
    assert [r.name for r in claimed] == ["at-0.2", "at-0.3"]
    assert claimed[0].trained_by["row_id"] == ids[0]


def test_a_certify_only_row_is_retried_and_recovered_like_any_row(store):
    job_id, ids = shared_job(store)
    claim(store)
    store.complete_row(ids[0], "d1", {"metrics": {}, "checkpoint": "/x/checkpoint.pt"})
    assert claim(store) == ["at-0.2", "at-0.3"]
    assert store.fail_row(ids[2], "d1", "OSError: disk", max_attempts=2) == "queued"
    # the other one's dispatcher dies: its lease expires and another dispatcher takes it over
    assert store.renew_lease(ids[3], "d1", lease_seconds=0.01)
    time.sleep(0.05)
    assert claim(store, "d2") == ["at-0.2", "at-0.3"]
    rows = store.get_job(job_id).rows
    assert [r.attempts for r in rows[2:]] == [2, 2]
    assert [a.outcome for a in rows[3].attempt_log] == ["lost", None]
    assert all(r.trained_by["row"] == "train" for r in rows[2:])


def test_a_trainer_retried_keeps_its_rows_waiting_and_a_failed_one_fails_them(store):
    job_id, ids = shared_job(store)
    claim(store)
    assert store.fail_row(ids[0], "d1", "RuntimeError: boom", max_attempts=2) == "queued"
    assert claim(store) == ["train"]  # the retry, and still not the waiting rows
    assert store.fail_row(ids[0], "d1", "RuntimeError: boom again", max_attempts=2) == "failed"
    job = store.get_job(job_id)
    for row in job.rows[2:]:
        assert row.status == "failed" and row.attempts == 0
        assert "row train" in row.error and ids[0] in row.error and "boom again" in row.error
    assert job.rows[1].status == "running" and job.status == "running"
    store.complete_row(ids[1], "d1", {"metrics": {}})
    job = store.get_job(job_id)
    assert job.status == "failed" and job.error == "RuntimeError: boom again"


def test_a_trainer_lost_too_often_fails_its_rows(store):
    job_id, ids = shared_job(store)
    for _ in range(2):
        store.claim_rows("dead", lease_seconds=0.01, limit=1, max_attempts=2)
        time.sleep(0.05)
    assert claim(store) == ["other"]  # the trainer's lease expired twice: it failed
    rows = store.get_job(job_id).rows
    assert rows[0].status == "failed" and "lost or failed 2 times" in rows[0].error
    assert [r.status for r in rows[2:]] == ["failed", "failed"]
    assert all("row train" in r.error and "lost or failed" in r.error for r in rows[2:])


def test_cancelling_a_job_cancels_its_waiting_rows(store):
    job_id, ids = shared_job(store)
    claim(store)
    store.cancel_job(job_id)
    for row_id in ids[:2]:
        store.finish_cancelled(row_id, "d1")
    job = store.get_job(job_id)
    assert job.status == "cancelled" and {r.status for r in job.rows} == {"cancelled"}


@pytest.mark.parametrize("trained_by, message", [
    (3, "index of an earlier row"), (-1, "index of an earlier row"),
    (1, "does not train itself"),
])
def test_a_trainer_must_be_an_earlier_row_that_trains_itself(store, trained_by, message):
    rows = [NewRow("a", BASE), NewRow("b", BASE, trained_by=0), NewRow("c", BASE),
            NewRow("d", BASE)]
    rows[2].trained_by = trained_by
    with pytest.raises(ValueError, match=message):
        store.create_job("table", {}, rows)
    assert store.list_jobs()[0] == []


# --------------------------------------------------------------------------------------------
# The certify-only task body, on a real checkpoint


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    workdir = tmp_path_factory.mktemp("trainer")
    return run_row(with_(epochs=2), workdir)


def source_of(result: dict, **extra) -> dict:
    return {"row_id": "t" * 32, "row": "train", "seed": 0, "mlflow_run_id": "run1",
            "checkpoint": result["checkpoint"], "train_size": 64, **extra}


def test_a_certify_only_row_certifies_the_trainers_checkpoint_at_its_own_eps(trained, tmp_path):
    config = resolve(with_(epochs=2, eps=0.3, test_limit=5)).model_dump()
    result = execute_certify(config, str(tmp_path), None, 1, source_of(trained))
    assert result["config"] == config and result["config"]["eps"] == 0.3
    assert result["timing"]["sec_per_epoch"] == trained["timing"]["sec_per_epoch"]
    assert result["history"] == trained["history"] and len(result["history"]) == 2
    assert result["trained_by"]["row"] == "train"
    assert result["trained_by"]["checkpoint"] == trained["checkpoint"]
    assert result["data"]["size"] == 5 and result["data"]["train_size"] == 64
    assert set(result["metrics"]["verified_acc"]) == {"ibp"}
    assert set(result["timing"]["certify_sec"]) >= {"ibp"}
    written = json.loads((tmp_path / "result.json").read_text())
    # the same model: what IBP verifies at eps 0.3 it verifies at the trainer's eps 0.1
    for ours, theirs in zip(written["per_example"], trained["per_example"]):
        assert ours["index"] == theirs["index"] and ours["label"] == theirs["label"]
        assert ours["clean_correct"] == theirs["clean_correct"]
        assert theirs["verified"]["ibp"] or not ours["verified"]["ibp"]
    assert len(written["per_example"]) == 5 and "per_example" not in result
    assert json.loads((tmp_path / "progress.json").read_text())["epoch"] == 2
    assert not (tmp_path / "checkpoint.pt").exists()  # no training of its own


def test_a_checkpoint_of_another_training_is_refused(trained, tmp_path):
    config = resolve(with_(epochs=2, eps_train=0.3)).model_dump()
    with pytest.raises(ValueError, match="not trained with this row's training config"):
        execute_certify(config, str(tmp_path / "row"), None, 1, source_of(trained))
    assert not (tmp_path / "row" / "result.json").exists()


def test_an_unfinished_training_is_refused(tmp_path):
    config = resolve(with_(epochs=2))
    x, y = load_split(config.dataset, "train")
    checkpoint = tmp_path / "trainer" / "checkpoint.pt"
    train(config, x[:64], y[:64], checkpoint, stop_after=1)
    with pytest.raises(ValueError, match="holds epoch 1 of 2"):
        execute_certify(config.model_dump(), str(tmp_path / "row"), None, 1,
                        source_of({"checkpoint": str(checkpoint)}))
    with pytest.raises(FileNotFoundError):
        execute_certify(config.model_dump(), str(tmp_path / "row"), None, 1,
                        source_of({"checkpoint": str(tmp_path / "missing.pt")}))
