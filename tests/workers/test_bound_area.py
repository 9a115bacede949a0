"""The sampled adversarial polytope and its IBP box (IBP Figure 4): exact areas on networks that
are affine on the box, soundness of the box against every sample on random MLPs, where the
diagnostic runs, and one real toy2d row through the runner."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from workers.core.bounds import PerturbationSet
from workers.core.diagnostics import measure
from workers.core.polytope import box_grid, convex_hull, logit_polytope
from workers.runner import run_row


def linear_net(seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 2)).double()


def one_regime_net(seed=0) -> nn.Sequential:
    """2-8-2 with biases that keep every ReLU on near the middle of [0,1]^2: affine there."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 2)).double()
    with torch.no_grad():
        net[0].bias.fill_(5.0)
    return net


def test_grid_holds_the_corners_and_the_edges():
    grid = box_grid(torch.tensor([0.1, 0.2]), torch.tensor([0.3, 0.6]), 5)
    assert grid.shape == (25, 2)
    for corner in ([0.1, 0.2], [0.1, 0.6], [0.3, 0.2], [0.3, 0.6]):
        assert (grid - torch.tensor(corner)).abs().sum(dim=1).min() < 1e-7
    assert grid.min(dim=0).values.tolist() == pytest.approx([0.1, 0.2])
    assert grid.max(dim=0).values.tolist() == pytest.approx([0.3, 0.6])


def test_hull_of_a_square_and_of_degenerate_points():
    square = np.array([[0, 0], [1, 0], [1, 1], [0, 1], [0.5, 0.5], [0.2, 0.7]])
    vertices, area = convex_hull(square)
    assert area == pytest.approx(1.0)
    assert sorted(map(tuple, vertices)) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    segment, zero = convex_hull(np.array([[0, 0], [1, 2], [0.5, 1.0]]))
    assert zero == 0.0 and sorted(map(tuple, segment)) == [(0, 0), (1, 2)]
    point, zero = convex_hull(np.array([[3.0, 4.0]] * 4))
    assert zero == 0.0 and point.tolist() == [[3.0, 4.0]]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_linear_net_maps_the_box_to_an_exact_parallelogram(seed):
    net, eps = linear_net(seed), 0.1
    polytope = logit_polytope(net, torch.tensor([0.5, 0.4], dtype=torch.float64), PerturbationSet("linf", eps),
                              points_per_side=21)
    weight = net[0].weight.detach()
    assert polytope.hull_area == pytest.approx(abs(torch.det(weight).item()) * (2 * eps) ** 2,
                                               rel=1e-9)
    assert len(polytope.hull) == 4  # the images of the box's corners
    # IBP is exact per logit on an affine map: each side is 2 eps sum_j |W_ij|.
    expected_box = torch.prod(2 * eps * weight.abs().sum(dim=1)).item()
    assert polytope.box_area == pytest.approx(expected_box, rel=1e-9)


def test_a_clipped_box_is_sampled_as_the_bounds_see_it():
    """Near [0,1]^2's corner the input box is clipped: sides 0.05 + 0.1 and 0.1 + 0.03."""
    net, eps = linear_net(3), 0.1
    polytope = logit_polytope(net, torch.tensor([0.05, 0.97], dtype=torch.float64), PerturbationSet("linf", eps),
                              points_per_side=11)
    weight = net[0].weight.detach()
    assert polytope.hull_area == pytest.approx(abs(torch.det(weight).item()) * 0.15 * 0.13,
                                               rel=1e-9)


