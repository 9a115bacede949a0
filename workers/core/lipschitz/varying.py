"""Which activation outputs vary over a perturbation set (Local-Lip Section 3: Eq. 3 for ReLU,
Eq. 9 for ReLU_theta, the clipped MaxMin's rule), read from the boxes an `Outer` holds, and their
share per layer (Local-Lip Figures 3 and 6). An output that is not varying is constant over the
whole set, so its row and column leave the local Lipschitz bound."""
from __future__ import annotations

from typing import Iterator, Sequence

import torch

from ..activations import ACTIVATION_RULES
from .bcp import Outer


def varying_masks(outer: Outer) -> Iterator[torch.Tensor]:
    """Per hidden layer, the (B, *shape) bool mask of outputs that may vary over the set."""
    for activation, lower, upper in outer.boxes:
        yield ACTIVATION_RULES[type(activation)].varying(activation, lower, upper)


def layer_shares(outer: Outer) -> list[torch.Tensor]:
    """Per hidden layer, the share of varying outputs over the batch's examples and the layer's
    neurons (0-dim tensors, no device sync)."""
    return [mask.float().mean() for mask in varying_masks(outer)]


def share_stats(shares: Sequence[torch.Tensor | float]) -> dict:
    """{"layer1": the first hidden layer's share, ..., "mean": their mean}; the mean weighs every
    layer alike (as the paper's per-layer bars do), not every neuron. Empty without layers."""
    if not shares:
        return {}
    stats = {f"layer{i}": share for i, share in enumerate(shares, start=1)}
    stats["mean"] = sum(shares) / len(shares)
    return stats
