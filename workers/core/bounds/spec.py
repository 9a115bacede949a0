"""The specification: a matrix C per example whose rows are the linear functions of the logits
that must stay positive. For robustness, row j is e_{y_true} - e_j (the margin of the true class
over class j); the row j = y_true is zero and its margin is 0 by definition."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Specification:
    matrix: torch.Tensor  # (B, S, K): S margins over K logits
    labels: torch.Tensor | None = None  # set for margin specifications: rows are y_true - j

    def elide(self, last: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
        """Fold the last linear layer into the specification (IBP paper, Eq. 9):
        C (W z + b) = (C W) z + C b, so no relaxation is spent on that layer. Returns (C W, C b)."""
        matrix = self.matrix.to(last.weight.dtype)
        weight = torch.einsum("bsk,kn->bsn", matrix, last.weight)
        bias = matrix @ last.bias if last.bias is not None else matrix.new_zeros(matrix.shape[:2])
        return weight, bias

    def certified(self, lower: torch.Tensor) -> torch.Tensor:
        """Per example: every margin but the trivial one is proven positive."""
        if self.labels is None:
            return (lower > 0).all(dim=1)
        trivial = nn.functional.one_hot(self.labels, lower.shape[1]).bool()
        return (lower > 0).logical_or(trivial).all(dim=1)


def margin_specification(labels: torch.Tensor, num_classes: int) -> Specification:
    """C[b, j] = e_{y_b} - e_j for every class j (row y_b is zero): margins z_y - z_j."""
    eye = torch.eye(num_classes, device=labels.device)
    matrix = eye[labels].unsqueeze(1) - eye.unsqueeze(0)  # (B, K, K)
    return Specification(matrix, labels)
