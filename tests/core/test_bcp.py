"""BCP: the problem-(11) solver against an independent convex solver, its round count
(Proposition 2), the box never loosening the ball, the tightness tau, and the l_inf extension
(the circumscribing ball) against the exact MIP margins."""
import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from torch import nn

from tests.core.nets import DTYPE, random_init
from workers.core.bounds import PerturbationSet
from workers.core.certify import CERTIFIERS
from workers.core.lipschitz import bcp_outer, bcp_tightness, margin_lower, solve_ball_box
from workers.core.lipschitz.bcp import ball_box_minimum
from workers.core.lipschitz.bounds import bcp_margins, lipschitz_margins
from workers.core.mip import mip_min_margins

pytestmark = pytest.mark.usefixtures("one_thread")


def random_problem(gen, n, batch=1, specs=1):
    z = torch.randn(batch, n, generator=gen, dtype=DTYPE)
    below = torch.rand(batch, n, generator=gen, dtype=DTYPE) * 0.6
    above = torch.rand(batch, n, generator=gen, dtype=DTYPE) * 0.6
    rho = 0.3 + torch.rand(batch, generator=gen, dtype=DTYPE)
    c = torch.randn(batch, specs, n, generator=gen, dtype=DTYPE)
    c[torch.rand(c.shape, generator=gen) < 0.1] = 0.0  # some coordinates the objective ignores
    return z, z - below, z + above, rho, c


def scipy_optimum(z, lower, upper, rho, c) -> float:
    """min c.p s.t. ||p - z|| <= rho, lower <= p <= upper, by SLSQP (a general NLP solver)."""
    z, lower, upper, c = (t.numpy() for t in (z, lower, upper, c))
    result = minimize(lambda p: c @ p, np.clip(z, lower, upper), jac=lambda p: c,
                      method="SLSQP", bounds=list(zip(lower, upper)),
                      constraints=[{"type": "ineq", "fun": lambda p: rho ** 2 - ((p - z) ** 2).sum(),
                                    "jac": lambda p: -2 * (p - z)}],
                      options={"ftol": 1e-12, "maxiter": 1000})
    # SLSQP may stop on "positive directional derivative" at the optimum: check the point itself
    assert result.success or result.status == 8, result.message
    p = result.x
    assert ((p - z) ** 2).sum() <= rho ** 2 + 1e-8
    assert (p >= lower - 1e-9).all() and (p <= upper + 1e-9).all()
    return float(c @ p)


def test_solver_matches_an_independent_convex_solver_and_stops_within_dim_rounds():
    gen = torch.Generator().manual_seed(0)
    most = 0
    for n in (3, 8, 24):
        z, lower, upper, rho, c = random_problem(gen, n, batch=4, specs=3)
        p, rounds = solve_ball_box(z, lower, upper, rho, c, return_rounds=True)
        assert rounds < n  # Proposition 2
        most = max(most, rounds)
        # feasible
        assert ((p - z.unsqueeze(1)).norm(dim=-1) <= rho.view(-1, 1) * (1 + 1e-9)).all()
        assert (p >= lower.unsqueeze(1) - 1e-12).all() and (p <= upper.unsqueeze(1) + 1e-12).all()
        ours = (c * p).sum(-1)
        assert torch.allclose(ball_box_minimum(z, lower, upper, rho, c), ours, atol=1e-12)
        for b in range(4):
            for s in range(3):
                reference = scipy_optimum(z[b], lower[b], upper[b], float(rho[b]), c[b, s])
                assert float(ours[b, s]) == pytest.approx(reference, abs=1e-4)
                assert float(ours[b, s]) <= reference + 1e-6  # never above a feasible value
    assert most >= 3  # the cases needed several projection rounds


def test_solver_edge_cases():
    z = torch.zeros(1, 3, dtype=DTYPE)
    c = torch.tensor([[[1.0, -2.0, 0.0]]], dtype=DTYPE)
    # a box inside the ball: the optimum is the box's corner
    p = solve_ball_box(z, z - 0.1, z + 0.1, torch.tensor([5.0], dtype=DTYPE), c)
    assert torch.allclose(p, torch.tensor([[[-0.1, 0.1, 0.0]]], dtype=DTYPE))
    # a ball inside the box: the ball's minimizer z - rho c / ||c||
    p = solve_ball_box(z, z - 10, z + 10, torch.tensor([1.0], dtype=DTYPE), c)
    assert torch.allclose(p, -c / c.norm())
    # radius 0 and a zero specification vector: p = z
    assert torch.allclose(solve_ball_box(z, z - 1, z + 1, torch.tensor([0.0], dtype=DTYPE), c),
                          z.unsqueeze(1), atol=1e-12)
    assert torch.equal(solve_ball_box(z, z - 1, z + 1, torch.tensor([1.0], dtype=DTYPE),
                                      torch.zeros_like(c)), z.unsqueeze(1))


def test_solver_is_differentiable():
    gen = torch.Generator().manual_seed(1)
    z, lower, upper, rho, c = random_problem(gen, 10, batch=2, specs=2)
    leaves = [t.clone().requires_grad_(True) for t in (z, lower, upper, rho, c)]
    value = lambda *args: (args[4] * solve_ball_box(*args)).sum()  # noqa: E731
    assert torch.autograd.gradcheck(value, leaves, atol=1e-6)
    assert torch.autograd.gradcheck(lambda *a: ball_box_minimum(*a).sum(), leaves, atol=1e-6)


