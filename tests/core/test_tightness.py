"""003's tightness regularizers d and r, and the forward (exact or projected) Fast-Lin boxes."""
import numpy as np
import pytest
import torch
from torch import nn

from tests.core.nets import DTYPE, random_init
from workers.core.bounds import PerturbationSet, Specification
from workers.core.bounds.linear import linear_margin_solution, preactivation_bounds
from workers.core.bounds.projection import fastlin_forward_boxes
from workers.core.bounds.tightness import tightness_regularizers
from workers.core.mip import mip_min_margins
from workers.core.models import Normalize

pytestmark = pytest.mark.usefixtures("one_thread")


def toy_model():
    """003 Appendix A: h(x) = W2 relu(W1 x) = x_2 - |x_1| near the points used below."""
    model = nn.Sequential(nn.Linear(2, 4, bias=False), nn.ReLU(), nn.Linear(4, 1, bias=False))
    model = model.to(DTYPE)
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1, 0], [-1, 0], [0, 1], [0, -1]], dtype=DTYPE))
        model[2].weight.copy_(torch.tensor([[-1, -1, 1, -1]], dtype=DTYPE))
    return model


@pytest.mark.parametrize("method", ["fastlin", "crown"])
def test_d_and_r_vanish_on_the_toy_example_although_neurons_are_unstable(method):
    model = toy_model()
    x0 = torch.tensor([[0.1, 0.42], [0.05, 0.5], [-0.15, 0.7], [0.0, 0.31]], dtype=DTYPE)
    perturbation = PerturbationSet("linf", 0.2, low=-1.0, high=1.0)
    spec = Specification(torch.ones(len(x0), 1, 1, dtype=DTYPE))
    solution = linear_margin_solution(model, x0, perturbation, spec, method=method)
    tight = tightness_regularizers(model, solution)
    assert tight.unstable.tolist() == [2, 2, 2, 2]
    torch.testing.assert_close(tight.d, torch.zeros_like(tight.d), rtol=0, atol=1e-12)
    torch.testing.assert_close(tight.r, torch.zeros_like(tight.r), rtol=0, atol=1e-12)
    # The optimum 003 derives: delta_0 = [eps, -eps] for x_1 >= 0 (mirrored for x_1 < 0).
    torch.testing.assert_close(solution.input_point[0, 0], torch.tensor([0.3, 0.22], dtype=DTYPE))


def two_d_nets():
    gen = torch.Generator().manual_seed(11)
    for seed in range(6):
        yield random_init(nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                                        nn.Linear(8, 3)), gen).eval()


@pytest.mark.parametrize("method", ["fastlin", "crown"])
def test_d_and_r_are_positive_exactly_where_the_relaxation_is_not_tight(method):
    """Against the exact minimum (MIP): where the bound is below it, d >= the gap and r > 0
    (Proposition 1: r = 0 implies tightness); d >= 0 everywhere; the optimum lies in the set."""
    perturbation = PerturbationSet("linf", 0.15)
    loose = 0
    for model in two_d_nets():
        x = torch.rand(6, 2, generator=torch.Generator().manual_seed(5), dtype=DTYPE) * 0.6 + 0.2
        with torch.no_grad():
            y = model(x).argmax(dim=1)
        proven, attained = mip_min_margins(model, x, y, perturbation, time_limit=30)
        with torch.no_grad():
            solution = linear_margin_solution(model, x, perturbation, y, method=method)
            tight = tightness_regularizers(model, solution)
        low, high = perturbation.box(x)
        assert (solution.input_point >= low.unsqueeze(1) - 1e-12).all()
        assert (solution.input_point <= high.unsqueeze(1) + 1e-12).all()
        lower, d, r = (t.numpy() for t in (solution.lower, tight.d, tight.r))
        for b in range(len(x)):
            for j in range(3):
                if j == y[b]:
                    assert d[b, j] == 0 and r[b, j] == 0
                    continue
                # The MIP's proven bound and the margin at its minimizer bracket the minimum.
                assert lower[b, j] <= attained[b, j] + 1e-9 and d[b, j] >= -1e-9
                gap = proven[b, j] - lower[b, j]
                if gap > 1e-6:
                    loose += 1
                    assert d[b, j] >= gap - 1e-7, (b, j, d[b, j], gap)
                    assert r[b, j] > 0
                if r[b, j] < 1e-12:  # Proposition 1: r = 0 means the bound is the minimum
                    assert attained[b, j] - lower[b, j] < 1e-6 and d[b, j] < 1e-6
    assert loose > 0  # the nets are loose somewhere: the check is not vacuous


