"""The share of varying (non-constant) ReLU outputs per layer over a perturbation set (Local-Lip
Figure 3), measured on a trained network and recorded during training.

A diagnostic, `varying_relu` (with the `local_lip` certifier, the one Figure 3's rows run): the
boxes are those of the Local-Lip certificate (`local_outer` with the certified per-example norms,
so a neuron called constant is constant over the whole set, up to the norms' stated failure
probability), and an output varies by its activation's rule (Eq. 3 for ReLU: UB > 0; Eq. 9 for
ReLU_theta). Metrics: `layer1` ... `layerK` (K hidden layers: every activation but the logit
layer's, as Figure 3 counts them), the share over the test examples and the layer's neurons, and
`mean`, their mean over the layers (what training records as `varying_fraction`). The same
yardstick measures every model (standard, BCP, Local-Lip), whatever bound it was trained with.
"""
from __future__ import annotations

import torch
from torch import nn

from .bounds import PerturbationSet
from .diagnostics import DIAGNOSTICS, Diagnostic, _chunks
from .lipschitz import CertifiedLocalNorms, layer_shares, local_outer, share_stats


@torch.no_grad()
def varying_shares(model: nn.Module, x: torch.Tensor, perturbation: PerturbationSet,
                   batch_size: int = 256) -> list[float]:
    """Per hidden layer, the share of outputs that may vary over the perturbation set of each
    example of x, over all examples and neurons."""
    totals: torch.Tensor | None = None
    for xb in _chunks(x, batch_size):
        outer, _ = local_outer(model, xb, perturbation, CertifiedLocalNorms())
        shares = torch.stack(layer_shares(outer)) * len(xb)  # every layer has as many per example
        totals = shares if totals is None else totals + shares
    return [] if totals is None else (totals / len(x)).tolist()


def _varying_relu(model, x, perturbation, batch_size) -> dict[str, float]:
    shares = varying_shares(model, x, perturbation, batch_size)
    return {key: float(value) for key, value in share_stats(shares).items()}


DIAGNOSTICS.add("varying_relu", Diagnostic(("local_lip",), _varying_relu))
