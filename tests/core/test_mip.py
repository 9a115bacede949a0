"""The complete (MIP) verifier: exact against dense grid search, between IBP and PGD, its timeout
fallback to the LP relaxation, its parallel path, and the dense form of conv models."""
import numpy as np
import pytest
import torch
from torch import nn

from workers.core.attacks import PGD
from workers.core.bounds import PerturbationSet, ibp_margin_bounds
from workers.core.bounds.linear import linear_margin_bounds
from workers.core.certify import CERTIFIERS
from workers.core.config import RunConfig, resolve
from workers.core.data import load_split
from workers.core.mip import (convert, crown_ibp_intersection_bounds, ibp_preactivation_bounds,
                              mip_min_margins, mip_verify)
from workers.core.models import Normalize
from workers.core.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


def mlp(sizes, seed, normalize=None):
    torch.manual_seed(seed)
    layers = [] if normalize is None else [normalize]
    for i in range(len(sizes) - 1):
        layers += [nn.Linear(sizes[i], sizes[i + 1]), nn.ReLU()]
    return nn.Sequential(*layers[:-1]).eval()


def conv_net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(Normalize([0.4], [0.25], 3), nn.Conv2d(1, 4, 3, 2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(36, 12), nn.ReLU(), nn.Linear(12, 4)).eval()


def lipschitz_linf(model, label, target):
    """A rigorous l_inf -> R Lipschitz constant of z_label - z_target (|weights| products)."""
    weights = [layer.weight.detach().double() for layer in model if isinstance(layer, nn.Linear)]
    row = (weights[-1][label] - weights[-1][target]).abs()
    for weight in reversed(weights[:-1]):
        row = row @ weight.abs()
    if isinstance(model[0], Normalize):
        row = row / model[0].std.double().flatten()
    return float(row.sum())


def test_dense_form_reproduces_conv_models():
    for model, shape in [
        (conv_net(0), (1, 8, 8)),
        (nn.Sequential(Normalize([0.5, 0.3], [0.2, 0.4], 3), nn.Conv2d(2, 3, 3, 1, 1),
                       nn.ReLU(), nn.Conv2d(3, 5, 4, 2, 1), nn.ReLU(), nn.Flatten(),
                       nn.Linear(5 * 4 * 4, 7)), (2, 8, 8)),
    ]:
        x = torch.rand(5, *shape, dtype=torch.float64)
        net = convert(model, shape)
        expected = model.double()(x).detach().numpy()
        assert np.abs(net.forward(x.flatten(1).numpy()) - expected).max() < 1e-5
    with pytest.raises(TypeError, match="cannot encode"):
        convert(nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 2)), (2,))
    with pytest.raises(ValueError, match="linf"):
        mip_verify(mlp([2, 4, 2], 0), torch.rand(1, 2), torch.zeros(1, dtype=torch.long),
                   PerturbationSet("l2", 0.1))


