"""Linear-relaxation bounds: Fast-Lin (Weng et al., 2018), CROWN (Zhang et al., 2018) and
CROWN-IBP (Zhang et al., 2019), in the closed form of 003 (Section 4, Algorithm 1, Appendix F).

Every ReLU with pre-activation bounds [l, u] is enclosed between two lines,

    alpha * x  <=  relu(x)  <=  u / (u - l) * (x - l)        (unstable: l < 0 < u)

(identity when l >= 0, zero when u <= 0). Fast-Lin takes the lower slope alpha = u / (u - l), the
upper line's slope; CROWN takes the adaptive alpha = 1 if u > -l else 0 (003, Appendix F).

A lower bound on a linear function Lambda z of the last layer's output is computed backwards
(003 Eq. 19): Lambda is pulled back through each affine layer (Linear: Lambda W; Conv2d:
conv_transpose2d; Flatten: reshape; Normalize: divided by std, with the mean moved into the
constant), and through each ReLU with the lower line where Lambda's entry is positive and the
upper line where it is negative. At the input Lambda_0 x + c is minimized over the set in closed
form (003 Eq. 16/17): for l_inf over the box clipped to the pixel range, Lambda_0 mid -
|Lambda_0| rad; for l_2, Lambda_0 x + c - eps ||Lambda_0||_2 (and, both being sound, the better of
that and the clipped box of the ball).

Lambda has shape (B, S, *layer shape), so a margin specification (S = K) costs K backward passes'
worth of memory per example; conv layers are only ever applied through conv_transpose2d, never as
dense Jacobians.

Intermediate pre-activation bounds (one box per ReLU) come either from IBP (`intermediate="ibp"`:
CROWN-IBP) or from the same linear method, layer by layer, with the identity specification at each
pre-activation (`intermediate="same"`: exact Fast-Lin / CROWN; its cost grows with the number of
neurons, fine for small nets). A list of boxes (e.g. from `preactivation_bounds`) may also be
passed, e.g. Wong et al.'s random-projection estimates of the Fast-Lin boxes (`projection.py`),
which training may use; they give no guarantee, so no certifier does.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..models import Normalize
from .interval import interval_bounds, layers_of, rule_for
from .perturbation import PerturbationSet
from .spec import Specification, margin_specification

Box = tuple[torch.Tensor, torch.Tensor]
METHODS = ("crown", "fastlin")
INTERMEDIATE = ("same", "ibp")
Intermediate = Union[str, Sequence[Box]]

_SUPPORTED = (nn.Linear, nn.Conv2d, nn.ReLU, nn.Flatten, nn.Identity, Normalize)


def _check(layers: list[nn.Module], method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown linear bound method {method!r}; allowed: {', '.join(METHODS)}")
    for layer in layers:
        if not isinstance(layer, _SUPPORTED):
            names = ", ".join(t.__name__ for t in _SUPPORTED)
            raise TypeError(f"linear bounds do not support layer {type(layer).__name__}; "
                            f"supported: {names}")


def _as_model_dtype(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x in the model's floating dtype (a float32 batch may meet a float64 model)."""
    for parameter in model.parameters():
        if parameter.is_floating_point():
            return x.to(parameter.dtype)
    return x


def _input_shapes(layers: list[nn.Module], x: torch.Tensor) -> list[torch.Size]:
    """The per-example input shape of every layer (and, last, the output shape)."""
    shapes = []
    with torch.no_grad():
        h = x[:1].detach()
        for layer in layers:
            shapes.append(h.shape[1:])
            h = layer(h)
    shapes.append(h.shape[1:])
    return shapes


