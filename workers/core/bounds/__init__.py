"""Bounds on a network's outputs over a perturbation set.

A bound function takes the model, the input batch, the perturbation set and the specification
and returns lower bounds on the specification's margins, batched, differentiable, on the model's
device. Per-layer rules live in tables that layers register into (see `interval.py`); later bounds
(CROWN, BCP, Lipschitz) add their own tables beside it.
"""
from .interval import IntervalRule, interval_bounds, interval_rule, ibp_margin_bounds, layers_of
from .perturbation import NORMS, PerturbationSet
from .spec import Specification, margin_specification

__all__ = [
    "IntervalRule", "interval_bounds", "interval_rule", "ibp_margin_bounds", "layers_of",
    "NORMS", "PerturbationSet", "Specification", "margin_specification",
]
