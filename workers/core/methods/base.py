"""The training-method interface: one subclass per method, looked up by name in METHODS.

A method turns a batch into a loss. The trainer owns everything around it (batching,
augmentation, the optimizer, the learning rate and the eps curriculum) and hands the method a
`StepState` with the current eps and progress; a method reads its own options and any further
schedule (kappa for IBP) from the resolved config it was built with.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from ..bounds import PerturbationSet
from ..registry import Registry


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass
class StepState:
    t: float  # training progress in epochs (fractional)
    eps: float  # the curriculum's current training eps
    perturbation: PerturbationSet  # norm and current eps
    generator: torch.Generator  # CPU generator for any randomness the method needs
    # positions of the batch's examples in the training set (methods with per-example state,
    # e.g. Local-Lip's saved power-iteration vectors); None where the caller has none
    index: torch.Tensor | None = None
    step: int = 0  # the step's position in its epoch (0: the first), for occasional statistics


class Method:
    # Options model (pydantic, extra fields forbidden): the method's own hyper-parameters.
    Options: ClassVar[type[BaseModel]] = NoOptions
    # Paper defaults, as fractions of the total epochs, used where the config leaves them unset.
    warmup_fraction: ClassVar[float] = 0.0  # eps (and kappa) held at their start values
    rampup_fraction: ClassVar[float] = 0.0  # then ramped linearly over this many
    lr_milestone_fractions: ClassVar[tuple[float, ...]] = ()
    lr_factor: ClassVar[float] = 0.1  # what a step schedule multiplies lr by at each milestone

    def __init__(self, config: Any):
        self.config = config  # the resolved RunConfig
        self.options = self.Options(**config.method_options)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             state: StepState) -> tuple[torch.Tensor, dict[str, "torch.Tensor | float"]]:
        """The batch loss to minimize and a few statistics for the curves (floats or detached
        0-dim tensors: the trainer averages each over the epoch's steps that recorded it, without
        a device sync per step)."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """State the method keeps between steps (saved in the checkpoint for an exact resume)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


METHODS: Registry[type[Method]] = Registry("method")
