"""`crown_ibp`: Zhang et al.'s CROWN-IBP training, with the defaults 003 reuses.

Loss: kappa * CE(z, y) + (1 - kappa) * CE(-m, y), where m is a mix of the two margin lower bounds,
m = beta * m_CROWN-IBP + (1 - beta) * m_IBP. Over the eps ramp-up, kappa goes from kappa_start to
kappa_final and beta from beta_start (CROWN-IBP's tighter bound while eps is small) to beta_final
(pure IBP at the end, which trains faster and generalizes better in Zhang et al.'s experiments).
"""
from __future__ import annotations

import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from ..bounds import ibp_margin_bounds
from ..bounds.linear import crown_ibp_margin_bounds
from ..schedules import ramp
from .base import METHODS
from .ibp import IBPTraining, spec_loss
from .standard import accuracy


class CrownIBPOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kappa_start: float = Field(1.0, ge=0, le=1)
    kappa_final: float = Field(0.0, ge=0, le=1, description="CROWN-IBP: 1 -> 0")
    beta_start: float = Field(1.0, ge=0, le=1)
    beta_final: float = Field(0.0, ge=0, le=1, description="CROWN-IBP: 1 -> 0")
    spec_loss: str = Field("ce", pattern="^(ce|softplus)$")


@METHODS.register("crown_ibp")
class CrownIBPTraining(IBPTraining):
    Options = CrownIBPOptions

    def beta(self, t: float) -> float:
        s = self.config.schedule
        return ramp(t, s.warmup_epochs, s.rampup_epochs, self.options.beta_start,
                    self.options.beta_final)

    def loss(self, model, x, y, state):
        kappa, beta = self.kappa(state.t), self.beta(state.t)
        stats = {"kappa": kappa, "beta": beta}
        loss = x.new_zeros(())
        if kappa > 0:
            logits = model(x)
            fit = F.cross_entropy(logits, y)
            loss = loss + kappa * fit
            stats.update(fit_loss=fit.detach(), train_acc=accuracy(logits, y))
        if kappa < 1:
            lower = 0
            if beta > 0:  # the backward pass is the expensive part: skip it once beta is 0
                lower = beta * crown_ibp_margin_bounds(model, x, state.perturbation, y)
            if beta < 1:
                lower = lower + (1 - beta) * ibp_margin_bounds(model, x, state.perturbation, y)
            spec = spec_loss(lower, y, self.options.spec_loss)
            loss = loss + (1 - kappa) * spec
            others = ~F.one_hot(y, lower.shape[1]).bool()
            verified = (lower.masked_fill(~others, 1.0) > 0).all(dim=1).float().mean().detach()
            stats.update(spec_loss=spec.detach(), train_verified=verified)
        stats["loss"] = loss.detach()
        return loss, stats