def _relu_relaxation(lower: torch.Tensor, upper: torch.Tensor, method: str
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lower slope, upper slope, upper intercept) of the ReLU relaxation, element-wise."""
    active = lower >= 0
    unstable = (lower < 0) & (upper > 0)
    # Denominators are only used where the neuron is unstable; elsewhere 1 (no NaN gradients).
    width = torch.where(unstable, upper - lower, torch.ones_like(upper))
    chord = upper / width
    upper_slope = torch.where(unstable, chord, active.to(upper.dtype))
    upper_intercept = torch.where(unstable, -lower * chord, torch.zeros_like(upper))
    if method == "fastlin":
        lower_slope = upper_slope
    else:  # crown: adaptive slope, 1 where the positive part dominates
        adaptive = (upper > -lower).to(upper.dtype)
        lower_slope = torch.where(unstable, adaptive, active.to(upper.dtype))
    return lower_slope, upper_slope, upper_intercept


def _sum_rest(t: torch.Tensor) -> torch.Tensor:
    """Sum over all dims after the first two: (B, S, ...) -> (B, S)."""
    return t.flatten(2).sum(dim=2)


def _backward(layers: list[nn.Module], shapes: list[torch.Size], boxes: dict[int, Box],
              lam: torch.Tensor, bias: torch.Tensor, method: str,
              record: dict[int, torch.Tensor] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pull Lambda z_L + bias back to Lambda_0 x + bias' through `layers` (whose output z_L
    Lambda applies to). `boxes[i]` holds the input bounds of the ReLU layers[i]. With `record`,
    the Lambda that reaches each ReLU's output is stored under its index: its sign says which
    line of the relaxation the optimum sits on (003's regularizer r needs it)."""
    batch, specs = lam.shape[:2]
    for index in range(len(layers) - 1, -1, -1):
        layer = layers[index]
        in_shape = shapes[index]
        if isinstance(layer, nn.Linear):
            if layer.bias is not None:
                bias = bias + lam @ layer.bias
            lam = lam @ layer.weight
        elif isinstance(layer, nn.Conv2d):
            if layer.bias is not None:
                bias = bias + torch.einsum("bschw,c->bs", lam, layer.bias)
            if isinstance(layer.padding, str) or layer.padding_mode != "zeros":
                raise TypeError("linear bounds need Conv2d with numeric zero padding")
            flat = lam.reshape(batch * specs, *lam.shape[2:])
            # output_padding recovers the input size that strided convs round down.
            padding = [
                in_shape[1 + d] - ((lam.shape[3 + d] - 1) * layer.stride[d] - 2 * layer.padding[d]
                                   + layer.dilation[d] * (layer.kernel_size[d] - 1) + 1)
                for d in range(2)]
            flat = F.conv_transpose2d(flat, layer.weight, None, layer.stride, layer.padding,
                                      tuple(padding), layer.groups, layer.dilation)
            lam = flat.reshape(batch, specs, *in_shape)
        elif isinstance(layer, nn.Flatten):
            lam = lam.reshape(batch, specs, *in_shape)
        elif isinstance(layer, Normalize):
            # z = (x - mean) / std: Lambda z = (Lambda / std) x - Lambda . (mean / std)
            std, mean = layer.std.to(lam.dtype), layer.mean.to(lam.dtype)
            lam = lam / std
            bias = bias - _sum_rest(lam * mean)
        elif isinstance(layer, nn.ReLU):
            if record is not None:
                record[index] = lam
            lower, upper = boxes[index]
            lower_slope, upper_slope, upper_intercept = _relu_relaxation(lower, upper, method)
            positive, negative = lam.clamp(min=0), lam.clamp(max=0)
            bias = bias + _sum_rest(negative * upper_intercept.unsqueeze(1))
            lam = positive * lower_slope.unsqueeze(1) + negative * upper_slope.unsqueeze(1)
        elif isinstance(layer, nn.Identity):
            pass
        else:  # pragma: no cover - _check rejects these first
            raise TypeError(f"linear bounds do not support layer {type(layer).__name__}")
    return lam, bias


def _minimize_over_input(lam: torch.Tensor, bias: torch.Tensor, x: torch.Tensor,
                         perturbation: PerturbationSet) -> torch.Tensor:
    """min over the perturbation set of Lambda_0 x' + bias, (B, S)."""
    lam = lam.reshape(lam.shape[0], lam.shape[1], -1)
    low, high = perturbation.box(x)
    low, high = low.flatten(1).to(lam.dtype), high.flatten(1).to(lam.dtype)
    mid, rad = (high + low) / 2, (high - low) / 2
    box = (torch.einsum("bsn,bn->bs", lam, mid) - torch.einsum("bsn,bn->bs", lam.abs(), rad)
           + bias)
    if perturbation.norm == "linf" or perturbation.eps == 0:
        return box
    # l_2: the ball's own closed form (dual norm), and its clipped bounding box: both hold the
    # set, so the larger of the two minima is still a lower bound.
    center = x.flatten(1).to(lam.dtype)
    ball = torch.einsum("bsn,bn->bs", lam, center) - perturbation.eps * lam.norm(dim=2) + bias
    return torch.maximum(ball, box)


