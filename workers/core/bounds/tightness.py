"""003's tightness regularizers of a linear relaxation (Section 4, Eq. 2 and 3, Algorithm 1).

Both read the relaxed problem's optimum: the input point x' = x + delta_0 where the bound is
attained, and, for every unstable neuron, the line of the relaxation its optimum sits on. The
ReLU network itself is then run at x' (the feasible solution of the original problem O):

- d = p_O(x') - p_C (Eq. 2): the margin the real network has at x' minus the relaxed minimum;
  >= 0, and 0 where the relaxation is tight at its own optimum.
- r (Eq. 3): how far each unstable pre-activation x'_ij of the real network is from the values
  where the relaxed optimum would be feasible for O (Proposition 1): 0 when the optimum uses the
  lower line (intercept 0; the ReLU there is exact only at x'_ij = 0), the nearer of l_ij, u_ij
  when it uses the upper chord (exact only at the chord's ends); summed over unstable neurons
  and divided by their number. r = 0 implies d = 0 (Proposition 1).

Per example and specification row; the trivial row (the true class against itself) is 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .interval import layers_of
from .linear import LinearSolution


@dataclass
class Tightness:
    d: torch.Tensor  # (B, S)
    r: torch.Tensor  # (B, S)
    unstable: torch.Tensor  # (B,) number of unstable neurons per example


def tightness_regularizers(model: nn.Module, solution: LinearSolution) -> Tightness:
    """d and r of `solution` (from `linear_margin_solution(..., with_optimum=True)`)."""
    if solution.input_point is None:
        raise ValueError("tightness needs the relaxed optimum: compute the solution with "
                         "with_optimum=True")
    layers = layers_of(model)
    point = solution.input_point
    batch, specs = point.shape[:2]
    h = point.reshape(batch * specs, *point.shape[2:])
    preactivations: dict[int, torch.Tensor] = {}
    for index, layer in enumerate(layers):
        if isinstance(layer, nn.ReLU):
            preactivations[index] = h.reshape(batch, specs, *h.shape[1:])
        h = layer(h)
    logits = h.reshape(batch, specs, -1)
    matrix = solution.spec.matrix.to(logits.dtype)
    margin_at_point = (matrix * logits).sum(dim=2)  # c_t^T h_L(x + delta_0)
    d = margin_at_point - solution.lower

    distance = logits.new_zeros(batch, specs)
    count = logits.new_zeros(batch)
    for index, (lower, upper) in solution.boxes.items():
        unstable = ((lower < 0) & (upper > 0)).unsqueeze(1)
        pre = preactivations[index]
        # Upper chord where the pulled-back coefficient is negative (the intercept is used).
        on_chord = solution.relu_coefficients[index] < 0
        to_ends = torch.minimum((pre - lower.unsqueeze(1)).abs(), (pre - upper.unsqueeze(1)).abs())
        gap = torch.where(on_chord, to_ends, pre.abs())
        distance = distance + (gap * unstable).flatten(2).sum(dim=2)
        count = count + unstable.flatten(1).sum(dim=1)
    r = distance / count.clamp(min=1).unsqueeze(1)
    nontrivial = matrix.abs().sum(dim=2) > 0
    return Tightness(d * nontrivial, r * nontrivial, count)
