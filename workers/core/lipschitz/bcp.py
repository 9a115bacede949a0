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
from ..bounds.spec import Specification, margin_specification
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
    last_norm: torch.Tensor | None = None  # the logit layer's (reduced) norm, where computed


def _view(rho: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return rho.view(-1, *([1] * (like.dim() - 1)))


class _Intersect(torch.autograd.Function):
    """[c - r, c + r] intersected with [l, u] (Eq. 8), keeping only which side won for the
    backward pass (two bool masks instead of four float tensors: BCP's propagation is bound by
    memory traffic more than by arithmetic)."""

    @staticmethod
    def forward(ctx, center, radius, lower, upper):
        ball_lower, ball_upper = center - radius, center + radius
        take_ball_lower, take_ball_upper = ball_lower >= lower, ball_upper <= upper
        ctx.save_for_backward(take_ball_lower, take_ball_upper)
        ctx.shapes = (center.shape, radius.shape)
        return (torch.where(take_ball_lower, ball_lower, lower),
                torch.where(take_ball_upper, ball_upper, upper))

    @staticmethod
    def backward(ctx, grad_lower, grad_upper):
        take_ball_lower, take_ball_upper = ctx.saved_tensors
        center_shape, radius_shape = ctx.shapes
        ball_lower = torch.where(take_ball_lower, grad_lower, 0)
        ball_upper = torch.where(take_ball_upper, grad_upper, 0)
        grad_center = ball_lower + ball_upper
        grad_radius = _sum_to(ball_upper - ball_lower, radius_shape)
        return (_sum_to(grad_center, center_shape), grad_radius, grad_lower - ball_lower,
                grad_upper - ball_upper)


def _sum_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Undo broadcasting: sum grad down to `shape`."""
    if grad.shape == shape:
        return grad
    dims = [i for i, (g, s) in enumerate(zip(grad.shape, shape)) if s == 1 and g != 1]
    return grad.sum(dim=dims, keepdim=True)


def _intersect(center, radius, lower, upper):
    return _Intersect.apply(center, radius, lower, upper)


def propagate(model: nn.Module, x: torch.Tensor, perturbation: PerturbationSet, norm_of: NormFn,
              masks: bool = False) -> Outer:
    """Ball and box outer bounds up to the penultimate layer (see the module docstring). With
    `masks`, the varying-neuron masks are computed from the boxes and handed to `norm_of`, and
    the ball's row norms drop the columns of constant inputs."""
    net = network_of(model, x)
    z = x
    lower, upper = perturbation.box(x)  # the circumscribed box, clipped to the pixel range
    # one radius for the batch until a per-example norm makes it (B,): the global case then never
    # materializes a full-size radius tensor
    rho = x.new_tensor(input_radius(perturbation, x))
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
        box_lower, box_upper = _intersect(center, radius, ia_lower, ia_upper)  # Eq. 8
        rule = ACTIVATION_RULES[type(activation)]
        out_mask = rule.needed(activation, box_lower, box_upper) if masks else None
        norm = norm_of(i, affine, in_mask, out_mask)
        norms.append(norm)
        rho = rho * norm
        boxes.append((activation, box_lower, box_upper))
        z = activation(center)
        # (the post-activation ball's own box, z +- rho, is never tighter: each row norm is at
        # most the layer's norm, so it is not intersected again)
        lower, upper = rule_for(activation)(activation, box_lower, box_upper)
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
    return Outer(last.affine.layer(z), z.flatten(1), lower.flatten(1), upper.flatten(1),
                 rho.expand(x.shape[0]),
                 last.affine.layer, last.affine, None if in_mask is None else in_mask.flatten(1),
                 boxes, norms)


def _projected_set(z, target, rho, c, max_rounds: int) -> tuple[torch.Tensor, int]:
    """Algorithm 1's rounds, without gradients: the coordinates that end up on the box. A
    coordinate with c_l != 0 reaches its box end at step length t_l = (z_l - target_l) / c_l; at
    step length t the projected set is {t_l <= t}, and Eq. 12 gives the next t from it. t only
    grows, so the set only grows; the rounds end when it stops changing."""
    with torch.no_grad():
        reach = torch.where(c != 0, (z - target) / c, torch.full_like(c, float("inf")))
        fixed_sq, c_sq = (target - z).pow(2), c.pow(2)
        r_sq = rho.pow(2)
        t = rho / c_sq.sum(-1).sqrt().clamp_min(1e-30)  # the ball's minimizer z - rho c / ||c||
        projected = reach <= t.unsqueeze(-1)
        rounds = 0
        while rounds < max_rounds and bool(projected.any()):
            rounds += 1
            fixed = (fixed_sq * projected).sum(-1)
            free = (c_sq * ~projected).sum(-1)
            t = torch.where(free > 0, ((r_sq - fixed).clamp_min(0) / free.clamp_min(1e-30)).sqrt(),
                            torch.zeros_like(free))
            grown = projected | (reach <= t.unsqueeze(-1))
            if torch.equal(grown, projected):
                break
            projected = grown
    return projected, rounds


def _step_length(projected, target, z, rho, c) -> torch.Tensor:
    """Eq. 12 as a step length: the free coordinates sit at z - t c with t putting p on the
    sphere (0 where no free coordinate has c != 0). Differentiable."""
    fixed = torch.where(projected, target - z, torch.zeros_like(c)).pow(2).sum(-1)
    free = torch.where(projected, torch.zeros_like(c), c).pow(2).sum(-1)
    budget = (rho.pow(2) - fixed).clamp_min(1e-30)
    return torch.where(free > 0, (budget / free.clamp_min(1e-30)).sqrt(), torch.zeros_like(free))


def solve_ball_box(z: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, rho: torch.Tensor,
                   c: torch.Tensor, return_rounds: bool = False):
    """argmin_p c^T p s.t. ||p - z|| <= rho, lower <= p <= upper (problem (11)), for z, lower,
    upper (B, n), rho (B,), c (B, S, n): p (B, S, n). z must lie in the box. With
    `return_rounds`, also the number of projection rounds Algorithm 1 took (max over the batch)."""
    z3, r = z.unsqueeze(1), rho.view(-1, 1)
    target = torch.where(c > 0, lower.unsqueeze(1), upper.unsqueeze(1))  # where c^T p pushes
    projected, rounds = _projected_set(z3, target, r, c, c.shape[-1])
    t = _step_length(projected, target, z3, r, c)
    p = torch.where(projected, target, z3 - t.unsqueeze(-1) * c)
    return (p, rounds) if return_rounds else p


def ball_box_minimum(z: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor,
                     rho: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """min c^T p of problem (11), (B, S), without forming p: sum over the projected coordinates
    of c target plus, over the free ones, c (z - t c) (the training path: fewer passes over the
    (B, S, n) tensors than `solve_ball_box`)."""
    z3, r = z.unsqueeze(1), rho.view(-1, 1)
    target = torch.where(c > 0, lower.unsqueeze(1), upper.unsqueeze(1))
    projected, _ = _projected_set(z3, target, r, c, c.shape[-1])
    t = _step_length(projected, target, z3, r, c)
    free_sq = torch.where(projected, torch.zeros_like(c), c).pow(2).sum(-1)
    return (c * torch.where(projected, target, z3)).sum(-1) - t * free_sq


def pair_vectors(last: nn.Linear, spec: Specification | torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The specification folded into the logit layer: c = C W and C b, (B, S, n) and (B, S). A
    label tensor stands for the margin specification, whose row m is c = W_y - W_m (row y
    zero)."""
    if isinstance(spec, torch.Tensor):
        spec = margin_specification(spec, last.out_features)
    return spec.elide(last)


def margin_lower(outer: Outer, spec: Specification | torch.Tensor,
                 use_box: bool = True) -> torch.Tensor:
    """Lower bounds (B, S) on the specification's margins C z over the outer bound: the ball
    intersected with the box (BCP) or the ball alone (the global-Lipschitz / GloRo bound). With
    labels, the margins z_y - z_m (entry y is 0)."""
    c, b = pair_vectors(outer.last, spec)
    if use_box:
        return ball_box_minimum(outer.z, outer.lower, outer.upper, outer.rho, c) + b
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