def test_regularizers_are_differentiable_in_the_weights():
    model = random_init(nn.Sequential(nn.Linear(3, 10), nn.ReLU(), nn.Linear(10, 10), nn.ReLU(),
                                      nn.Linear(10, 4)), torch.Generator().manual_seed(2))
    x = torch.rand(5, 3, dtype=DTYPE)
    y = torch.tensor([0, 1, 2, 3, 0])
    solution = linear_margin_solution(model, x, PerturbationSet("linf", 0.2), y, method="fastlin")
    tight = tightness_regularizers(model, solution)
    (tight.d.sum() + tight.r.sum()).backward()
    for parameter in model.parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all()
    # The last bias cancels out of d (it shifts p_O and p_C alike) and r ignores it.
    assert all(model[i].weight.grad.abs().sum() > 0 for i in (0, 2, 4))


def test_tightness_needs_the_optimum():
    model = toy_model()
    x = torch.zeros(1, 2, dtype=DTYPE)
    solution = linear_margin_solution(model, x, PerturbationSet("linf", 0.1),
                                      Specification(torch.ones(1, 1, 1, dtype=DTYPE)),
                                      with_optimum=False)
    with pytest.raises(ValueError, match="with_optimum=True"):
        tightness_regularizers(model, solution)


# ---------------------------------------------------------------------------------------------
# Forward Fast-Lin boxes: exact, and Wong et al.'s random-projection estimate


def conv_net(seed):
    return random_init(nn.Sequential(
        Normalize([0.4], [0.3], 3), nn.Conv2d(1, 4, 3, stride=2), nn.ReLU(), nn.Conv2d(4, 6, 3),
        nn.ReLU(), nn.Flatten(), nn.Linear(6 * 3 * 3, 20), nn.ReLU(), nn.Linear(20, 5)),
        torch.Generator().manual_seed(seed)).eval()


@pytest.mark.parametrize("seed", [0, 1])
def test_exact_forward_boxes_equal_the_backward_fastlin_boxes(seed):
    model = conv_net(seed)
    x = torch.rand(4, 1, 11, 11, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)
    perturbation = PerturbationSet("linf", 0.03)
    backward = preactivation_bounds(model, x, perturbation, method="fastlin", intermediate="same")
    forward = fastlin_forward_boxes(model, x, perturbation)
    assert len(forward) == len(backward) == 3
    for (lower, upper), (f_lower, f_upper) in zip(backward, forward):
        torch.testing.assert_close(f_lower, lower, rtol=0, atol=1e-10)
        torch.testing.assert_close(f_upper, upper, rtol=0, atol=1e-10)


def test_projected_boxes_are_close_to_the_exact_ones_on_average():
    """k = 50 (Wong et al.): the widths are off per neuron but right on average over draws;
    more columns, closer. The first ReLU's box is always the exact one."""
    model = conv_net(3)
    x = torch.rand(4, 1, 11, 11, generator=torch.Generator().manual_seed(3), dtype=DTYPE)
    perturbation = PerturbationSet("linf", 0.03)
    model.requires_grad_(False)
    exact = fastlin_forward_boxes(model, x, perturbation)

    def relative_width_error(k: int, draws: int) -> np.ndarray:
        errors = []
        for draw in range(draws):
            boxes = fastlin_forward_boxes(model, x, perturbation, projections=k,
                                          generator=torch.Generator().manual_seed(draw))
            torch.testing.assert_close(boxes[0], exact[0])
            errors.append([float(((u - l).mean() - (eu - el).mean()) / (eu - el).mean())
                           for (l, u), (el, eu) in zip(boxes[1:], exact[1:])])
        return np.array(errors)

    errors_50 = relative_width_error(50, 20)
    assert np.abs(errors_50.mean(axis=0)).max() < 0.05  # unbiased on average
    assert np.abs(errors_50).max() > 1e-3  # but an estimate: draws differ from the exact box
    # One draw's columns serve every neuron, so a draw's errors are correlated: its mean width
    # error is about one neuron's, ~1.6 / sqrt(k) for the Cauchy median.
    errors_2000 = relative_width_error(2000, 2)
    assert np.abs(errors_2000).max() < 0.08 < np.abs(errors_50).max()


def test_projections_must_be_positive():
    model = conv_net(0)
    x = torch.rand(1, 1, 11, 11, dtype=DTYPE)
    with pytest.raises(ValueError, match="projections must be a positive"):
        fastlin_forward_boxes(model, x, PerturbationSet("linf", 0.1), projections=0)
