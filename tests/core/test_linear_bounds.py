"""Tests for workers.core.bounds.linear: Fast-Lin, CROWN and CROWN-IBP lower bounds on margins.

Soundness is checked against the network itself (uniform samples of the set, l_inf box vertices,
l_2 sphere points, the PGD point), on small random MLPs and conv nets with and without a
normalization layer, in float64. Exactness where the relaxation is exact (no unstable ReLU, a single
linear layer, 003's toy example of Appendix A). Tightness on a briefly IBP-trained digits model:
CROWN's adaptive slopes certify at least as many examples as Fast-Lin's, and both far more than IBP.
Gradients reach every weight (CROWN-IBP is trained through these bounds).
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
    layers_of,
    margin_specification,
)
from workers.core.bounds.linear import (
    crown_ibp_margin_bounds,
    linear_margin_bounds,
    preactivation_bounds,
)
from tests.core.nets import DTYPE, random_init
from workers.core.models import Normalize

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-6  # samples are drawn in float32 before being cast; nets run in float64

# (name, keyword arguments of linear_margin_bounds); crown_ibp is checked through its wrapper.
VARIANTS = [
    ("fastlin", dict(method="fastlin", intermediate="same")),
    ("crown", dict(method="crown", intermediate="same")),
    ("fastlin_ibp", dict(method="fastlin", intermediate="ibp")),
]


def _all_bounds(model, x, perturbation, spec, elide=True):
    out = {name: linear_margin_bounds(model, x, perturbation, spec, elide=elide, **kwargs)
           for name, kwargs in VARIANTS}
    out["crown_ibp"] = crown_ibp_margin_bounds(model, x, perturbation, spec, elide=elide)
    return out


# ---------------------------------------------------------------------------------------------
# Small random nets


def _init(model: nn.Module, seed: int) -> nn.Module:
    return random_init(model, torch.Generator().manual_seed(seed))


NORMALIZE = ([0.4, 0.6], [0.3, 0.7])  # two channels, std != 1


def _mlp(normalize: bool, seed: int = 0) -> nn.Sequential:
    layers = [Normalize(*NORMALIZE, 3)] if normalize else []
    layers += [nn.Flatten(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(),
               nn.Linear(16, 5)]
    return _init(nn.Sequential(*layers), seed)


def _conv(normalize: bool, seed: int = 0) -> nn.Sequential:
    # Input (2, 7, 7): stride 2 with padding 1 rounds 7 down (output_padding = 0) and the second
    # conv's stride 2 on 4 leaves 1 row unused (output_padding = 1).
    layers = [Normalize(*NORMALIZE, 3)] if normalize else []
    layers += [nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.ReLU(),
               nn.Conv2d(4, 6, 3, stride=2, padding=0), nn.ReLU(), nn.Identity(), nn.Flatten(),
               nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 5)]
    return _init(nn.Sequential(*layers), seed)


NETS = {
    "mlp": (lambda: _mlp(False), (2, 4, 4)),
    "mlp_norm": (lambda: _mlp(True, 1), (2, 4, 4)),
    "conv": (lambda: _conv(False, 2), (2, 7, 7)),
    "conv_norm": (lambda: _conv(True, 3), (2, 7, 7)),
}


def _inputs(shape, n=4, seed=0, low=0.0, high=1.0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *shape, generator=gen, dtype=DTYPE) * (high - low) + low
    labels = torch.randint(0, 5, (n,), generator=gen)
    return x, labels


def _margins(model, x, labels):
    z = model(x)
    return z.gather(1, labels[:, None]) - z  # (B, K): z_y - z_j


def _empirical_min(model, x, labels, perturbation, seed=0, samples=1500, vertices=500):
    """Per example and margin, the smallest margin found: samples, vertices/sphere, PGD."""
    gen = torch.Generator().manual_seed(seed)
    worst = _margins(model, x, labels)
    n = x.shape[0]
    xs = x.repeat(samples, *([1] * (x.dim() - 1)))
    ys = labels.repeat(samples)
    points = [perturbation.sample(xs, gen)]
    xv = x.repeat(vertices, *([1] * (x.dim() - 1)))
    if perturbation.norm == "linf":
        low, high = perturbation.box(xv)
        pick = torch.rand(xv.shape, generator=gen, dtype=DTYPE) < 0.5
        points.append(torch.where(pick, low, high))
    else:  # points on the sphere (clipping moves coordinates toward x: still in the set)
        direction = torch.randn(xv.shape, generator=gen, dtype=DTYPE)
        direction = direction / direction.flatten(1).norm(dim=1).view(-1, *([1] * (x.dim() - 1)))
        points.append((xv + perturbation.eps * direction).clamp(perturbation.low,
                                                                 perturbation.high))
    with torch.no_grad():
        for pts, ys_ in ((points[0], ys), (points[1], labels.repeat(vertices))):
            reps = pts.shape[0] // n
            margins = _margins(model, pts.to(DTYPE), ys_).view(reps, n, -1)
            worst = torch.minimum(worst, margins.min(dim=0).values)
    pgd = PGD(steps=40, restarts=1, loss="margin").perturb(model, x, labels, perturbation, gen)
    assert ((pgd - x).flatten(1).norm(dim=1, p=float("inf") if perturbation.norm == "linf"
                                      else 2) <= perturbation.eps + 1e-9).all()
    with torch.no_grad():
        worst = torch.minimum(worst, _margins(model, pgd, labels))
    return worst


SETS = [("linf", 0.02), ("linf", 0.1), ("l2", 0.1), ("l2", 0.5)]


@pytest.mark.parametrize("net", sorted(NETS))
@pytest.mark.parametrize("norm,eps", SETS)
def test_bounds_are_sound_against_samples_vertices_and_pgd(net, norm, eps):
    build, shape = NETS[net]
    model = build()
    x, labels = _inputs(shape, seed=10 * sorted(NETS).index(net) + SETS.index((norm, eps)))
    perturbation = PerturbationSet(norm, eps)
    worst = _empirical_min(model, x, labels, perturbation)
    with torch.no_grad():
        bounds = _all_bounds(model, x, perturbation, labels)
        bounds["crown_unelided"] = linear_margin_bounds(model, x, perturbation, labels,
                                                        elide=False)
    for name, lower in bounds.items():
        assert lower.shape == (4, 5) and torch.isfinite(lower).all(), name
        gap = lower - worst
        assert (gap <= TOL).all(), f"{name} unsound on {net} {norm} eps={eps}: {gap.max():.3g}"
    # The bounds are not vacuous: at the small eps, the tightest one is close to the truth.
    if norm == "linf" and eps == 0.02:
        assert (worst - bounds["crown"]).max() < 1.0
    # Intermediate boxes hold every sampled pre-activation.
    layers = layers_of(model)
    relus = [i for i, layer in enumerate(layers) if isinstance(layer, nn.ReLU)]
    points = perturbation.sample(x.repeat(200, *([1] * (x.dim() - 1))),
                                 torch.Generator().manual_seed(1)).to(DTYPE)
    for method in ("fastlin", "crown"):
        for intermediate in ("same", "ibp"):
            with torch.no_grad():
                boxes = preactivation_bounds(model, x, perturbation, method=method,
                                             intermediate=intermediate)
            assert len(boxes) == len(relus)
            for index, (lo, hi) in zip(relus, boxes):
                with torch.no_grad():
                    pre = nn.Sequential(*layers[:index])(points).view(200, *lo.shape)
                assert (pre >= lo - TOL).all() and (pre <= hi + TOL).all(), (method, index)


def test_eps_zero_gives_the_margin_itself():
    for net, (build, shape) in NETS.items():
        model = build()
        x, labels = _inputs(shape, seed=5)
        for norm in ("linf", "l2"):
            perturbation = PerturbationSet(norm, 0.0)
            with torch.no_grad():
                exact = _margins(model, x, labels)
                for name, lower in _all_bounds(model, x, perturbation, labels).items():
                    torch.testing.assert_close(lower, exact, rtol=0, atol=1e-10,
                                               msg=f"{net} {norm} {name}")


# ---------------------------------------------------------------------------------------------
# Exactness


def _linear_min(model, x, labels, perturbation):
    """Exact minimum of each margin over the set when the net is affine on it: from the Jacobian
    at x, the minimizing box vertex (l_inf, with clipping) or -eps ||J||_2 (l_2, ball inside the
    pixel range). Also returns the network's margins at that vertex (l_inf)."""
    jac = torch.autograd.functional.jacobian(
        lambda inp: _margins(model, inp, labels).sum(0), x)  # (K, B, *shape)
    jac = jac.transpose(0, 1).flatten(2)  # (B, K, n)
    center = _margins(model, x, labels)
    if perturbation.norm == "l2":
        return center - perturbation.eps * jac.norm(dim=2), None
    low, high = perturbation.box(x)
    d_low, d_high = (low - x).flatten(1)[:, None], (high - x).flatten(1)[:, None]
    exact = center + torch.minimum(jac * d_low, jac * d_high).sum(dim=2)
    vertex_margins = []
    for k in range(jac.shape[1]):
        vertex = torch.where((jac[:, k] > 0).view_as(x.flatten(1)).view_as(x), low, high)
        vertex_margins.append(_margins(model, vertex, labels)[:, k])
    return exact, torch.stack(vertex_margins, dim=1)


