"""ReLU_theta and the clipped MaxMin: values, interval rules (sound and exact at the ends), the
varying-neuron masks (an output marked constant never moves), the models that use them."""
import pytest
import torch

from workers.core.activations import ACTIVATION_RULES, MaxMin, ReLUTheta, activation_rule
from workers.core.bounds import PerturbationSet, ibp_margin_bounds
from workers.core.bounds.interval import rule_for
from workers.core.data import dataset_info
from workers.core.models import MODELS, build_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_relu_theta_is_eq_8():
    layer = ReLUTheta((3,), 1.0)
    with torch.no_grad():
        layer.theta.copy_(torch.tensor([1.0, 2.0, 0.5]))
    z = torch.tensor([[-1.0, 1.5, 0.7], [0.3, 3.0, 0.2]])
    assert torch.equal(layer(z), torch.tensor([[0.0, 1.5, 0.5], [0.3, 2.0, 0.2]]))
    z.requires_grad_(True)
    layer(z).sum().backward()
    assert layer.theta.grad.tolist() == [0.0, 1.0, 1.0]  # the threshold learns where it clips
    with pytest.raises(ValueError, match="threshold"):
        ReLUTheta((3,), 0.0)


def test_maxmin_sorts_pairs_and_clips():
    layer = MaxMin((4,), upper=1.0, lower=-1.0)
    z = torch.tensor([[0.5, -3.0, 0.2, 2.0]])  # pairs (0.5, 0.2) and (-3, 2)
    assert torch.equal(layer(z), torch.tensor([[0.5, 1.0, 0.2, -1.0]]))
    with pytest.raises(ValueError, match="even"):
        MaxMin((3, 4, 4))
    with pytest.raises(ValueError, match="below"):
        MaxMin((4,), upper=0.0, lower=1.0)


@pytest.mark.parametrize("layer", [ReLUTheta((6,), 0.4), MaxMin((6,), 0.4, -0.3),
                                   ReLUTheta((2, 3, 3), 0.8), MaxMin((2, 3, 3), 0.5, -0.5)])
def test_interval_rules_and_masks_are_sound(layer):
    gen = torch.Generator().manual_seed(0)
    shape = (5,) + tuple(layer.theta.shape if isinstance(layer, ReLUTheta) else
                         (layer.a.shape[0] * 2, *layer.a.shape[1:]))
    center = torch.randn(shape, generator=gen) * 0.6
    radius = torch.rand(shape, generator=gen) * 0.5
    lower, upper = center - radius, center + radius
    out_lower, out_upper = rule_for(layer)(layer, lower, upper)
    rule = activation_rule(layer)
    varying = rule.varying(layer, lower, upper)
    needed = rule.needed(layer, lower, upper)
    with torch.no_grad():
        reference = layer(center)
        samples = [lower + (upper - lower) * torch.rand(shape, generator=gen) for _ in range(400)]
        samples += [lower, upper]
        for point in samples:
            out = layer(point)
            assert (out >= out_lower - 1e-6).all() and (out <= out_upper + 1e-6).all()
            moved = (out - reference).abs() > 1e-7
            assert not (moved & ~varying).any(), "an output marked constant moved"
        # the ends are reached: the rule is exact for these monotone maps
        assert torch.allclose(layer(lower), out_lower) and torch.allclose(layer(upper), out_upper)
        # an input whose outputs are all constant cannot change any varying output
        if isinstance(layer, MaxMin):
            pair = torch.cat([needed.chunk(2, 1)[0]] * 2, dim=1)
            assert torch.equal(needed, pair)
            assert torch.equal(needed.chunk(2, 1)[0], varying.chunk(2, 1)[0] | varying.chunk(2, 1)[1])
        else:
            assert torch.equal(needed, varying)
    sparse = rule.sparsity(layer, lower, upper, 0.1)
    assert sparse.shape == lower.shape and (sparse >= 0).all()


def test_sparsity_loss_is_eq_12_and_26():
    layer = ReLUTheta((2,), 1.0)
    lower, upper = torch.tensor([[-2.0, 1.5]]), torch.tensor([[-1.0, 2.0]])  # both constant
    assert not layer.varying(lower, upper).any()
    # Eq. 12 as printed sums both hinges for every neuron: max(0, UB) + lambda_theta *
    # max(0, theta - LB) (Eq. 26 puts lambda_theta on the second)
    assert torch.allclose(layer.sparsity(lower, upper, 1.0), torch.tensor([[3.0, 2.0]]))
    assert torch.allclose(layer.sparsity(lower, upper, 0.1), torch.tensor([[0.3, 2.0]]))
    relu = ACTIVATION_RULES[torch.nn.ReLU]
    assert torch.equal(relu.sparsity(torch.nn.ReLU(), lower, upper, 1.0), torch.tensor([[0.0, 2.0]]))
    maxmin = MaxMin((2,), upper=1.0, lower=-1.0)  # pair (x1, x2): max then min
    lower, upper = torch.tensor([[2.0, 1.5]]), torch.tensor([[3.0, 2.5]])  # max >= a: constant
    assert maxmin.varying(lower, upper).tolist() == [[False, True]]
    # max half: lambda_theta * max(0, a - LB_max) = 0; min half: max(0, UB_min - b) = 3.5
    assert torch.allclose(maxmin.sparsity(lower, upper, 0.1), torch.tensor([[0.0, 3.5]]))


@pytest.mark.parametrize("name", ["6C2F-theta", "6C2F-maxmin", "8C2F-maxmin", "mlp2x100-theta"])
def test_models_with_the_new_activations_build_and_bound(name):
    info = dataset_info("digits")
    torch.manual_seed(0)
    model = build_model(name, info)
    kinds = {type(m) for m in model}
    assert (ReLUTheta in kinds) != (MaxMin in kinds) and torch.nn.ReLU not in kinds
    x = torch.rand(2, *info.input_shape)
    y = model(x).argmax(dim=1)
    lower = ibp_margin_bounds(model, x, PerturbationSet("linf", 0.01), y)
    assert lower.shape == (2, 10) and torch.isfinite(lower).all()
    assert name in MODELS
    with pytest.raises(ValueError, match="even"):  # odd widths are refused clearly
        MaxMin((5, 2, 2))
