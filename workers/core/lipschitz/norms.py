"""The layer norms `propagate` asks for: global or local (Local-Lip Eq. 6, the reduced operator
I_out W I_in of each example), estimated for training or bounded for certificates, and local ones
estimated from the global iterates (to record the local bound during global-bound training).
"""
from __future__ import annotations

import weakref
from typing import Literal

import torch
from torch import nn

from .network import Affine, Network
from .store import IterateStore
from .power import (CertifySettings, GlobalPower, certified_norms, power_iterate, random_start,
                    reduced_apply, reduced_apply_t, sigma)


class TrainingGlobalNorms:
    """Global norms from a few warm-started power steps per training step (differentiable)."""

    def __init__(self, power: GlobalPower, network: Network, generator: torch.Generator | None):
        self.values = power.norms([s.affine for s in network.stages], generator)

    def __call__(self, index, affine, in_mask, out_mask) -> torch.Tensor:
        return self.values[index]

    @property
    def last(self) -> torch.Tensor:
        return self.values[-1]


_CERTIFIED: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def certified_global_norms(model: nn.Module, network: Network,
                           settings: CertifySettings = CertifySettings()) -> list[torch.Tensor]:
    """Upper bounds on every affine layer's norm (see `power`). Cached per model against a copy of
    its parameters, so a certification run computes them once, never with stale weights."""
    params = [p.detach() for p in model.parameters()]
    cached = _CERTIFIED.get(model)
    if cached is not None and cached[0] == settings and len(cached[1]) == len(params) and all(
            a.shape == b.shape and torch.equal(a, b) for a, b in zip(cached[1], params)):
        return cached[2]
    generator = torch.Generator().manual_seed(0)
    values = [certified_norms(s.affine, 1, settings=settings, generator=generator)[0]
              for s in network.stages]
    _CERTIFIED[model] = (settings, [p.clone() for p in params], values)
    return values


class CertifiedGlobalNorms:
    def __init__(self, model: nn.Module, network: Network,
                 settings: CertifySettings = CertifySettings()):
        self.values = certified_global_norms(model, network, settings)

    def __call__(self, index, affine, in_mask, out_mask) -> torch.Tensor:
        return self.values[index].to(affine.weight.dtype)

    @property
    def last(self) -> torch.Tensor:
        return self.values[-1]


class TrainingLocalNorms:
    """Per-example norms of the reduced operators (Local-Lip Algorithm 1): `iterations` power
    steps from the example's saved u ("saved") or from a random u ("random"), differentiable."""

    def __init__(self, iterations: int, init: Literal["saved", "random"], store: IterateStore,
                 index: torch.Tensor | None):
        self.iterations, self.init, self.store, self.index = iterations, init, store, index

    def __call__(self, layer, affine: Affine, in_mask, out_mask) -> torch.Tensor:
        batch = _batch(in_mask, out_mask)
        weight = affine.weight
        u = None
        if self.init == "saved" and self.index is not None:
            u = self.store.get(layer, self.index, affine.in_shape)
        if u is None:
            # drawn on the layer's device from torch's global generator (saved with the
            # checkpoint on the CPU)
            u = torch.randn((batch, *affine.in_shape), device=weight.device, dtype=weight.dtype)
        else:
            # a small constant component keeps the start off the reduced operator's null space
            # where the mask has moved (and seeds rows never seen); cheaper than fresh noise
            u = u.to(weight.device, weight.dtype) + 1e-2 / affine.in_numel ** 0.5
        # the last of the power steps carries the gradient: v = unit(A u) without it, then
        # sigma = ||A^T v|| (<= ||A|| for a unit v), one operator pass fewer than ||A u|| after
        # a full last step
        u, _ = power_iterate(affine, u, self.iterations - 1, in_mask, out_mask)
        with torch.no_grad():
            v = reduced_apply(affine, u, in_mask, out_mask)
            v = v / v.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, *[1] * (v.dim() - 1))
        back = reduced_apply_t(affine, v, in_mask, out_mask)
        norm = back.flatten(1).norm(dim=1)
        if self.init == "saved" and self.index is not None:
            self.store.put(layer, self.index, back.detach())  # the next u, up to its length
        return norm


class SharedStartLocalNorms:
    """Per-example norms of the reduced operators, estimated without gradients from one start
    every example shares: the layer's global iterate vector (its top right singular vector once
    the global power iteration has converged), so no per-example store is needed. For recording
    the local bound beside a training that uses the global one (Local-Lip Figure 2: "the average
    local Lipschitz bound (computed by our method) during BCP training"). Like every power
    estimate, each value is at most the reduced operator's norm."""

    def __init__(self, power: GlobalPower, iterations: int, generator: torch.Generator | None):
        self.power, self.iterations, self.generator = power, iterations, generator

    @torch.no_grad()
    def __call__(self, layer, affine: Affine, in_mask, out_mask) -> torch.Tensor:
        batch = _batch(in_mask, out_mask)
        weight = affine.weight
        start = self.power.u.get(layer)
        if start is None or start.shape[1:] != affine.in_shape:
            start = random_start((1, *affine.in_shape), self.generator, weight)
        # the constant component keeps the start off the null space of an example's mask
        u = start.to(weight.device, weight.dtype).expand(batch, *affine.in_shape) \
            + 1e-2 / affine.in_numel ** 0.5
        u, _ = power_iterate(affine, u, self.iterations, in_mask, out_mask)
        return sigma(affine, u, in_mask, out_mask)


class CertifiedLocalNorms:
    """Per-example upper bounds on the reduced operators' norms (exact or with the stated safety
    factor; see `power`)."""

    def __init__(self, settings: CertifySettings = CertifySettings(),
                 generator: torch.Generator | None = None):
        self.settings = settings
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)

    def __call__(self, layer, affine: Affine, in_mask, out_mask) -> torch.Tensor:
        return certified_norms(affine, _batch(in_mask, out_mask), in_mask, out_mask, self.settings,
                               self.generator).to(affine.weight.dtype)


def _batch(in_mask: torch.Tensor | None, out_mask: torch.Tensor | None) -> int:
    """Examples in a local-norm call (every layer has a mask on at least one side)."""
    return next(m.shape[0] for m in (in_mask, out_mask) if m is not None)
