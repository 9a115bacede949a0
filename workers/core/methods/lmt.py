"""`lmt`: Tsuzuku et al.'s Lipschitz-margin training, as Local-Lip Section 3.3 states it: the
worst logit z_i + sqrt(2) eps L for every i != y, L the global Lipschitz bound of the whole
network (product of the layer norms from warm-started power iteration), trained with the
cross-entropy on it. lambda stays 1 by default (no clean term), as in LMT."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field

from ..lipschitz import input_radius
from .base import METHODS
from .bcp import LipschitzOptions, LipschitzTraining, global_norms


class LMTOptions(LipschitzOptions):
    lambda_start: float = Field(1.0, ge=0, le=1)


@METHODS.register("lmt")
class LMTTraining(LipschitzTraining):
    Options = LMTOptions

    def robust(self, model, x, y, state):
        norms = global_norms(self, model, x, state)
        lipschitz = torch.stack(norms.values).prod()
        logits = model(x)
        shift = math.sqrt(2) * input_radius(state.perturbation, x) * lipschitz
        others = 1 - F.one_hot(y, logits.shape[1]).to(logits.dtype)
        worst = logits + shift * others
        lower = worst.gather(1, y[:, None]) - worst  # margins of the worst logit, entry y = 0
        return F.cross_entropy(worst, y), lower, {"lipschitz": lipschitz.detach()}
