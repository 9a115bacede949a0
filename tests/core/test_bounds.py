"""Tests for workers.core.bounds: interval bound propagation (IBP) over l_inf and l_2 sets.

Soundness is checked against the network itself: the lower bound on every margin must not exceed
the margin at thousands of points of the perturbation set (uniform samples, box vertices, points
on the l_2 sphere) and at the point a targeted PGD run finds. Exactness is checked where IBP is
exact (a single linear layer). Everything runs in float64 on small random nets with fixed seeds.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from workers.core.attacks import PGD
from workers.core.bounds import (
    PerturbationSet,
    Specification,
    ibp_margin_bounds,
    interval_bounds,
    layers_of,
    margin_specification,
)
from tests.core.nets import DTYPE, random_init
from workers.core.models import Normalize

TOL = 1e-6  # samples are drawn in float32 (eps rounded to float32), the nets run in float64


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# Small random nets


def _flat_width(layers: list[nn.Module], input_shape: tuple[int, ...]) -> int:
    with torch.no_grad():
        return nn.Sequential(*layers)(torch.zeros(1, *input_shape)).shape[1]


def _conv_net(input_shape, convs, hidden, classes, normalize=None) -> list[nn.Module]:
    layers: list[nn.Module] = []
    if normalize is not None:
        mean, std = normalize
        layers.append(Normalize(mean, std, len(input_shape)))
    channels = input_shape[0]
    for out_channels, kernel, stride, padding in convs:
        layers += [nn.Conv2d(channels, out_channels, kernel, stride, padding), nn.ReLU()]
        channels = out_channels
    layers.append(nn.Flatten())
    width = _flat_width(layers, input_shape)
    return layers + [nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, classes)]


def _net(kind: str, seed: int = 0) -> tuple[nn.Sequential, tuple[int, ...], int]:
    """(model, input shape, classes) for one of the small test architectures."""
    gen = torch.Generator().manual_seed(1000 + seed)
    if kind == "linear":  # a single layer: the elided spec is the first affine layer
        shape, classes = (3,), 4
        layers = [nn.Linear(3, 4)]
    elif kind == "norm_linear":
        shape, classes = (2, 2, 1), 3
        layers = [Normalize([0.3, 0.6], [0.25, 1.5], 3), nn.Flatten(), nn.Linear(4, 3)]
    elif kind == "mlp2":
        shape, classes = (8,), 5
        layers = [nn.Linear(8, 20), nn.ReLU(), nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 5)]
    elif kind == "mlp3":  # flatten of an image-like input, three hidden layers
        shape, classes = (2, 3, 2), 4
        layers = [nn.Flatten(), nn.Linear(12, 30), nn.ReLU(), nn.Linear(30, 20), nn.ReLU(),
                  nn.Linear(20, 10), nn.ReLU(), nn.Linear(10, 4)]
    elif kind == "mlp_norm":  # per-feature normalization of a vector input, std far from 1
        shape, classes = (6,), 3
        layers = [Normalize([0.1, 0.5, 0.9, 0.3, 0.6, 0.2], [0.15, 2.5, 0.4, 1.0, 0.08, 3.0], 1),
                  nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3)]
    elif kind == "linear_first_norm":  # image behind Normalize, Flatten then Linear first
        shape, classes = (2, 4, 4), 4
        layers = [Normalize([0.4, 0.6], [0.12, 3.0], 3), nn.Flatten(), nn.Linear(32, 20),
                  nn.ReLU(), nn.Linear(20, 4)]
    elif kind == "conv_s2p1":
        shape, classes = (1, 8, 8), 4
        layers = _conv_net(shape, [(4, 3, 2, 1), (6, 3, 1, 0)], 16, classes)
    elif kind == "conv_p2_norm":
        shape, classes = (2, 6, 6), 4
        layers = _conv_net(shape, [(5, 3, 1, 1), (4, 4, 2, 2)], 12, classes,
                           normalize=([0.4, 0.6], [0.2, 2.0]))
    elif kind == "conv_s3_norm":
        shape, classes = (2, 7, 7), 3
        layers = _conv_net(shape, [(3, 2, 3, 0), (4, 2, 1, 1)], 10, classes,
                           normalize=([0.5, 0.5], [0.1, 0.7]))
    else:
        raise AssertionError(kind)
    return random_init(nn.Sequential(*layers), gen), shape, classes


NETS = ["linear", "norm_linear", "mlp2", "mlp3", "mlp_norm", "linear_first_norm", "conv_s2p1",
        "conv_p2_norm", "conv_s3_norm"]
EPS = {"linf": [0.01, 0.05, 0.2], "l2": [0.05, 0.3, 1.0]}


def _inputs(shape, batch: int, seed: int, edge_fraction: float = 0.25) -> torch.Tensor:
    """Random points of [0,1]^shape, a fraction of the coordinates exactly on 0 or 1 (so the
    pixel-range clipping of the set matters)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand((batch, *shape), generator=gen, dtype=DTYPE)
    edge = torch.rand(x.shape, generator=gen, dtype=DTYPE) < edge_fraction
    side = (torch.rand(x.shape, generator=gen, dtype=DTYPE) < 0.5).to(DTYPE)
    return torch.where(edge, side, x)