@pytest.mark.parametrize("seed", [0, 1])
def test_one_relu_regime_gives_the_exact_area_and_the_interval_closed_form(seed):
    net, eps = one_regime_net(seed), 0.08
    x = torch.tensor([0.45, 0.6], dtype=torch.float64)
    lower, upper = PerturbationSet("linf", eps).box(x[None])
    hidden = net[0](box_grid(lower[0], upper[0], 41))
    assert (hidden > 0).all()  # the precondition: one regime over the whole box
    polytope = logit_polytope(net, x, PerturbationSet("linf", eps), points_per_side=41)
    w1, w2 = net[0].weight.detach(), net[2].weight.detach()
    assert polytope.hull_area == pytest.approx(abs(torch.det(w2 @ w1).item()) * (2 * eps) ** 2,
                                               rel=1e-9)
    # Interval bounds through both layers: radius |W2| |W1| eps per logit (looser than |W2 W1|).
    radius = w2.abs() @ (w1.abs() @ torch.full((2,), eps, dtype=torch.float64))
    assert polytope.box_area == pytest.approx(torch.prod(2 * radius).item(), rel=1e-9)
    assert polytope.box_area >= polytope.hull_area


@pytest.mark.parametrize("seed", range(4))
def test_every_sampled_logit_lies_in_the_ibp_box_of_a_random_mlp(seed):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(2, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(),
                        nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 2)).double()
    x = torch.rand(2, dtype=torch.float64)
    polytope = logit_polytope(net, x, PerturbationSet("linf", 0.08), points_per_side=61)
    samples = polytope.samples.detach().numpy()
    assert (samples >= polytope.box_lower - 1e-12).all()
    assert (samples <= polytope.box_upper + 1e-12).all()
    assert (polytope.hull >= polytope.box_lower - 1e-12).all()
    assert (polytope.hull <= polytope.box_upper + 1e-12).all()
    assert 0 < polytope.hull_area <= polytope.box_area
    assert polytope.outline[0].tolist() == pytest.approx(polytope.outline[-1].tolist())


def test_measure_runs_bound_area_only_for_planar_linf_ibp_rows():
    net = one_regime_net().float()
    x = torch.tensor([[0.2, 0.3], [0.5, 0.5], [0.7, 0.1]])
    labels = torch.tensor([0, 1, 1])
    linf = PerturbationSet("linf", 0.05)
    diagnosis = measure(net, x, linf, ["ibp"], labels=labels)
    area = diagnosis.metrics["bound_area"]
    assert area["fill"] == pytest.approx(area["polytope"] / area["ibp"])
    data = diagnosis.figure_data["bound_area"]
    assert data["example"] == 1 and data["label"] == 1  # the first positive example
    json.dumps(diagnosis.figure_data)  # it goes into the result as it is
    assert "bound_area" not in measure(net, x, linf, ["pgd"], labels=labels).metrics
    assert "bound_area" not in measure(net, x, PerturbationSet("l2", 0.05), ["ibp"],
                                       labels=labels).metrics
    wide = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    assert "bound_area" not in measure(wide, torch.rand(3, 1, 2, 2), linf, ["ibp"],
                                       labels=labels).metrics
    with pytest.raises(ValueError, match="labels"):
        measure(net, x, linf, ["ibp"])


def test_a_toy2d_row_records_the_areas_and_the_figure_data(tmp_path):
    config = {"method": "ibp", "dataset": "toy2d", "model": "mlp3x100", "norm": "linf",
              "eps": 0.08, "eps_train": 0.08, "batch_size": 13, "epochs": 5, "test_limit": 13,
              "certifiers": ["ibp"], "augment": False,
              "optimizer": {"name": "adam", "lr": 0.001, "lr_milestones": []},
              "attack": {"steps": 3, "restarts": 1}}
    result = run_row(config, tmp_path)
    area = result["metrics"]["bound_area"]
    assert 0 < area["polytope"] <= area["ibp"] and 0 < area["fill"] <= 1
    data = result["figure_data"]["bound_area"]
    assert data["example"] == 0 and data["label"] == 1  # toy2d's first 5 points are positive
    (x_low, x_high), (y_low, y_high) = data["box"]
    assert (x_high - x_low) * (y_high - y_low) == pytest.approx(area["ibp"], rel=1e-4)
    for x, y in data["hull"] + [data["point"]]:
        assert x_low - 1e-5 <= x <= x_high + 1e-5 and y_low - 1e-5 <= y <= y_high + 1e-5
    assert len(json.dumps(result["figure_data"])) < 20_000  # hull vertices only: small
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["figure_data"] == result["figure_data"]
