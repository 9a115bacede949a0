"""Certifiers from linear-relaxation bounds (workers.core.bounds.linear), registered in CERTIFIERS:

- `fastlin`: Fast-Lin (Weng et al., 2018), intermediate bounds from Fast-Lin itself;
- `crown`: CROWN (Zhang et al., 2018), intermediate bounds from CROWN itself (the tightest here);
- `crown_ibp`: CROWN on the last layer over IBP intermediate bounds (Zhang et al., 2019).

Each is pure (no max with another method's bound), so their verified accuracies can be compared.
Importing this module registers them once (Python caches the module).
"""
from __future__ import annotations

import torch
from torch import nn

from .bounds import PerturbationSet, margin_specification
from .bounds.linear import linear_margin_bounds
from .certify import CERTIFIERS


def _certify(model: nn.Module, x: torch.Tensor, y: torch.Tensor, perturbation: PerturbationSet,
             method: str, intermediate: str) -> torch.Tensor:
    lower = linear_margin_bounds(model, x, perturbation, y, method=method,
                                 intermediate=intermediate, elide=True)
    return margin_specification(y, lower.shape[1]).certified(lower)


@CERTIFIERS.register("fastlin")
def certify_fastlin(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                    perturbation: PerturbationSet) -> torch.Tensor:
    return _certify(model, x, y, perturbation, "fastlin", "same")


@CERTIFIERS.register("crown")
def certify_crown(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  perturbation: PerturbationSet) -> torch.Tensor:
    return _certify(model, x, y, perturbation, "crown", "same")


@CERTIFIERS.register("crown_ibp")
def certify_crown_ibp(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      perturbation: PerturbationSet) -> torch.Tensor:
    return _certify(model, x, y, perturbation, "crown", "ibp")