def _labels(batch: int, classes: int, seed: int) -> torch.Tensor:
    return torch.randint(classes, (batch,), generator=torch.Generator().manual_seed(seed))


def _margins(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, K): z_y - z_j for every class j (0 at j = y)."""
    return logits.gather(1, y[:, None]) - logits


def _set_points(x: torch.Tensor, perturbation: PerturbationSet, n: int, seed: int) -> torch.Tensor:
    """(B, N, ...) points of the set around each example: uniform samples, then box vertices
    (l_inf) or points on the sphere's surface clipped to the pixel range (l_2)."""
    gen = torch.Generator().manual_seed(seed)
    batch, shape = x.shape[0], x.shape[1:]
    rep = x.repeat_interleave(n, dim=0)
    uniform = perturbation.sample(rep, gen)
    if perturbation.norm == "linf":
        lower, upper = perturbation.box(rep)
        pick = torch.rand(rep.shape, generator=gen) < 0.5
        extreme = torch.where(pick, lower, upper)
    else:
        direction = torch.randn(rep.shape, generator=gen, dtype=DTYPE)
        direction = direction / direction.flatten(1).norm(dim=1).view(-1, *([1] * len(shape)))
        extreme = (rep + perturbation.eps * direction).clamp(perturbation.low, perturbation.high)
    points = torch.cat([uniform.view(batch, n, *shape), extreme.view(batch, n, *shape)], dim=1)
    _assert_in_set(points, x, perturbation)
    return points


def _assert_in_set(points: torch.Tensor, x: torch.Tensor, perturbation: PerturbationSet) -> None:
    delta = (points - x.unsqueeze(1)).flatten(2)
    size = delta.abs().amax(dim=2) if perturbation.norm == "linf" else delta.norm(dim=2)
    assert (size <= perturbation.eps + 1e-6).all()
    assert (points >= perturbation.low).all() and (points <= perturbation.high).all()


