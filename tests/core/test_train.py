"""Training: exact resumption and the claim that IBP training certifies far more than nominal."""
import torch

from workers.core.attacks import PGD
from workers.core.bounds import PerturbationSet
from workers.core.certify import certify
from workers.core.config import RunConfig, resolve
from workers.core.data import load_split
from workers.core.train import load_checkpoint, train


def small_config(**fields):
    base = dict(method="ibp", dataset="digits-8x8", model="mlp2x100", eps=0.05, epochs=4,
                batch_size=64, train_limit=400, schedule={"warmup_epochs": 1, "rampup_epochs": 2},
                optimizer={"lr_milestones": [3]})
    return resolve(RunConfig(**(base | fields)))


def train_data(config):
    x, y = load_split(config.dataset, "train")
    return x[:config.train_limit], y[:config.train_limit]


def test_resume_after_kill_gives_identical_parameters(tmp_path):
    for method in ("ibp", "pgd"):
        config = small_config(method=method, dataset="digits", model="small", train_limit=200)
        x, y = train_data(config)
        straight = train(config, x, y, tmp_path / f"{method}-straight.pt")
        killed = tmp_path / f"{method}-killed.pt"
        train(config, x, y, killed, stop_after=2)  # "killed" after epoch 2
        assert load_checkpoint(killed)["epoch"] == 2
        resumed = train(config, x, y, killed)
        for (name, a), b in zip(straight.model.state_dict().items(),
                                resumed.model.state_dict().values()):
            assert torch.equal(a, b), f"{method}: {name} differs after resume"
        assert len(resumed.sec_per_epoch) == config.epochs
        assert resumed.history == straight.history
        state = load_checkpoint(killed)
        assert state["epoch"] == config.epochs and state["config"] == config.model_dump()


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path):
    config = small_config(epochs=1)
    x, y = train_data(config)
    train(config, x, y, tmp_path / "c.pt")
    try:
        train(config.model_copy(update={"seed": 3}), x, y, tmp_path / "c.pt")
    except ValueError as error:
        assert "different config" in str(error)
    else:
        raise AssertionError("a checkpoint of another config was resumed")


def test_ibp_training_certifies_far_more_than_nominal():
    eps = 0.1
    results = {}
    for method in ("nominal", "ibp"):
        config = resolve(RunConfig(
            method=method, dataset="digits", model="small", eps=eps, eps_train=0.15, epochs=12,
            batch_size=32, schedule={"warmup_epochs": 1, "rampup_epochs": 6},
            optimizer={"lr_milestones": [10]}))
        x, y = load_split("digits", "train")
        model = train(config, x, y).model
        xt, yt = load_split("digits", "test")
        outcome = certify(model, xt, yt, PerturbationSet("linf", eps), ["ibp"],
                          PGD(steps=20, restarts=1))
        results[method] = outcome.metrics()
        # a certificate implies robustness to the attack, which implies correctness
        for clean, pgd, verified in zip(outcome.clean_correct, outcome.pgd_correct,
                                        outcome.verified["ibp"]):
            assert clean >= pgd >= verified
    assert results["nominal"]["verified_acc"]["ibp"] < 0.02
    assert results["ibp"]["verified_acc"]["ibp"] > 0.5
    assert results["ibp"]["clean_acc"] > 0.8


def test_crown_ibp_training_certifies_far_more_than_nominal():
    """CROWN-IBP (beta 1 -> 0 over the ramp, kappa 1 -> 0) on digits, certified with its own
    bound and with IBP."""
    eps = 0.1
    config = resolve(RunConfig(
        method="crown_ibp", dataset="digits", model="small", eps=eps, eps_train=0.15, epochs=10,
        batch_size=32, schedule={"warmup_epochs": 1, "rampup_epochs": 6},
        optimizer={"lr_milestones": [8]}))
    x, y = load_split("digits", "train")
    result = train(config, x, y)
    assert result.history[2]["beta"] < 1 and result.history[-1]["beta"] == 0.0
    xt, yt = load_split("digits", "test")
    outcome = certify(result.model, xt, yt, PerturbationSet("linf", eps), ["ibp", "crown_ibp"],
                      PGD(steps=20, restarts=1))
    metrics = outcome.metrics()
    assert metrics["verified_acc"]["crown_ibp"] > 0.4 and metrics["verified_acc"]["ibp"] > 0.4
    for pgd, verified in zip(outcome.pgd_correct, outcome.verified["crown_ibp"]):
        assert pgd >= verified
