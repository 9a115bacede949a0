"""Certifiers from Lipschitz bounds (workers.core.lipschitz), registered in CERTIFIERS:

- `lipschitz`: the global bound: z_y - z_m > rho ||W_y - W_m|| with rho = r times the product of
  the hidden layers' certified norms (r = eps for l_2, sqrt(N) eps for l_inf);
- `bcp`: BCP's ball intersected with the propagated box at the penultimate layer, problem (11)
  solved exactly for every class;
- `local_lip`: the same with Local-Lip's per-example local norms, with the paper's shortcut: an
  example the global bound already certifies is certified, one a 100-step PGD (step eps / 4)
  breaks is not, and only the rest get the local bound (power iteration until
  ||u(t+1) - u(t)|| <= 1e-3, at least `CertifySettings.min_iterations` steps).

Norms are certified values (exact where the layer is small, else power iteration with the stated
safety factor: see workers/core/lipschitz/power.py). Importing this module registers them.
"""
from __future__ import annotations

import torch
from torch import nn

from .attacks import PGD
from .bounds import PerturbationSet, margin_specification
from .certify import CERTIFIERS
from .lipschitz import bcp_margins, lipschitz_margins, local_margins


def _certified(lower: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return margin_specification(y, lower.shape[1]).certified(lower)


@CERTIFIERS.register("lipschitz")
def certify_lipschitz(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      perturbation: PerturbationSet) -> torch.Tensor:
    return _certified(lipschitz_margins(model, x, y, perturbation), y)


@CERTIFIERS.register("bcp")
def certify_bcp(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                perturbation: PerturbationSet) -> torch.Tensor:
    return _certified(bcp_margins(model, x, y, perturbation), y)


@CERTIFIERS.register("local_lip")
def certify_local_lip(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      perturbation: PerturbationSet) -> torch.Tensor:
    certified = certify_lipschitz(model, x, y, perturbation)
    rest = (~certified).nonzero().squeeze(1)
    if rest.numel() == 0:
        return certified
    attack = PGD(steps=100, restarts=1, step_size=perturbation.eps / 4, loss="margin")
    generator = torch.Generator().manual_seed(0)
    with torch.enable_grad():
        robust = attack.robust(model, x[rest], y[rest], perturbation, generator)
    rest = rest[robust]  # PGD found a counterexample for the others: they stay uncertified
    if rest.numel():
        lower = local_margins(model, x[rest], y[rest], perturbation)
        certified[rest] = _certified(lower, y[rest])
    return certified