def _min_margins_over(model, points: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, K): the smallest margin over the given points of each example."""
    batch, n = points.shape[:2]
    with torch.no_grad():
        logits = model(points.flatten(0, 1))
    return _margins(logits, y.repeat_interleave(n)).view(batch, n, -1).amin(dim=1)


class _Targeted(nn.Module):
    """Logits (z_y, z_t) with label 0, so PGD's margin loss is z_t - z_y: PGD then minimizes the
    margin of y over the target t."""

    def __init__(self, model: nn.Module, y: torch.Tensor, target: torch.Tensor):
        super().__init__()
        self.model, self.y, self.target = model, y, target

    def forward(self, x):
        logits = self.model(x)
        return torch.stack([logits.gather(1, self.y[:, None]).squeeze(1),
                            logits.gather(1, self.target[:, None]).squeeze(1)], dim=1)


def _pgd_min_margins(model, x, y, perturbation, classes: int, seed: int) -> torch.Tensor:
    """(B, K): for every target class j, the margin z_y - z_j at the point a targeted PGD found."""
    batch = x.shape[0]
    rep_x = x.repeat_interleave(classes, dim=0)
    rep_y = y.repeat_interleave(classes)
    target = torch.arange(classes).repeat(batch)
    attacked = _Targeted(model, rep_y, target)
    zeros = torch.zeros_like(rep_y)
    gen = torch.Generator().manual_seed(seed)
    found = []
    for attack in (PGD(steps=40, restarts=1, step_size=perturbation.eps / 8),
                   PGD(steps=40, restarts=1, random_start=False)):
        x_adv = attack.perturb(attacked, rep_x, zeros, perturbation, gen)
        _assert_in_set(x_adv.view(batch, classes, *x.shape[1:]), x, perturbation)
        with torch.no_grad():
            margin = -(attacked(x_adv)[:, 1] - attacked(x_adv)[:, 0])
        found.append(margin.view(batch, classes))
    return torch.minimum(*found)


# ---------------------------------------------------------------------------------------------
# Soundness


@pytest.mark.parametrize("elide", [True, False], ids=["elide", "no_elide"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("kind", NETS)
def test_bounds_are_sound_against_samples_vertices_and_pgd(kind, norm, elide):
    model, shape, classes = _net(kind)
    x = _inputs(shape, batch=3, seed=1)
    y = _labels(3, classes, seed=2)
    for i, eps in enumerate(EPS[norm]):
        perturbation = PerturbationSet(norm, eps)
        lower = ibp_margin_bounds(model, x, perturbation, y, elide=elide)
        assert lower.shape == (3, classes)
        assert torch.isfinite(lower).all()
        sampled = _min_margins_over(model, _set_points(x, perturbation, 1500, seed=10 + i), y)
        assert (lower <= sampled + TOL).all(), (eps, (lower - sampled).max())
        attacked = _pgd_min_margins(model, x, y, perturbation, classes, seed=20 + i)
        assert (lower <= attacked + TOL).all(), (eps, (lower - attacked).max())
        # The trivial margin y - y is exactly 0.
        assert torch.allclose(lower.gather(1, y[:, None]), torch.zeros(3, 1, dtype=DTYPE))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_bounds_sound_for_a_general_specification(norm):
    model, shape, classes = _net("conv_p2_norm", seed=3)
    x = _inputs(shape, batch=2, seed=4)
    gen = torch.Generator().manual_seed(5)
    matrix = torch.randn(2, 3, classes, generator=gen, dtype=DTYPE)
    spec = Specification(matrix)
    perturbation = PerturbationSet(norm, EPS[norm][1])
    points = _set_points(x, perturbation, 1500, seed=6)
    with torch.no_grad():
        logits = model(points.flatten(0, 1)).view(2, -1, classes)
        values = torch.einsum("bsk,bnk->bns", matrix, logits)
    for elide in (True, False):
        lower = ibp_margin_bounds(model, x, perturbation, spec, elide=elide)
        assert lower.shape == (2, 3)
        assert (lower <= values.amin(dim=1) + TOL).all()


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_bounds_sound_for_a_pixel_range_other_than_unit(norm):
    # The l_2 rule intersects the ball's image with that of its clipped bounding box: the
    # clipping must use the set's own range, not [0, 1]. Low input dimension and inputs on the
    # edges of [0, 1], so the box term is the tighter one and a wrong clip shows.
    gen = torch.Generator().manual_seed(7)
    model = random_init(nn.Sequential(nn.Linear(3, 10), nn.ReLU(), nn.Linear(10, 4)), gen)
    x = _inputs((3,), batch=4, seed=8, edge_fraction=1.0)
    y = _labels(4, 4, seed=9)
    for eps in (0.1, 0.5):
        perturbation = PerturbationSet(norm, eps, low=-1.0, high=2.0)
        points = _set_points(x, perturbation, 2000, seed=10)
        assert (points < 0).any() and (points > 1).any()  # the set really leaves [0, 1]
        with torch.no_grad():
            hidden = model[0](points)
        lower, upper = interval_bounds(model[:1], x, perturbation)
        assert (lower[:, None] <= hidden + TOL).all() and (hidden <= upper[:, None] + TOL).all()
        sampled = _min_margins_over(model, points, y)
        for elide in (True, False):
            bound = ibp_margin_bounds(model, x, perturbation, y, elide=elide)
            assert (bound <= sampled + TOL).all()


@pytest.mark.parametrize("seed", range(3))
def test_l2_first_layer_rule_behind_normalize(seed):
    # A Linear (and a Conv2d) right behind Normalize(std != 1): the l_2 first-layer rule folds
    # 1/std into the weights. With no clipping it is exact: W_i n(x) + b_i -+ eps ||W_i / std||.
    gen = torch.Generator().manual_seed(50 + seed)
    std = torch.tensor([0.1, 0.3, 2.5], dtype=DTYPE)
    mean = torch.tensor([0.5, 0.4, 0.6], dtype=DTYPE)
    normalize = Normalize(mean.tolist(), std.tolist(), 3).to(DTYPE)
    x = 0.4 + 0.2 * torch.rand(2, 3, 4, 4, generator=gen, dtype=DTYPE)
    eps = 0.05  # ball inside [0.35, 0.65]^n: no clipping
    perturbation = PerturbationSet("l2", eps)
    scale = (1 / std).view(3, 1, 1).expand(3, 4, 4)

    linear = random_init(nn.Linear(48, 7), gen)
    layers = [normalize, nn.Flatten(), linear]
    lower, upper = interval_bounds(layers, x, perturbation)
    center = nn.Sequential(*layers)(x)
    radius = eps * (linear.weight * scale.flatten()).norm(dim=1)
    torch.testing.assert_close(lower, center - radius)
    torch.testing.assert_close(upper, center + radius)
    # The bound is attained: move along -+ (W_i / std) / ||W_i / std||.
    direction = linear.weight * scale.flatten()
    direction = direction / direction.norm(dim=1, keepdim=True)
    for i in range(7):
        low_point = x - eps * direction[i].view(1, 3, 4, 4)
        torch.testing.assert_close(nn.Sequential(*layers)(low_point)[:, i], lower[:, i])

    conv = random_init(nn.Conv2d(3, 5, 2, stride=2, padding=0), gen)  # no padding: every window full
    layers = [normalize, conv]
    lower, upper = interval_bounds(layers, x, perturbation)
    center = nn.Sequential(*layers)(x)
    radius = eps * (conv.weight / std.view(1, 3, 1, 1)).flatten(1).norm(dim=1).view(1, 5, 1, 1)
    torch.testing.assert_close(lower, center - radius)
    torch.testing.assert_close(upper, center + radius)

    # And a deeper Linear-first net behind Normalize is sound on samples near the edges too.
    model, shape, classes = _net("linear_first_norm", seed=seed)
    x = _inputs(shape, batch=3, seed=60 + seed)
    y = _labels(3, classes, seed=70 + seed)
    for eps in (0.02, 0.2, 1.0):
        perturbation = PerturbationSet("l2", eps)
        sampled = _min_margins_over(model, _set_points(x, perturbation, 2000, seed=seed), y)
        for elide in (True, False):
            assert (ibp_margin_bounds(model, x, perturbation, y, elide) <= sampled + TOL).all()


# ---------------------------------------------------------------------------------------------
# Elision


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_elision_never_loosens(norm):
    for seed in range(3):
        for kind in NETS:
            model, shape, classes = _net(kind, seed=seed)
            x = _inputs(shape, batch=4, seed=100 + seed)
            y = _labels(4, classes, seed=200 + seed)
            for eps in EPS[norm]:
                perturbation = PerturbationSet(norm, eps)
                elided = ibp_margin_bounds(model, x, perturbation, y, elide=True)
                plain = ibp_margin_bounds(model, x, perturbation, y, elide=False)
                assert (elided >= plain - 1e-6).all(), (kind, seed, eps)
    # And it matters: on a net with a hidden layer elision is strictly tighter somewhere.
    model, shape, classes = _net("mlp2")
    x, y = _inputs(shape, 4, seed=1), _labels(4, classes, seed=2)
    perturbation = PerturbationSet(norm, EPS[norm][1])
    assert (ibp_margin_bounds(model, x, perturbation, y, True)
            > ibp_margin_bounds(model, x, perturbation, y, False) + 1e-6).any()


# ---------------------------------------------------------------------------------------------
# Exactness on a single linear layer


def _single_linear(d: int, k: int, seed: int) -> nn.Linear:
    return random_init(nn.Linear(d, k), torch.Generator().manual_seed(seed))


def _edge_inputs(batch: int, d: int, seed: int) -> torch.Tensor:
    """Coordinates near and on the pixel range's edges, so the box is clipped."""
    gen = torch.Generator().manual_seed(seed)
    choices = torch.tensor([0.0, 0.01, 0.03, 0.5, 0.97, 0.99, 1.0], dtype=DTYPE)
    return choices[torch.randint(len(choices), (batch, d), generator=gen)]


