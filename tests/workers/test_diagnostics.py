"""The measurements recorded beside the certificates (BCP's tightness, the Lipschitz bounds),
from a real row: train `bcp` briefly on digits, certify, read the result's metrics."""
import pytest

from workers.runner import run_row


def test_a_bcp_row_records_tightness_and_lipschitz_bounds(tmp_path):
    config = {"method": "bcp", "dataset": "digits-8x8", "model": "mlp2x100", "norm": "l2",
              "eps": 0.5, "epochs": 2, "batch_size": 64, "train_limit": 300, "test_limit": 20,
              "certifiers": ["bcp", "lipschitz", "local_lip"],
              "attack": {"steps": 5, "restarts": 1}}
    result = run_row(config, tmp_path)
    metrics = result["metrics"]
    tight = metrics["tightness"]
    assert 0 < tight["bcp_mean"] <= tight["global"] + 1e-9  # the box only ever tightens
    assert tight["reduction"] == pytest.approx(1 - tight["bcp_mean"] / tight["global"])
    # BCP Figure 3's violins: tau(x) of every test example, whose mean is the recorded one.
    taus = result["figure_data"]["tightness"]["bcp"]
    assert len(taus) == config["test_limit"]
    assert sum(taus) / len(taus) == pytest.approx(tight["bcp_mean"], rel=1e-5)
    assert all(0 < tau <= tight["global"] * (1 + 1e-5) for tau in taus)
    assert len(set(taus)) > 1  # per example, not one number repeated
    bound = metrics["lipschitz_bound"]
    assert 0 < bound["local"] <= bound["global"] * (1 + 1e-6)  # Local-Lip Theorem 1


def test_no_diagnostic_without_its_certifier(tmp_path):
    config = {"method": "nominal", "dataset": "digits-8x8", "model": "mlp2x100", "eps": 0.05,
              "epochs": 1, "train_limit": 100, "test_limit": 10, "certifiers": ["ibp"],
              "attack": {"steps": 2, "restarts": 1}}
    result = run_row(config, tmp_path)
    assert "tightness" not in result["metrics"] and "lipschitz_bound" not in result["metrics"]
    assert result["figure_data"] == {}  # digits is not planar: no bound_area either