def _input_minimizer(lam: torch.Tensor, bias: torch.Tensor, x: torch.Tensor,
                     perturbation: PerturbationSet) -> torch.Tensor:
    """A point x' of the set (B, S, *input shape) where Lambda_0 x' + bias attains the minimum
    `_minimize_over_input` returns (003 Eq. 16: for l_inf the box corner opposite to the sign of
    Lambda_0; for l_2 the minimizer of whichever of the ball and its clipped box gave the larger,
    i.e. the returned, minimum; that point may lie outside the other set). Detached: 003 treats
    delta_0 as given."""
    lam = lam.detach()
    batch, specs = lam.shape[:2]
    flat = lam.reshape(batch, specs, -1)
    low, high = perturbation.box(x)
    low, high = low.flatten(1).to(lam.dtype), high.flatten(1).to(lam.dtype)
    corner = torch.where(flat >= 0, low.unsqueeze(1), high.unsqueeze(1))
    if perturbation.norm == "l2" and perturbation.eps > 0:
        center = x.flatten(1).to(lam.dtype).unsqueeze(1)
        norms = flat.norm(dim=2, keepdim=True).clamp_min(1e-12)
        ball = center - perturbation.eps * flat / norms
        value = lambda point: (flat * point).sum(dim=2, keepdim=True)  # noqa: E731
        corner = torch.where(value(ball) >= value(corner), ball, corner)
    return corner.reshape(batch, specs, *x.shape[1:])


def _ibp_boxes(layers: list[nn.Module], x: torch.Tensor, perturbation: PerturbationSet
               ) -> dict[int, Box]:
    """IBP boxes at the input of every ReLU, from one interval pass."""
    relus = [i for i, layer in enumerate(layers) if isinstance(layer, nn.ReLU)]
    boxes: dict[int, Box] = {}
    if not relus:
        return boxes
    # interval_bounds handles the l_2 first affine layer exactly; continue from its box.
    lower, upper = interval_bounds(layers[:relus[0]], x, perturbation)
    boxes[relus[0]] = (lower, upper)
    for index in range(relus[0], relus[-1]):
        layer = layers[index]
        lower, upper = rule_for(layer)(layer, lower, upper)
        if index + 1 in relus:
            boxes[index + 1] = (lower, upper)
    return boxes


def _identity_bounds(layers: list[nn.Module], shapes: list[torch.Size], boxes: dict[int, Box],
                     end: int, x: torch.Tensor, perturbation: PerturbationSet, method: str) -> Box:
    """Bounds on the output of layers[:end] from the identity specification (both signs)."""
    shape = shapes[end]
    size = shape.numel()
    eye = torch.eye(size, dtype=x.dtype, device=x.device)
    spec = torch.cat([eye, -eye]).reshape(1, 2 * size, *shape).expand(x.shape[0], -1,
                                                                         *shape)
    bias = x.new_zeros(x.shape[0], 2 * size)
    lam, bias = _backward(layers[:end], shapes, boxes, spec, bias, method)
    bound = _minimize_over_input(lam, bias, x, perturbation)
    lower, neg_upper = bound[:, :size], bound[:, size:]
    return lower.reshape(-1, *shape), (-neg_upper).reshape(-1, *shape)


def _boxes(layers: list[nn.Module], shapes: list[torch.Size], x: torch.Tensor,
           perturbation: PerturbationSet, method: str, intermediate: Intermediate
           ) -> dict[int, Box]:
    relus = [i for i, layer in enumerate(layers) if isinstance(layer, nn.ReLU)]
    if not isinstance(intermediate, str):
        given = list(intermediate)
        if len(given) < len(relus):
            raise ValueError(f"{len(given)} intermediate boxes given for {len(relus)} ReLUs")
        return dict(zip(relus, given))
    if intermediate == "ibp":
        return _ibp_boxes(layers, x, perturbation)
    if intermediate != "same":
        raise ValueError(f"unknown intermediate bounds {intermediate!r}; allowed: "
                         f"{', '.join(INTERMEDIATE)} or a list of (lower, upper) boxes")
    boxes: dict[int, Box] = {}
    for index in relus:
        boxes[index] = _identity_bounds(layers, shapes, boxes, index, x, perturbation, method)
    return boxes