@pytest.mark.parametrize("eps", [0.0, 0.02, 0.1, 0.6])
def test_single_linear_interval_is_exact_for_linf(eps):
    linear = _single_linear(9, 4, seed=11)
    x = _edge_inputs(5, 9, seed=12)
    perturbation = PerturbationSet("linf", eps)
    lower, upper = interval_bounds([linear], x, perturbation)
    box_low = (x - eps).clamp(0, 1)
    box_high = (x + eps).clamp(0, 1)
    w = linear.weight
    # Closed form: each term of W_i x + b_i takes its own minimum / maximum over its interval.
    exact_low = torch.minimum(w * box_low[:, None], w * box_high[:, None]).sum(2) + linear.bias
    exact_high = torch.maximum(w * box_low[:, None], w * box_high[:, None]).sum(2) + linear.bias
    torch.testing.assert_close(lower, exact_low, rtol=0, atol=1e-12)
    torch.testing.assert_close(upper, exact_high, rtol=0, atol=1e-12)
    # Attained at the vertex picked by the sign pattern of W_i.
    for i in range(4):
        low_vertex = torch.where(w[i] > 0, box_low, box_high)
        high_vertex = torch.where(w[i] > 0, box_high, box_low)
        torch.testing.assert_close(linear(low_vertex)[:, i], lower[:, i], rtol=0, atol=1e-12)
        torch.testing.assert_close(linear(high_vertex)[:, i], upper[:, i], rtol=0, atol=1e-12)


