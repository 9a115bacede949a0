"""`crown_ibp`: Zhang et al.'s CROWN-IBP training, with the defaults 003 reuses.

Loss: kappa * CE(z, y) + (1 - kappa) * CE(-m, y), where m is a mix of the two margin lower bounds,
m = beta * m_CROWN-IBP + (1 - beta) * m_IBP. Over the eps ramp-up, kappa goes from kappa_start to
kappa_final and beta from beta_start (CROWN-IBP's tighter bound while eps is small) to beta_final
(pure IBP at the end, which trains faster and generalizes better in Zhang et al.'s experiments).
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from ..bounds import ibp_margin_bounds
from ..bounds.linear import crown_ibp_margin_bounds
from ..schedules import ramp
from .base import METHODS
from .ibp import IBPTraining


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

    def schedule_stats(self, t: float) -> dict[str, float]:
        return {"kappa": self.kappa(t), "beta": self.beta(t)}

    def margin_lower(self, model, x, y, state):
        beta = self.beta(state.t)
        lower = 0
        if beta > 0:  # the backward pass is the expensive part: skip it once beta is 0
            lower = beta * crown_ibp_margin_bounds(model, x, state.perturbation, y)
        if beta < 1:
            lower = lower + (1 - beta) * ibp_margin_bounds(model, x, state.perturbation, y)
        return lower
