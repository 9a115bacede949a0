"""PGD (Madry et al.) for l_inf and l_2 balls in [0,1] pixel scale, with random restarts.

Used two ways: inside training (`pgd` method: few steps, cross-entropy, one start) and for the
empirical column of a result (IBP paper protocol: 200 steps, 10 restarts, on the margin loss).
Random starts draw from a CPU `torch.Generator`, so attacks are reproducible.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .bounds.perturbation import PerturbationSet


def margin_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per example: best other logit minus the true logit (> 0 means misclassified)."""
    true = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), float("-inf"))
    return others.max(dim=1).values - true


def cross_entropy_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels, reduction="none")


ATTACK_LOSSES = {"margin": margin_loss, "ce": cross_entropy_loss}


@dataclass(frozen=True)
class PGD:
    steps: int = 200
    restarts: int = 10
    step_size: float | None = None  # None: 2.5 * eps / steps (Madry et al.)
    loss: str = "margin"
    random_start: bool = True

    def __post_init__(self):
        if self.loss not in ATTACK_LOSSES:
            raise ValueError(f"unknown attack loss {self.loss!r}; allowed: {', '.join(ATTACK_LOSSES)}")
        if self.steps < 0 or self.restarts < 1:
            raise ValueError("PGD needs steps >= 0 and restarts >= 1")

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                perturbation: PerturbationSet, generator: torch.Generator | None = None
                ) -> torch.Tensor:
        """One PGD run from one (random) start: the point of the set with the highest loss found."""
        eps = perturbation.eps
        if eps == 0 or self.steps == 0:
            return x.detach().clone()
        step = self.step_size if self.step_size is not None else 2.5 * eps / self.steps
        loss_fn = ATTACK_LOSSES[self.loss]
        x = x.detach()
        x_adv = perturbation.sample(x, generator) if self.random_start else x.clone()
        best, best_loss = x_adv.clone(), torch.full((x.shape[0],), -float("inf"), device=x.device,
                                                 dtype=x.dtype)
        for _ in range(self.steps + 1):
            x_adv.requires_grad_(True)
            loss = loss_fn(model(x_adv), y)
            grad, = torch.autograd.grad(loss.sum(), x_adv)
            with torch.no_grad():
                # keep the best iterate, not the last one (torch.where: no device sync)
                better = loss > best_loss
                best = torch.where(better.view(-1, *([1] * (x.dim() - 1))), x_adv, best)
                best_loss = torch.where(better, loss, best_loss)
                if perturbation.norm == "linf":
                    x_adv = x_adv + step * grad.sign()
                else:
                    norms = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
                    x_adv = x_adv + step * grad / norms.view(-1, *([1] * (x.dim() - 1)))
                x_adv = perturbation.project(x_adv, x)
        return best.detach()

    def robust(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
               perturbation: PerturbationSet, generator: torch.Generator | None = None
               ) -> torch.Tensor:
        """Per example: True when no restart found a misclassified point. Each restart only
        attacks the examples no earlier restart has broken."""
        with torch.no_grad():
            robust = model(x).argmax(dim=1) == y
        for _ in range(self.restarts if perturbation.eps > 0 else 0):
            alive = robust.nonzero().squeeze(1)
            if alive.numel() == 0:
                break
            x_adv = self.perturb(model, x[alive], y[alive], perturbation, generator)
            with torch.no_grad():
                robust[alive] = model(x_adv).argmax(dim=1) == y[alive]
        return robust