def net(gen, sizes=(6, 20, 20, 4)):
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return random_init(nn.Sequential(*layers[:-1]), gen)


def test_box_never_loosens_the_ball_and_tau_is_at_most_the_global_one():
    gen = torch.Generator().manual_seed(2)
    for eps in (0.05, 0.5, 3.0):
        model = net(gen)
        x = torch.rand(16, 6, generator=gen, dtype=DTYPE)
        y = torch.randint(0, 4, (16,), generator=gen)
        perturbation = PerturbationSet("l2", eps)
        outer = bcp_outer(model, x, perturbation)
        with_box, ball = margin_lower(outer, y, True), margin_lower(outer, y, False)
        assert (with_box >= ball - 1e-9).all()
        assert torch.allclose(ball, lipschitz_margins(model, x, y, perturbation))
        tau, tau_global = bcp_tightness(model, x, perturbation)
        assert (tau <= tau_global + 1e-9).all() and (tau >= 0).all()
        # without the box tau is the paper's constant: rho * mean ||W_i - W_j||
        weight = model[-1].weight
        pairs = [(weight[i] - weight[j]).norm() for i in range(4) for j in range(4) if i != j]
        assert torch.allclose(tau_global, outer.rho * torch.stack(pairs).mean())


def test_linf_bcp_through_the_circumscribing_ball_is_below_the_exact_mip_margins():
    gen = torch.Generator().manual_seed(3)
    model = net(gen, (4, 8, 8, 3)).float()
    x = torch.rand(6, 4, generator=gen)
    y = model(x).argmax(dim=1)
    for eps in (0.02, 0.1):
        perturbation = PerturbationSet("linf", eps)
        exact_lower, exact_at_point = mip_min_margins(model, x, y, perturbation)
        for bound in (bcp_margins, lipschitz_margins):
            ours = bound(model, x, y, perturbation).detach().numpy()
            others = ~np.isnan(exact_at_point)
            assert (ours[others] <= exact_at_point[others] + 1e-5).all()
        certified = CERTIFIERS.get("bcp")(model, x, y, perturbation)
        exact = CERTIFIERS.get("mip")(model, x, y, perturbation)
        assert not (certified & ~exact).any()
    # the ball has radius sqrt(N) eps
    outer = bcp_outer(model, x, PerturbationSet("linf", 0.1))
    norms = torch.stack(outer.norms).prod()
    assert torch.allclose(outer.rho, torch.full_like(outer.rho, 0.1 * math.sqrt(4)) * norms)


def test_general_specifications_fold_into_the_last_layer():
    """A specification matrix other than the margins: each row's bound is the bound of that linear
    function of the logits, and the margin specification gives the label form."""
    from workers.core.bounds import Specification, margin_specification
    gen = torch.Generator().manual_seed(5)
    model = net(gen)
    x = torch.rand(5, 6, generator=gen, dtype=DTYPE)
    y = torch.randint(0, 4, (5,), generator=gen)
    perturbation = PerturbationSet("l2", 0.3)
    outer = bcp_outer(model, x, perturbation)
    spec = margin_specification(y, 4)
    assert torch.allclose(margin_lower(outer, spec), margin_lower(outer, y))
    matrix = torch.randn(5, 2, 4, generator=gen, dtype=DTYPE)
    lower = margin_lower(outer, Specification(matrix))
    # below every sampled value of C z
    for _ in range(200):
        delta = torch.randn(x.shape, generator=gen, dtype=DTYPE)
        delta = delta / delta.norm(dim=1, keepdim=True) * 0.3 * torch.rand(5, 1, generator=gen,
                                                                            dtype=DTYPE)
        values = torch.einsum("bsk,bk->bs", matrix, model(perturbation.project(x + delta, x)))
        assert (lower <= values + 1e-9).all()
    ball = lipschitz_margins(model, x, Specification(matrix), perturbation)
    assert (ball <= lower + 1e-9).all()


def test_the_box_intersection_has_the_gradient_of_max_and_min():
    from workers.core.lipschitz.bcp import _intersect
    gen = torch.Generator().manual_seed(6)
    center = torch.randn(3, 2, 4, generator=gen, dtype=DTYPE, requires_grad=True)
    for radius_shape in ((1, 2, 4), (3, 2, 4)):
        radius = torch.rand(radius_shape, generator=gen, dtype=DTYPE).requires_grad_(True)
        lower = (center.detach() - torch.rand(3, 2, 4, generator=gen, dtype=DTYPE)).requires_grad_()
        upper = (center.detach() + torch.rand(3, 2, 4, generator=gen, dtype=DTYPE)).requires_grad_()
        low, up = _intersect(center, radius, lower, upper)
        assert torch.equal(low, torch.maximum(center - radius, lower))
        assert torch.equal(up, torch.minimum(center + radius, upper))
        assert torch.autograd.gradcheck(lambda *a: torch.cat(_intersect(*a)),
                                        (center, radius, lower, upper))
