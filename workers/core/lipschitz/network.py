"""A plain `nn.Sequential` read as the Lipschitz bounds need it: a chain of stages, each an affine
layer (Linear or Conv2d, its bias ignored for norms) followed by a 1-Lipschitz activation, with
the last stage's affine layer (the logit layer) on its own.

Layers allowed between stages are reshapes (Flatten, Identity) and, before the first affine layer,
the model's `Normalize`: its element-wise scale 1/std is folded into the first affine operator, so
norms and row norms are exact for W diag(1/std) instead of multiplying by max(1/std).

`Affine` gives the operator on one example's real input shape (padding, stride and the image size
all count) and its transpose, batched, which is what power iteration runs on.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..activations import ACTIVATION_RULES
from ..bounds.interval import layers_of
from ..models import Normalize

_RESHAPES = (nn.Flatten, nn.Identity)


@dataclass(eq=False)
class Affine:
    layer: nn.Linear | nn.Conv2d
    in_shape: tuple[int, ...]  # one example's input shape
    out_shape: tuple[int, ...]
    scale: torch.Tensor | None = None  # element-wise input scale (in_shape), folded Normalize
    weight_override: torch.Tensor | None = None  # e.g. a float64 copy for certification

    @property
    def weight(self) -> torch.Tensor:
        return self.layer.weight if self.weight_override is None else self.weight_override

    def promoted(self, dtype: torch.dtype = torch.float64) -> "Affine":
        """A detached copy in `dtype` (accurate power iteration at certification)."""
        return Affine(self.layer, self.in_shape, self.out_shape,
                      None if self.scale is None else self.scale.to(dtype),
                      self.layer.weight.detach().to(dtype))

    @property
    def in_numel(self) -> int:
        return int(torch.Size(self.in_shape).numel())

    @property
    def out_numel(self) -> int:
        return int(torch.Size(self.out_shape).numel())

    def _conv(self, inputs: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        c = self.layer
        return F.conv2d(inputs, weight, None, c.stride, c.padding, c.dilation, c.groups)

    def apply(self, u: torch.Tensor) -> torch.Tensor:
        """The linear part on a batch (B, *in_shape) -> (B, *out_shape)."""
        if self.scale is not None:
            u = u * self.scale
        if isinstance(self.layer, nn.Linear):
            return F.linear(u, self.weight)
        return self._conv(u, self.weight)

    def apply_t(self, v: torch.Tensor) -> torch.Tensor:
        """The transpose on a batch (B, *out_shape) -> (B, *in_shape)."""
        if isinstance(self.layer, nn.Linear):
            u = v @ self.weight
        else:
            c = self.layer
            # output_padding recovers input sizes that the stride rounded away
            extra = tuple(
                size - ((out - 1) * s - 2 * p + d * (k - 1) + 1)
                for size, out, s, p, d, k in zip(self.in_shape[1:], self.out_shape[1:], c.stride,
                                                 c.padding, c.dilation, c.kernel_size))
            u = F.conv_transpose2d(v, self.weight, None, c.stride, c.padding, extra, c.groups,
                                   c.dilation)
        if self.scale is not None:
            u = u * self.scale
        return u

    def row_norms(self, in_mask: torch.Tensor | None = None) -> torch.Tensor:
        """||row_i of W diag(scale) diag(in_mask)||_2 for every output neuron i, (B or 1,
        *out_shape): exact, border effects of padding included (one pass of W^2 over the
        squared scale)."""
        weight = self.weight
        squared = torch.ones((1, *self.in_shape), device=weight.device, dtype=weight.dtype)
        if self.scale is not None:
            squared = squared * self.scale ** 2
        if in_mask is not None:
            squared = squared * in_mask.to(weight.dtype)
        if isinstance(self.layer, nn.Linear):
            out = F.linear(squared, weight ** 2)
        else:
            out = self._conv(squared, weight ** 2)
        return out.clamp_min(0).sqrt()

    def dense(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The operator as a dense (out_numel, in_numel) matrix (only for small layers)."""
        weight = self.layer.weight.detach().to(dtype)
        basis = torch.eye(self.in_numel, device=weight.device, dtype=dtype).view(-1, *self.in_shape)
        if self.scale is not None:
            basis = basis * self.scale.to(dtype)
        with torch.no_grad():
            if isinstance(self.layer, nn.Linear):
                columns = F.linear(basis, weight)
            else:
                columns = self._conv(basis, weight)
        return columns.reshape(self.in_numel, self.out_numel).T


