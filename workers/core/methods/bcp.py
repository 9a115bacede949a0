"""`bcp`: Lee et al.'s Lipschitz-certifiable training with box constraint propagation, and the
base the other Lipschitz methods (`lmt`, `gloro`, `local_lip_b`, `local_lip_g`) share.

Loss (BCP Eq. 13, Local-Lip Eq. 25): (1 - lambda) CE(z, y) + lambda CE(z_worst, y), z_worst the
worst-translated logit over the outer bound (BCP: the global-Lipschitz ball intersected with the
propagated box at the penultimate layer, problem (11) solved per example and class). eps and
lambda ramp together, 0 -> eps_train and lambda_start -> lambda_final (Local-Lip Eq. 28-29, n =
half the epochs on MNIST and CIFAR-10, Table 3). Layer norms: `power_iterations` warm-started
power steps per training step (Table 3: 5 on MNIST, 2 on CIFAR-10).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from ..lipschitz import GlobalPower, TrainingGlobalNorms, margin_lower, network_of, propagate
from ..schedules import ramp
from .base import METHODS, Method
from .standard import accuracy


class LipschitzOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    power_iterations: int = Field(2, ge=1, le=1000,
                                  description="power steps per training step (Local-Lip: 2-5)")
    lambda_start: float = Field(0.0, ge=0, le=1, description="weight of the robust loss")
    lambda_final: float = Field(1.0, ge=0, le=1)


class LipschitzTraining(Method):
    """Shared loop: the lambda mix of Eq. 13 / 25 around a subclass's `robust` term."""
    Options = LipschitzOptions
    warmup_fraction = 0.0
    rampup_fraction = 0.5  # Local-Lip Table 3: eps and lambda ramp over half the epochs

    def __init__(self, config):
        super().__init__(config)
        self.power = GlobalPower(self.options.power_iterations)

    def lam(self, t: float) -> float:
        s = self.config.schedule
        return ramp(t, s.warmup_epochs, s.rampup_epochs, self.options.lambda_start,
                    self.options.lambda_final)

    def robust(self, model, x, y, state) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """The robust loss, margin lower bounds (B, K) (entry y = 0) and extra statistics."""
        raise NotImplementedError

    def loss(self, model, x, y, state):
        lam = self.lam(state.t)
        stats: dict = {"lambda": lam}
        loss = x.new_zeros(())
        if lam < 1:
            logits = model(x)
            fit = F.cross_entropy(logits, y)
            loss = loss + (1 - lam) * fit
            stats.update(fit_loss=fit.detach(), train_acc=accuracy(logits, y))
        if lam > 0:
            robust, lower, extra = self.robust(model, x, y, state)
            loss = loss + lam * robust
            others = ~F.one_hot(y, lower.shape[1]).bool()
            verified = (lower.masked_fill(~others, 1.0) > 0).all(dim=1).float().mean()
            stats.update(robust_loss=robust.detach(), train_verified=verified.detach(), **extra)
        stats["loss"] = loss.detach()
        return loss, stats

    # iterate vectors are training state: saved with the checkpoint for an exact resume
    def state_dict(self) -> dict:
        return {"power": self.power.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.power.load_state_dict(state.get("power", {}))


def global_norms(method: LipschitzTraining, model, x, state) -> TrainingGlobalNorms:
    return TrainingGlobalNorms(method.power, network_of(model, x), state.generator)


@METHODS.register("bcp")
class BCPTraining(LipschitzTraining):
    def robust(self, model, x, y, state):
        norms = global_norms(self, model, x, state)
        outer = propagate(model, x, state.perturbation, norms)
        lower = margin_lower(outer, y, use_box=True)
        lipschitz = torch.stack(norms.values).prod().detach()
        return F.cross_entropy(-lower, y), lower, {"lipschitz": lipschitz}