@pytest.mark.parametrize("eps", [0.0, 0.02, 0.1, 0.6])
def test_single_linear_elided_margin_is_exact_for_linf(eps):
    model = nn.Sequential(_single_linear(9, 5, seed=13))
    x = _edge_inputs(6, 9, seed=14)
    y = _labels(6, 5, seed=15)
    perturbation = PerturbationSet("linf", eps)
    lower = ibp_margin_bounds(model, x, perturbation, y, elide=True)
    box_low, box_high = perturbation.box(x)
    w = model[0].weight
    for j in range(5):
        row = w[y] - w[j]  # (B, d): the margin's weight row per example
        vertex = torch.where(row > 0, box_low, box_high)  # the minimizing vertex
        exact = _margins(model(vertex), y)[:, j]
        torch.testing.assert_close(lower[:, j], exact, rtol=0, atol=1e-12)
    # Without elision the bound is still sound, and no tighter.
    plain = ibp_margin_bounds(model, x, perturbation, y, elide=False)
    assert (plain <= lower + 1e-12).all()


@pytest.mark.parametrize("front", ["none", "flatten", "normalize"])
@pytest.mark.parametrize("eps", [0.01, 0.05])
def test_single_linear_elided_margin_is_exact_for_l2(front, eps):
    # Away from the edges: c^T (W x + b) - eps ||W^T c||_2 (with 1/std folded in behind Normalize).
    gen = torch.Generator().manual_seed(16)
    shape = (2, 3, 2)
    d = 12
    linear = _single_linear(d, 4, seed=17)
    std = torch.ones(shape, dtype=DTYPE)
    if front == "none":
        layers, x = [linear], 0.4 + 0.2 * torch.rand(5, d, generator=gen, dtype=DTYPE)
    else:
        x = 0.4 + 0.2 * torch.rand(5, *shape, generator=gen, dtype=DTYPE)
        layers = [nn.Flatten(), linear]
        if front == "normalize":
            norm = Normalize([0.3, 0.7], [0.2, 1.7], 3).to(DTYPE)
            layers.insert(0, norm)
            std = norm.std.expand(shape)
    model = nn.Sequential(*layers)
    y = _labels(5, 4, seed=18)
    perturbation = PerturbationSet("l2", eps)
    lower = ibp_margin_bounds(model, x, perturbation, y, elide=True)
    rows = (linear.weight[y][:, None, :] - linear.weight[None, :, :]) / std.flatten()  # (B, K, d)
    exact = _margins(model(x), y) - eps * rows.norm(dim=2)
    torch.testing.assert_close(lower, exact, rtol=0, atol=1e-12)
    # Attained on the sphere (no clipping here), so nothing tighter is sound.
    for j in range(4):
        direction = rows[:, j] / rows[:, j].norm(dim=1, keepdim=True).clamp_min(1e-300)
        point = x - eps * direction.view_as(x)
        assert ((point - x).flatten(1).norm(dim=1) <= eps + 1e-12).all()
        assert (point > 0).all() and (point < 1).all()
        torch.testing.assert_close(_margins(model(point), y)[:, j], lower[:, j], rtol=0, atol=1e-12)


@pytest.mark.parametrize("conv", [dict(stride=1, padding=0), dict(stride=2, padding=1),
                                  dict(stride=1, padding=2, dilation=2), dict(stride=3, padding=1)])
