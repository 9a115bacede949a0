"""The input set around an example: an l_inf or l_2 ball of radius eps in [0,1] pixel scale,
intersected with the valid pixel range."""
from __future__ import annotations

from dataclasses import dataclass

import torch

NORMS = ("linf", "l2")


@dataclass(frozen=True)
class PerturbationSet:
    norm: str
    eps: float
    low: float = 0.0  # valid pixel range; the box of an l_inf ball is clipped to it
    high: float = 1.0

    def __post_init__(self):
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; allowed: {', '.join(NORMS)}")
        if not self.eps >= 0:
            raise ValueError(f"eps must be >= 0, got {self.eps}")

    def box(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """An axis-aligned box holding the set: exact for l_inf; for l_2 the circumscribed box
        [x - eps, x + eps] (clipped to the pixel range), which also contains the ball."""
        return (x - self.eps).clamp(self.low, self.high), (x + self.eps).clamp(self.low, self.high)

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Closest-enough point of the set to x_adv (projection onto the ball, then the pixel
        range; for l_2 this composition stays inside the set, which is all attacks need)."""
        delta = x_adv - x
        if self.norm == "linf":
            delta = delta.clamp(-self.eps, self.eps)
        else:
            norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
            factor = (self.eps / norms).clamp(max=1.0)
            delta = delta * factor.view(-1, *([1] * (x.dim() - 1)))
        return (x + delta).clamp(self.low, self.high)

    def sample(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Uniform random points of the set (for l_2 uniform in the ball), drawn on the CPU from
        `generator` so runs are reproducible, then clipped to the pixel range."""
        shape = x.shape
        if self.norm == "linf":
            delta = (torch.rand(shape, generator=generator) * 2 - 1) * self.eps
        else:
            dim = x[0].numel()
            direction = torch.randn(shape, generator=generator)
            direction = direction / direction.flatten(1).norm(dim=1).clamp_min(1e-12).view(
                -1, *([1] * (x.dim() - 1)))
            radius = torch.rand(shape[0], generator=generator) ** (1.0 / dim) * self.eps
            delta = direction * radius.view(-1, *([1] * (x.dim() - 1)))
        return (x + delta.to(x.device, x.dtype)).clamp(self.low, self.high)
