"""Tests for workers.core.attacks: PGD over l_inf and l_2 sets in [0,1] pixel scale."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from workers.core.attacks import PGD, cross_entropy_loss, margin_loss
from workers.core.bounds import PerturbationSet


pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(seed: int, shape=(1, 4, 4), classes: int = 5, dtype=torch.float32) -> nn.Sequential:
    width = 1
    for size in shape:
        width *= size
    with torch.random.fork_rng():  # deterministic weights, global RNG left as it was
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Flatten(), nn.Linear(width, 32), nn.ReLU(), nn.Linear(32, 32),
                              nn.ReLU(), nn.Linear(32, classes))
    return model.to(dtype)


def _inputs(batch: int, shape=(1, 4, 4), seed: int = 0, dtype=torch.float32,
            edge_fraction: float = 0.25) -> torch.Tensor:
    """Random images, a fraction of the pixels exactly on 0 or 1 (so the pixel clip matters)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand((batch, *shape), generator=gen)
    edge = torch.rand(x.shape, generator=gen) < edge_fraction
    x = torch.where(edge, (torch.rand(x.shape, generator=gen) < 0.5).float(), x)
    return x.to(dtype)


def _labels(batch: int, classes: int, seed: int) -> torch.Tensor:
    return torch.randint(classes, (batch,), generator=torch.Generator().manual_seed(seed))


def _size(delta: torch.Tensor, norm: str) -> torch.Tensor:
    flat = delta.flatten(1)
    return flat.abs().amax(dim=1) if norm == "linf" else flat.norm(dim=1)


EPS = {"linf": 0.1, "l2": 0.8}


def test_margin_loss_and_cross_entropy():
    logits = torch.tensor([[2.0, 5.0, -1.0], [0.5, -3.0, 0.25], [1.0, 1.0, 1.0]])
    y = torch.tensor([1, 0, 2])
    torch.testing.assert_close(margin_loss(logits, y), torch.tensor([-3.0, -0.25, 0.0]))
    assert margin_loss(torch.tensor([[0.0, 1.0]]), torch.tensor([0])).item() == 1.0
    expected = torch.logsumexp(logits, 1) - logits.gather(1, y[:, None]).squeeze(1)
    torch.testing.assert_close(cross_entropy_loss(logits, y), expected)


def test_pgd_validates_its_arguments():
    with pytest.raises(ValueError, match="loss"):
        PGD(loss="hinge")
    with pytest.raises(ValueError):
        PGD(restarts=0)
    with pytest.raises(ValueError):
        PGD(steps=-1)


