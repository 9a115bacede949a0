"""`gloro`: Leino et al.'s globally-robust networks, as Local-Lip appendix B describes them: an
extra bottom logit max_{m != y} z*_m appended to the logits, z*_m the worst-translated logit over
the ball alone (global Lipschitz bound through the penultimate layer: z_y - z_m turns into
z_y - z_m - rho ||W_y - W_m||), trained with the cross-entropy over the K + 1 logits and mixed
with the clean loss by lambda (Eq. 25)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..lipschitz import input_radius, network_of
from ..lipschitz.bcp import pair_vectors
from .base import METHODS
from .bcp import LipschitzTraining, global_norms


def gloro_loss(logits: torch.Tensor, lower: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """CE over [z | max_{m != y} (z_y - lower_m)]; lower (B, K) margin lower bounds, entry y 0."""
    true = logits.gather(1, y[:, None])
    worst = (true - lower).masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    bottom = worst.max(dim=1, keepdim=True).values
    return F.cross_entropy(torch.cat([logits, bottom], dim=1), y)


@METHODS.register("gloro")
class GloroTraining(LipschitzTraining):
    def robust(self, model, x, y, state):
        network = network_of(model, x)
        norms = global_norms(self, model, x, state)
        rho = input_radius(state.perturbation, x) * torch.stack(norms.values[:-1]).prod()
        logits = model(x)
        c, _ = pair_vectors(network.last, y)  # W_y - W_m
        lower = logits.gather(1, y[:, None]) - logits - rho * c.norm(dim=-1)
        lipschitz = torch.stack(norms.values).prod().detach()
        return gloro_loss(logits, lower, y), lower, {"lipschitz": lipschitz}