def preactivation_bounds(model: nn.Module, x: torch.Tensor, perturbation: PerturbationSet, *,
                         method: str = "crown", intermediate: Intermediate = "same"
                         ) -> list[Box]:
    """(lower, upper) of the input of every ReLU of `model`, in order, each (B, *shape)."""
    layers = layers_of(model)
    _check(layers, method)
    x = _as_model_dtype(model, x)
    shapes = _input_shapes(layers, x)
    boxes = _boxes(layers, shapes, x, perturbation, method, intermediate)
    return [boxes[i] for i in sorted(boxes)]


@dataclass
class LinearSolution:
    """A linear bound with what 003's regularizers read from its optimum (when asked for)."""
    lower: torch.Tensor  # (B, S) lower bounds on the margins
    spec: Specification
    boxes: dict[int, Box]  # the intermediate bounds used: ReLU index -> (lower, upper)
    input_point: torch.Tensor | None = None  # (B, S, *input shape): a minimizer over the set
    relu_coefficients: dict[int, torch.Tensor] = field(default_factory=dict)  # (B, S, *shape)


def linear_margin_solution(model: nn.Module, x: torch.Tensor, perturbation: PerturbationSet,
                           spec_or_labels: Specification | torch.Tensor, *, method: str = "crown",
                           intermediate: Intermediate = "same", elide: bool = True,
                           with_optimum: bool = True) -> LinearSolution:
    """The bound of `linear_margin_bounds`; `with_optimum` adds the point of the input set where
    the relaxed problem attains it and the Lambda reaching each ReLU (whose sign says which line
    of the relaxation the optimum sits on)."""
    layers = layers_of(model)
    _check(layers, method)
    spec = spec_or_labels
    if isinstance(spec, torch.Tensor):
        spec = margin_specification(spec, layers[-1].out_features)
    x = _as_model_dtype(model, x)
    shapes = _input_shapes(layers, x)
    boxes = _boxes(layers, shapes, x, perturbation, method, intermediate)
    if elide and isinstance(layers[-1], nn.Linear):
        lam, bias = spec.elide(layers[-1])
        layers = layers[:-1]
    else:
        lam = spec.matrix.to(x.dtype)
        bias = lam.new_zeros(lam.shape[:2])
    lam = lam.to(x.dtype).reshape(lam.shape[0], lam.shape[1], *shapes[len(layers)])
    record: dict[int, torch.Tensor] | None = {} if with_optimum else None
    lam, bias = _backward(layers, shapes, boxes, lam, bias.to(x.dtype), method, record)
    lower = _minimize_over_input(lam, bias, x, perturbation)
    if not with_optimum:
        return LinearSolution(lower, spec, boxes)
    point = _input_minimizer(lam, bias, x, perturbation)
    return LinearSolution(lower, spec, boxes, point, record)


def linear_margin_bounds(model: nn.Module, x: torch.Tensor, perturbation: PerturbationSet,
                         spec_or_labels: Specification | torch.Tensor, *, method: str = "crown",
                         intermediate: Intermediate = "same", elide: bool = True
                         ) -> torch.Tensor:
    """Lower bounds (B, S) on the specification's margins C z over the perturbation set.

    `spec_or_labels` is a Specification or a label tensor (then the margin specification
    z_y - z_j for all classes j). `method`: "crown" (adaptive lower slopes) or "fastlin";
    `intermediate`: "same" (the method itself, layer by layer), "ibp", or a list of ReLU input
    boxes. With `elide` a last Linear layer is folded into C (C W, C b)."""
    return linear_margin_solution(model, x, perturbation, spec_or_labels, method=method,
                                  intermediate=intermediate, elide=elide,
                                  with_optimum=False).lower


def crown_ibp_margin_bounds(model: nn.Module, x: torch.Tensor, perturbation: PerturbationSet,
                            spec_or_labels: Specification | torch.Tensor, elide: bool = True
                            ) -> torch.Tensor:
    """CROWN-IBP (Zhang et al., 2019): IBP boxes for every ReLU, CROWN for the last layer."""
    return linear_margin_bounds(model, x, perturbation, spec_or_labels, method="crown",
                                intermediate="ibp", elide=elide)