def test_mip_equals_dense_grid_search_on_2d_nets():
    eps, steps = 0.05, 301
    robust_seen = refuted_seen = 0
    for seed in range(3):
        # The normalization scales inputs up, so the decision regions are small enough for eps.
        model = mlp([2, 16, 16, 3], seed, Normalize([0.5, 0.5], [0.2, 0.2], 1))
        x = torch.rand(6, 2, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            y = model(x).argmax(1)
        perturbation = PerturbationSet("linf", eps)
        lower, upper = mip_min_margins(model, x, y, perturbation)
        results = mip_verify(model, x, y, perturbation, time_limit=60)
        lo, hi = perturbation.box(x)
        for b in range(len(x)):
            axes = [torch.linspace(float(lo[b, i]), float(hi[b, i]), steps, dtype=torch.float64)
                    for i in range(2)]
            grid = torch.cartesian_prod(*axes)
            with torch.no_grad():
                z = model.double()(grid)
            model.float()
            spacing = float((hi[b] - lo[b]).max()) / (steps - 1)
            grid_min = np.inf
            for j in range(3):
                if j == y[b]:
                    continue
                grid_j = float((z[:, y[b]] - z[:, j]).min())
                tol = lipschitz_linf(model, int(y[b]), j) * spacing / 2 + 1e-6
                # Sound: never above a point's margin; exact: within the grid's resolution.
                assert lower[b, j] <= grid_j + 1e-6
                assert grid_j - tol <= lower[b, j] <= upper[b, j] + 1e-7
                assert upper[b, j] <= lower[b, j] + 1e-6
                grid_min = min(grid_min, grid_j)
            result = results[b]
            if grid_min > 1e-3:
                assert result["verified"] and result["status"] == "proved"
                robust_seen += 1
            elif grid_min < 0:
                assert not result["verified"] and result["status"] == "refuted"
                point = torch.tensor(result["counterexample"], dtype=torch.float32)
                assert (point >= lo[b] - 1e-7).all() and (point <= hi[b] + 1e-7).all()
                with torch.no_grad():
                    assert model(point[None]).argmax(1).item() != y[b]
                assert result["margin"] < 0
                refuted_seen += 1
    assert robust_seen >= 3 and refuted_seen >= 3, (robust_seen, refuted_seen)


def check_chain(model, x, y, perturbation, tighten=False):
    """Every incomplete bound (IBP, Fast-Lin, CROWN-IBP, CROWN) <= exact MIP minimum <= the
    margin at PGD's point, every target."""
    lower, upper = mip_min_margins(model, x, y, perturbation, time_limit=30, tighten=tighten)
    assert np.nanmax(upper - lower) < 1e-5
    ibp = ibp_margin_bounds(model, x, perturbation, y).detach().double().numpy()
    incomplete = {"ibp": ibp}
    for name, method, intermediate in [("fastlin", "fastlin", "same"),
                                       ("crown_ibp", "crown", "ibp"), ("crown", "crown", "same")]:
        incomplete[name] = linear_margin_bounds(model, x, perturbation, y, method=method,
                                                intermediate=intermediate).detach().double().numpy()
    generator = torch.Generator().manual_seed(0)
    attacked = np.full(lower.shape, np.inf)
    for _ in range(3):
        point = PGD(steps=50, restarts=3, loss="margin").perturb(model, x, y, perturbation,
                                                                generator)
        with torch.no_grad():
            z = model(point).double()
        attacked = np.minimum(attacked, (z.gather(1, y[:, None]) - z).numpy())
    for b in range(len(x)):
        for j in range(lower.shape[1]):
            if j == y[b]:
                continue
            for name, bound in incomplete.items():
                assert bound[b, j] <= upper[b, j] + 1e-5, (name, b, j, bound[b, j], upper[b, j])
            assert lower[b, j] <= attacked[b, j] + 1e-5, (b, j, lower[b, j], attacked[b, j])
    return lower, ibp


def test_ibp_below_mip_below_pgd_on_small_nets():
    gaps = 0
    for model, shape in [(conv_net(1), (1, 8, 8)),
                         (mlp([6, 12, 12, 4], 2, Normalize([0.5] * 6, [0.3] * 6, 1)), (6,))]:
        x = torch.rand(4, *shape, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            y = model(x).argmax(1)
        lower, ibp = check_chain(model, x, y, PerturbationSet("linf", 0.04))
        gaps += int(np.nansum(lower - ibp > 1e-3))
    assert gaps > 0  # IBP is loose somewhere: the MIP is not just repeating it


def test_ibp_below_mip_below_pgd_on_a_trained_net():
    config = resolve(RunConfig(method="ibp", dataset="digits-8x8", model="mlp2x100", eps=0.05,
                               epochs=3, batch_size=50, train_limit=300,
                               schedule={"warmup_epochs": 0, "rampup_epochs": 2}))
    x, y = load_split(config.dataset, "train")
    model = train(config, x[:300], y[:300]).model.eval()
    x_test, y_test = load_split(config.dataset, "test")
    # Three epochs leave many unstable neurons: a small eps, and LP-tightened big-M bounds, keep
    # the exact MIPs (9 targets per example, solved to optimality) to seconds.
    check_chain(model, x_test[:3], y_test[:3], PerturbationSet("linf", 0.005), tighten=True)


def test_timeout_falls_back_to_lp_and_never_claims_more():
    model = mlp([8, 24, 24, 3], 5)
    x = torch.rand(8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        y = model(x).argmax(1)
    perturbation = PerturbationSet("linf", 0.1)
    full = mip_verify(model, x, y, perturbation, time_limit=120)
    hurried = mip_verify(model, x, y, perturbation, time_limit=1e-3)
    statuses = [r["status"] for r in hurried]
    assert all(s in ("proved", "refuted", "timeout-lp-proved", "timeout-unknown")
               for s in statuses), statuses
    assert any(s.startswith("timeout") for s in statuses), statuses
    for quick, exact in zip(hurried, full):
        assert quick["verified"] == (quick["status"] in ("proved", "timeout-lp-proved"))
        if quick["verified"]:
            assert exact["verified"]
        if exact["status"] == "refuted":
            assert not quick["verified"]
    assert sum(r["verified"] for r in full) > sum(r["verified"] for r in hurried) or \
        all(r["verified"] for r in full), [(r["status"], q["status"]) for r, q in zip(full, hurried)]


def test_parallel_workers_give_the_same_flags(monkeypatch):
    model = mlp([2, 16, 16, 3], 7, Normalize([0.5, 0.5], [0.2, 0.2], 1))
    x = torch.rand(6, 2, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        y = model(x).argmax(1)
    perturbation = PerturbationSet("linf", 0.05)
    one = mip_verify(model, x, y, perturbation, workers=1)
    two = mip_verify(model, x, y, perturbation, workers=2)
    solved = [r for r in two if any(t["method"] == "mip" for t in r["targets"].values())]
    assert len(solved) >= 2  # the process pool really ran
    assert {r["status"] for r in one} >= {"proved", "refuted"}
    assert [r["verified"] for r in one] == [r["verified"] for r in two]
    assert [r["status"] for r in one] == [r["status"] for r in two]
    monkeypatch.setenv("CERTREPRO_MIP_TIME_LIMIT", "30")
    flags = CERTIFIERS.get("mip")(model, x, y, perturbation)
    assert flags.dtype == torch.bool and flags.tolist() == [r["verified"] for r in one]


def test_crown_boxes_shrink_the_mip_and_keep_its_verdicts():
    """The certifier's default big-M boxes (CROWN intersected with IBP) lie inside IBP's, leave
    fewer unstable ReLUs (fewer binaries), and change no verdict."""
    model = conv_net(4)
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        y = model(x).argmax(1)
    perturbation = PerturbationSet("linf", 0.03)
    ibp = ibp_preactivation_bounds(model, x, perturbation)
    tight = crown_ibp_intersection_bounds(model, x, perturbation, chunk=2)
    unstable = {"ibp": 0, "tight": 0}
    for (il, iu), (tl, tu) in zip(ibp, tight):
        assert (tl >= il).all() and (tu <= iu).all() and (tl <= tu).all()
        unstable["ibp"] += int(((il < 0) & (iu > 0)).sum())
        unstable["tight"] += int(((tl < 0) & (tu > 0)).sum())
    assert unstable["tight"] < unstable["ibp"]
    with_ibp = mip_verify(model, x, y, perturbation, time_limit=30)
    with_tight = mip_verify(model, x, y, perturbation, time_limit=30,
                            bounds_fn=crown_ibp_intersection_bounds)
    assert [r["verified"] for r in with_ibp] == [r["verified"] for r in with_tight]
