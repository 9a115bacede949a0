"""Power iteration, certified layer norms, the global and local Lipschitz bounds (Local-Lip
appendix A.1 by the numbers, Theorem 1 as a property) and the soundness of the `lipschitz`,
`bcp` and `local_lip` certificates against dense sampling and l_2 PGD."""
import math

import pytest
import torch
from torch import nn

from tests.core.nets import DTYPE, random_init
from workers.core.activations import MaxMin, ReLUTheta
from workers.core.attacks import PGD, margin_loss
from workers.core.bounds import PerturbationSet
from workers.core.lipschitz import (CertifiedLocalNorms, CertifySettings, certified_norms,
                                    global_bound, local_bound, local_outer, network_of,
                                    power_iterate, safety_factor)
from workers.core.lipschitz.bounds import bcp_margins, lipschitz_margins, local_margins
from workers.core.lipschitz.power import sigma
from workers.core.models import Normalize

pytestmark = pytest.mark.usefixtures("one_thread")
FREE = dict(low=-math.inf, high=math.inf)  # no pixel-range clipping (inputs of any sign)
POWER_ONLY = CertifySettings(dense_limit=0, min_iterations=300)  # force the power-iteration path


def conv_net(gen, channels=1, size=6, activation=nn.ReLU):
    layers = [Normalize([0.5] * channels, [0.3 + 0.1 * i for i in range(channels)], 3),
              nn.Conv2d(channels, 4, 3, stride=1, padding=1), activation((4, size, size)),
              nn.Conv2d(4, 4, 4, stride=2, padding=1), activation((4, size // 2, size // 2)),
              nn.Flatten(), nn.Linear(4 * (size // 2) ** 2, 10), activation((10,)),
              nn.Linear(10, 3)]
    if activation is nn.ReLU:
        layers = [nn.ReLU() if isinstance(l, nn.ReLU) else l for l in layers]
    return random_init(nn.Sequential(*layers), gen)


def relu(_shape):
    return nn.ReLU()


def mlp(gen, sizes=(5, 12, 8, 3), activation=relu):
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), activation((b,))]
    return random_init(nn.Sequential(*layers[:-1]), gen)


def affines(model, x):
    return [stage.affine for stage in network_of(model, x).stages]


def test_affine_operators_are_exact_and_transposes_adjoint():
    gen = torch.Generator().manual_seed(0)
    model = conv_net(gen, channels=2, size=7)  # odd size: the stride rounds, output_padding needed
    x = torch.rand(3, 2, 7, 7, generator=gen, dtype=DTYPE)
    for affine in affines(model, x):
        u = torch.randn(3, *affine.in_shape, generator=gen, dtype=DTYPE)
        v = torch.randn(3, *affine.out_shape, generator=gen, dtype=DTYPE)
        lhs = (affine.apply(u) * v).flatten(1).sum(1)
        rhs = (u * affine.apply_t(v)).flatten(1).sum(1)
        assert torch.allclose(lhs, rhs, atol=1e-10)
        dense = affine.dense()
        assert torch.allclose(affine.apply(u).flatten(1), u.flatten(1) @ dense.T, atol=1e-10)
        mask = torch.rand(3, *affine.in_shape, generator=gen) > 0.4
        rows = affine.row_norms(mask).flatten(1)
        exact = (dense.unsqueeze(0) * mask.flatten(1).unsqueeze(1)).norm(dim=2)
        assert torch.allclose(rows, exact, atol=1e-10)  # borders of the padding included
    # the first affine layer folds Normalize's 1/std: the operator is the net's own map
    first = affines(model, x)[0]
    delta = torch.randn(1, 2, 7, 7, generator=gen, dtype=DTYPE) * 0.1
    diff = model[1](model[0](x[:1] + delta)) - model[1](model[0](x[:1]))
    assert torch.allclose(diff, first.apply(delta), atol=1e-10)


def test_power_iteration_approaches_the_norm_from_below_and_certified_norms_bound_it():
    gen = torch.Generator().manual_seed(1)
    model = conv_net(gen)
    x = torch.rand(2, 1, 6, 6, generator=gen, dtype=DTYPE)
    for affine in affines(model, x):
        exact = torch.linalg.matrix_norm(affine.dense(), ord=2)
        u = torch.randn(1, *affine.in_shape, generator=gen, dtype=DTYPE)
        previous = 0.0
        for steps in (1, 3, 10, 100, 3000):
            estimate = sigma(affine, power_iterate(affine, u, steps)[0]).item()
            assert estimate <= exact * (1 + 1e-9)  # from below
            assert estimate >= previous - 1e-9  # and non-decreasing (warm start = more steps)
            previous = estimate
        assert previous == pytest.approx(float(exact), rel=1e-4)
        dense = certified_norms(affine)
        assert dense.item() == pytest.approx(float(exact), rel=1e-8) and dense >= exact
        powered = certified_norms(affine, settings=POWER_ONLY)
        factor = safety_factor(POWER_ONLY.min_iterations, affine.in_numel, POWER_ONLY.delta)
        assert exact <= powered <= exact * factor * (1 + 1e-6)


def test_safety_factor_shrinks_with_iterations_and_grows_with_dimension_and_confidence():
    assert safety_factor(100, 1000, 1e-6) > safety_factor(1000, 1000, 1e-6) > 1
    assert safety_factor(1000, 10 ** 6, 1e-6) > safety_factor(1000, 100, 1e-6)
    assert safety_factor(1000, 1000, 1e-12) > safety_factor(1000, 1000, 1e-3)
    # 1000 steps on a 32768-dim layer (6C2F's widest) at delta 1e-6: below 1 %
    assert safety_factor(1000, 32768, 1e-6) < 1.01
    with pytest.raises(ValueError):
        CertifySettings(delta=0)


def toy_network():
    """Local-Lip appendix A.1: W1 = W2 = diag(3, 2, 1), W3 = [1 1 1], theta = 1, no biases."""
    w = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=DTYPE))
    layers = [nn.Linear(3, 3), ReLUTheta((3,), 1.0), nn.Linear(3, 3), ReLUTheta((3,), 1.0),
              nn.Linear(3, 1)]
    model = nn.Sequential(*layers).to(DTYPE)
    with torch.no_grad():
        model[0].weight.copy_(w), model[2].weight.copy_(w), model[4].weight.fill_(1.0)
        for i in (0, 2, 4):
            model[i].bias.zero_()
    return model


