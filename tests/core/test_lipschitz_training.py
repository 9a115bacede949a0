"""Training with the Lipschitz methods on digits at an l_2 eps: each certifies far more than
nominal training under its own certificate, BCP's tau is below the global one on the trained
model, Local-Lip's saved iterate vectors survive a resume exactly, and the variants run."""
import numpy as np
import pytest
import torch

from workers.core.attacks import PGD
from workers.core.bounds import PerturbationSet
from workers.core.certify import certify
from workers.core.config import RunConfig, resolve
from workers.core.data import dataset_info, load_split
from workers.core.lipschitz import IterateStore, bcp_tightness, global_bound, network_of
from workers.core.models import build_model
from workers.core.train import load_checkpoint, train

pytestmark = pytest.mark.usefixtures("one_thread")
EPS = 1.0  # l_2, [0,1] pixel scale, on 28x28 digits


def config(method, **fields):
    base = dict(method=method, dataset="digits", model="mlp2x100", norm="l2", eps=EPS,
                epochs=6, batch_size=64, optimizer={"lr_milestones": []})
    return resolve(RunConfig(**(base | fields)))


@pytest.fixture(scope="module")
def trained(one_thread):
    x, y = load_split("digits", "train")
    return {method: train(config(method), x, y).model
            for method in ("nominal", "lmt", "bcp", "gloro", "local_lip_b")}


def test_each_method_certifies_far_more_than_nominal(trained):
    xt, yt = load_split("digits", "test")
    xt, yt = xt[:200], yt[:200]
    own = {"lmt": "lipschitz", "gloro": "lipschitz", "bcp": "bcp", "local_lip_b": "local_lip"}
    certifiers = ["lipschitz", "bcp", "local_lip"]
    results = {}
    for method, model in trained.items():
        outcome = certify(model, xt, yt, PerturbationSet("l2", EPS), certifiers,
                          PGD(steps=40, restarts=2))
        results[method] = outcome.metrics()["verified_acc"]
        for name in certifiers:
            for clean, pgd, verified in zip(outcome.clean_correct, outcome.pgd_correct,
                                            outcome.verified[name]):
                assert clean >= pgd >= verified, f"{method}/{name}: a certificate PGD broke"
        # a tighter bound never certifies less
        assert all(b >= a for a, b in zip(outcome.verified["lipschitz"], outcome.verified["bcp"]))
        assert all(b >= a for a, b in zip(outcome.verified["lipschitz"],
                                          outcome.verified["local_lip"]))
    for method, certifier in own.items():
        assert results[method][certifier] > results["nominal"][certifier] + 0.2, results


def test_bcp_tightness_is_below_the_global_one_on_the_trained_model(trained):
    xt, _ = load_split("digits", "test")
    tau, tau_global = bcp_tightness(trained["bcp"], xt[:100], PerturbationSet("l2", EPS))
    assert (tau <= tau_global + 1e-6).all()
    assert float(tau.mean()) < 0.95 * float(tau_global.mean())


@pytest.mark.parametrize("method", ["bcp", "local_lip_b"])
def test_resume_restores_the_iterate_vectors_exactly(tmp_path, method):
    cfg = config(method, epochs=3, train_limit=160, batch_size=32,
                 schedule={"warmup_epochs": 0, "rampup_epochs": 1})
    x, y = load_split("digits", "train")
    x, y = x[:160], y[:160]
    straight = train(cfg, x, y, tmp_path / "straight.pt")
    killed = tmp_path / "killed.pt"
    train(cfg, x, y, killed, stop_after=2)
    state = load_checkpoint(killed)["method_state"]
    if method == "local_lip_b":
        store = state["store"]
        assert set(store) == {"0", "1", "2"}
        # a row per example seen (the table grows geometrically, so it may hold spare rows)
        assert all(t.dtype == torch.float16 and t.shape[0] >= 160
                   and t[:160].abs().sum(1).gt(0).all() for t in store.values())
    else:
        assert set(state["power"]) == {"0", "1", "2"}  # one u per layer
    resumed = train(cfg, x, y, killed)
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


def test_a_store_too_large_stays_out_of_the_checkpoint(monkeypatch):
    from workers.core.methods import local_lip
    method = local_lip.LocalLipB(config("local_lip_b"))
    method.store.put(0, torch.arange(4), torch.ones(4, 10))
    assert "store" in method.state_dict()
    monkeypatch.setattr(local_lip, "STORE_CHECKPOINT_LIMIT", 10)
    assert "store" not in method.state_dict() and "power" in method.state_dict()