def test_single_conv_interval_is_exact_for_linf(conv):
    # Each output neuron is linear in the pixels of its receptive field: its interval is attained
    # at the vertex given by the sign pattern of its row of the Jacobian.
    gen = torch.Generator().manual_seed(19)
    layer = random_init(nn.Conv2d(2, 3, 3, **conv), gen)
    x = _edge_inputs(2, 2 * 7 * 7, seed=20).view(2, 2, 7, 7)
    perturbation = PerturbationSet("linf", 0.05)
    lower, upper = interval_bounds([layer], x, perturbation)
    box_low, box_high = perturbation.box(x)
    jacobian = torch.autograd.functional.jacobian(layer, x[:1]).reshape(-1, 2 * 7 * 7)  # (O, n)
    for b in range(2):
        low_vertices = torch.where(jacobian > 0, box_low[b].flatten(), box_high[b].flatten())
        high_vertices = torch.where(jacobian > 0, box_high[b].flatten(), box_low[b].flatten())
        out_low = layer(low_vertices.view(-1, 2, 7, 7)).flatten(1).diagonal()
        out_high = layer(high_vertices.view(-1, 2, 7, 7)).flatten(1).diagonal()
        torch.testing.assert_close(lower[b].flatten(), out_low, rtol=0, atol=1e-12)
        torch.testing.assert_close(upper[b].flatten(), out_high, rtol=0, atol=1e-12)


