"""Schedules as pure functions of training progress t (epochs, fractional: step / steps_per_epoch),
so that a resumed run recomputes them exactly and they need no saved state.

- `ramp`: the IBP paper's curriculum shape: `start` until `begin`, linear to `end` over
  `length`, then `end` (eps goes 0 -> eps_train, kappa 1 -> kappa_final over the same window).
- learning rates: `step` (IBP: x factor at each milestone) and `exponential` (Local-Lip Eq. 27:
  constant to epoch m, then geometric to end_lr at the last epoch); a registry, so others add more.
"""
from __future__ import annotations

from typing import Callable, Sequence

from .registry import Registry


def ramp(t: float, begin: float, length: float, start: float, end: float) -> float:
    if t <= begin:
        return start
    if length <= 0 or t >= begin + length:
        return end
    return start + (end - start) * (t - begin) / length


LRSchedule = Callable[..., float]
LR_SCHEDULES: Registry[LRSchedule] = Registry("learning-rate schedule")


@LR_SCHEDULES.register("step")
def step_lr(t: float, lr: float, milestones: Sequence[float] = (), factor: float = 0.1,
            **_: object) -> float:
    """lr times `factor` for each milestone (in epochs) already passed."""
    passed = sum(1 for milestone in milestones if t >= milestone - 1e-9)  # float-safe
    return lr * factor ** passed


@LR_SCHEDULES.register("exponential")
def exponential_lr(t: float, lr: float, total: float, decay_start: float = 0.0,
                   end_lr: float | None = None, **_: object) -> float:
    """Local-Lip Eq. 27: lr until `decay_start`, then lr * (end_lr / lr) ** ((t - m) / (T - m))."""
    if end_lr is None or t <= decay_start or total <= decay_start:
        return lr
    fraction = min(1.0, (t - decay_start) / (total - decay_start))
    return lr * (end_lr / lr) ** fraction


@LR_SCHEDULES.register("constant")
def constant_lr(t: float, lr: float, **_: object) -> float:
    return lr