def test_local_lip_appendix_a1_by_the_numbers():
    model = toy_network()
    x = torch.tensor([[1.0, -1.0, 0.0]], dtype=DTYPE)
    perturbation = PerturbationSet("l2", 0.1, **FREE)
    assert float(global_bound(model, x)) == pytest.approx(9 * math.sqrt(3), rel=1e-8)
    assert float(local_bound(model, x, perturbation)[0]) == pytest.approx(1.0, rel=1e-8)
    outer, _ = local_outer(model, x, perturbation, CertifiedLocalNorms())
    (act1, lo1, up1), (act2, lo2, up2) = outer.boxes
    # the boxes printed in A.1: after W1 [[2.7, 3.3], [-2.2, -1.8], [-0.1, 0.1]], after W2
    # [3, 0, [0, 0.1]]
    assert torch.allclose(lo1, torch.tensor([[2.7, -2.2, -0.1]], dtype=DTYPE))
    assert torch.allclose(up1, torch.tensor([[3.3, -1.8, 0.1]], dtype=DTYPE))
    assert torch.allclose(lo2, torch.tensor([[3.0, 0.0, 0.0]], dtype=DTYPE))
    assert torch.allclose(up2, torch.tensor([[3.0, 0.0, 0.1]], dtype=DTYPE))
    for act, lo, up in outer.boxes:  # I_C, I_theta, I_V as printed, for both layers
        constant = (up <= 0)[0].tolist()
        clipped = (lo >= act.theta)[0].tolist()
        varying = act.varying(lo, up)[0].tolist()
        assert constant == [False, True, False]
        assert clipped == [True, False, False]
        assert varying == [False, False, True]


@pytest.mark.parametrize("kind", ["mlp-relu", "mlp-theta", "mlp-maxmin", "conv-relu",
                                  "conv-theta"])
