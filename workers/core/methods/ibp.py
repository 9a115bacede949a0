"""`ibp`: Gowal et al.'s interval bound propagation training.

Loss (Eq. 12): kappa * CE(z, y) + (1 - kappa) * l(z_hat, y), z_hat the worst-case logits of Eq. 10
(with elision, -lower bound of the margins y - j). kappa is held at `kappa_start` through the
warm-up and ramped linearly to `kappa_final` while eps ramps 0 -> eps_train (appendix A). The
ablation of Table 5 swaps the cross-entropy for a softplus on each specification and turns
elision off.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from ..bounds import ibp_margin_bounds
from ..schedules import ramp
from .base import METHODS, Method
from .standard import accuracy


class IBPOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kappa_start: float = Field(1.0, ge=0, le=1)
    kappa_final: float = Field(0.5, ge=0, le=1, description="IBP paper: 0.5 (or 0, best kept)")
    spec_loss: Literal["ce", "softplus"] = "ce"
    elide: bool = True


def spec_loss(lower: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
    """The specification loss on margin lower bounds (B, K), entry y being 0."""
    if kind == "ce":
        return F.cross_entropy(-lower, y)  # worst-case logits z_hat = -lower (Eq. 10-11)
    others = ~F.one_hot(y, lower.shape[1]).bool()
    return F.softplus(-lower)[others].view(len(y), -1).sum(dim=1).mean()


@METHODS.register("ibp")
class IBPTraining(Method):
    Options = IBPOptions
    # MNIST protocol (appendix A) as fractions of 60K steps: warm-up 2K, ramp-up 10K,
    # learning rate x0.1 at 15K and 25K.
    warmup_fraction = 2 / 60
    rampup_fraction = 10 / 60
    lr_milestone_fractions = (15 / 60, 25 / 60)

    def kappa(self, t: float) -> float:
        s = self.config.schedule
        return ramp(t, s.warmup_epochs, s.rampup_epochs, self.options.kappa_start,
                    self.options.kappa_final)

    def margin_lower(self, model, x, y, state) -> torch.Tensor:
        """Lower bounds (B, K) on the margins y - j over the current perturbation set: the hook
        that methods with other bounds (CROWN-IBP) override."""
        return ibp_margin_bounds(model, x, state.perturbation, y, elide=self.options.elide)

    def margin_bound(self, model, x, y, state) -> tuple[torch.Tensor, torch.Tensor | None,
                                                        dict[str, float]]:
        """(margin lower bounds, a penalty added to the loss or None, its statistics): the hook
        for methods that regularize the bound (003's d and r)."""
        return self.margin_lower(model, x, y, state), None, {}

    def schedule_stats(self, t: float) -> dict[str, float]:
        return {"kappa": self.kappa(t)}

    def loss(self, model, x, y, state):
        kappa = self.kappa(state.t)
        stats = self.schedule_stats(state.t)
        loss = x.new_zeros(())
        if kappa > 0:  # kappa = 0 skips the nominal pass: the pure specification loss
            logits = model(x)
            fit = F.cross_entropy(logits, y)
            loss = loss + kappa * fit
            stats.update(fit_loss=fit.detach(), train_acc=accuracy(logits, y))
        if kappa < 1:  # kappa = 1 (the warm-up) costs no bound pass
            lower, penalty, penalty_stats = self.margin_bound(model, x, y, state)
            spec = spec_loss(lower, y, self.options.spec_loss)
            loss = loss + (1 - kappa) * spec
            if penalty is not None:
                loss = loss + penalty
            stats.update(penalty_stats)
            others = ~F.one_hot(y, lower.shape[1]).bool()
            verified = (lower.masked_fill(~others, 1.0) > 0).all(dim=1).float().mean().detach()
            stats.update(spec_loss=spec.detach(), train_verified=verified)
        stats["loss"] = loss.detach()
        return loss, stats
