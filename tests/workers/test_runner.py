import json

from workers.core.config import RunConfig
from workers.recorder import MemoryRecorder, flatten
from workers.runner import run_row


def test_run_row_reports_params_curves_and_the_result(tmp_path):
    config = RunConfig(method="ibp", dataset="digits-8x8", model="mlp2x100", eps=0.05, epochs=2,
                       batch_size=64, train_limit=200, test_limit=30,
                       attack={"steps": 3, "restarts": 1})
    recorder = MemoryRecorder()
    result = run_row(config, tmp_path, recorder)
    assert recorder.params["method"] == "ibp" and "optimizer.lr" in recorder.params
    epochs = [step for step, metrics in recorder.metrics if "sec_per_epoch" in metrics]
    assert epochs == [1, 2]
    final = recorder.metrics[-1][1]
    assert final["verified_acc.ibp"] == result["metrics"]["verified_acc"]["ibp"]
    assert recorder.artifacts == [str(tmp_path / "result.json"), str(tmp_path / "checkpoint.pt")]
    assert json.loads((tmp_path / "result.json").read_text())["metrics"] == result["metrics"]
    assert result["data"] == {"name": "digits-8x8", "split": "test", "size": 30, "root": None,
                              "train_size": 200}
    # a second run in the same folder resumes from the final checkpoint: no epoch is trained again
    again = MemoryRecorder()
    rerun = run_row(config, tmp_path, again)
    assert [s for s, m in again.metrics if "sec_per_epoch" in m] == []
    assert rerun["metrics"] == result["metrics"]
    assert rerun["timing"]["sec_per_epoch"] == result["timing"]["sec_per_epoch"]


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}