@pytest.mark.parametrize("net", sorted(NETS))
def test_exact_when_no_relu_is_unstable(net):
    build, shape = NETS[net]
    model = build()
    # Values near the pixel range's edges too, so the l_inf box is clipped on some coordinates.
    x, labels = _inputs(shape, seed=11, low=-0.2, high=1.2)
    x = x.clamp(0, 1)
    for norm, eps in (("linf", 2e-2), ("l2", 5e-2)):
        xin = x if norm == "linf" else x.clamp(0.01, 0.99)  # l_2: the ball inside the range
        # All ReLUs stable by construction: shrink eps until no neuron is unstable.
        for _ in range(40):
            perturbation = PerturbationSet(norm, eps)
            with torch.no_grad():
                unstable = sum(((lo < 0) & (hi > 0)).sum().item()
                               for method in ("fastlin", "crown") for intermediate in ("same", "ibp")
                               for lo, hi in preactivation_bounds(model, xin, perturbation,
                                                                  method=method,
                                                                  intermediate=intermediate))
            if unstable == 0:
                break
            eps /= 2
        assert unstable == 0 and eps > 1e-7, "test setup: no eps without unstable ReLUs"
        exact, at_vertex = _linear_min(model, xin, labels, perturbation)
        if at_vertex is not None:
            torch.testing.assert_close(at_vertex, exact, rtol=0, atol=1e-10)
        with torch.no_grad():
            for name, lower in _all_bounds(model, xin, perturbation, labels).items():
                torch.testing.assert_close(lower, exact, rtol=0, atol=1e-10,
                                           msg=f"{net} {norm} {name}")


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("elide", [True, False])
def test_single_linear_layer_is_exact_for_both_norms(normalize, elide):
    layers = [Normalize(*NORMALIZE, 3)] if normalize else []
    model = _init(nn.Sequential(*layers, nn.Flatten(), nn.Linear(32, 5)), seed=7)
    x, labels = _inputs((2, 4, 4), seed=3, low=-0.3, high=1.3)
    x = x.clamp(0, 1)  # many pixels at the range's edges: clipping matters for l_inf
    for norm, eps, xin in (("linf", 0.15, x), ("l2", 0.2, x.clamp(0.25, 0.75))):
        perturbation = PerturbationSet(norm, eps)
        exact, _ = _linear_min(model, xin, labels, perturbation)
        with torch.no_grad():
            for name, lower in _all_bounds(model, xin, perturbation, labels, elide).items():
                torch.testing.assert_close(lower, exact, rtol=0, atol=1e-10, msg=f"{norm} {name}")


