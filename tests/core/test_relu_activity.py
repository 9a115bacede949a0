"""The varying-ReLU shares (Local-Lip Figure 3): exact answers on hand-set weights, and soundness
on random nets: a neuron reported constant keeps its regime for every input sampled in, and every
attack within, the perturbation set."""
import pytest
import torch
from torch import nn

from workers.core.activations import ReLUTheta
from workers.core.bounds import PerturbationSet
from workers.core.diagnostics import DIAGNOSTICS, diagnose
from workers.core.lipschitz import CertifiedLocalNorms, local_outer, varying_masks
from workers.core.relu_activity import varying_shares

from .nets import DTYPE, random_init

pytestmark = pytest.mark.usefixtures("one_thread")


def _linear(weight, bias) -> nn.Linear:
    weight = torch.tensor(weight, dtype=DTYPE)
    layer = nn.Linear(weight.shape[1], weight.shape[0]).to(DTYPE)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(torch.tensor(bias, dtype=DTYPE))
    return layer


def hand_set(activation=nn.ReLU) -> nn.Sequential:
    """Around x = (0.5, 0.5) at l_2 eps 0.1 (inside [0, 1]^2): layer 1's pre-activations are
    x1 + x2 - 2 (<= -0.86: constant 0), x1 + 1 (in [1.4, 1.6]: linear, which Eq. 3 counts as
    varying) and x1 - 0.5 (crosses 0: varying); layer 2's are -h1 - h2 - h3 - 1 (<= -1, as h >= 0:
    constant) and h2 (linear: varying)."""
    second = activation((2,)) if activation is ReLUTheta else activation()
    first = activation((3,)) if activation is ReLUTheta else activation()
    return nn.Sequential(
        _linear([[1, 1], [1, 0], [1, 0]], [-2, 1, -0.5]), first,
        _linear([[-1, -1, -1], [0, 1, 0]], [-1, 0]), second,
        _linear([[1, -1], [0, 1]], [0, 0]))


X0 = torch.tensor([[0.5, 0.5]], dtype=DTYPE)


def test_exact_shares_on_hand_set_weights():
    shares = varying_shares(hand_set(), X0, PerturbationSet("l2", 0.1))
    assert shares == pytest.approx([2 / 3, 1 / 2])
    metrics = diagnose(hand_set(), X0, PerturbationSet("l2", 0.1), ["local_lip"])["varying_relu"]
    assert metrics == pytest.approx({"layer1": 2 / 3, "layer2": 1 / 2, "mean": 7 / 12})
    # a point (eps 0): x1 - 0.5 = 0 is not > 0, so only the linear neurons vary
    assert varying_shares(hand_set(), X0, PerturbationSet("l2", 0.0)) == \
        pytest.approx([1 / 3, 1 / 2])
    # x1 + x2 - 2 <= 0 on all of [0, 1]^2: constant at any eps, the pixel range clips the set
    assert varying_shares(hand_set(), X0, PerturbationSet("linf", 0.5))[0] == pytest.approx(2 / 3)
    assert varying_shares(hand_set(), X0 + 0.4, PerturbationSet("l2", 0.5))[0] == \
        pytest.approx(2 / 3)


def test_relu_theta_counts_the_clipped_neurons_as_constant():
    """Eq. 9: with theta = 1, x1 + 1 (>= 1.4) sits on theta (constant) and h2 (>= 1.4) too."""
    assert varying_shares(hand_set(ReLUTheta), X0, PerturbationSet("l2", 0.1)) == \
        pytest.approx([1 / 3, 0.0])


