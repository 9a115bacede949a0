"""Model registry: every model is a plain `nn.Sequential` of standard layers (plus `Normalize`, this
project's fixed per-channel affine first layer), shaped for the data set's input and classes.

Architectures:
- `small`, `medium`, `large`: the IBP paper's Table 1 (Gowal et al.). Table 1's hidden-unit and
  parameter counts (8.3K/471K, 47K/1.2M, 230K/17M on CIFAR-10) fix the padding: `small` and
  `medium` use no padding, `large` uses "same" padding.
- `mlp2x100`: the 2x100 fully connected net; `mlp3x100`: the 2-100-100-100-2 net of the IBP
  paper's toy experiment (Section 4.3).
- `4C3F`, `6C2F`, `8C2F`: the conv nets of the BCP and Local-Lip papers (Local-Lip appendix C.1,
  C(channels, kernel, stride, padding) then F(units)).
- `wong_small`, `wong_large`, `xlarge`: the nets of 003 (see the comment at their registration).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from .data import DatasetInfo, dataset_info
from .registry import Registry


class Normalize(nn.Module):
    """(x - mean) / std per channel: the fixed affine that makes normalization part of the model,
    so data and eps stay in [0,1] pixel scale everywhere outside it."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], input_ndim: int):
        super().__init__()
        shape = (len(mean),) + (1,) * (input_ndim - 1)  # (C,1,1) for images, (D,) for vectors
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(shape))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


# A builder gets the data set's input shape and class count and returns the layers after the
# normalization; it raises ValueError when the input shape does not suit it.
Builder = Callable[[tuple[int, ...], int], list[nn.Module]]
MODELS: Registry[Builder] = Registry("model")


def _conv_stack(input_shape: tuple[int, ...], convs: Sequence[tuple[int, int, int, int]],
                fcs: Sequence[int], num_classes: int, name: str) -> list[nn.Module]:
    """Conv2d(c, k, stride s, padding p) + ReLU for each conv, then Flatten and FC + ReLU layers,
    then the logit layer."""
    if len(input_shape) != 3:
        raise ValueError(f"model {name!r} needs image input (C, H, W), got shape {input_shape}")
    layers: list[nn.Module] = []
    channels = input_shape[0]
    for out_channels, kernel, stride, padding in convs:
        layers += [nn.Conv2d(channels, out_channels, kernel, stride, padding), nn.ReLU()]
        channels = out_channels
    layers.append(nn.Flatten())
    # The flattened width follows from the input size: run the convs on a meta tensor (no memory).
    try:
        with torch.device("meta"):
            width = nn.Sequential(*layers)(torch.empty(1, *input_shape)).shape[1]
    except RuntimeError as error:  # e.g. a kernel larger than what is left of the image
        raise ValueError(f"model {name!r} cannot take input of shape {input_shape}: {error}") from None
    return layers + _fc_stack(width, fcs, num_classes)


def _fc_stack(width: int, hidden: Sequence[int], num_classes: int) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for units in hidden:
        layers += [nn.Linear(width, units), nn.ReLU()]
        width = units
    return layers + [nn.Linear(width, num_classes)]


def _conv_model(name: str, convs: Sequence[tuple[int, int, int, int]], fcs: Sequence[int]) -> None:
    MODELS.add(name, lambda shape, classes: _conv_stack(shape, convs, fcs, classes, name))


def _mlp_model(name: str, hidden: Sequence[int]) -> None:
    def build(shape: tuple[int, ...], classes: int) -> list[nn.Module]:
        width = 1
        for size in shape:
            width *= size
        return [nn.Flatten()] + _fc_stack(width, hidden, classes)

    MODELS.add(name, build)


# IBP paper, Table 1 (conv: channels, kernel, stride, padding).
_conv_model("small", [(16, 4, 2, 0), (32, 4, 1, 0)], [100])
_conv_model("medium", [(32, 3, 1, 0), (32, 4, 2, 0), (64, 3, 1, 0), (64, 4, 2, 0)], [512, 512])
_conv_model("large", [(64, 3, 1, 1), (64, 3, 1, 1), (128, 3, 2, 1), (128, 3, 1, 1),
                      (128, 3, 1, 1)], [512])