def test_fastlin_is_tight_on_the_toy_example_of_appendix_a():
    """003 Appendix A: h(x) = W2 relu(W1 x) = x_2 - |x_1| with b = 0.3, eps = 0.2,
    x0 = [0.1, 0.42]: two neurons are unstable, yet Fast-Lin's bound is the exact minimum,
    c - a - 2 eps = -0.08."""
    model = nn.Sequential(nn.Linear(2, 4, bias=False), nn.ReLU(), nn.Linear(4, 1, bias=False))
    model = model.to(DTYPE)
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1, 0], [-1, 0], [0, 1], [0, -1]], dtype=DTYPE))
        model[2].weight.copy_(torch.tensor([[-1, -1, 1, -1]], dtype=DTYPE))
    eps = 0.2
    # 003's point, then more points of S_1 = {x_2 >= |x_1| + b} with |x_1| < eps (the case with
    # unstable neurons) and one with |x_1| >= eps (all stable).
    x0 = torch.tensor([[0.1, 0.42], [0.05, 0.5], [-0.15, 0.7], [0.0, 0.31], [0.5, 0.9]],
                      dtype=DTYPE)
    perturbation = PerturbationSet("linf", eps, low=-1.0, high=1.0)  # ||x||_inf <= 1 in 003
    spec = Specification(torch.ones(len(x0), 1, 1, dtype=DTYPE))
    grid = torch.linspace(-eps, eps, 401, dtype=DTYPE)
    g1, g2 = torch.meshgrid(grid, grid, indexing="ij")
    offsets = torch.stack([g1.flatten(), g2.flatten()], dim=1)
    with torch.no_grad():
        exact = torch.stack([model(point + offsets).min() for point in x0])  # grid has vertices
        torch.testing.assert_close(exact, x0[:, 1] - x0[:, 0].abs() - 2 * eps, rtol=0,
                                   atol=1e-12)
        boxes = preactivation_bounds(model, x0, perturbation, method="fastlin")
        unstable = ((boxes[0][0] < 0) & (boxes[0][1] > 0)).sum(dim=1)
        assert unstable.tolist() == [2, 2, 2, 2, 0]
        for elide in (True, False):
            for method in ("fastlin", "crown"):
                lower = linear_margin_bounds(model, x0, perturbation, spec, method=method,
                                             elide=elide)[:, 0]
                torch.testing.assert_close(lower, exact, rtol=0, atol=1e-12,
                                           msg=f"{method} elide={elide}")
        # IBP is not tight here: the relaxation matters.
        ibp = ibp_margin_bounds(model, x0, perturbation, spec)[:, 0]
        assert (ibp[:4] < exact[:4] - 0.04).all()


