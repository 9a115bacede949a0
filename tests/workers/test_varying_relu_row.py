"""Local-Lip Figure 3 from real rows: a standard and a Local-Lip-B row certified with
`local_lip` record the varying-ReLU shares of the trained network (`varying_relu.*`), and the
Local-Lip-B row's history holds the shares per epoch (Figure 6)."""
import pytest

from orchestrator.tables import metric_value
from workers.runner import run_row

BASE = {"dataset": "digits-8x8", "model": "mlp2x100", "norm": "l2", "eps": 0.5, "epochs": 1,
        "batch_size": 50, "train_limit": 100, "test_limit": 12, "certifiers": ["local_lip"],
        "attack": {"steps": 3, "restarts": 1}, "schedule": {"warmup_epochs": 0}}


@pytest.mark.parametrize("method", ["nominal", "local_lip_b"])
def test_a_local_lip_row_records_the_varying_relu_shares(tmp_path, method):
    result = run_row(BASE | {"method": method}, tmp_path)
    shares = [metric_value(result["metrics"], f"varying_relu.layer{i}") for i in (1, 2)]
    assert all(share is not None and 0 <= share <= 1 for share in shares)
    assert metric_value(result["metrics"], "varying_relu.layer3") is None  # two hidden layers
    assert metric_value(result["metrics"], "varying_relu.mean") == pytest.approx(sum(shares) / 2)
    assert 0 < sum(shares) < 2  # neither every output constant nor every one varying
    last = result["history"][-1]
    if method == "local_lip_b":
        assert 0 <= last["varying_fraction.layer1"] <= 1
        assert 0 < last["local_lipschitz"] <= last["lipschitz"]
    else:
        assert "varying_fraction.layer1" not in last  # nominal training does not measure it
