"""`local_lip_b` and `local_lip_g`: Huang et al.'s training with local Lipschitz bounds
(Local-Lip Algorithm 1) plugged into the BCP loss (-B) or the GloRo loss (-G, keeping the box, as
appendix B says).

Per step: the ball and box are propagated together (as in BCP), the box at each activation gives
the varying-neuron masks (Eq. 3 for ReLU, Eq. 9 for ReLU_theta, the clipped MaxMin's rule), and
each affine layer's norm is that of its reduced operator I_out W I_in for each example, from
`power_iterations` power steps started from the example's saved iterate vector (`init="saved"`,
kept in host memory in float16 between epochs) or from a random one (`init="random"`; Table 1
compares the two). The ball's radius at layer l is eps times the product of these per-example
norms (Eq. 6). A step records the average local bound, the global one (from the shared
global iterates, without gradients), and the share of varying outputs per layer
(`varying_fraction.layer{i}`, Local-Lip Figure 6) and over the layers (`varying_fraction`). The
sparsity loss (Eq. 12, 26) pushes pre-activation boxes into the constant
regions: lambda_sparse * mean over neurons of max(0, UB) + lambda_theta max(0, theta - LB) (for
MaxMin: max(0, UB_min - b) + lambda_theta max(0, a - LB_max)); the paper's Table 3 uses 0 on
MNIST and CIFAR-10 and 0.01 / 0.1 on Tiny ImageNet. The models with ReLU_theta or MaxMin
activations are the registry's `-theta` / `-maxmin` variants.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from ..activations import ACTIVATION_RULES
from ..lipschitz import IterateStore, TrainingLocalNorms, local_outer, margin_lower
from .base import METHODS
from .bcp import LipschitzOptions, LipschitzTraining, clean_stats, local_stats
from .gloro import gloro_loss


STORE_CHECKPOINT_LIMIT = 1 << 30  # bytes of saved iterate vectors a checkpoint still holds


class LocalLipOptions(LipschitzOptions):
    init: Literal["saved", "random"] = Field(
        "saved", description="power-iteration start: the example's saved u, or random (Table 1)")
    lambda_sparse: float = Field(0.0, ge=0, description="Eq. 26; Table 3: 0 (MNIST, CIFAR-10)")
    lambda_theta: float = Field(0.0, ge=0, description="Eq. 26; Table 3: 0 (MNIST, CIFAR-10)")
    store_dir: str | None = Field(
        None, description="saved u in memory-mapped float16 files here; None: host memory")


def sparsity(outer, lambda_theta: float) -> torch.Tensor:
    """Eq. 12 averaged over the neurons and examples of each activation layer, summed over the
    layers."""
    total = 0
    for activation, lower, upper in outer.boxes:
        rule = ACTIVATION_RULES[type(activation)]
        total = total + rule.sparsity(activation, lower, upper, lambda_theta).mean()
    return total


class LocalLipTraining(LipschitzTraining):
    Options = LocalLipOptions
    # the global bound from the warm-started global iterates (Local-Lip Figure 2); the local one
    # is the robust term's, and measured without gradients during the warm-up (lambda = 0)
    tracked = ("lipschitz", "local_lipschitz")

    def __init__(self, config):
        super().__init__(config)
        self.store = IterateStore(directory=self.options.store_dir)

    def combine(self, logits, lower, y) -> torch.Tensor:
        raise NotImplementedError

    def local_norms(self, model, x, state):
        o = self.options
        return TrainingLocalNorms(o.power_iterations, o.init, self.store, state.index)

    def robust(self, model, x, y, state):
        o = self.options
        outer, local = local_outer(model, x, state.perturbation, self.local_norms(model, x, state))
        lower = margin_lower(outer, y, use_box=True)
        loss = self.combine(outer.logits, lower, y)
        extra = local_stats(outer, local) | clean_stats(outer.logits, y)
        if o.lambda_sparse > 0:
            sparse = sparsity(outer, o.lambda_theta)
            loss = loss + o.lambda_sparse * sparse
            extra["sparsity_loss"] = sparse.detach()
        return loss, lower, extra

    def state_dict(self) -> dict:
        # A store too large to rewrite every epoch (CIFAR-10 6C2F: 11.4 GB) stays out of the
        # checkpoint: a resumed run then seeds those vectors at random, which changes only the
        # start of the power iteration (Local-Lip: "it only provides an initialization").
        if self.store.nbytes > STORE_CHECKPOINT_LIMIT:
            return super().state_dict()
        return super().state_dict() | {"store": self.store.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.store.load_state_dict(state.get("store", {}))


@METHODS.register("local_lip_b")
class LocalLipB(LocalLipTraining):
    def combine(self, logits, lower, y):
        return F.cross_entropy(-lower, y)  # the worst-translated logit, up to a shift


@METHODS.register("local_lip_g")
class LocalLipG(LocalLipTraining):
    def combine(self, logits, lower, y):
        return gloro_loss(logits, lower, y)