@pytest.mark.parametrize("method,model,options", [
    ("local_lip_g", "mlp2x100-maxmin", {"init": "random", "power_iterations": 3}),
    ("local_lip_b", "mlp2x100-theta", {"lambda_sparse": 0.01, "lambda_theta": 0.1}),
    ("bcp", "mlp2x100", {"lambda_start": 0.5}),
])
def test_variants_train(method, model, options):
    cfg = config(method, model=model, epochs=2, train_limit=128, batch_size=64,
                 method_options=options, schedule={"warmup_epochs": 0, "rampup_epochs": 1})
    x, y = load_split("digits", "train")
    result = train(cfg, x[:128], y[:128])
    last = result.history[-1]
    assert all(torch.isfinite(torch.tensor(v)) for v in last.values())
    assert "robust_loss" in last and last["lambda"] == 1.0
    if options.get("lambda_sparse"):
        assert last["sparsity_loss"] > 0


def test_saved_iterate_store_size_for_cifar10_6c2f():
    model = build_model("6C2F", dataset_info("cifar10"))
    network = network_of(model, torch.zeros(1, 3, 32, 32))
    per_example = 3 * 32 * 32 + 2 * 32 * 32 * 32 + 32 * 16 * 16 + 2 * 64 * 16 * 16 + 64 * 8 * 8 \
        + 512  # the input of every affine layer
    assert IterateStore.size_for(network, 50_000) == per_example * 50_000 * 2  # float16
    store = IterateStore()
    store.put(0, torch.tensor([4, 1]), torch.ones(2, 3, 2))
    assert store.nbytes == 5 * 6 * 2
    got = store.get(0, torch.tensor([1, 9, 0]), (3, 2))
    assert torch.equal(got[0], torch.ones(3, 2)) and not got[1:].any()  # unseen rows: zeros


def test_memory_mapped_store_writes_through_and_grows(tmp_path):
    store = IterateStore(directory=tmp_path / "u")
    store.put(1, torch.tensor([0, 2]), torch.full((2, 4, 2), 0.5))
    assert (tmp_path / "u" / "layer1-3x8.f16").stat().st_size == 3 * 8 * 2
    store.put(1, torch.tensor([7]), torch.full((1, 4, 2), -1.0))  # grows to 8 rows, old file gone
    assert sorted(p.name for p in (tmp_path / "u").iterdir()) == ["layer1-8x8.f16"]
    got = store.get(1, torch.tensor([2, 7, 1]), (4, 2))
    assert torch.equal(got[0], torch.full((4, 2), 0.5)) and torch.equal(got[1], -torch.ones(4, 2))
    assert not got[2].any()
    mapped = np.memmap(tmp_path / "u" / "layer1-8x8.f16", dtype=np.float16, mode="r")
    assert mapped.reshape(8, 8)[7, 0] == -1.0  # on disk, not only in memory
    with pytest.raises(ValueError, match="float16 or float32"):
        IterateStore(torch.bfloat16, directory=tmp_path)
    restored = IterateStore(directory=tmp_path / "v")
    restored.load_state_dict(store.state_dict())
    assert torch.equal(restored.get(1, torch.tensor([7]), (8,)), store.get(1, torch.tensor([7]), (8,)))


@pytest.mark.parametrize("method", ["bcp", "local_lip_b"])
def test_both_bounds_and_the_varying_shares_are_recorded(method):
    """Local-Lip Figure 2: the global and the average local bound during BCP and Local-Lip-B
    training; Figure 6: the varying share of each layer."""
    cfg = config(method, epochs=1, train_limit=128, batch_size=32,
                 schedule={"warmup_epochs": 0, "rampup_epochs": 1})
    x, y = load_split("digits", "train")
    last = train(cfg, x[:128], y[:128]).history[-1]
    assert 0 < last["local_lipschitz"] <= last["lipschitz"]  # Local-Lip Theorem 1
    layers = [last["varying_fraction.layer1"], last["varying_fraction.layer2"]]
    assert "varying_fraction.layer3" not in last  # mlp2x100: two hidden layers
    assert all(0 < share <= 1 for share in layers)
    assert last["varying_fraction"] == pytest.approx(sum(layers) / 2, rel=1e-6)
    assert last["fit_loss"] > 0 and last["robust_loss"] > 0


