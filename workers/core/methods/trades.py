"""`trades` (Zhang et al. 2019, "Theoretically Principled Trade-off between Robustness and
Accuracy"): cross-entropy on the clean batch plus beta times KL(p(x) || p(x')), where x' maximizes
that KL divergence over the perturbation set (PGD on the KL, started next to x). Works for any norm
the config names (l_inf: sign steps; l_2: normalized gradient steps)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from .base import METHODS, Method
from .standard import accuracy


class TradesOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    beta: float = Field(6.0, ge=0, description="weight of the KL term (the paper's 1/lambda: 6)")
    steps: int = Field(10, ge=1, description="PGD steps on the KL (Zhang et al.: 10 on CIFAR-10, "
                                              "40 on MNIST)")
    step_size: float | None = Field(None, gt=0, description="None: 2.5 * eps / steps")
    start_std: float = Field(0.001, ge=0, description="std of the Gaussian start around x")


def kl_to_clean(logits_adv: torch.Tensor, log_p_clean: torch.Tensor) -> torch.Tensor:
    """Per example KL(p_clean || p_adv)."""
    return F.kl_div(F.log_softmax(logits_adv, dim=1), log_p_clean, reduction="none",
                    log_target=True).sum(dim=1)


@METHODS.register("trades")
class Trades(Method):
    Options = TradesOptions
    lr_milestone_fractions = (15 / 60, 25 / 60)

    def adversarial(self, model, x, log_p_clean, state):
        """x' maximizing KL(p(x) || p(x')) over the set: PGD from a small Gaussian start."""
        perturbation, o = state.perturbation, self.options
        eps = perturbation.eps
        if eps == 0:
            return x.detach().clone()
        step = o.step_size if o.step_size is not None else 2.5 * eps / o.steps
        noise = torch.randn(x.shape, generator=state.generator).to(x.device, x.dtype)
        x_adv = perturbation.project(x + o.start_std * noise, x).detach()
        shape = (-1, *([1] * (x.dim() - 1)))
        for _ in range(o.steps):
            x_adv.requires_grad_(True)
            loss = kl_to_clean(model(x_adv), log_p_clean).sum()
            grad, = torch.autograd.grad(loss, x_adv)
            with torch.no_grad():
                if perturbation.norm == "linf":
                    x_adv = x_adv + step * grad.sign()
                else:
                    x_adv = x_adv + step * grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(shape)
                x_adv = perturbation.project(x_adv, x)
        return x_adv.detach()

    def loss(self, model, x, y, state):
        logits = model(x)
        log_p_clean = F.log_softmax(logits, dim=1)
        x_adv = self.adversarial(model, x, log_p_clean.detach(), state)
        logits_adv = model(x_adv)
        natural = F.cross_entropy(logits, y)
        robust = kl_to_clean(logits_adv, log_p_clean).mean()
        loss = natural + self.options.beta * robust
        return loss, {"loss": loss.detach(), "natural_loss": natural.detach(),
                      "kl": robust.detach(), "train_acc": accuracy(logits, y),
                      "train_adv_acc": accuracy(logits_adv, y)}
