"""Interval bound propagation (IBP; Gowal et al., Eq. 5-9).

Each layer type registers an interval rule that maps a box (lower, upper) on its input to a box
on its output. Affine layers use the (mu, r) form of Eq. 6: mu' = W mu + b, r' = |W| r, two
matrix products; monotone activations map the ends (Eq. 7). New layer types register a rule with
`@interval_rule(MyLayer)`; the driver never changes.

For an l_2 input set the first affine layer gets the exact box of the ball's image (003, Appendix
E): neuron i lies in W_i x + b_i +- eps ||W_i||_2, with any fixed normalization in front folded
into W. That box is intersected with the interval image of the ball's clipped bounding box, which
is also sound and sometimes tighter near the pixel range's edges.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..models import Normalize
from .perturbation import PerturbationSet
from .spec import Specification, margin_specification

Box = tuple[torch.Tensor, torch.Tensor]
IntervalRule = Callable[[nn.Module, torch.Tensor, torch.Tensor], Box]
_RULES: dict[type, IntervalRule] = {}


def interval_rule(*layer_types: type) -> Callable[[IntervalRule], IntervalRule]:
    def register(rule: IntervalRule) -> IntervalRule:
        for layer_type in layer_types:
            _RULES[layer_type] = rule
        return rule
    return register


def rule_for(layer: nn.Module) -> IntervalRule:
    for layer_type in type(layer).__mro__:
        if layer_type in _RULES:
            return _RULES[layer_type]
    known = ", ".join(sorted(t.__name__ for t in _RULES))
    raise TypeError(f"no interval rule for layer {type(layer).__name__}; rules exist for: {known}")


def layers_of(model: nn.Module) -> list[nn.Module]:
    """The flat list of layers of a (possibly nested) nn.Sequential."""
    if isinstance(model, nn.Sequential):
        return [leaf for child in model for leaf in layers_of(child)]
    return [model]


def _affine_box(lower, upper, apply, apply_abs) -> Box:
    # Eq. 6 with the 1/2 of mu = (u + l) / 2 and r = (u - l) / 2 folded into the weights, which are
    # small, instead of two divisions of full-size activations (forward and backward).
    mu, r = apply(upper + lower), apply_abs(upper - lower)
    return mu - r, mu + r


@interval_rule(nn.Linear)
def _linear(layer: nn.Linear, lower, upper) -> Box:
    return _affine_box(lower, upper, lambda s: F.linear(s, layer.weight / 2, layer.bias),
                       lambda d: F.linear(d, layer.weight.abs() / 2))


@interval_rule(nn.Conv2d)
def _conv2d(layer: nn.Conv2d, lower, upper) -> Box:
    def conv(inputs, weight, bias=None):
        return F.conv2d(inputs, weight, bias, layer.stride, layer.padding, layer.dilation,
                        layer.groups)
    return _affine_box(lower, upper, lambda s: conv(s, layer.weight / 2, layer.bias),
                       lambda d: conv(d, layer.weight.abs() / 2))


@interval_rule(nn.ReLU, nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.ELU, nn.Hardtanh, Normalize,
               nn.Flatten, nn.Identity)
def _increasing(layer: nn.Module, lower, upper) -> Box:
    # Element-wise increasing maps (Normalize divides by a positive std) and reshapes map the
    # ends of the box to the ends of the image box.
    return layer(lower), layer(upper)


def _l2_first_affine(layers: list[nn.Module], x: torch.Tensor,
                     perturbation: PerturbationSet) -> tuple[int, Box]:
    """Box after the first affine layer for the l_2 ball of radius eps around x.

    Returns the index of the first layer still to propagate and the box. Layers before the first
    affine one may only be Normalize (an element-wise scale, folded into the weights) and
    Flatten."""
    scale = torch.ones_like(x[0])  # d(layer input)/d(pixel), element-wise, in the input's shape
    for index, layer in enumerate(layers):
        if isinstance(layer, Normalize):
            scale = scale / layer.std
        elif isinstance(layer, nn.Flatten):
            scale = scale.flatten()
        elif isinstance(layer, nn.Linear):
            rows = (layer.weight * scale.flatten()).norm(dim=1)
            break
        elif isinstance(layer, nn.Conv2d):
            # Per output channel the norm of the whole kernel over (in channels, kh, kw). At the
            # border zero padding removes some terms, so this only overestimates: still sound.
            channel_scale = scale.reshape(scale.shape[0], -1)[:, 0]  # per input channel
            kernel = layer.weight * channel_scale.view(1, -1, 1, 1)
            rows = kernel.flatten(1).norm(dim=1).view(-1, 1, 1)
            break
        else:
            raise TypeError(f"l2 interval bounds need a Linear or Conv2d layer first (after "
                            f"Normalize/Flatten), found {type(layer).__name__}")
    else:
        # No affine layer (e.g. the prefix left when the only one is elided into the spec): the
        # clipped bounding box of the ball, propagated by the box rules, is sound.
        return 0, perturbation.box(x)
    prefix = nn.Sequential(*layers[: index + 1])
    center = prefix(x)
    radius = perturbation.eps * rows
    ball_box = (center - radius, center + radius)
    # The ball also lies in its clipped bounding box: intersect with that box's interval image.
    lower, upper = PerturbationSet("linf", perturbation.eps, perturbation.low,
                                   perturbation.high).box(x)
    for layer in layers[: index + 1]:
        lower, upper = rule_for(layer)(layer, lower, upper)
    return index + 1, (torch.maximum(ball_box[0], lower), torch.minimum(ball_box[1], upper))


def interval_bounds(layers: Iterable[nn.Module], x: torch.Tensor,
                    perturbation: PerturbationSet) -> Box:
    """The interval box of the output of `layers` over the perturbation set around x."""
    layers = list(layers)
    if perturbation.norm == "l2" and perturbation.eps > 0:
        start, (lower, upper) = _l2_first_affine(layers, x, perturbation)
    else:
        start, (lower, upper) = 0, perturbation.box(x)
    for layer in layers[start:]:
        lower, upper = rule_for(layer)(layer, lower, upper)
    return lower, upper


def ibp_margin_bounds(model: nn.Module, x: torch.Tensor, perturbation: PerturbationSet,
                      spec: Specification | torch.Tensor, elide: bool = True) -> torch.Tensor:
    """Lower bounds (B, S) on the specification's margins C z over the perturbation set.

    `spec` is a Specification or a label tensor (then the margin specification y_true - j for all
    classes j; the entry j = y_true is 0). With `elide` the last linear layer is folded into C."""
    layers = layers_of(model)
    if isinstance(spec, torch.Tensor):
        spec = margin_specification(spec, layers[-1].out_features)
    if elide and isinstance(layers[-1], nn.Linear):
        lower, upper = interval_bounds(layers[:-1], x, perturbation)
        weight, bias = spec.elide(layers[-1])
    else:
        lower, upper = interval_bounds(layers, x, perturbation)
        weight, bias = spec.matrix, None
    mu, r = (upper + lower) / 2, (upper - lower) / 2
    weight = weight.to(mu.dtype)  # a label spec is float32; the model may be float64
    bound = torch.einsum("bsn,bn->bs", weight, mu) - torch.einsum("bsn,bn->bs", weight.abs(), r)
    bound = bound if bias is None else bound + bias
    if (elide and perturbation.norm == "l2" and perturbation.eps > 0
            and isinstance(layers[-1], nn.Linear)
            and all(isinstance(layer, (Normalize, nn.Flatten, nn.Identity))
                    for layer in layers[:-1])):
        # The elided spec (C W) is the first affine layer: the same exact l_2 rule as in
        # `_l2_first_affine`, c^T z(x) - eps ||scale * (C W)_s||_2, intersected with the box bound
        # and with the unelided bound (whose per-logit boxes mix ball and box sides).
        scale = torch.ones_like(x[0])
        for layer in layers[:-1]:
            if isinstance(layer, Normalize):
                scale = scale / layer.std
        center = nn.Sequential(*layers[:-1])(x).flatten(1)
        rows = (weight * scale.flatten()).norm(dim=2)
        ball = torch.einsum("bsn,bn->bs", weight, center) - perturbation.eps * rows + bias
        bound = torch.maximum(bound, ball)
        bound = torch.maximum(bound, ibp_margin_bounds(model, x, perturbation, spec, elide=False))
    return bound
