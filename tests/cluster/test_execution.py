"""RayExecutor's side of a cluster, without starting Ray: the resources a row asks for follow the
cluster as it is now (GPU workers may join after the API), a row lost with its node is re-run by
Ray, and when those re-runs are spent the error says the node was lost, not that the row failed."""
from __future__ import annotations

from pathlib import Path

import pytest
import ray

from orchestrator import execution
from orchestrator.execution import RayExecutor, RowHandle


class FakeRemote:
    """Stands in for the remote row function: records the options of each submission."""

    def __init__(self):
        self.submitted: list[dict] = []

    def options(self, **options):
        self.submitted.append(options)
        return self

    def remote(self, config, workdir, recorder, threads):
        self.submitted[-1]["config"] = config
        return object()


@pytest.fixture
def cluster(monkeypatch):
    resources = {"CPU": 0.0}  # the head and the API only: no worker node yet
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: dict(resources))
    remote = FakeRemote()
    monkeypatch.setattr(execution, "_remote_row", remote)
    return resources, remote


def test_rows_ask_for_gpus_once_gpu_workers_join(cluster, tmp_path):
    resources, remote = cluster
    executor = RayExecutor("ray-head:6379", node_retries=2)
    assert executor.capacity() == 1  # one row waits in Ray for the first worker
    executor.submit("row-cpu", {"device": "cpu", "epochs": 1}, tmp_path, None)
    resources.update(CPU=16.0, GPU=4.0)  # a GPU worker joined after the API started
    assert executor.capacity() == 4
    executor.submit("row-gpu", {"device": "cpu", "epochs": 1}, tmp_path, None)
    first, second = remote.submitted
    assert (first["num_gpus"], first["config"]["device"]) == (0.0, "cpu")
    assert (second["num_gpus"], second["config"]["device"]) == (1.0, "cuda")
    # Ray itself re-runs a row whose node died, as many times as the setting says
    assert first["max_retries"] == second["max_retries"] == 2


@pytest.mark.parametrize("error, lost", [
    (ray.exceptions.NodeDiedError("node 1a2b died"), True),
    (ray.exceptions.WorkerCrashedError(), True),
    (ray.exceptions.TaskCancelledError(), False),
])
def test_a_row_lost_with_its_node_is_named_as_such(cluster, monkeypatch, error, lost):
    def get(ref):
        raise error

    monkeypatch.setattr(ray, "get", get)
    executor = RayExecutor("ray-head:6379", node_retries=3)
    result, message = executor.outcome(RowHandle("row", object(), Path(".")))
    assert result is None and type(error).__name__ in message
    assert message.startswith("the row's Ray worker or node was lost (after 3 re-runs)") is lost
