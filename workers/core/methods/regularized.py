"""003's regularized methods: `cap+reg` and `crown_ibp+reg` add lambda * sum_t d_t +
gamma * sum_t r_t (Eq. 4; d and r of Eq. 2 and 3, summed over the margins t, averaged over the
batch) to the loss of `cap` and `crown_ibp`. lambda and gamma are warmed up from 0 to their
values over the eps ramp (003 Appendix C: over the first 20 epochs, because the projected
intermediate bounds are noisy early on).

`crown_ibp+reg` regularizes the CROWN-IBP bound while it is in use (beta > 0): 003 uses the
regularizer to give the later, pure-IBP stage of training a better start. Defaults are 003's
Table 1 values: lambda = 5e-3, gamma = 0.5 for CP; lambda = 0, gamma = 0.5 for CROWN-IBP.
"""
from __future__ import annotations

from pydantic import Field

from ..bounds import ibp_margin_bounds
from ..bounds.linear import linear_margin_solution
from ..bounds.tightness import tightness_regularizers
from ..schedules import ramp
from .base import METHODS
from .cap import CAPOptions, CAPTraining
from .crown_ibp import CrownIBPOptions, CrownIBPTraining


class CAPRegOptions(CAPOptions):
    lambda_d: float = Field(5e-3, ge=0, description="weight of d (003 Eq. 2)")
    gamma_r: float = Field(0.5, ge=0, description="weight of r (003 Eq. 3)")


class CrownIBPRegOptions(CrownIBPOptions):
    lambda_d: float = Field(0.0, ge=0, description="weight of d (003 Eq. 2)")
    gamma_r: float = Field(0.5, ge=0, description="weight of r (003 Eq. 3)")


class TightnessRegularized:
    """Mixin: the penalty from the relaxed optimum of `solve(model, x, y, state)`."""

    def weights(self, t: float) -> tuple[float, float]:
        s = self.config.schedule
        window = s.warmup_epochs + s.rampup_epochs
        return (ramp(t, 0.0, window, 0.0, self.options.lambda_d),
                ramp(t, 0.0, window, 0.0, self.options.gamma_r))

    def regularized_bound(self, model, x, y, state, intermediate, method):
        solution = linear_margin_solution(model, x, state.perturbation, y, method=method,
                                          intermediate=intermediate, with_optimum=True)
        lambda_d, gamma_r = self.weights(state.t)
        if lambda_d == 0 and gamma_r == 0:
            return solution.lower, None, {}
        tight = tightness_regularizers(model, solution)
        d, r = tight.d.sum(dim=1).mean(), tight.r.sum(dim=1).mean()
        stats = {"reg_d": d.detach(), "reg_r": r.detach(), "lambda_d": lambda_d,
                 "gamma_r": gamma_r}
        return solution.lower, lambda_d * d + gamma_r * r, stats


@METHODS.register("cap+reg")
class CAPRegTraining(TightnessRegularized, CAPTraining):
    Options = CAPRegOptions

    def margin_bound(self, model, x, y, state):
        boxes = self.intermediate_boxes(model, x, state)
        return self.regularized_bound(model, x, y, state, boxes, "fastlin")


@METHODS.register("crown_ibp+reg")
class CrownIBPRegTraining(TightnessRegularized, CrownIBPTraining):
    Options = CrownIBPRegOptions

    def margin_bound(self, model, x, y, state):
        beta = self.beta(state.t)
        if beta == 0:  # pure IBP from here on: no relaxed optimum to regularize
            return super().margin_bound(model, x, y, state)
        lower, penalty, stats = self.regularized_bound(model, x, y, state, "ibp", "crown")
        lower = beta * lower
        if beta < 1:
            lower = lower + (1 - beta) * ibp_margin_bounds(model, x, state.perturbation, y)
        return lower, penalty, stats
