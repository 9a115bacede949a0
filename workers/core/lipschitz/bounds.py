"""Whole-network bounds built from the pieces: the global and local Lipschitz bounds, the margin
lower bounds of the `lipschitz`, `bcp` and `local_lip` certificates, and BCP's tightness tau."""
from __future__ import annotations

import torch
from torch import nn

from ..bounds.perturbation import PerturbationSet
from ..bounds.spec import Specification, margin_specification
from .bcp import Outer, margin_lower, pair_vectors, propagate, tightness
from .network import input_radius, network_of
from .norms import CertifiedGlobalNorms, CertifiedLocalNorms
from .power import CertifySettings


def global_bound(model: nn.Module, x: torch.Tensor,
                 settings: CertifySettings = CertifySettings()) -> torch.Tensor:
    """Certified global Lipschitz constant of the logits: the product of the layer norms (Eq. 2)."""
    norms = CertifiedGlobalNorms(model, network_of(model, x), settings).values
    return torch.stack(norms).prod()


def local_outer(model: nn.Module, x: torch.Tensor, perturbation: PerturbationSet, norm_of
                ) -> tuple[Outer, torch.Tensor]:
    """Local-Lip's outer bounds (ball radius from the per-example reduced norms) and the local
    Lipschitz bound of the whole network (Eq. 6), (B,)."""
    outer = propagate(model, x, perturbation, norm_of, masks=True)
    last = norm_of(len(outer.norms), outer.last_affine, outer.last_mask, None)
    outer.last_norm = last
    bound = last
    for norm in outer.norms:
        bound = bound * norm
    return outer, bound


def local_bound(model: nn.Module, x: torch.Tensor, perturbation: PerturbationSet,
                settings: CertifySettings = CertifySettings()) -> torch.Tensor:
    """Certified local Lipschitz bound (Eq. 6) per example over the perturbation set."""
    return local_outer(model, x, perturbation, CertifiedLocalNorms(settings))[1]


def lipschitz_margins(model: nn.Module, x: torch.Tensor, spec: Specification | torch.Tensor,
                      perturbation: PerturbationSet,
                      settings: CertifySettings = CertifySettings()) -> torch.Tensor:
    """Global-Lipschitz margin lower bounds (B, S): C z - rho ||c|| with c = C W (for labels:
    z_y - z_m - rho ||W_y - W_m||), rho = r times the product of the hidden layers' norms (the
    ball of Tsuzuku et al. through the last layer, tighter than sqrt(2) r L)."""
    network = network_of(model, x)
    norms = CertifiedGlobalNorms(model, network, settings).values
    rho = input_radius(perturbation, x) * torch.stack(norms[:-1]).prod().to(x.dtype)
    if isinstance(spec, torch.Tensor):
        spec = margin_specification(spec, network.last.out_features)
    logits = model(x)
    c, _ = pair_vectors(network.last, spec)
    return torch.einsum("bsk,bk->bs", spec.matrix.to(logits.dtype), logits) - rho * c.norm(dim=-1)


def bcp_outer(model: nn.Module, x: torch.Tensor, perturbation: PerturbationSet,
              settings: CertifySettings = CertifySettings()) -> Outer:
    return propagate(model, x, perturbation,
                     CertifiedGlobalNorms(model, network_of(model, x), settings))


def bcp_margins(model, x, y, perturbation, settings: CertifySettings = CertifySettings()):
    return margin_lower(bcp_outer(model, x, perturbation, settings), y, use_box=True)


def local_margins(model, x, y, perturbation, settings: CertifySettings = CertifySettings(),
                  generator: torch.Generator | None = None) -> torch.Tensor:
    outer, _ = local_outer(model, x, perturbation, CertifiedLocalNorms(settings, generator))
    return margin_lower(outer, y, use_box=True)


@torch.no_grad()
def bcp_tightness(model: nn.Module, x: torch.Tensor, perturbation: PerturbationSet,
                  settings: CertifySettings = CertifySettings()
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """BCP Section 4's tau(x) for every example (B,), and the same measure without the box (the
    global-Lipschitz constant, as (B,) for comparison)."""
    outer = bcp_outer(model, x, perturbation, settings)
    return tightness(outer, use_box=True), tightness(outer, use_box=False)
