"""`nominal` (plain cross-entropy) and `pgd` (Madry et al.: cross-entropy on PGD points)."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from ..attacks import PGD
from .base import METHODS, Method


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(dim=1) == y).float().mean().detach()


@METHODS.register("nominal")
class Nominal(Method):
    # IBP paper appendix A: the same Adam learning-rate decay for every method on MNIST.
    lr_milestone_fractions = (15 / 60, 25 / 60)

    def loss(self, model, x, y, state):
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        return loss, {"loss": loss.detach(), "train_acc": accuracy(logits, y)}


class PGDOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    steps: int = Field(7, ge=1, description="PGD steps per training example (IBP paper: 7)")
    step_size: float | None = Field(None, gt=0, description="None: 2.5 * eps / steps")
    restarts: int = Field(1, ge=1)
    loss: Literal["ce", "margin"] = "ce"


@METHODS.register("pgd")
class PGDTraining(Method):
    Options = PGDOptions
    lr_milestone_fractions = (15 / 60, 25 / 60)

    def __init__(self, config):
        super().__init__(config)
        o = self.options
        self.attack = PGD(steps=o.steps, restarts=1, step_size=o.step_size, loss=o.loss)

    def loss(self, model, x, y, state):
        x_adv = self.attack.perturb(model, x, y, state.perturbation, state.generator)
        logits = model(x_adv)
        loss = F.cross_entropy(logits, y)
        return loss, {"loss": loss.detach(), "train_adv_acc": accuracy(logits, y)}
