"""Box constraint propagation (BCP; Lee et al., 2020, Section 3) and the worst-translated logit.

`propagate` pushes a ball and a box through the hidden layers together (Eq. 6-8): at each affine
layer the box circumscribing the image of the ball (center W z + b, radius ||W_i,:|| rho) is
intersected with the interval image of the previous box, and the ball's radius grows by the
layer's norm. The caller supplies the layer norms: global ones (BCP), or per-example norms of the
reduced operators (Local-Lip), for which the box of each layer also yields the varying-neuron
masks (Local-Lip Eq. 3 / 9) that the next norm needs. (Eq. 8 as printed takes the max of the
upper ends and the min of the lower ends; the text and Figure 1 say intersection, which is what
is sound and tight, so that is what is computed here.)

At the penultimate layer, problem (11), min c^T p over the ball intersected with the box, is solved
for every example and every class pair at once by Algorithm 1's iteration: start from the ball's
minimizer z - rho c / ||c||, project the coordinates that leave the box onto it, rescale the
others (Eq. 12) back onto the sphere, until none leaves. Its optimum has the form
p = clamp(z - t c, box) and t only grows, so a coordinate once projected stays projected: at most
dim(c) rounds (Proposition 2). The rounds run without gradients; the answer is then recomputed in
one differentiable step from the final projected set.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..activations import ACTIVATION_RULES
from ..bounds.interval import rule_for
from ..bounds.perturbation import PerturbationSet
from .network import Affine, network_of, input_radius

# norm_of(stage index, affine, in_mask, out_mask) -> scalar or (B,) tensor
NormFn = Callable[[int, Affine, "torch.Tensor | None", "torch.Tensor | None"], torch.Tensor]


@dataclass
class Outer:
    """Outer bounds at the penultimate layer (the logit layer's input), per example."""
    logits: torch.Tensor  # (B, K)
    z: torch.Tensor  # (B, n) the clean activation
    lower: torch.Tensor  # (B, n) the box
    upper: torch.Tensor
    rho: torch.Tensor  # (B,) the ball's radius around z
    last: nn.Linear
    last_affine: Affine
    last_mask: torch.Tensor | None  # varying neurons of the last activation (masked mode)
    boxes: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    norms: list[torch.Tensor] = field(default_factory=list)  # one per hidden layer


def _view(rho: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return rho.view(-1, *([1] * (like.dim() - 1)))


def propagate(model: nn.Module, x: torch.Tensor, perturbation: PerturbationSet, norm_of: NormFn,
              masks: bool = False) -> Outer:
    """Ball and box outer bounds up to the penultimate layer (see the module docstring). With
    `masks`, the varying-neuron masks are computed from the boxes and handed to `norm_of`, and
    the ball's row norms drop the columns of constant inputs."""
    net = network_of(model, x)
    z = x
    lower, upper = perturbation.box(x)  # the circumscribed box, clipped to the pixel range
    rho = x.new_full((x.shape[0],), input_radius(perturbation, x))
    in_mask = None
    boxes, norms = [], []
    for i, stage in enumerate(net.hidden):
        for layer in stage.before:
            z = layer(z)
            lower, upper = rule_for(layer)(layer, lower, upper)
            if in_mask is not None:
                in_mask = layer(in_mask)
        affine, activation = stage.affine, stage.activation
        center = affine.layer(z)
        radius = affine.row_norms(in_mask) * _view(rho, center)  # Eq. 6
        ia_lower, ia_upper = rule_for(affine.layer)(affine.layer, lower, upper)  # Eq. 7
        box_lower = torch.maximum(center - radius, ia_lower)  # Eq. 8 (intersection)
        box_upper = torch.minimum(center + radius, ia_upper)
        rule = ACTIVATION_RULES[type(activation)]
        out_mask = rule.needed(activation, box_lower, box_upper) if masks else None
        norm = norm_of(i, affine, in_mask, out_mask)
        norms.append(norm)
        rho = rho * norm
        boxes.append((activation, box_lower, box_upper))
        z = activation(center)
        lower, upper = rule_for(activation)(activation, box_lower, box_upper)
        # the post-activation ball bounds each coordinate too
        lower = torch.maximum(lower, z - _view(rho, z))
        upper = torch.minimum(upper, z + _view(rho, z))
        in_mask = rule.varying(activation, box_lower, box_upper) if masks else None
    last = net.stages[-1]
    for layer in last.before:
        z = layer(z)
        lower, upper = rule_for(layer)(layer, lower, upper)
        if in_mask is not None:
            in_mask = layer(in_mask)
    # rounding can leave the clean point a hair outside its box: widen (sound) rather than solve
    # problem (11) around a center the box excludes
    lower, upper = torch.minimum(lower, z), torch.maximum(upper, z)
    return Outer(last.affine.layer(z), z.flatten(1), lower.flatten(1), upper.flatten(1), rho,
                 last.affine.layer, last.affine, None if in_mask is None else in_mask.flatten(1),
                 boxes, norms)


def solve_ball_box(z: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, rho: torch.Tensor,
                   c: torch.Tensor, return_rounds: bool = False):
    """argmin_p c^T p s.t. ||p - z|| <= rho, lower <= p <= upper (problem (11)), for z, lower,
    upper (B, n), rho (B,), c (B, S, n): p (B, S, n). z must lie in the box. With
    `return_rounds`, also the number of projection rounds Algorithm 1 took (max over the batch)."""
    z3, lo3, hi3 = z.unsqueeze(1), lower.unsqueeze(1), upper.unsqueeze(1)
    r = rho.view(-1, 1)
    target = torch.where(c > 0, lo3, hi3)  # the box end that c^T p pushes a coordinate to
    with torch.no_grad():
        c0, z0, lo0, hi0, target0, r0 = (t.detach() for t in (c, z3, lo3, hi3, target, r))
        projected = torch.zeros(c.shape, dtype=torch.bool, device=c.device)
        t = r0 / c0.norm(dim=-1).clamp_min(1e-30)  # the ball's minimizer z - rho c / ||c||
        rounds = 0
        for _ in range(c.shape[-1] + 1):
            p = torch.where(projected, target0, z0 - t.unsqueeze(-1) * c0)
            # a coordinate leaves through the end it moves toward (t only grows)
            leaving = ~projected & (((c0 > 0) & (p <= lo0)) | ((c0 < 0) & (p >= hi0)))
            if not bool(leaving.any()):
                break
            rounds += 1
            projected |= leaving  # first phase: project the violating coordinates
            t = _scale(projected, target0, z0, r0, c0)  # second phase: Eq. 12
    # one differentiable step from the final projected set
    t = _scale(projected, target, z3, r, c)
    p = torch.where(projected, target, z3 - t.unsqueeze(-1) * c)
    return (p, rounds) if return_rounds else p


def _scale(projected, target, z, r, c) -> torch.Tensor:
    """Eq. 12 as a step length: the free coordinates move to z - t c with t chosen so that p
    lies on the sphere (0 where no free coordinate has c != 0)."""
    fixed = torch.where(projected, target - z, torch.zeros_like(c)).pow(2).sum(-1)
    free = torch.where(projected, torch.zeros_like(c), c).pow(2).sum(-1)
    budget = (r.pow(2) - fixed).clamp_min(1e-30)
    return torch.where(free > 0, (budget / free.clamp_min(1e-30)).sqrt(), torch.zeros_like(free))


def pair_vectors(last: nn.Linear, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """c = W_y - W_m and b_y - b_m for every class m (row y is zero): (B, K, n), (B, K)."""
    weight, bias = last.weight, last.bias
    c = weight[labels].unsqueeze(1) - weight.unsqueeze(0)
    b = (bias[labels].unsqueeze(1) - bias.unsqueeze(0)) if bias is not None \
        else c.new_zeros(c.shape[:2])
    return c, b


def margin_lower(outer: Outer, labels: torch.Tensor, use_box: bool = True) -> torch.Tensor:
    """Lower bounds (B, K) on z_y - z_m over the outer bound: the ball intersected with the box
    (BCP) or the ball alone (the global-Lipschitz / GloRo bound). Entry y is 0."""
    c, b = pair_vectors(outer.last, labels)
    if use_box:
        p = solve_ball_box(outer.z, outer.lower, outer.upper, outer.rho, c)
        return (c * p).sum(-1) + b
    return (c * outer.z.unsqueeze(1)).sum(-1) + b - outer.rho.unsqueeze(1) * c.norm(dim=-1)


def worst_logits(outer: Outer, labels: torch.Tensor, use_box: bool = True) -> torch.Tensor:
    """The worst-translated logit z + t (Definition 1): z_y - lower margin for m != y, z_y at y.
    For the cross-entropy it equals -lower up to a shift."""
    true = outer.logits.gather(1, labels[:, None])
    return true - margin_lower(outer, labels, use_box)


def tightness(outer: Outer, use_box: bool = True, chunk: int = 64) -> torch.Tensor:
    """tau(x) of BCP Section 4: the mean translation t_i(x; j) over all ordered class pairs
    i != j, per example (B,). Without the box it is the constant of the global bound."""
    weight = outer.last.weight
    k = weight.shape[0]
    first, second = torch.meshgrid(torch.arange(k), torch.arange(k), indexing="ij")
    keep = first != second
    c_all = weight[first[keep]] - weight[second[keep]]  # (K(K-1), n): c = W_j - W_i
    out = []
    for start in range(0, outer.z.shape[0], chunk):
        sl = slice(start, start + chunk)
        z = outer.z[sl]
        c = c_all.unsqueeze(0).expand(z.shape[0], *c_all.shape)
        if use_box:
            p = solve_ball_box(z, outer.lower[sl], outer.upper[sl], outer.rho[sl], c)
            t = (c * (z.unsqueeze(1) - p)).sum(-1)
        else:
            t = outer.rho[sl].unsqueeze(1) * c.norm(dim=-1)
        out.append(t.mean(dim=1))
    return torch.cat(out)
