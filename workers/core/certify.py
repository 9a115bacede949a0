"""Post-hoc certification of a trained model on a test split.

For every example: clean correctness, PGD robustness (the empirical column), and for each requested
certifier whether it proves the example robust. Certifiers are looked up by name in CERTIFIERS; a
certifier takes (model, x, y, perturbation) and returns a boolean per example, True only when every
point of the perturbation set is classified y: a certifier must never be unsound.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from .attacks import PGD
from .bounds import PerturbationSet, ibp_margin_bounds, margin_specification
from .progress import Progress
from .registry import Registry

Certifier = Callable[[nn.Module, torch.Tensor, torch.Tensor, PerturbationSet], torch.Tensor]
CERTIFIERS: Registry[Certifier] = Registry("certifier")


@CERTIFIERS.register("ibp")
def certify_ibp(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                perturbation: PerturbationSet) -> torch.Tensor:
    lower = ibp_margin_bounds(model, x, perturbation, y, elide=True)
    return margin_specification(y, lower.shape[1]).certified(lower)


@dataclass
class CertifyResult:
    clean_correct: list[bool]
    pgd_correct: list[bool]
    verified: dict[str, list[bool]]
    certify_sec: dict[str, float] = field(default_factory=dict)

    def metrics(self) -> dict:
        def mean(flags: list[bool]) -> float:
            return sum(flags) / len(flags) if flags else 0.0
        return {
            "clean_acc": mean(self.clean_correct),
            "pgd_acc": mean(self.pgd_correct),
            "verified_acc": {name: mean(flags) for name, flags in self.verified.items()},
        }

    def per_example(self, labels: Sequence[int], indices: Sequence[int]) -> list[dict]:
        return [
            {"index": int(index), "label": int(label), "clean_correct": clean,
             "pgd_correct": pgd, "verified": {name: flags[i] for name, flags in self.verified.items()}}
            for i, (index, label, clean, pgd) in enumerate(
                zip(indices, labels, self.clean_correct, self.pgd_correct))
        ]


def certify(model: nn.Module, x: torch.Tensor, y: torch.Tensor, perturbation: PerturbationSet,
            certifiers: Sequence[str], attack: PGD | None = None, batch_size: int = 256,
            seed: int = 0, show_progress: bool = False) -> CertifyResult:
    """Certify every example of (x, y) (CPU tensors; batches move to the model's device)."""
    functions = {name: CERTIFIERS.get(name) for name in certifiers}  # unknown names fail first
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    result = CertifyResult([], [], {name: [] for name in functions},
                           {name: 0.0 for name in functions} | {"pgd": 0.0})
    progress = Progress(len(x), "certify", enabled=show_progress)
    for start in range(0, len(x), batch_size):
        xb, yb = x[start:start + batch_size].to(device), y[start:start + batch_size].to(device)
        with torch.no_grad():
            result.clean_correct += (model(xb).argmax(dim=1) == yb).tolist()
        began = time.perf_counter()
        robust = (attack or PGD(steps=0, restarts=1)).robust(model, xb, yb, perturbation, generator)
        result.pgd_correct += robust.tolist()
        result.certify_sec["pgd"] += time.perf_counter() - began
        for name, function in functions.items():
            began = time.perf_counter()
            with torch.no_grad():
                result.verified[name] += function(model, xb, yb, perturbation).tolist()
            result.certify_sec[name] += time.perf_counter() - began
        progress.update(len(xb))
    progress.close()
    model.train(was_training)
    return result


# Certifiers defined in their own modules register on import; they import CERTIFIERS from here,
# so these imports come last.
from . import linear_certifiers, mip  # noqa: E402,F401
from . import lipschitz_certifiers  # noqa: E402,F401
