"""Measurements of a trained model that some tables report beside its certificates, recorded in
a result's metrics when the certifier they belong to runs (a registry: name -> (the certifiers
that ask for it, the function)). Each function takes the model, the test inputs and the
perturbation set and returns a dict of numbers, stored under the diagnostic's name:

- `tightness` (with `bcp`): BCP Section 4's tau(x), the mean translation of the outer bound over
  class pairs: `bcp_mean` over the test examples, `global` the same without the box (the global
  Lipschitz bound's constant), `reduction` = 1 - bcp_mean / global (BCP Figure 3).
- `lipschitz_bound` (with `lipschitz` or `local_lip`): the certified global Lipschitz bound of the
  logits and the mean over the test examples of the certified local bound over each example's
  perturbation set (Local-Lip Table 5).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from .bounds import PerturbationSet
from .lipschitz.bounds import bcp_tightness, global_bound, local_bound
from .registry import Registry

Diagnostic = Callable[[nn.Module, torch.Tensor, PerturbationSet, int], dict[str, float]]
DIAGNOSTICS: Registry[tuple[tuple[str, ...], Diagnostic]] = Registry("diagnostic")


def _chunks(x: torch.Tensor, batch_size: int):
    return (x[start:start + batch_size] for start in range(0, len(x), batch_size))


@torch.no_grad()
def _tightness(model, x, perturbation, batch_size):
    taus = [bcp_tightness(model, xb, perturbation) for xb in _chunks(x, batch_size)]
    bcp = float(torch.cat([t for t, _ in taus]).mean())
    plain = float(torch.cat([g for _, g in taus]).mean())
    return {"bcp_mean": bcp, "global": plain, "reduction": 1 - bcp / plain if plain > 0 else 0.0}


@torch.no_grad()
def _lipschitz_bound(model, x, perturbation, batch_size):
    local = torch.cat([local_bound(model, xb, perturbation) for xb in _chunks(x, batch_size)])
    return {"global": float(global_bound(model, x[:1])), "local": float(local.mean())}


DIAGNOSTICS.add("tightness", (("bcp",), _tightness))
DIAGNOSTICS.add("lipschitz_bound", (("lipschitz", "local_lip"), _lipschitz_bound))
from . import relu_activity  # noqa: E402,F401  (registers its diagnostic here)


def diagnose(model: nn.Module, x: torch.Tensor, perturbation: PerturbationSet,
             certifiers: Sequence[str], batch_size: int = 256) -> dict[str, dict[str, float]]:
    """Every diagnostic that one of `certifiers` asks for, on inputs x (on the model's device)."""
    out = {}
    for name in DIAGNOSTICS.names():
        wanted_by, function = DIAGNOSTICS.get(name)
        if set(wanted_by) & set(certifiers):
            out[name] = function(model.eval(), x, perturbation, batch_size)
    return out
