"""Spectral norms of affine layers by power iteration, for training and for certificates.

Training (BCP Section 3.1, Local-Lip Algorithm 1): a few iterations per step, warm-started from
the iterate vector u the previous step left (one per layer for the global bound, one per training
example and layer for the local one), and sigma = ||A u|| with u held fixed, which is
differentiable in the weights. Power iteration approaches the norm from below, so this value is
only an estimate.

Certificates use a value that is an upper bound:
- exact: where the (masked) operator is small enough to build densely, its largest singular value
  in float64 (`CertifySettings.dense_limit` entries);
- otherwise power iteration from a random start, run for at least `min_iterations` (and on until
  ||u(t+1) - u(t)|| <= tol, Local-Lip Section 4) and multiplied by the stated safety factor of
  Kuczynski and Wozniakowski (1992): from a start uniform on the sphere, k power steps on
  M = A^T A (dimension n) fall below (1 - e) lambda_max with probability at most
  0.824 sqrt(n) (1 - e)^(k - 1/2). We solve for e at probability `delta` with k =
  min_iterations (the estimate only grows with more steps: the Rayleigh quotients of power
  iterates of a PSD matrix are non-decreasing) and use sigma / sqrt(1 - e). Each such norm is
  then an upper bound except with probability `delta` over the random start.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .network import Affine


def _unit(t: torch.Tensor) -> torch.Tensor:
    """Each example's vector scaled to norm 1 (zero stays zero)."""
    norms = t.flatten(1).norm(dim=1).clamp_min(1e-30)
    return t / norms.view(-1, *([1] * (t.dim() - 1)))