@pytest.mark.parametrize("loss", ["margin", "ce"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("step_size", [None, 0.5], ids=["default_step", "big_step"])
@pytest.mark.parametrize("random_start", [True, False], ids=["random", "clean"])
def test_pgd_stays_in_the_set_and_pixel_range(norm, loss, step_size, random_start):
    model = _mlp(0)
    x = _inputs(16, seed=1)
    y = _labels(16, 5, seed=2)
    perturbation = PerturbationSet(norm, EPS[norm])
    attack = PGD(steps=15, restarts=1, step_size=step_size, loss=loss, random_start=random_start)
    x_adv = attack.perturb(model, x, y, perturbation, torch.Generator().manual_seed(3))
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert not x_adv.requires_grad
    assert (_size(x_adv - x, norm) <= EPS[norm] + 1e-6).all()
    assert (x_adv >= 0).all() and (x_adv <= 1).all()
    # It did move, and it does not lower the loss below that of the start it could keep.
    assert (x_adv != x).any()
    if not random_start and loss == "margin":
        assert (margin_loss(model(x_adv), y) >= margin_loss(model(x), y) - 1e-6).all()


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_uses_the_whole_budget_away_from_the_edges(norm):
    # Far from the pixel edges nothing but the ball limits the attack: the returned points lie on
    # its boundary (and not beyond it).
    model = _mlp(8)
    gen = torch.Generator().manual_seed(9)
    x = 0.35 + 0.3 * torch.rand(16, 1, 4, 4, generator=gen)
    y = _labels(16, 5, seed=10)
    eps = 0.05 if norm == "linf" else 0.3  # |delta_i| <= 0.3 keeps every pixel inside [0, 1]
    perturbation = PerturbationSet(norm, eps)
    x_adv = PGD(steps=30, restarts=1, step_size=eps / 2).perturb(
        model, x, y, perturbation, torch.Generator().manual_seed(11))
    torch.testing.assert_close(_size(x_adv - x, norm), torch.full((16,), eps), rtol=0, atol=1e-5)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_respects_a_custom_pixel_range(norm):
    model = _mlp(1)
    x = _inputs(8, seed=4) * 0.5 + 0.25  # inside [0.25, 0.75]
    y = _labels(8, 5, seed=5)
    perturbation = PerturbationSet(norm, EPS[norm], low=0.2, high=0.8)
    x_adv = PGD(steps=10, restarts=1, step_size=0.3).perturb(model, x, y, perturbation,
                                                            torch.Generator().manual_seed(6))
    assert (x_adv >= 0.2).all() and (x_adv <= 0.8).all()
    assert (_size(x_adv - x, norm) <= EPS[norm] + 1e-6).all()


def _linear_model(d: int, seed: int) -> nn.Sequential:
    gen = torch.Generator().manual_seed(seed)
    linear = nn.Linear(d, 2).double()
    with torch.no_grad():
        linear.weight.copy_(torch.randn(2, d, generator=gen, dtype=torch.float64))
        linear.bias.copy_(torch.randn(2, generator=gen, dtype=torch.float64))
    return nn.Sequential(linear)


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("random_start", [True, False], ids=["random", "clean"])
def test_pgd_finds_the_exact_worst_case_of_a_linear_model(norm, random_start):
    # Two classes, one linear layer: the margin loss z_o - z_y = w.x + c is linear, so its maximum
    # over the set (away from the pixel edges) is w.x + c + eps ||w||_1 (linf) or eps ||w||_2 (l2).
    d = 12
    model = _linear_model(d, seed=7)
    gen = torch.Generator().manual_seed(8)
    x = 0.3 + 0.4 * torch.rand(10, d, generator=gen, dtype=torch.float64)
    y = _labels(10, 2, seed=9)
    eps = 0.05 if norm == "linf" else 0.1  # the set stays inside [0.25, 0.75]^d
    perturbation = PerturbationSet(norm, eps)
    weight, bias = model[0].weight, model[0].bias
    w = weight[1 - y] - weight[y]  # (B, d)
    c = bias[1 - y] - bias[y]
    dual = w.abs().sum(1) if norm == "linf" else w.norm(dim=1)
    exact = (w * x).sum(1) + c + eps * dual
    step = None if norm == "linf" else eps / 4  # l2: large enough steps to turn onto w quickly
    attack = PGD(steps=100, restarts=1, step_size=step, random_start=random_start)
    x_adv = attack.perturb(model, x, y, perturbation, torch.Generator().manual_seed(10))
    with torch.no_grad():
        found = margin_loss(model(x_adv), y)
    assert (found <= exact + 1e-9).all()  # nothing in the set beats the closed form
    torch.testing.assert_close(found, exact, rtol=0, atol=1e-5 * dual.max().item())
    if norm == "linf":  # the worst point is the corner x + eps sign(w)
        torch.testing.assert_close(x_adv, x + eps * w.sign(), rtol=0, atol=1e-6)


def test_eps_zero_returns_the_input_and_robust_is_clean_accuracy():
    model = _mlp(2)
    x = _inputs(32, seed=11)
    y = _labels(32, 5, seed=12)
    clean = model(x).argmax(1) == y
    assert clean.any() and not clean.all()
    for norm in ("linf", "l2"):
        perturbation = PerturbationSet(norm, 0.0)
        x_adv = PGD(steps=10, restarts=3).perturb(model, x, y, perturbation,
                                                  torch.Generator().manual_seed(0))
        assert torch.equal(x_adv, x)
        assert torch.equal(PGD(steps=10, restarts=3).robust(model, x, y, perturbation,
                                                            torch.Generator().manual_seed(0)),
                           clean)
    # steps = 0 is no attack either.
    x_adv = PGD(steps=0, restarts=1).perturb(model, x, y, PerturbationSet("linf", 0.1))
    assert torch.equal(x_adv, x)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_robust_is_false_where_the_clean_prediction_is_wrong(norm):
    model = _mlp(3)
    x = _inputs(32, seed=13)
    y = _labels(32, 5, seed=14)
    clean = model(x).argmax(1) == y
    assert (~clean).any()
    robust = PGD(steps=10, restarts=2).robust(model, x, y, PerturbationSet(norm, EPS[norm] / 10),
                                              torch.Generator().manual_seed(15))
    assert robust.dtype == torch.bool and robust.shape == (32,)
    assert not robust[~clean].any()
    assert not (robust & ~clean).any()


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_robust_agrees_with_the_points_perturb_finds(norm):
    # Label every example with its clean prediction: then the single restart of `robust` attacks
    # the whole batch from the same generator state as `perturb`, and an example counts as broken
    # exactly when the returned point is misclassified (and it is in the set).
    model = _mlp(4)
    x = _inputs(64, seed=16)
    y = model(x).argmax(1)
    perturbation = PerturbationSet(norm, EPS[norm] / 2)
    attack = PGD(steps=20, restarts=1)
    robust = attack.robust(model, x, y, perturbation, torch.Generator().manual_seed(17))
    x_adv = attack.perturb(model, x, y, perturbation, torch.Generator().manual_seed(17))
    assert (_size(x_adv - x, norm) <= perturbation.eps + 1e-6).all()
    with torch.no_grad():
        broken = model(x_adv).argmax(1) != y
    assert broken.any() and not broken.all()  # the eps gives a mix, so the check means something
    assert torch.equal(robust, ~broken)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_more_restarts_from_the_same_seed_never_more_robust(norm):
    # Restart 1 draws the same random start in both runs, so whatever it breaks stays broken.
    model = _mlp(5)
    x = _inputs(64, seed=18)
    y = model(x).argmax(1)
    perturbation = PerturbationSet(norm, EPS[norm] / 2)
    one = PGD(steps=10, restarts=1).robust(model, x, y, perturbation,
                                           torch.Generator().manual_seed(19))
    five = PGD(steps=10, restarts=5).robust(model, x, y, perturbation,
                                            torch.Generator().manual_seed(19))
    assert not (five & ~one).any()
    assert five.sum() <= one.sum()


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_is_deterministic_given_the_generator(norm):
    model = _mlp(6)
    x = _inputs(16, seed=20)
    y = _labels(16, 5, seed=21)
    perturbation = PerturbationSet(norm, EPS[norm])
    attack = PGD(steps=5, restarts=3)

    def run(seed):
        return attack.perturb(model, x, y, perturbation, torch.Generator().manual_seed(seed))

    assert torch.equal(run(22), run(22))
    assert not torch.equal(run(22), run(23))  # the random start really comes from the generator
    robust = [attack.robust(model, x, y, perturbation, torch.Generator().manual_seed(22))
              for _ in range(2)]
    assert torch.equal(*robust)


class _Recording(nn.Module):
    """Records every input the attack evaluates."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.seen = model, []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.model(x)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_returns_the_best_iterate(norm):
    # With a huge step the iterates bounce around the set; the returned point must be the best
    # iterate evaluated (per example), not the last one.
    model = _mlp(7, dtype=torch.float64)
    recording = _Recording(model)
    x = _inputs(32, seed=24, dtype=torch.float64)
    y = _labels(32, 5, seed=25)
    perturbation = PerturbationSet(norm, 0.2 if norm == "linf" else 1.0)
    attack = PGD(steps=7, restarts=1, step_size=1.0)
    x_adv = attack.perturb(recording, x, y, perturbation, torch.Generator().manual_seed(26))
    iterates = torch.stack(recording.seen)  # (steps + 1, B, ...)
    assert iterates.shape[0] == 8
    with torch.no_grad():
        losses = torch.stack([margin_loss(model(point), y) for point in iterates])
        best = losses.argmax(dim=0)
        torch.testing.assert_close(x_adv, iterates[best, torch.arange(32)], rtol=0, atol=0)
        assert (margin_loss(model(x_adv), y) >= losses.amax(dim=0) - 1e-12).all()
    assert (best != iterates.shape[0] - 1).any()  # the last iterate is not always the best
