"""The adversarial polytope of a network with 2-D inputs and 2 logits against its IBP box (the IBP
paper's Section 4.3 and Figure 4).

The polytope is the image of one example's input box in logit space. It is found by sampling: a
dense grid over the (clipped) l_inf box, its edges and corners included, pushed through the
network. Its convex hull's area is what `logit_polytope` reports as the polytope's area; for a
network that is affine on the box (one ReLU regime) the grid's corners are the input box's
corners, so the hull is the exact image (a parallelogram of area |det W| (2 eps)^2). The IBP box
is the interval bound of the last layer (the paper's Eq. 5, the logits themselves, not the
elided margins), which holds every sampled point when the bound is sound.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.spatial import ConvexHull, QhullError
from torch import nn

from .bounds import PerturbationSet, interval_bounds, layers_of

POINTS_PER_SIDE = 201  # 40,401 samples: one forward pass of a small MLP, milliseconds
OUTLINE_POINTS_PER_EDGE = 50  # the traced image of the box's boundary, for the figure


def box_grid(lower: torch.Tensor, upper: torch.Tensor, points_per_side: int) -> torch.Tensor:
    """(points_per_side^2, 2) points evenly spaced over the box [lower, upper] (2-D), its edges
    and corners included."""
    axes = [torch.linspace(float(lo), float(hi), points_per_side, dtype=lower.dtype)
            for lo, hi in zip(lower, upper)]
    first, second = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([first.flatten(), second.flatten()], dim=1).to(lower.device)


def box_outline(lower: torch.Tensor, upper: torch.Tensor, points_per_edge: int) -> torch.Tensor:
    """The box's boundary traced counter-clockwise from its lower-left corner (closed: the last
    point is the first), points_per_edge points per edge."""
    corners = torch.stack([lower, torch.stack([upper[0], lower[1]]), upper,
                           torch.stack([lower[0], upper[1]]), lower])
    steps = torch.linspace(0.0, 1.0, points_per_edge + 1, dtype=lower.dtype,
                           device=lower.device)[:-1, None]
    edges = [a + steps * (b - a) for a, b in zip(corners[:-1], corners[1:])]
    return torch.cat(edges + [corners[:1]])


def convex_hull(points: np.ndarray) -> tuple[np.ndarray, float]:
    """The hull's vertices (counter-clockwise, (k, 2)) and its area. Points on a line or at one
    place (a dead network, eps = 0) have no 2-D hull: their extreme points and area 0."""
    points = np.asarray(points, dtype=np.float64)
    try:
        hull = ConvexHull(points)
    except QhullError:
        # Degenerate: the two extremes along the points' main direction (one point if equal).
        centered = points - points.mean(axis=0)
        direction = np.linalg.svd(centered, full_matrices=False)[2][0]
        along = centered @ direction
        ends = points[[int(along.argmin()), int(along.argmax())]]
        return np.unique(ends, axis=0), 0.0
    return points[hull.vertices], float(hull.volume)  # in 2-D, qhull's volume is the area


@dataclass
class LogitPolytope:
    """One example's sampled polytope and IBP box in the 2-D logit space."""
    point: np.ndarray  # (2,) the nominal logits
    hull: np.ndarray  # (k, 2) the sampled logits' convex hull, counter-clockwise
    hull_area: float
    box_lower: np.ndarray  # (2,) the IBP box
    box_upper: np.ndarray
    outline: np.ndarray  # (m, 2) the image of the input box's boundary, closed
    samples: torch.Tensor  # (n, 2) every sampled logit point (not stored in results: large)

    @property
    def box_area(self) -> float:
        return float(np.prod(self.box_upper - self.box_lower))


def is_planar(model: nn.Module, x: torch.Tensor) -> bool:
    """2-D inputs and 2 logits: where the polytope and its box can be drawn and their areas
    compared."""
    with torch.no_grad():
        return x[0].numel() == 2 and model(x[:1]).shape[1:].numel() == 2


@torch.no_grad()
def logit_polytope(model: nn.Module, x: torch.Tensor, perturbation: PerturbationSet,
                   points_per_side: int = POINTS_PER_SIDE) -> LogitPolytope:
    """The polytope and IBP box of one example x (shape (2,)) of a planar network, computed in
    the model's dtype on its device."""
    if perturbation.norm != "linf":
        raise ValueError("the sampled polytope covers an l_inf box; got norm "
                         f"{perturbation.norm!r}")
    parameter = next(model.parameters())
    x = x.to(parameter.device, parameter.dtype).reshape(1, 2)
    lower, upper = perturbation.box(x)  # clipped to the pixel range, as the bounds see it
    box_lower, box_upper = interval_bounds(layers_of(model), x, perturbation)
    samples = model(box_grid(lower[0], upper[0], points_per_side)).reshape(-1, 2)
    outline = model(box_outline(lower[0], upper[0], OUTLINE_POINTS_PER_EDGE)).reshape(-1, 2)
    hull, area = convex_hull(samples.double().cpu().numpy())
    return LogitPolytope(
        point=model(x).reshape(2).double().cpu().numpy(), hull=hull, hull_area=area,
        box_lower=box_lower.reshape(2).double().cpu().numpy(),
        box_upper=box_upper.reshape(2).double().cpu().numpy(),
        outline=outline.double().cpu().numpy(), samples=samples)