# ---------------------------------------------------------------------------------------------
# Tightness on a trained model


@pytest.fixture(scope="module")
def trained_digits():
    from workers.core.config import RunConfig, resolve
    from workers.core.data import load_split
    from workers.core.train import train

    config = resolve(RunConfig(method="ibp", dataset="digits-8x8", model="mlp2x100", eps=0.05,
                               epochs=20, batch_size=64, train_limit=1200, seed=0,
                               schedule={"warmup_epochs": 1, "rampup_epochs": 10}))
    x, y = load_split("digits-8x8", "train")
    model = train(config, x[:1200], y[:1200]).model.eval().to(DTYPE)
    xt, yt = load_split("digits-8x8", "test")
    return model, xt[:300].to(DTYPE), yt[:300], PerturbationSet("linf", 0.05)


def test_crown_is_at_least_as_tight_as_fastlin_and_both_beat_ibp(trained_digits):
    model, x, y, perturbation = trained_digits
    spec = margin_specification(y, 10)
    off = ~nn.functional.one_hot(y, 10).bool()
    with torch.no_grad():
        fastlin = linear_margin_bounds(model, x, perturbation, y, method="fastlin")
        boxes = preactivation_bounds(model, x, perturbation, method="fastlin")
        crown_same_boxes = linear_margin_bounds(model, x, perturbation, y, method="crown",
                                                intermediate=boxes)
        crown = linear_margin_bounds(model, x, perturbation, y, method="crown")
        crown_ibp = crown_ibp_margin_bounds(model, x, perturbation, y)
        ibp = ibp_margin_bounds(model, x, perturbation, y)
    counts = {name: spec.certified(b).sum().item() for name, b in
              [("ibp", ibp), ("crown_ibp", crown_ibp), ("fastlin", fastlin),
               ("crown|fastlin boxes", crown_same_boxes), ("crown", crown)]}
    means = {name: b[off].mean().item() for name, b in
             [("ibp", ibp), ("crown_ibp", crown_ibp), ("fastlin", fastlin),
              ("crown|fastlin boxes", crown_same_boxes), ("crown", crown)]}
    print("certified of 300:", counts, "mean margin bound:", means)
    # Same intermediate boxes: CROWN's adaptive slopes tend to be tighter (a tendency, not per
    # margin).
    assert counts["crown|fastlin boxes"] >= counts["fastlin"]
    assert means["crown|fastlin boxes"] >= means["fastlin"]
    assert counts["crown"] >= counts["fastlin"]
    # Layer-by-layer linear bounds are far tighter than IBP's on this briefly trained model.
    assert counts["fastlin"] >= counts["ibp"] + 50 and counts["crown"] >= counts["ibp"] + 50
    assert means["fastlin"] > means["ibp"] and means["crown"] > means["ibp"]
    assert means["crown"] > means["crown_ibp"]
    # Sound on the trained model as well (PGD point).
    worst = _empirical_min(model, x[:50], y[:50], perturbation, samples=200, vertices=100)
    for lower in (fastlin, crown, crown_ibp, crown_same_boxes):
        assert (lower[:50] <= worst + TOL).all()