_mlp_model("mlp2x100", [100, 100])
_mlp_model("mlp3x100", [100, 100, 100])
# BCP / Local-Lip (Local-Lip appendix C.1).
_conv_model("4C3F", [(32, 3, 1, 1), (32, 4, 2, 1), (64, 3, 1, 1), (64, 4, 2, 1)], [512, 512])
_conv_model("6C2F", [(32, 3, 1, 1), (32, 3, 1, 1), (32, 4, 2, 1), (64, 3, 1, 1), (64, 3, 1, 1),
                     (64, 4, 2, 1)], [512])
_conv_model("8C2F", [(64, 3, 1, 1), (64, 3, 1, 1), (64, 4, 2, 0), (128, 3, 1, 1), (128, 3, 1, 1),
                     (128, 4, 2, 0), (256, 3, 1, 1), (256, 4, 2, 0)], [256])

# 003 (Appendix C) uses Wong et al.'s nets; 003 gives channels and widths only, the kernels,
# strides and paddings are Wong et al.'s (2018): `wong_small` is conv 16, 32 (4x4, stride 2,
# padding 1) + FC 100; `wong_large` is the same net as `4C3F`. `xlarge` is the 5-layer conv net
# of CROWN-IBP's latest version, which is the IBP paper's `large` (CROWN-IBP's "DM-large").
# 003's families of 10 small and 8 large CROWN-IBP models (Tables 2 and 4) are not defined in
# 003's text ("the same as Zhang et al."), so they are not registered.
_conv_model("wong_small", [(16, 4, 2, 1), (32, 4, 2, 1)], [100])
_conv_model("wong_large", [(32, 3, 1, 1), (32, 4, 2, 1), (64, 3, 1, 1), (64, 4, 2, 1)], [512, 512])
_conv_model("xlarge", [(64, 3, 1, 1), (64, 3, 1, 1), (128, 3, 2, 1), (128, 3, 1, 1),
                       (128, 3, 1, 1)], [512])


def build_model(name: str, info: DatasetInfo) -> nn.Sequential:
    """The registered architecture `name` for data set `info`, with its normalization first."""
    layers = MODELS.get(name)(tuple(info.input_shape), info.num_classes)
    if info.mean is not None:
        layers.insert(0, Normalize(info.mean, info.std, len(info.input_shape)))
    return nn.Sequential(*layers)


def build(config: Mapping[str, Any] | Any) -> nn.Sequential:
    """Rebuild the model a run config describes (a dict, e.g. a checkpoint's `config`, or a
    RunConfig): `config["model"]` on `config["dataset"]`. Weights are freshly initialized."""
    get = config.get if isinstance(config, Mapping) else lambda key: getattr(config, key)
    return build_model(get("model"), dataset_info(get("dataset")))


@functools.lru_cache(maxsize=256)
def check_model_fits(name: str, info: DatasetInfo) -> None:
    """Raise ValueError if architecture `name` cannot take data set `info` (checked without
    allocating weights; cached, since every config validation asks)."""
    with torch.device("meta"):
        build_model(name, info)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- Lipschitz methods (issue 5) ------------------------------------------------------------
# Local-Lip appendix C.1 puts ReLU_theta after every layer but the last; its MaxMin nets use the
# clipped MaxMin instead. These variants take a registered net and swap each ReLU for the
# activation, sized to the feature shape it sees. (Local-Lip's Tiny ImageNet `7C1F` and BCP's
# `WRN` are not defined in the papers' texts, so they are not registered.)
def _swap_relus(base: str, make: Callable[[tuple[int, ...]], nn.Module]) -> Builder:
    def build(shape: tuple[int, ...], classes: int) -> list[nn.Module]:
        layers = MODELS.get(base)(shape, classes)
        x = torch.zeros(1, *shape)  # follows torch.device("meta") when only shapes are checked
        for i, layer in enumerate(layers):
            if isinstance(layer, nn.ReLU):
                layers[i] = layer = make(tuple(x.shape[1:]))
            with torch.no_grad():
                x = layer(x)
        return layers
    return build


def _relu_theta(shape: tuple[int, ...]) -> nn.Module:
    from .activations import ReLUTheta  # lazily: activations imports bounds, which import us
    return ReLUTheta(shape)


def _maxmin(shape: tuple[int, ...]) -> nn.Module:
    from .activations import MaxMin
    return MaxMin(shape)


for _base in ("4C3F", "6C2F", "8C2F", "mlp2x100"):
    MODELS.add(f"{_base}-theta", _swap_relus(_base, _relu_theta))
for _base in ("6C2F", "8C2F", "mlp2x100"):
    MODELS.add(f"{_base}-maxmin", _swap_relus(_base, _maxmin))
