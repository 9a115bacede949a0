"""Fast-Lin intermediate bounds computed forwards, exactly or estimated with random projections
(Wong et al., 2018, as 003 Section 4.4 and Table 1 use them for training the larger nets).

Fast-Lin relaxes every unstable ReLU (l < 0 < u) as z = D x + delta with D = u / (u - l) and
0 <= delta <= s = -l D (003 Eq. 12-13), so each pre-activation is an affine function of the input
perturbation and of the deltas of all earlier ReLUs. Its bounds (003 Eq. 17, Algorithm 1) are

    g(x) -+ ||W_{i:1} diag(rad)||_1  +  sum over earlier ReLUs of (M s -+ ||M diag(s)||_1) / 2

where g is the "centre" network (affine layers, ReLUs replaced by D), M the linear map from an
earlier ReLU's output to this pre-activation, and the last term is sum_j s_j min(M_j, 0) (resp.
max) rewritten with min(m, 0) = (m - |m|) / 2. The row norms need one column per input pixel and
per earlier neuron propagated through the net ("exact", what the backward pass of `linear.py`
computes too), or, estimated, k columns of Cauchy noise: for c with i.i.d. standard Cauchy
entries, a.c is Cauchy with scale ||a||_1, so median_k |a.c_k| estimates ||a||_1 (for the l_2 input
term, Gaussian noise and median / 0.6745 estimate ||a||_2). Estimates can fall below the true
norm, so projected boxes are not bounds: training may use them, certifiers never do.

The first ReLU's box is always exact (the interval image of the input set through the first
affine layer, which is what Fast-Lin gives there).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..models import Normalize
from .interval import interval_bounds, layers_of
from .perturbation import PerturbationSet

Box = tuple[torch.Tensor, torch.Tensor]
_GAUSSIAN_MEDIAN = 0.6744897501960817  # median of |N(0, 1)|


def _apply_linear_part(layer: nn.Module, columns: torch.Tensor) -> torch.Tensor:
    """The layer's linear part (no bias, no mean shift) on columns (B, M, *in shape)."""
    batch, count = columns.shape[:2]
    if isinstance(layer, nn.Linear):
        return F.linear(columns, layer.weight)
    if isinstance(layer, nn.Conv2d):
        if layer.padding_mode != "zeros":
            raise TypeError("projected bounds need Conv2d with zero padding")
        flat = F.conv2d(columns.flatten(0, 1), layer.weight, None, layer.stride, layer.padding,
                        layer.dilation, layer.groups)
        return flat.reshape(batch, count, *flat.shape[1:])
    if isinstance(layer, nn.Flatten):
        return columns.reshape(batch, count, -1)
    if isinstance(layer, Normalize):
        return columns / layer.std.to(columns.dtype)
    if isinstance(layer, nn.Identity):
        return columns
    raise TypeError(f"projected Fast-Lin bounds do not support layer {type(layer).__name__}; "
                    "supported: Linear, Conv2d, Flatten, Normalize, Identity, ReLU")


class _Group:
    """Columns started at one place (the input or one ReLU's output) and how to read a row norm
    off them: `exact` columns are a diagonal (sum of |.| or the 2-norm), projected ones noise."""

    def __init__(self, columns: torch.Tensor, exact: bool, norm: str, offset: torch.Tensor | None):
        self.columns, self.exact, self.norm = columns, exact, norm
        self.offset = offset  # M s for a ReLU group (one column propagated with the others)

    def row_norm(self) -> torch.Tensor:
        if self.exact:
            if self.norm == "l1":
                return self.columns.abs().sum(dim=1)
            return self.columns.norm(dim=1)
        median = self.columns.abs().median(dim=1).values
        return median if self.norm == "l1" else median / _GAUSSIAN_MEDIAN


def fastlin_forward_boxes(model: nn.Module, x: torch.Tensor, perturbation: PerturbationSet,
                          projections: int | None = None,
                          generator: torch.Generator | None = None) -> list[Box]:
    """(lower, upper) at the input of every ReLU of `model`, in order. `projections=None`: exact
    Fast-Lin (sound); an int k: Wong et al.'s estimate from k random columns per group
    (not sound; k = 50 in Wong et al. and 003)."""
    if projections is not None and projections < 1:
        raise ValueError(f"projections must be a positive number of columns or None (exact), "
                         f"got {projections}")
    layers = layers_of(model)
    relus = [i for i, layer in enumerate(layers) if isinstance(layer, nn.ReLU)]
    if not relus:
        return []
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), x.dtype)
    x = x.to(dtype)
    exact = projections is None

    def noise(count: int, width: int, kind: str) -> torch.Tensor:
        shape = (count, width)
        if kind == "l1":  # standard Cauchy: tan(pi (U - 1/2))
            sample = torch.tan(torch.pi * (torch.rand(shape, generator=generator) - 0.5))
        else:
            sample = torch.randn(shape, generator=generator)
        return sample.to(device=x.device, dtype=dtype)

    def start_group(scale: torch.Tensor, norm: str, offset: torch.Tensor | None) -> _Group:
        """Columns diag(scale) (exact) or scale * noise, scale (B, *shape)."""
        batch, shape = scale.shape[0], scale.shape[1:]
        flat = scale.flatten(1)
        if exact:
            columns = torch.diag_embed(flat)  # (B, n, n): column j is scale_j e_j
        else:
            columns = flat.unsqueeze(1) * noise(projections, flat.shape[1], norm).unsqueeze(0)
        return _Group(columns.reshape(batch, -1, *shape), exact, norm, offset)

    low, high = perturbation.box(x)
    if perturbation.norm == "linf":
        center = (low + high) / 2
        groups = [start_group((high - low) / 2, "l1", None)]
        input_scale = 1.0
    else:  # l_2 ball: eps ||W_j||_2 around the clean input
        center = x
        groups = [start_group(torch.ones_like(x), "l2", None)]
        input_scale = perturbation.eps

    boxes: list[Box] = [interval_bounds(layers[:relus[0]], x, perturbation)]
    for index, layer in enumerate(layers[:relus[-1]]):
        if isinstance(layer, nn.ReLU):
            lower, upper = boxes[-1]
            unstable = (lower < 0) & (upper > 0)
            width = torch.where(unstable, upper - lower, torch.ones_like(upper))
            slope = torch.where(unstable, upper / width, (lower >= 0).to(dtype))
            intercept = torch.where(unstable, -lower * slope, torch.zeros_like(upper))
            center = center * slope
            for group in groups:
                group.columns = group.columns * slope.unsqueeze(1)
                if group.offset is not None:
                    group.offset = group.offset * slope
            groups.append(start_group(intercept, "l1", intercept))
            continue
        center = layer(center)
        for group in groups:
            group.columns = _apply_linear_part(layer, group.columns)
            if group.offset is not None:
                group.offset = _apply_linear_part(layer, group.offset.unsqueeze(1)).squeeze(1)
        if index + 1 in relus[1:]:  # the first ReLU's box is the exact one above
            spread = input_scale * groups[0].row_norm()
            lower, upper = center - spread, center + spread
            for group in groups[1:]:
                norm = group.row_norm()
                lower = lower + (group.offset - norm) / 2
                upper = upper + (group.offset + norm) / 2
            boxes.append((lower, upper))
    return boxes