def test_certifiers_are_registered_and_imply_pgd_robustness(trained_digits):
    import workers.core.linear_certifiers  # noqa: F401  (registers the certifiers)
    from workers.core.certify import CERTIFIERS, certify

    model, x, y, perturbation = trained_digits
    for name in ("fastlin", "crown", "crown_ibp"):
        assert name in CERTIFIERS
    result = certify(model, x[:100], y[:100], perturbation, ["ibp", "fastlin", "crown", "crown_ibp"],
                     attack=PGD(steps=20, restarts=1))
    verified = result.verified
    for name in ("fastlin", "crown", "crown_ibp"):
        flags = torch.tensor(verified[name])
        assert (flags <= torch.tensor(result.pgd_correct)).all(), name
        assert (flags <= torch.tensor(result.clean_correct)).all(), name
    assert sum(verified["crown"]) >= sum(verified["fastlin"]) > 0
    with torch.no_grad():
        direct = linear_margin_bounds(model, x[:100], perturbation, y[:100], method="crown")
    assert verified["crown"] == margin_specification(y[:100], 10).certified(direct).tolist()


# ---------------------------------------------------------------------------------------------
# Gradients


@pytest.mark.parametrize("net", ["mlp_norm", "conv_norm"])
@pytest.mark.parametrize("eps", [0.05, 0.0])  # eps = 0: the start of a training ramp
def test_gradients_reach_every_weight(net, eps):
    build, shape = NETS[net]
    model = build()
    x, labels = _inputs(shape, seed=21)
    perturbation = PerturbationSet("linf", eps)
    for name, lower in _all_bounds(model, x, perturbation, labels).items():
        model.zero_grad()
        lower.sum().backward()
        for pname, parameter in model.named_parameters():
            assert parameter.grad is not None, (name, pname)
            assert torch.isfinite(parameter.grad).all(), (name, pname)
            assert parameter.grad.abs().sum() > 0, (name, pname)


def test_gradients_match_finite_differences():
    model = _mlp(True, seed=4)
    x, labels = _inputs((2, 4, 4), seed=8)
    perturbation = PerturbationSet("linf", 0.05)
    params = dict(model.named_parameters())

    for method, intermediate in (("crown", "ibp"), ("fastlin", "same"), ("crown", "same")):
        def bound(w1, w2):
            return _with_weights(model, {"2.weight": w1, "4.weight": w2},
                                 lambda: linear_margin_bounds(model, x, perturbation, labels,
                                                              method=method,
                                                              intermediate=intermediate))

        assert torch.autograd.gradcheck(
            bound, (params["2.weight"].detach().clone().requires_grad_(),
                    params["4.weight"].detach().clone().requires_grad_()),
            eps=1e-6, atol=1e-5, fast_mode=True)


def _with_weights(model, state, fn):
    """Run fn with some parameters of `model` replaced by the given tensors (for gradcheck)."""
    modules = dict(model.named_modules())
    saved = {}
    for key, value in state.items():
        module_name, attr = key.rsplit(".", 1)
        module = modules[module_name]
        saved[key] = module._parameters[attr]
        del module._parameters[attr]
        setattr(module, attr, value)
    try:
        return fn()
    finally:
        for key, value in saved.items():
            module_name, attr = key.rsplit(".", 1)
            module = modules[module_name]
            delattr(module, attr)
            module._parameters[attr] = value