@dataclass(eq=False)
class Stage:
    before: list[nn.Module]  # Normalize / reshapes applied to the stage's input
    affine: Affine
    activation: nn.Module | None  # None for the logit layer


@dataclass(eq=False)
class Network:
    stages: list[Stage]
    input_shape: tuple[int, ...]
    hidden: list[Stage] = field(init=False)

    def __post_init__(self):
        self.hidden = self.stages[:-1]

    @property
    def last(self) -> nn.Linear:
        return self.stages[-1].affine.layer


def _parse(model: nn.Module, input_shape: tuple[int, ...], device, dtype) -> Network:
    layers = layers_of(model)
    stages: list[Stage] = []
    before: list[nn.Module] = []
    scale: torch.Tensor | None = None
    x = torch.zeros((1, *input_shape), device=device, dtype=dtype)
    pending: Affine | None = None
    for layer in layers:
        if isinstance(layer, Normalize):
            if stages or pending is not None:
                raise ValueError("Lipschitz bounds: Normalize is only allowed before the first "
                                 "affine layer")
            scale = (1 / layer.std).to(dtype).expand(x.shape[1:]).clone() if scale is None \
                else scale / layer.std
            before.append(layer)
        elif isinstance(layer, _RESHAPES):
            if pending is not None:
                raise ValueError(f"Lipschitz bounds: {type(layer).__name__} directly after an "
                                 "affine layer (an activation must follow it)")
            if scale is not None:
                scale = layer(scale.unsqueeze(0)).squeeze(0)
            before.append(layer)
        elif isinstance(layer, (nn.Linear, nn.Conv2d)):
            if pending is not None:
                raise ValueError("Lipschitz bounds: two affine layers in a row; each needs an "
                                 "activation after it")
            for b in before:
                x = b(x)
            out = layer(x)
            pending = Affine(layer, tuple(x.shape[1:]), tuple(out.shape[1:]), scale)
            scale = None
            x = out
        elif type(layer) in ACTIVATION_RULES:
            if pending is None:
                raise ValueError(f"Lipschitz bounds: activation {type(layer).__name__} without "
                                 "an affine layer before it")
            stages.append(Stage(before, pending, layer))
            x = layer(x)
            before, pending = [], None
        else:
            known = ", ".join(["Linear", "Conv2d", "Normalize", "Flatten", "Identity"]
                              + [t.__name__ for t in ACTIVATION_RULES])
            raise TypeError(f"Lipschitz bounds cannot handle layer {type(layer).__name__}; "
                            f"known: {known}")
    if pending is None or not isinstance(pending.layer, nn.Linear) or before:
        raise ValueError("Lipschitz bounds need a network that ends with a Linear logit layer")
    if not stages:
        raise ValueError("Lipschitz bounds need at least one hidden layer before the logit layer")
    stages.append(Stage([], pending, None))
    return Network(stages, tuple(input_shape))


_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def network_of(model: nn.Module, x: torch.Tensor) -> Network:
    """The stages of `model` for inputs shaped like x[0] (cached per model, shape and dtype;
    the stages hold the layers themselves, so weight updates are seen)."""
    key = (tuple(x.shape[1:]), x.device, x.dtype)
    per_model = _CACHE.setdefault(model, {})
    if key not in per_model:
        with torch.no_grad():
            per_model[key] = _parse(model, key[0], x.device, x.dtype)
    return per_model[key]


def input_radius(perturbation, x: torch.Tensor) -> float:
    """The l_2 radius of a ball holding the perturbation set: eps for l_2, sqrt(N) eps for l_inf
    (BCP Section 3.1, the circumscribing ball)."""
    if perturbation.norm == "l2":
        return float(perturbation.eps)
    return float(perturbation.eps) * x[0].numel() ** 0.5
