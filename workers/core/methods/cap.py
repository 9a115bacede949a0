"""`cap`: Wong et al.'s convex-adversarial-polytope training (CP in 003), on the Fast-Lin bound,
which equals their dual (003, Appendix F).

Loss: CE(-p_C, y), the cross-entropy of the worst-case logits given by the Fast-Lin margin lower
bounds (003 Eq. 4 without regularizers), with no nominal term. Intermediate bounds are exact
Fast-Lin boxes computed forwards (`projections: null`) or Wong et al.'s random-projection
estimate with k columns (`projections: 50` as in 003's non-"Exact" rows); either way the final
margin bound is the Fast-Lin backward pass over those boxes.

Schedule (003 Appendix C, after Wong et al.): Adam at 1e-3, eps ramped linearly over the first
20 of 80 epochs, then the learning rate halved every 10 epochs. (Wong et al. start the ramp at
eps = 0.01 on MNIST and 0.001 on CIFAR-10; here it starts at 0, as for every method.)
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from ..bounds.linear import linear_margin_bounds
from ..bounds.projection import fastlin_forward_boxes
from .base import METHODS
from .ibp import IBPTraining


class CAPOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    projections: int | None = Field(
        None, ge=1, description="random projections for the intermediate bounds (Wong et al.: "
                                "50); null: exact")
    kappa_start: float = Field(0.0, ge=0, le=1, description="weight of the nominal loss "
                                                           "(Wong et al.: 0)")
    kappa_final: float = Field(0.0, ge=0, le=1)
    spec_loss: str = Field("ce", pattern="^(ce|softplus)$")


@METHODS.register("cap")
class CAPTraining(IBPTraining):
    Options = CAPOptions
    warmup_fraction = 0.0
    rampup_fraction = 20 / 80
    lr_milestone_fractions = (30 / 80, 40 / 80, 50 / 80, 60 / 80, 70 / 80)
    lr_factor = 0.5

    def intermediate_boxes(self, model, x, state):
        return fastlin_forward_boxes(model, x, state.perturbation, self.options.projections,
                                     state.generator)

    def margin_lower(self, model, x, y, state):
        return linear_margin_bounds(model, x, state.perturbation, y, method="fastlin",
                                    intermediate=self.intermediate_boxes(model, x, state))