def _masked(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return t if mask is None else t * mask.to(t.dtype)


def reduced_apply(affine: Affine, u: torch.Tensor, in_mask=None, out_mask=None) -> torch.Tensor:
    """I_out A I_in u (Local-Lip Eq. 6's reduced operator; masks None = all kept)."""
    return _masked(affine.apply(_masked(u, in_mask)), out_mask)


def reduced_apply_t(affine: Affine, v: torch.Tensor, in_mask=None, out_mask=None) -> torch.Tensor:
    return _masked(affine.apply_t(_masked(v, out_mask)), in_mask)


@torch.no_grad()
def power_iterate(affine: Affine, u: torch.Tensor, iterations: int, in_mask=None, out_mask=None,
                  tol: float | None = None, max_iterations: int | None = None
                  ) -> tuple[torch.Tensor, int]:
    """`iterations` steps u <- unit(A^T unit(A u)) on the reduced operator, batched over the
    examples of u (B, *in_shape); with `tol`, continue (up to `max_iterations`) until every
    example's ||u(t+1) - u(t)|| <= tol. Returns the last u and the number of steps."""
    u = _unit(_masked(u, in_mask))
    limit = iterations if tol is None else max(iterations, max_iterations or iterations)
    steps = 0
    while steps < limit:
        v = _unit(reduced_apply(affine, u, in_mask, out_mask))
        new = _unit(reduced_apply_t(affine, v, in_mask, out_mask))
        steps += 1
        done = steps >= iterations and tol is not None and \
            bool(((new - u).flatten(1).norm(dim=1) <= tol).all())
        u = new
        if done:
            break
    return u, steps


def sigma(affine: Affine, u: torch.Tensor, in_mask=None, out_mask=None) -> torch.Tensor:
    """||A u|| per example for unit u (held fixed): the differentiable norm estimate (B,)."""
    return reduced_apply(affine, u.detach(), in_mask, out_mask).flatten(1).norm(dim=1)


def random_start(shape: tuple[int, ...], generator: torch.Generator | None, like: torch.Tensor
                 ) -> torch.Tensor:
    """Gaussian directions (uniform on the sphere once normalized), drawn on the CPU."""
    return torch.randn(shape, generator=generator).to(like.device, like.dtype)


class GlobalPower:
    """The training-time spectral norms of a network's affine layers: one iterate vector per layer,
    kept between steps (BCP, LMT, GloRo)."""

    def __init__(self, iterations: int):
        self.iterations = iterations
        self.u: dict[int, torch.Tensor] = {}

    def norms(self, affines: list[Affine], generator: torch.Generator | None) -> list[torch.Tensor]:
        out = []
        for i, affine in enumerate(affines):
            weight = affine.layer.weight
            u = self.u.get(i)
            if u is None or u.shape[1:] != affine.in_shape:
                u = random_start((1, *affine.in_shape), generator, weight)
            u, _ = power_iterate(affine, u.to(weight.device, weight.dtype), self.iterations)
            self.u[i] = u
            out.append(sigma(affine, u)[0])
        return out

    def state_dict(self) -> dict:
        return {str(i): u.detach().cpu() for i, u in self.u.items()}

    def load_state_dict(self, state: dict) -> None:
        self.u = {int(i): u for i, u in state.items()}


@dataclass(frozen=True)
class CertifySettings:
    dense_limit: int = 2 ** 23  # entries of a dense operator (x batch) computed exactly
    min_iterations: int = 1000  # power steps the safety factor is computed for
    max_iterations: int = 5000
    tol: float = 1e-3  # Local-Lip's stopping rule, ||u(t+1) - u(t)||
    delta: float = 1e-6  # failure probability of each power-iterated norm

    def __post_init__(self):
        if self.min_iterations < 2 or not 0 < self.delta < 1:
            raise ValueError("CertifySettings: min_iterations must be >= 2 and delta in (0, 1)")


def safety_factor(iterations: int, dimension: int, delta: float) -> float:
    """Upper bound factor on sigma from `iterations` power steps in `dimension` (see the module
    docstring); inf where that many steps prove nothing."""
    log_term = math.log(0.824 * math.sqrt(max(dimension, 1)) / delta)
    if log_term <= 0:
        return 1.0
    # (1 - e)^(k - 1/2) = delta / (0.824 sqrt(n))  =>  e = 1 - exp(-log_term / (k - 1/2))
    e = -math.expm1(-log_term / (iterations - 0.5))
    return 1.0 / math.sqrt(1.0 - e) if e < 1 else math.inf


def _dense_norms(affine: Affine, batch: int, in_mask, out_mask, limit: int) -> torch.Tensor:
    matrix = affine.dense()
    chunk = max(1, limit // matrix.numel())
    norms = []
    for start in range(0, batch, chunk):
        stop = min(batch, start + chunk)
        m = matrix.expand(stop - start, *matrix.shape)
        if out_mask is not None:
            m = m * out_mask[start:stop].reshape(stop - start, -1, 1).to(m.dtype)
        if in_mask is not None:
            m = m * in_mask[start:stop].reshape(stop - start, 1, -1).to(m.dtype)
        norms.append(torch.linalg.matrix_norm(m, ord=2))
    # float64 SVD: relative error ~1e-15; the 1e-9 margin keeps the value above the true norm
    return torch.cat(norms) * (1 + 1e-9)


@torch.no_grad()
def certified_norms(affine: Affine, batch: int = 1, in_mask: torch.Tensor | None = None,
                    out_mask: torch.Tensor | None = None,
                    settings: CertifySettings = CertifySettings(),
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Upper bounds (batch,) on ||I_out A I_in|| per example (masks (batch, ...) or None), in
    float64 on the layer's device."""
    device = affine.weight.device
    if affine.in_numel * affine.out_numel <= settings.dense_limit:
        return _dense_norms(affine, batch, in_mask, out_mask, settings.dense_limit).to(device)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    promoted = affine.promoted(torch.float64)
    u = random_start((batch, *affine.in_shape), generator, promoted.weight)
    in64 = None if in_mask is None else in_mask.to(torch.float64)
    out64 = None if out_mask is None else out_mask.to(torch.float64)
    u, _ = power_iterate(promoted, u, settings.min_iterations, in64, out64, settings.tol,
                         settings.max_iterations)
    estimate = sigma(promoted, u, in64, out64)
    dimension = affine.in_numel if in_mask is None else int(in_mask.flatten(1).sum(1).max())
    return estimate * safety_factor(settings.min_iterations, dimension, settings.delta)