def test_shares_are_means_over_examples_and_batches():
    model = random_init(nn.Sequential(nn.Linear(4, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU(),
                                      nn.Linear(8, 3)), torch.Generator().manual_seed(3))
    x = torch.rand(7, 4, generator=torch.Generator().manual_seed(4), dtype=DTYPE)
    perturbation = PerturbationSet("l2", 0.2)
    whole = varying_shares(model, x, perturbation, batch_size=7)
    assert varying_shares(model, x, perturbation, batch_size=3) == pytest.approx(whole)
    per_example = [varying_shares(model, x[i:i + 1], perturbation) for i in range(len(x))]
    assert whole == pytest.approx([sum(s[k] for s in per_example) / len(x) for k in range(2)])


def test_varying_relu_is_registered_for_local_lip_only():
    wanted_by = DIAGNOSTICS.get("varying_relu").wanted_by
    assert tuple(wanted_by) == ("local_lip",)
    model = hand_set()
    assert "varying_relu" not in diagnose(model, X0, PerturbationSet("l2", 0.1), ["bcp"])


def _pre_activations(model: nn.Sequential, x: torch.Tensor) -> list[torch.Tensor]:
    out, z = [], x
    for layer in model:
        if isinstance(layer, nn.ReLU):
            out.append(z)
        z = layer(z)
    return out


def _project(p: torch.Tensor, x: torch.Tensor, perturbation: PerturbationSet) -> torch.Tensor:
    """Into the perturbation set: onto the ball (or box), then clipped to [0, 1], which keeps the
    point in the ball since the center lies in [0, 1] (each coordinate only moves toward it)."""
    delta = p - x
    if perturbation.norm == "l2":
        norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
        delta = delta * (perturbation.eps / norms).clamp_max(1).view(-1, *[1] * (x.dim() - 1))
    else:
        delta = delta.clamp(-perturbation.eps, perturbation.eps)
    return (x + delta).clamp(0, 1)


def _sampled(x, perturbation, count, generator):
    direction = torch.randn((count, *x.shape), generator=generator, dtype=DTYPE)
    if perturbation.norm == "l2":  # points spread through the ball, many near its sphere
        direction = direction / direction.flatten(2).norm(dim=2).unsqueeze(-1)
        radius = torch.rand((count, len(x), 1), generator=generator, dtype=DTYPE) ** 0.25
        delta = direction * radius * perturbation.eps
    else:  # box corners and interior
        delta = torch.where(torch.rand(direction.shape, generator=generator) < 0.5,
                            direction.sign(), direction.clamp(-1, 1)) * perturbation.eps
    return _project(x + delta, x.expand_as(delta), perturbation)


def _attacked(model, x, perturbation, layer, neurons, steps=60):
    """For each (example, neuron) pair, gradient ascent on that neuron's pre-activation within
    the example's set; the highest value it reached."""
    example, neuron = neurons
    center = x[example]
    p = center.clone().requires_grad_(True)
    best = torch.full((len(example),), -float("inf"), dtype=DTYPE)
    step = 2.5 * perturbation.eps / steps
    for _ in range(steps):
        value = _pre_activations(model, p)[layer].gather(1, neuron[:, None]).squeeze(1)
        best = torch.maximum(best, value.detach())
        grad, = torch.autograd.grad(value.sum(), p)
        with torch.no_grad():
            if perturbation.norm == "l2":
                grad = grad / grad.norm(dim=1, keepdim=True).clamp_min(1e-12)
            else:
                grad = grad.sign()
            p = _project(p + step * grad, center, perturbation).requires_grad_(True)
    return best


@pytest.mark.parametrize("norm,eps", [("l2", 0.3), ("linf", 0.08)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_neuron_reported_constant_never_switches_on(norm, eps, seed):
    gen = torch.Generator().manual_seed(seed)
    model = random_init(nn.Sequential(nn.Linear(5, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(),
                                      nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 3)), gen)
    x = torch.rand(6, 5, generator=gen, dtype=DTYPE)
    perturbation = PerturbationSet(norm, eps)
    with torch.no_grad():
        outer, _ = local_outer(model, x, perturbation, CertifiedLocalNorms())
        masks = list(varying_masks(outer))
        samples = _sampled(x, perturbation, 400, gen)  # (400, B, 5)
        sampled = _pre_activations(model, samples.reshape(-1, 5))
    constant_total = 0
    for layer, (mask, values) in enumerate(zip(masks, sampled)):
        values = values.view(400, *mask.shape)
        constant = ~mask
        constant_total += int(constant.sum())
        assert (values.amax(0)[constant] <= 1e-9).all(), f"layer {layer + 1}: a sample switched"
        # and the neurons sampling saw switch are all reported varying
        assert mask[values.amax(0) > 0].all()
        pairs = constant.nonzero(as_tuple=True)
        if len(pairs[0]):
            assert (_attacked(model, x, perturbation, layer, pairs) <= 1e-9).all(), \
                f"layer {layer + 1}: an attack switched a constant neuron on"
    assert constant_total > 0  # the check is not vacuous
    assert sum(int(m.sum()) for m in masks) > 0
    # the diagnostic's shares are these masks' shares
    assert varying_shares(model, x, perturbation) == \
        pytest.approx([float(m.double().mean()) for m in masks])
