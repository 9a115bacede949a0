"""`bcp`: Lee et al.'s Lipschitz-certifiable training with box constraint propagation, and the
base the other Lipschitz methods (`lmt`, `gloro`, `local_lip_b`, `local_lip_g`) share.

Loss (BCP Eq. 13, Local-Lip Eq. 25): (1 - lambda) CE(z, y) + lambda CE(z_worst, y), z_worst the
worst-translated logit over the outer bound (BCP: the global-Lipschitz ball intersected with the
propagated box at the penultimate layer, problem (11) solved per example and class). eps and
lambda ramp together, 0 -> eps_train and lambda_start -> lambda_final (Local-Lip Eq. 28-29, n =
half the epochs on MNIST and CIFAR-10, Table 3). Layer norms: `power_iterations` warm-started
power steps per training step (Table 3: 5 on MNIST, 2 on CIFAR-10).

Beside the loss, `bcp` and `local_lip_*` record on every step (warm-up included) both the global
Lipschitz bound (`lipschitz`) and the average local one (`local_lipschitz`), each layer's norm
in both (`lipschitz.layer{i}`, `local_lipschitz.layer{i}`, the logit layer last: appendix
Figure 7) and the share of varying activation outputs (`varying_fraction`,
`varying_fraction.layer{i}`: Figure 6), as Local-Lip Figure 2 compares them during BCP and
Local-Lip training. A bound the robust term did not compute is measured without gradients
(`TRACKERS`) on the first step of every epoch and every TRACK_EVERY-th after it: on a GPU,
measuring it on every step doubled BCP's step time (H200, 4C3F: 19 -> 44 ms), and the trainer
averages each statistic over the steps that recorded it. The natural cross-entropy (`fit_loss`)
is recorded after the ramp too (lambda = 1), from the clean logits the propagation yields.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from pydantic import BaseModel, ConfigDict, Field

from ..lipschitz import (GlobalPower, SharedStartLocalNorms, TrainingGlobalNorms, layer_shares,
                         local_outer, margin_lower, network_of, propagate, share_stats)
from ..registry import Registry
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
    tracked: tuple[str, ...] = ()  # TRACKERS recorded every step (in this order)

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
        # From the end of the warm-up on, every step records the robust statistics, the ramp's
        # first step too (lambda still 0 there: measured without gradients), so that their
        # curves start where the ramp does.
        if lam > 0 or state.t >= self.config.schedule.warmup_epochs:
            with torch.set_grad_enabled(torch.is_grad_enabled() and lam > 0):
                robust, lower, extra = self.robust(model, x, y, state)
            if lam > 0:
                loss = loss + lam * robust
            others = ~F.one_hot(y, lower.shape[1]).bool()
            verified = (lower.masked_fill(~others, 1.0) > 0).all(dim=1).float().mean()
            stats.update(robust_loss=robust.detach(), train_verified=verified.detach(), **extra)
        for name in self.tracked if state.step % TRACK_EVERY == 0 else ():
            if name not in stats:
                with torch.no_grad():
                    stats.update(TRACKERS.get(name)(self, model, x, state))
        stats["loss"] = loss.detach()
        return loss, stats

    def local_norms(self, model, x, state):
        """The per-example norm provider of the recorded local bound."""
        return SharedStartLocalNorms(self.power, self.options.power_iterations, state.generator)

    # iterate vectors are training state: saved with the checkpoint for an exact resume
    def state_dict(self) -> dict:
        return {"power": self.power.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.power.load_state_dict(state.get("power", {}))


def global_norms(method: LipschitzTraining, model, x, state) -> TrainingGlobalNorms:
    return TrainingGlobalNorms(method.power, network_of(model, x), state.generator)


def clean_stats(logits: torch.Tensor, y: torch.Tensor) -> dict:
    """The natural cross-entropy and accuracy of clean logits a robust term already computed."""
    return {"fit_loss": F.cross_entropy(logits.detach(), y), "train_acc": accuracy(logits, y)}


def layer_norms(name: str, norms) -> dict:
    """Each affine layer's norm, the logit layer's last (Local-Lip appendix Figure 7): scalars,
    or per-example values averaged over the batch."""
    return {f"{name}.layer{i}": torch.as_tensor(norm).detach().mean()
            for i, norm in enumerate(norms, start=1)}


def local_stats(outer, local: torch.Tensor) -> dict:
    """The average local bound of a batch, each layer's average reduced norm, and the varying
    shares (mean and per layer)."""
    stats = {"local_lipschitz": local.detach().mean(),
             **layer_norms("local_lipschitz", [*outer.norms, outer.last_norm])}
    for key, share in share_stats([s.detach() for s in layer_shares(outer)]).items():
        # the mean is `varying_fraction` itself, each layer's share `varying_fraction.layer{i}`
        stats["varying_fraction" + ("" if key == "mean" else f".{key}")] = share
    return stats


# A bound recorded beside the loss: name -> (method, model, x, state) -> stats, run under
# torch.no_grad() on the steps whose robust term did not yield it, one step in TRACK_EVERY
# (a curve over epochs needs a sample of each epoch's steps, not all of them).
TRACK_EVERY = 10
Tracker = Callable[[LipschitzTraining, nn.Module, torch.Tensor, Any], dict]
TRACKERS: Registry[Tracker] = Registry("tracked bound")


@TRACKERS.register("lipschitz")
def _global_bound(method, model, x, state) -> dict:
    # the method's own warm-started iterates: a few more power steps per step, no new state
    norms = global_norms(method, model, x, state).values
    return {"lipschitz": torch.stack(norms).prod(), **layer_norms("lipschitz", norms)}


# Examples of each batch the measured local bound is computed on: per-example norms cost a BCP
# step about twice over on the whole batch (4C3F, CPU), while the first few examples of a
# shuffled batch are a random sample whose means, over the epoch's tracked steps, estimate the
# same average (an epoch of CIFAR-10 at batch 256: 20 tracked steps x 32 = 640 examples).
TRACKED_EXAMPLES = 32


@TRACKERS.register("local_lipschitz")
def _local_bound(method, model, x, state) -> dict:
    count = min(TRACKED_EXAMPLES, len(x))
    index = None if state.index is None else state.index[:count]
    sample, state = x[:count], replace(state, index=index)
    norms = method.local_norms(model, sample, state)
    return local_stats(*local_outer(model, sample, state.perturbation, norms))


@METHODS.register("bcp")
class BCPTraining(LipschitzTraining):
    tracked = ("lipschitz", "local_lipschitz")  # the local one from the global iterates

    def robust(self, model, x, y, state):
        norms = global_norms(self, model, x, state)
        outer = propagate(model, x, state.perturbation, norms)
        lower = margin_lower(outer, y, use_box=True)
        lipschitz = torch.stack(norms.values).prod().detach()
        extra = {"lipschitz": lipschitz, **layer_norms("lipschitz", norms.values),
                 **clean_stats(outer.logits, y)}
        return F.cross_entropy(-lower, y), lower, extra
