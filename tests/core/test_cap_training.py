"""Training with 003's methods on digits: `cap`, `cap+reg` and `crown_ibp+reg`."""
import pytest
import torch

from workers.core.attacks import PGD
from workers.core.bounds import PerturbationSet
from workers.core.certify import certify
from workers.core.config import RunConfig, resolve
from workers.core.data import load_split
from workers.core.train import train

pytestmark = pytest.mark.usefixtures("one_thread")

EPS = 0.1
COMMON = dict(dataset="digits-8x8", model="mlp2x100", eps=EPS, epochs=10, batch_size=64,
              train_limit=1000, schedule={"warmup_epochs": 1, "rampup_epochs": 5})
# CROWN-IBP (kappa and beta 1 -> 0) needs a longer, faster-learning run on this small set.
CROWN_COMMON = COMMON | dict(epochs=20, batch_size=32, optimizer={"lr": 3e-3},
                             schedule={"warmup_epochs": 1, "rampup_epochs": 10})


@pytest.fixture(scope="module")
def data():
    x, y = load_split("digits-8x8", "train")
    xt, yt = load_split("digits-8x8", "test")
    return x[:1000], y[:1000], xt[:300], yt[:300]


@pytest.fixture(scope="module")
def nominal(data):
    x, y, xt, yt = data
    model = train(resolve(RunConfig(method="nominal", **COMMON)), x, y).model
    return certify(model, xt, yt, PerturbationSet("linf", EPS), ["ibp", "fastlin"]).metrics()


def test_cap_defaults_follow_wong_et_al():
    config = resolve(RunConfig(method="cap", epochs=80))
    assert config.schedule.warmup_epochs == 0 and config.schedule.rampup_epochs == 20
    assert config.optimizer.lr_milestones == [30, 40, 50, 60, 70]
    assert config.optimizer.lr_factor == 0.5
    assert resolve(RunConfig(method="ibp")).optimizer.lr_factor == 0.1
    options = resolve(RunConfig(method="cap+reg")).method_options
    assert options["lambda_d"] == 5e-3 and options["gamma_r"] == 0.5
    assert options["projections"] is None  # exact unless a row asks for projections


def test_cap_with_regularizers_certifies_far_more_than_nominal(data, nominal):
    x, y, xt, yt = data
    config = resolve(RunConfig(method="cap+reg", **COMMON))
    result = train(config, x, y)
    gammas = [epoch["gamma_r"] for epoch in result.history]
    # gamma warmed up from 0 over the eps ramp (6 epochs here), then held.
    assert gammas[0] < gammas[2] < gammas[4] < 0.5 and gammas[-1] == pytest.approx(0.5)
    assert all(epoch["reg_r"] >= 0 and epoch["reg_d"] >= -1e-6 for epoch in result.history)
    outcome = certify(result.model, xt, yt, PerturbationSet("linf", EPS), ["fastlin", "crown"],
                      PGD(steps=20, restarts=1))
    metrics = outcome.metrics()
    assert metrics["verified_acc"]["fastlin"] > nominal["verified_acc"]["fastlin"] + 0.25
    assert metrics["clean_acc"] > 0.75
    for pgd, verified in zip(outcome.pgd_correct, outcome.verified["fastlin"]):
        assert pgd >= verified


def test_crown_ibp_with_regularizers_trains_and_certifies_more_than_nominal(data):
    x, y, xt, yt = data
    results = {}
    for method, options in [("nominal", {}), ("crown_ibp+reg", {"lambda_d": 1e-3})]:
        result = train(resolve(RunConfig(method=method, method_options=options,
                                         **CROWN_COMMON)), x, y)
        results[method] = certify(result.model, xt, yt, PerturbationSet("linf", EPS),
                                  ["crown_ibp"]).metrics()["verified_acc"]["crown_ibp"]
    regularized = [epoch for epoch in result.history if "reg_r" in epoch]
    assert regularized and result.history[-1]["beta"] == 0.0  # regularized while beta > 0
    assert all(epoch["reg_d"] >= -1e-6 for epoch in regularized)
    assert results["crown_ibp+reg"] > results["nominal"] + 0.2


def test_cap_trains_a_conv_net_on_projected_bounds_reproducibly():
    """Wong et al.'s setting: projected intermediate bounds (drawn from the run's generator, so a
    rerun is identical) on a conv net."""
    x, y = load_split("digits", "train")
    config = resolve(RunConfig(method="cap", dataset="digits", model="wong_small", eps=EPS,
                               epochs=2, batch_size=50, train_limit=200,
                               method_options={"projections": 10}))
    first = train(config, x[:200], y[:200])
    second = train(config, x[:200], y[:200])
    assert all(torch.isfinite(torch.tensor(epoch["loss"])) for epoch in first.history)
    for a, b in zip(first.model.parameters(), second.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
