"""This project's own activation modules (Local-Lip, Section 3.3), with their interval rules.

- `ReLUTheta`: ReLU clipped at a learnable upper threshold theta per neuron (Eq. 8):
  min(max(z, 0), theta). A neuron whose input box lies below 0 or above theta has a constant
  output, so its row and column drop out of the local Lipschitz bound (Eq. 9).
- `MaxMin`: the clipped MaxMin of Anil et al.: the channels (dim 1) split into two halves x1, x2;
  the output is [min(max(x1, x2), a), max(min(x1, x2), b)] with learnable thresholds a (upper,
  for the max half) and b (lower, for the min half), one per output neuron of each half.

Both are 1-Lipschitz in l_2 (an element-wise clip, and a sort of each pair followed by clips), so
the global Lipschitz bound treats them like ReLU. Each module also answers, from a box on its
input, which of its outputs can still vary (`varying`) and which of its inputs matter
(`needed_inputs`): the indicator matrices I_V of Eq. 3 and 9, used by `workers.core.lipschitz`.
Their parameters are sized to one example's feature shape, which the model builders compute.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from .bounds.interval import interval_rule


class ReLUTheta(nn.Module):
    """ReLU_theta of Local-Lip Eq. 8: 0 below 0, z between, theta above theta (per neuron)."""

    def __init__(self, shape: Sequence[int], init: float = 1.0):
        super().__init__()
        if init <= 0:
            raise ValueError(f"ReLUTheta: the initial threshold must be > 0, got {init}")
        self.theta = nn.Parameter(torch.full(tuple(shape), float(init)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.minimum(torch.relu(z), self.theta)

    def varying(self, lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
        """Eq. 9: the output varies unless the input box lies below 0 or above theta."""
        return (upper > 0) & (lower < self.theta)

    needed_inputs = varying  # element-wise: an input matters exactly when its output varies

    def sparsity(self, lower: torch.Tensor, upper: torch.Tensor,
                 lambda_theta: float) -> torch.Tensor:
        """Eq. 12 / 26 per neuron: max(0, UB) + lambda_theta * max(0, theta - LB)."""
        return torch.relu(upper) + lambda_theta * torch.relu(self.theta - lower)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.theta.shape)}"


class MaxMin(nn.Module):
    """Clipped MaxMin (Local-Lip Section 3.3) over the two halves of dim 1."""

    def __init__(self, shape: Sequence[int], upper: float = 1.0, lower: float = -1.0):
        super().__init__()
        shape = tuple(shape)
        if not shape or shape[0] % 2:
            raise ValueError(f"MaxMin needs an even number of channels (dim 1), got shape {shape}")
        if not lower < upper:
            raise ValueError(f"MaxMin: the lower threshold b={lower} must be below a={upper}")
        half = (shape[0] // 2,) + shape[1:]
        self.a = nn.Parameter(torch.full(half, float(upper)))  # upper threshold of the max half
        self.b = nn.Parameter(torch.full(half, float(lower)))  # lower threshold of the min half

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x1, x2 = z.chunk(2, dim=1)
        return torch.cat([torch.minimum(torch.maximum(x1, x2), self.a),
                          torch.maximum(torch.minimum(x1, x2), self.b)], dim=1)

    def output_box(self, lower: torch.Tensor, upper: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Boxes of the max half and the min half before clipping: max and min are increasing
        in both arguments, so the ends map to the ends."""
        l1, l2 = lower.chunk(2, dim=1)
        u1, u2 = upper.chunk(2, dim=1)
        return torch.maximum(l1, l2), torch.maximum(u1, u2), torch.minimum(l1, l2), \
            torch.minimum(u1, u2)

    def varying(self, lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
        """A max output is constant (= a) once its lower bound reaches a; a min output is
        constant (= b) once its upper bound is at most b."""
        max_low, _, _, min_up = self.output_box(lower, upper)
        return torch.cat([max_low < self.a, min_up > self.b], dim=1)

    def needed_inputs(self, lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
        """Both inputs of a pair feed both of its outputs: the pair matters unless both outputs
        are constant."""
        max_varies, min_varies = self.varying(lower, upper).chunk(2, dim=1)
        pair = max_varies | min_varies
        return torch.cat([pair, pair], dim=1)

    def sparsity(self, lower: torch.Tensor, upper: torch.Tensor,
                 lambda_theta: float) -> torch.Tensor:
        """Eq. 12 for MaxMin: max(0, UB_min - b) + lambda_theta * max(0, a - LB_max) (Eq. 26's
        down-weighting applied to the upper threshold, as for ReLU_theta)."""
        max_low, _, _, min_up = self.output_box(lower, upper)
        return torch.cat([lambda_theta * torch.relu(self.a - max_low),
                          torch.relu(min_up - self.b)], dim=1)

    def extra_repr(self) -> str:
        return f"half_shape={tuple(self.a.shape)}"


@interval_rule(ReLUTheta)
def _relu_theta_box(layer: ReLUTheta, lower, upper):
    return layer(lower), layer(upper)  # increasing in its input


@interval_rule(MaxMin)
def _maxmin_box(layer: MaxMin, lower, upper):
    max_low, max_up, min_low, min_up = layer.output_box(lower, upper)
    return (torch.cat([torch.minimum(max_low, layer.a), torch.maximum(min_low, layer.b)], dim=1),
            torch.cat([torch.minimum(max_up, layer.a), torch.maximum(min_up, layer.b)], dim=1))


@dataclass(frozen=True)
class ActivationRule:
    """What the local Lipschitz bound needs of an activation, from the box on its input."""
    varying: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]  # I_V, outputs
    needed: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]  # inputs that matter
    sparsity: Callable[[nn.Module, torch.Tensor, torch.Tensor, float], torch.Tensor]


def _relu_varying(layer: nn.Module, lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    return upper > 0  # Eq. 3


# Every activation here is 1-Lipschitz in l_2, so the global bound treats them alike.
ACTIVATION_RULES: dict[type, ActivationRule] = {
    nn.ReLU: ActivationRule(_relu_varying, _relu_varying,
                            lambda layer, lower, upper, lambda_theta: torch.relu(upper)),
    ReLUTheta: ActivationRule(ReLUTheta.varying, ReLUTheta.needed_inputs, ReLUTheta.sparsity),
    MaxMin: ActivationRule(MaxMin.varying, MaxMin.needed_inputs, MaxMin.sparsity),
}


def activation_rule(layer: nn.Module) -> ActivationRule:
    try:
        return ACTIVATION_RULES[type(layer)]
    except KeyError:
        known = ", ".join(t.__name__ for t in ACTIVATION_RULES)
        raise TypeError(f"{type(layer).__name__} is not an activation the Lipschitz bounds "
                        f"know; known: {known}") from None
