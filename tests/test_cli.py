"""The `certrepro` command line, run as a real subprocess: results follow DESIGN.md "Interfaces";
bad input exits 2 with a message, no traceback, nothing written."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
QUICK = ["--dataset", "digits-8x8", "--model", "mlp2x100", "--eps", "0.05", "--epochs", "2",
         "--batch-size", "64", "--train-limit", "300", "--test-limit", "40", "--quiet",
         "--set", "attack.steps=5", "--set", "attack.restarts=1"]


def certrepro(*args, home: Path):
    env = os.environ | {"CERTREPRO_HOME": str(home), "PYTHONPATH": str(REPO),
                        "CERTREPRO_DOWNLOAD": "0"}
    return subprocess.run([sys.executable, "-m", "certrepro", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=300, cwd=home)


def test_run_writes_the_documented_result_and_certify_reads_the_checkpoint(tmp_path):
    out = tmp_path / "result.json"
    done = certrepro("run", "--method", "ibp", *QUICK, "--certifier", "ibp", "--out", out,
                     home=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    config = result["config"]
    for field in ("method", "dataset", "model", "norm", "eps", "eps_train", "epochs",
                  "batch_size", "seed", "certifiers", "test_limit", "device"):
        assert field in config
    assert config["schedule"]["warmup_epochs"] is not None  # fully resolved
    metrics = result["metrics"]
    assert 0 <= metrics["clean_acc"] <= 1 and 0 <= metrics["pgd_acc"] <= 1
    assert set(metrics["verified_acc"]) == {"ibp"}
    assert len(result["per_example"]) == 40
    first = result["per_example"][0]
    assert first["index"] == 0 and isinstance(first["label"], int)
    assert isinstance(first["clean_correct"], bool) and isinstance(first["verified"]["ibp"], bool)
    assert result["data"]["name"] == "digits-8x8" and result["data"]["split"] == "test"
    assert len(result["timing"]["sec_per_epoch"]) == 2
    assert "ibp" in result["timing"]["certify_sec"]
    assert sum(e["verified"]["ibp"] for e in result["per_example"]) / 40 == \
        pytest.approx(metrics["verified_acc"]["ibp"])
    assert "verified[ibp]" in done.stdout

    checkpoint = Path(result["checkpoint"])
    state = torch.load(checkpoint, weights_only=False)
    assert state["config"] == config and "model_state" in state
    from workers.core.models import build  # the documented way back to the model
    build(state["config"]).load_state_dict(state["model_state"])

    # certify the checkpoint at another eps; the bigger eps can only certify fewer
    out2 = tmp_path / "certified.json"
    done = certrepro("certify", checkpoint, "--norm", "linf", "--eps", "0.1", "--certifier",
                     "ibp", "--test-limit", "40", "--out", out2, "--quiet", home=tmp_path)
    assert done.returncode == 0, done.stderr
    again = json.loads(out2.read_text())
    assert again["config"]["eps"] == 0.1
    assert again["metrics"]["clean_acc"] == metrics["clean_acc"]
    assert again["metrics"]["verified_acc"]["ibp"] <= metrics["verified_acc"]["ibp"]


def test_run_from_yaml_with_overrides(tmp_path):
    (tmp_path / "run.yaml").write_text(
        "method: nominal\ndataset: digits-8x8\nmodel: mlp2x100\neps: 0.05\nepochs: 1\n"
        "train_limit: 200\ntest_limit: 20\nattack: {steps: 3, restarts: 1}\n")
    done = certrepro("run", tmp_path / "run.yaml", "--seed", "3", "--set", "optimizer.lr=0.002",
                     "--quiet", "--workdir", tmp_path / "w", home=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "w" / "result.json").read_text())
    assert result["config"]["seed"] == 3 and result["config"]["optimizer"]["lr"] == 0.002


@pytest.mark.parametrize("args, expected", [
    (["--method", "magic"], "unknown method 'magic'; known:"),
    (["--dataset", "nope"], "unknown dataset 'nope'; known:"),
    (["--model", "resnet"], "unknown model 'resnet'; known:"),
    (["--norm", "l1"], "norm:"),
    (["--eps", "-1"], "eps: Input should be greater than or equal to 0"),
    (["--eps", "25"], "out of range"),
    (["--epochs", "0"], "epochs: Input should be greater than or equal to 1"),
    (["--set", "optimizer.lr=-1"], "optimizer.lr"),
    (["--set", "wat=1"], "wat: unknown field"),
    (["--certifier", "oracle"], "unknown certifier 'oracle'"),
])
def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, args, expected):
    out = tmp_path / "result.json"
    done = certrepro("run", *args, "--out", out, home=tmp_path)
    assert done.returncode == 2
    assert expected in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists() and not (tmp_path / "runs").exists()


def test_bad_files_are_clear_errors(tmp_path):
    (tmp_path / "bad.yaml").write_text("method: [unclosed\n")
    done = certrepro("run", tmp_path / "bad.yaml", home=tmp_path)
    assert done.returncode == 2 and "not valid YAML" in done.stderr
    done = certrepro("run", tmp_path / "missing.yaml", home=tmp_path)
    assert done.returncode == 2 and "does not exist" in done.stderr
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    done = certrepro("certify", tmp_path / "junk.pt", "--out", tmp_path / "r.json", home=tmp_path)
    assert done.returncode == 2 and "not a readable checkpoint" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "r.json").exists()
    done = certrepro("run", "--dataset", "mnist", "--epochs", "1", home=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "mnist" in done.stderr and str(tmp_path) in done.stderr  # where it looked


def test_status_and_report_say_what_a_waiting_row_waits_for():
    """A row that certifies another row's model shows the store's note (not 'epoch 0/n') in
    `certrepro status` and on the report page."""
    from types import SimpleNamespace

    from certrepro.client import format_status
    from orchestrator.report import report_html

    note = "waiting for row eps-0.1's training (running)"
    row = {"id": "r2", "name": "eps-0.3", "seed": 0, "status": "queued", "attempts": 0,
           "progress": {"epoch": 0, "epochs": 5, "note": note}, "metrics": {}, "error": None}
    job = {"id": "j1", "kind": "table", "status": "running", "spec": "ibp/figure3", "rows": [row]}
    assert note in format_status(job)
    view = SimpleNamespace(**{**job, "profile": "smoke", "created_at": "t0", "updated_at": "t1",
                              "error": None, "rows": [SimpleNamespace(**row)]})
    assert f"<td>{note.replace(chr(39), '&#x27;')}</td>" in report_html(view, None, [])
