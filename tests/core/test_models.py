"""Tests for workers.core.models: the registry of architectures, their shapes, the IBP paper's
Table 1 sizes and the Normalize first layer."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from workers.core.data import dataset_info
from workers.core.models import (
    MODELS,
    Normalize,
    build,
    build_model,
    check_model_fits,
    count_parameters,
)

ALL_MODELS = ["small", "medium", "large", "mlp2x100", "mlp3x100", "4C3F", "6C2F", "8C2F",
              "wong_small", "wong_large", "xlarge"]
CONV_MODELS = ["small", "medium", "large", "4C3F", "6C2F", "8C2F", "wong_small", "wong_large",
               "xlarge"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _forward(model: nn.Module, input_shape, batch: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return model(torch.rand((batch, *input_shape), generator=gen))


# Local-Lip's activation variants (their own layers; tested in test_activations.py)
ACTIVATION_VARIANTS = ["4C3F-theta", "6C2F-theta", "8C2F-theta", "mlp2x100-theta",
                       "6C2F-maxmin", "8C2F-maxmin", "mlp2x100-maxmin"]


def test_the_registered_models():
    assert set(MODELS.names()) == set(ALL_MODELS) | set(ACTIVATION_VARIANTS)


@pytest.mark.parametrize("name", ALL_MODELS)
@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_every_model_builds_and_gives_logits(name, dataset):
    info = dataset_info(dataset)
    check_model_fits(name, info)  # no exception
    model = build_model(name, info)
    assert isinstance(model, nn.Sequential)
    logits = _forward(model, info.input_shape)
    assert logits.shape == (2, 10)
    assert torch.isfinite(logits).all()
    # Every layer is one the bound code knows how to handle: plain standard layers.
    allowed = (Normalize, nn.Conv2d, nn.Linear, nn.ReLU, nn.Flatten)
    assert all(isinstance(layer, allowed) for layer in model), model
    assert isinstance(model[-1], nn.Linear) and model[-1].out_features == 10


@pytest.mark.parametrize("name", ["mlp2x100", "mlp3x100"])
def test_mlps_take_vector_input(name):
    info = dataset_info("toy2d")
    model = build_model(name, info)
    assert _forward(model, info.input_shape, batch=3).shape == (3, info.num_classes)
    hidden = [layer.out_features for layer in model if isinstance(layer, nn.Linear)][:-1]
    assert hidden == [100] * (2 if name == "mlp2x100" else 3)


@pytest.mark.parametrize("name", CONV_MODELS)
def test_conv_model_on_vector_input_is_a_clear_value_error(name):
    info = dataset_info("toy2d")
    with pytest.raises(ValueError, match=rf"{name}.*image input"):
        check_model_fits(name, info)
    with pytest.raises(ValueError, match="image input"):
        build_model(name, info)


@pytest.mark.parametrize("name", ["small", "medium", "8C2F"])
def test_image_too_small_for_the_convs_is_a_value_error(name):
    info = dataset_info("digits-8x8")  # 1x8x8: these stacks shrink it below their kernels
    with pytest.raises(ValueError, match=rf"{name}.*cannot take input of shape"):
        check_model_fits(name, info)


def _hidden_units(model: nn.Module, input_shape) -> int:
    """ReLU outputs per example, counted by forward hooks."""
    counts = []
    hooks = [layer.register_forward_hook(lambda module, args, out: counts.append(out[0].numel()))
             for layer in model.modules() if isinstance(layer, nn.ReLU)]
    try:
        _forward(model, input_shape, batch=1)
    finally:
        for hook in hooks:
            hook.remove()
    return sum(counts)


@pytest.mark.parametrize("name, parameters, hidden", [
    ("small", 471_000, 8_300),
    ("medium", 1_200_000, 47_000),
    ("large", 17_000_000, 230_000),
])
def test_table1_sizes_on_cifar10(name, parameters, hidden):
    # Gowal et al., Table 1: parameter and hidden-unit counts on CIFAR-10 (3x32x32, 10 classes).
    info = dataset_info("cifar10")
    assert info.input_shape == (3, 32, 32) and info.num_classes == 10
    model = build_model(name, info)
    assert count_parameters(model) == pytest.approx(parameters, rel=0.02)
    assert _hidden_units(model, info.input_shape) == pytest.approx(hidden, rel=0.02)
    if name == "small":  # no padding: 16*3*16+16 + 32*16*16+32 + 100*800+100 + 10*100+10
        assert count_parameters(model) == 470_918


def test_count_parameters():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2, bias=False))
    assert count_parameters(model) == 3 * 4 + 4 + 4 * 2
    # Normalize's mean/std are buffers, not parameters.
    assert count_parameters(Normalize([0.5], [0.2], 3)) == 0


@pytest.mark.parametrize("dataset", ["cifar10", "svhn"])
def test_normalized_datasets_start_with_normalize(dataset):
    info = dataset_info(dataset)
    for name in ("small", "mlp2x100"):
        model = build_model(name, info)
        first = model[0]
        assert isinstance(first, Normalize)
        assert sum(isinstance(layer, Normalize) for layer in model.modules()) == 1
        torch.testing.assert_close(first.mean.flatten(), torch.tensor(info.mean))
        torch.testing.assert_close(first.std.flatten(), torch.tensor(info.std))
        x = torch.rand(2, *info.input_shape, generator=torch.Generator().manual_seed(1))
        mean, std = torch.tensor(info.mean).view(-1, 1, 1), torch.tensor(info.std).view(-1, 1, 1)
        expected = (x - mean) / std
        torch.testing.assert_close(first(x), expected)
        assert not list(first.parameters())  # fixed, never trained


@pytest.mark.parametrize("dataset", ["mnist", "digits"])
def test_unnormalized_datasets_have_no_normalize(dataset):
    info = dataset_info(dataset)
    assert info.mean is None
    for name in ("small", "mlp2x100"):
        model = build_model(name, info)
        assert not any(isinstance(layer, Normalize) for layer in model.modules())
        assert not isinstance(model[0], Normalize)


def test_normalize_on_vectors_and_after_dtype_change():
    layer = Normalize([0.5, 1.0, -1.0], [2.0, 0.5, 4.0], input_ndim=1)
    x = torch.tensor([[1.5, 1.0, 3.0]])
    torch.testing.assert_close(layer(x), torch.tensor([[0.5, 0.0, 1.0]]))
    assert "std=[2.0, 0.5, 4.0]" in repr(layer)
    double = layer.double()
    assert double.std.dtype == torch.float64
    torch.testing.assert_close(double(x.double()), torch.tensor([[0.5, 0.0, 1.0]],
                                                                dtype=torch.float64))


def test_build_from_a_plain_dict_and_a_config_object():
    model = build({"model": "small", "dataset": "digits", "seed": 3})
    info = dataset_info("digits")
    assert isinstance(model, nn.Sequential)
    assert _forward(model, info.input_shape).shape == (2, info.num_classes)
    same = build_model("small", info)
    assert [p.shape for p in model.parameters()] == [p.shape for p in same.parameters()]
    from_object = build(SimpleNamespace(model="mlp2x100", dataset="cifar10"))
    assert isinstance(from_object[0], Normalize)
    assert _forward(from_object, (3, 32, 32)).shape == (2, 10)


def test_unknown_model_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="small"):
        build_model("resnet9000", dataset_info("mnist"))