@pytest.mark.parametrize("method", ["bcp", "local_lip_b", "local_lip_g"])
@pytest.mark.parametrize("t", [0.5, 1.0, 2.5, 4.0])  # warm-up, the ramp's first step, ramp, after
def test_every_step_records_every_curve(method, t):
    """The trainer divides each statistic's sum by the epoch's steps: a statistic missing from a
    step would bias its epoch mean, so each step of these methods records them all."""
    from workers.core.methods import METHODS, StepState
    cfg = config(method, epochs=4, schedule={"warmup_epochs": 1, "rampup_epochs": 2})
    method_obj = METHODS.get(method)(cfg)
    model = build_model("mlp2x100", dataset_info("digits")).train()
    x, y = load_split("digits", "train")
    eps = 0.0 if t <= 1 else EPS
    state = StepState(t, eps, PerturbationSet("l2", eps), torch.Generator().manual_seed(0),
                      torch.arange(16))
    loss, stats = method_obj.loss(model, x[:16], y[:16], state)
    curves = {"lipschitz", "local_lipschitz", "varying_fraction", "varying_fraction.layer1",
              "varying_fraction.layer2", "fit_loss", "loss"}
    curves |= {f"{bound}.layer{i}" for bound in ("lipschitz", "local_lipschitz") for i in (1, 2, 3)}
    if t >= 1:  # from the end of the warm-up on
        curves |= {"robust_loss", "train_verified"}
    assert curves <= set(stats)
    # both are power-iteration estimates (from below) of bounds at most the certified global one
    # (on a fresh model the global estimate is not converged yet: no order between the two)
    certified = float(global_bound(model, x[:1]))
    assert 0 < float(stats["local_lipschitz"]) <= certified
    assert 0 < float(stats["lipschitz"]) <= certified
    # the global bound is the product of the layer norms it records (Figure 7's curves)
    layers = torch.stack([torch.as_tensor(stats[f"lipschitz.layer{i}"]) for i in (1, 2, 3)])
    assert float(layers.prod()) == pytest.approx(float(stats["lipschitz"]), rel=1e-5)
    assert all(float(stats[f"local_lipschitz.layer{i}"]) > 0 for i in (1, 2, 3))
    loss.backward()  # a differentiable loss at every stage, the ramp's first step included


def test_the_local_bound_recorded_beside_bcp_is_an_estimate_of_the_certified_one():
    """SharedStartLocalNorms (BCP's recorded local bound): power steps from the global iterates
    approach each example's reduced-operator norm from below, so the recorded bound stays under
    the certified one (exact here: dense float64 norms) and meets it once converged."""
    from torch import nn

    from workers.core.lipschitz import (CertifiedLocalNorms, GlobalPower, SharedStartLocalNorms,
                                        local_outer)

    from .nets import DTYPE, random_init
    gen = torch.Generator().manual_seed(5)
    model = random_init(nn.Sequential(nn.Linear(6, 20), nn.ReLU(), nn.Linear(20, 20), nn.ReLU(),
                                      nn.Linear(20, 4)), gen)
    x = torch.rand(10, 6, generator=gen, dtype=DTYPE)
    perturbation = PerturbationSet("l2", 0.2)
    with torch.no_grad():
        _, exact = local_outer(model, x, perturbation, CertifiedLocalNorms())
        power = GlobalPower(300)
        power.norms([s.affine for s in network_of(model, x).stages], gen)
        for steps, tolerance in ((1, None), (300, 1e-6)):
            _, estimate = local_outer(model, x, perturbation,
                                      SharedStartLocalNorms(power, steps, gen))
            assert (estimate <= exact * (1 + 1e-9)).all()
            if tolerance is not None:
                assert estimate == pytest.approx(exact, rel=tolerance)
    assert (exact < float(global_bound(model, x[:1]))).all()  # the masks do remove something


def test_tracked_bounds_are_sampled_and_epoch_means_are_over_the_steps_that_recorded_them(
        monkeypatch):
    """BCP measures the local bound it does not train with on the first step of each epoch and
    every TRACK_EVERY-th after it (on every step it doubled a GPU step); each epoch mean of the
    history is the mean over the steps that recorded the statistic, not a sum over all steps."""
    from workers.core.methods import METHODS
    from workers.core.methods.bcp import TRACK_EVERY

    recorded: list[dict[str, float]] = []
    loss_of = METHODS.get("bcp").loss

    def spy(self, model, x, y, state):
        loss, stats = loss_of(self, model, x, y, state)
        recorded.append({key: float(value) for key, value in stats.items()} | {"_step": state.step})
        return loss, stats

    monkeypatch.setattr(METHODS.get("bcp"), "loss", spy)
    steps = TRACK_EVERY + 2  # the tracked steps of each epoch: 0 and TRACK_EVERY
    cfg = config("bcp", epochs=2, train_limit=steps * 8, batch_size=8,
                 schedule={"warmup_epochs": 0, "rampup_epochs": 1})
    x, y = load_split("digits", "train")
    history = train(cfg, x[:steps * 8], y[:steps * 8]).history
    assert [r["_step"] for r in recorded] == list(range(steps)) * 2
    for epoch, means in enumerate(history):
        epoch_steps = recorded[epoch * steps:(epoch + 1) * steps]
        tracked = [r for r in epoch_steps if "local_lipschitz" in r]
        assert [r["_step"] for r in tracked] == [0, TRACK_EVERY]
        assert means["local_lipschitz"] == pytest.approx(
            sum(r["local_lipschitz"] for r in tracked) / 2, rel=1e-6)
        assert means["lipschitz"] == pytest.approx(  # BCP's own bound: every step
            sum(r["lipschitz"] for r in epoch_steps) / steps, rel=1e-6)