def test_local_bound_never_exceeds_the_global_bound(kind):
    """Theorem 1 as a property, over random nets, inputs and radii."""
    gen = torch.Generator().manual_seed(2)
    for trial in range(4):
        if kind.startswith("mlp"):
            activation = {"relu": relu, "theta": lambda s: ReLUTheta(s, 0.5),
                          "maxmin": lambda s: MaxMin(s, 0.5, -0.5)}[kind.split("-")[1]]
            model = mlp(gen, (6, 16, 12, 4), activation)
            x = torch.randn(16, 6, generator=gen, dtype=DTYPE)
        else:
            activation = nn.ReLU if kind == "conv-relu" else (lambda s: ReLUTheta(s, 0.5))
            model = conv_net(gen, activation=activation)
            x = torch.rand(16, 1, 6, 6, generator=gen, dtype=DTYPE)
        model = model.to(DTYPE)
        eps = [0.01, 0.1, 0.5, 2.0][trial]
        local = local_bound(model, x, PerturbationSet("l2", eps, **FREE))
        assert (local <= global_bound(model, x) * (1 + 1e-9)).all()
        # with the power-iteration path the local bound carries its safety factors, which are
        # at most the global layers' (fewer active dimensions)
        factors = math.prod(safety_factor(POWER_ONLY.min_iterations, a.in_numel, POWER_ONLY.delta)
                            for a in affines(model, x))
        local = local_bound(model, x[:4], PerturbationSet("l2", eps, **FREE), POWER_ONLY)
        assert (local <= global_bound(model, x) * factors * (1 + 1e-6)).all()


def _sampled_min_margins(model, x, y, eps, samples, gen, pixel=True):
    """The smallest margin z_y - z_m per class seen over dense samples of the ball (sphere and
    inside) and over l_2 PGD points."""
    perturbation = PerturbationSet("l2", eps) if pixel else PerturbationSet("l2", eps, **FREE)
    worst = None
    with torch.no_grad():
        for _ in range(samples):
            direction = torch.randn(x.shape, generator=gen, dtype=x.dtype)
            direction = direction / direction.flatten(1).norm(dim=1).view(-1, *[1] * (x.dim() - 1))
            radius = eps * torch.rand(x.shape[0], generator=gen, dtype=x.dtype) ** 0.25
            point = perturbation.project(x + direction * radius.view(-1, *[1] * (x.dim() - 1)), x)
            logits = model(point)
            margins = logits.gather(1, y[:, None]) - logits
            worst = margins if worst is None else torch.minimum(worst, margins)
    for _ in range(3):
        adv = PGD(steps=60, restarts=1, loss="margin").perturb(model, x, y, perturbation, gen)
        with torch.no_grad():
            logits = model(adv)
            worst = torch.minimum(worst, logits.gather(1, y[:, None]) - logits)
    return worst


@pytest.mark.parametrize("net", ["mlp-2d", "mlp-theta", "mlp-maxmin-2d", "conv"])
def test_every_margin_bound_holds_against_sampling_and_pgd(net):
    gen = torch.Generator().manual_seed(3)
    if net == "mlp-2d":  # 2-D input: 4000 samples are a dense cover of the disc
        model = mlp(gen, (2, 16, 16, 3))
        x = torch.rand(24, 2, generator=gen, dtype=DTYPE)
    elif net == "mlp-maxmin-2d":
        model = mlp(gen, (2, 16, 16, 4), lambda s: MaxMin(s, 0.6, -0.4)).to(DTYPE)
        x = torch.rand(24, 2, generator=gen, dtype=DTYPE)
    elif net == "mlp-theta":
        model = mlp(gen, (8, 20, 20, 4), lambda s: ReLUTheta(s, 0.7)).to(DTYPE)
        x = torch.rand(24, 8, generator=gen, dtype=DTYPE)
    else:
        model = conv_net(gen, activation=lambda s: ReLUTheta(s, 1.0)).to(DTYPE)
        x = torch.rand(24, 1, 6, 6, generator=gen, dtype=DTYPE)
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    for eps in (0.05, 0.3):
        perturbation = PerturbationSet("l2", eps)
        seen = _sampled_min_margins(model, x, y, eps, 4000 if net.endswith("2d") else 600, gen)
        for name, bound in (("lipschitz", lipschitz_margins), ("bcp", bcp_margins),
                            ("local_lip", local_margins)):
            lower = bound(model, x, y, perturbation)
            assert (lower <= seen + 1e-9).all(), f"{name} bound above a sampled margin"


def test_bcp_and_local_bounds_are_tighter_than_the_global_one_here():
    gen = torch.Generator().manual_seed(4)
    model = mlp(gen, (8, 30, 30, 5))
    x = torch.rand(32, 8, generator=gen, dtype=DTYPE)
    y = model(x).argmax(dim=1)
    perturbation = PerturbationSet("l2", 0.2)
    plain = lipschitz_margins(model, x, y, perturbation)
    bcp = bcp_margins(model, x, y, perturbation)
    local = local_margins(model, x, y, perturbation)
    others = y[:, None] != torch.arange(5)
    assert (bcp >= plain - 1e-9).all() and (bcp[others] > plain[others] + 1e-6).any()
    assert (local[others] > plain[others] + 1e-6).any()