ACTIVATIONS = {"relu": nn.ReLU, "leaky": lambda: nn.LeakyReLU(0.1), "tanh": nn.Tanh,
               "sigmoid": nn.Sigmoid, "elu": nn.ELU, "hardtanh": nn.Hardtanh}


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "normalize"])
def test_separable_net_is_exact_for_linf(activation, normalize):
    # Diagonal hidden layers keep the coordinates independent, so IBP is exact for the whole net:
    # with elision the margin bound is attained at a vertex picked coordinate by coordinate. This
    # catches an activation (or Normalize) rule that is too tight, which sampling a loose bound
    # cannot.
    gen = torch.Generator().manual_seed(21)
    d, classes = 7, 4
    layers: list[nn.Module] = []
    if normalize:
        layers.append(Normalize([0.2] * d, [0.3, 2.0, 0.5, 1.0, 0.1, 4.0, 0.7], 1))
    for _ in range(2):
        diagonal = nn.Linear(d, d)
        layers += [diagonal, ACTIVATIONS[activation]()]
    layers.append(nn.Linear(d, classes))
    model = random_init(nn.Sequential(*layers), gen)
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.Linear) and layer.out_features == d:
                layer.weight.copy_(torch.diag(torch.randn(d, generator=gen, dtype=DTYPE) * 3))
    features = model[:-1]  # separable: feature i depends on x_i only
    x = _edge_inputs(5, d, seed=22)
    y = _labels(5, classes, seed=23)
    for eps in (0.03, 0.3):
        perturbation = PerturbationSet("linf", eps)
        lower = ibp_margin_bounds(model, x, perturbation, y, elide=True)
        box_low, box_high = perturbation.box(x)
        at_low, at_high = features(box_low), features(box_high)
        for j in range(classes):
            row = model[-1].weight[y] - model[-1].weight[j]  # (B, d)
            vertex = torch.where(row * at_low <= row * at_high, box_low, box_high)
            exact = _margins(model(vertex), y)[:, j]
            torch.testing.assert_close(lower[:, j], exact, rtol=0, atol=1e-10)
        feature_low, feature_high = interval_bounds(layers_of(features), x, perturbation)
        torch.testing.assert_close(feature_low, torch.minimum(at_low, at_high), rtol=0, atol=1e-12)
        torch.testing.assert_close(feature_high, torch.maximum(at_low, at_high), rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# eps = 0, gradients, batching, specifications


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("kind", NETS)
def test_eps_zero_gives_the_clean_margins(kind, norm):
    model, shape, classes = _net(kind, seed=4)
    x = _inputs(shape, batch=4, seed=300)
    y = _labels(4, classes, seed=301)
    clean = _margins(model(x), y)
    perturbation = PerturbationSet(norm, 0.0)
    for elide in (True, False):
        torch.testing.assert_close(ibp_margin_bounds(model, x, perturbation, y, elide), clean,
                                   rtol=0, atol=1e-10)
    lower, upper = interval_bounds(layers_of(model), x, perturbation)
    torch.testing.assert_close(lower, model(x), rtol=0, atol=1e-10)
    torch.testing.assert_close(upper, model(x), rtol=0, atol=1e-10)


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("elide", [True, False], ids=["elide", "no_elide"])
@pytest.mark.parametrize("kind", ["mlp_norm", "conv_p2_norm"])
def test_bounds_are_differentiable(kind, elide, norm):
    model, shape, classes = _net(kind, seed=5)
    x = _inputs(shape, batch=3, seed=400)
    y = _labels(3, classes, seed=401)
    lower = ibp_margin_bounds(model, x, PerturbationSet(norm, EPS[norm][1]), y, elide)
    assert lower.requires_grad
    # The IBP training loss: cross-entropy on the negated bounds.
    nn.functional.cross_entropy(-lower, y).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        if name.endswith("weight"):
            assert parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("kind", ["mlp3", "conv_s2p1", "conv_s3_norm"])
def test_bounds_are_batched_per_example(kind, norm):
    model, shape, classes = _net(kind, seed=6)
    x = _inputs(shape, batch=5, seed=500)
    y = _labels(5, classes, seed=501)
    perturbation = PerturbationSet(norm, EPS[norm][1])
    for elide in (True, False):
        batched = ibp_margin_bounds(model, x, perturbation, y, elide)
        assert batched.shape == (5, classes)
        one_by_one = torch.cat([ibp_margin_bounds(model, x[i:i + 1], perturbation, y[i:i + 1],
                                                  elide) for i in range(5)])
        torch.testing.assert_close(batched, one_by_one, rtol=0, atol=1e-12)


def test_bounds_shrink_as_eps_grows():
    model, shape, classes = _net("conv_p2_norm", seed=7)
    x = _inputs(shape, batch=3, seed=600)
    y = _labels(3, classes, seed=601)
    for norm in ("linf", "l2"):
        previous = _margins(model(x), y)
        for eps in EPS[norm]:
            lower = ibp_margin_bounds(model, x, PerturbationSet(norm, eps), y)
            assert (lower <= previous + 1e-9).all()
            previous = lower


def test_float32_model_with_labels():
    model, shape, classes = _net("conv_s2p1", seed=8)
    model = model.float()
    x = _inputs(shape, batch=2, seed=700).float()
    y = _labels(2, classes, seed=701)
    for norm in ("linf", "l2"):
        lower = ibp_margin_bounds(model, x, PerturbationSet(norm, 0.1), y)
        assert lower.dtype == torch.float32 and lower.shape == (2, classes)


def test_margin_specification_and_certified():
    y = torch.tensor([2, 0])
    spec = margin_specification(y, 3)
    assert spec.matrix.shape == (2, 3, 3)
    logits = torch.tensor([[1.0, -2.0, 4.0], [0.5, 3.0, -1.0]])
    torch.testing.assert_close(torch.einsum("bsk,bk->bs", spec.matrix, logits), _margins(logits, y))
    assert torch.equal(spec.matrix[0, 2], torch.zeros(3))
    # The trivial margin (0) does not block certification; any other non-positive one does.
    lower = torch.tensor([[0.1, 0.2, 0.0], [0.0, 0.3, -0.1]])
    assert spec.certified(lower).tolist() == [True, False]
    lower = torch.tensor([[0.1, 0.0, 0.0], [-5.0, 0.3, 0.1]])
    assert spec.certified(lower).tolist() == [False, True]
    # Without labels every margin must be positive.
    general = Specification(torch.ones(1, 2, 3))
    assert general.certified(torch.tensor([[0.1, 0.0]])).tolist() == [False]
    assert general.certified(torch.tensor([[0.1, 0.2]])).tolist() == [True]


def test_perturbation_set_validation_and_box():
    with pytest.raises(ValueError, match="norm"):
        PerturbationSet("l1", 0.1)
    with pytest.raises(ValueError, match="eps"):
        PerturbationSet("linf", -0.1)
    x = torch.tensor([[0.0, 0.5, 0.98]], dtype=DTYPE)
    lower, upper = PerturbationSet("linf", 0.05).box(x)
    torch.testing.assert_close(lower, torch.tensor([[0.0, 0.45, 0.93]], dtype=DTYPE))
    torch.testing.assert_close(upper, torch.tensor([[0.05, 0.55, 1.0]], dtype=DTYPE))
