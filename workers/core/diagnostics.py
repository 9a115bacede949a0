"""Measurements of a trained model that some tables report beside its certificates, recorded in
a result's metrics when the certifier they belong to runs (a registry: name -> (the certifiers
that ask for it, the function)). Each function takes the model, the test inputs and the
perturbation set and returns a dict of numbers, stored under the diagnostic's name:

- `tightness` (with `bcp`): BCP Section 4's tau(x), the mean translation of the outer bound over
  class pairs: `bcp_mean` over the test examples, `global` the same without the box (the global
  Lipschitz bound's constant), `reduction` = 1 - bcp_mean / global (BCP Figure 3).
- `lipschitz_bound` (with `lipschitz` or `local_lip`): the certified global Lipschitz bound of the
  logits and the mean over the test examples of the certified local bound over each example's
  perturbation set (Local-Lip Table 5).
- `bound_area` (with `ibp`, only for l_inf and a network with 2-D inputs and 2 logits: toy2d):
  for the first positive example (label 1; the first example where none is), the area of the
  sampled adversarial polytope's convex hull in logit space (`polytope`), of its IBP interval
  box (`ibp`) and the share of the box the hull fills (`fill`) (IBP Section 4.3, Figure 4).

A diagnostic may also return a `Measurement`: its numbers go to the metrics as above, and a small
JSON block to the result's `figure_data` under the diagnostic's name, for the figure that draws
it (`tightness`: the per-example tau(x) with BCP; `bound_area`: the hull, box and nominal point).
A registry entry may say where a diagnostic applies (`applies`, e.g. only planar networks) and
that it reads the labels (`needs_labels`: then it is called with `labels=`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch import nn

from .bounds import PerturbationSet
from .lipschitz.bounds import bcp_tightness, global_bound, local_bound
from .polytope import is_planar, logit_polytope
from .registry import Registry

FIGURE_DIGITS = 6  # significant digits of the numbers kept for figures (a violin needs fewer)


@dataclass
class Measurement:
    """A diagnostic's numbers (-> metrics) and the data its figure draws (-> figure_data)."""
    numbers: dict[str, float]
    figure_data: dict[str, Any] | None = None


DiagnosticFn = Callable[..., "dict[str, float] | Measurement"]


def _always(model: nn.Module, x: torch.Tensor, perturbation: PerturbationSet) -> bool:
    return True


class Diagnostic(NamedTuple):
    """A registry entry."""
    wanted_by: tuple[str, ...]  # the certifiers whose rows record it
    function: DiagnosticFn  # (model, x, perturbation, batch_size[, labels=]) -> numbers
    applies: Callable[[nn.Module, torch.Tensor, PerturbationSet], bool] = _always
    needs_labels: bool = False


@dataclass
class Diagnosis:
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    figure_data: dict[str, Any] = field(default_factory=dict)


DIAGNOSTICS: Registry[Diagnostic] = Registry("diagnostic")


def compact(values: Sequence[float], digits: int = FIGURE_DIGITS) -> list[float]:
    """Floats rounded to `digits` significant digits: figure data stays small in the job store
    (a result's per-example list does not reach it)."""
    return [float(f"{float(v):.{digits}g}") for v in values]


def _chunks(x: torch.Tensor, batch_size: int):
    return (x[start:start + batch_size] for start in range(0, len(x), batch_size))


@torch.no_grad()
def _tightness(model, x, perturbation, batch_size):
    taus = [bcp_tightness(model, xb, perturbation) for xb in _chunks(x, batch_size)]
    per_example = torch.cat([t for t, _ in taus])
    bcp = float(per_example.mean())
    plain = float(torch.cat([g for _, g in taus]).mean())
    numbers = {"bcp_mean": bcp, "global": plain,
               "reduction": 1 - bcp / plain if plain > 0 else 0.0}
    # The violins of BCP Figure 3: tau(x) of every test example, in the test subset's order.
    return Measurement(numbers, {"bcp": compact(per_example.tolist())})


@torch.no_grad()
def _lipschitz_bound(model, x, perturbation, batch_size):
    local = torch.cat([local_bound(model, xb, perturbation) for xb in _chunks(x, batch_size)])
    return {"global": float(global_bound(model, x[:1])), "local": float(local.mean())}


def _figure_example(labels: torch.Tensor) -> int:
    """IBP Figure 4 draws "one of the positive training examples": the first with label 1."""
    positives = (labels == 1).nonzero().flatten()
    return int(positives[0]) if len(positives) else 0


def _planar_box(model: nn.Module, x: torch.Tensor, perturbation: PerturbationSet) -> bool:
    return perturbation.norm == "linf" and is_planar(model, x)


def _bound_area(model, x, perturbation, batch_size, labels):
    example = _figure_example(labels)
    polytope = logit_polytope(model, x[example], perturbation)
    numbers = {"polytope": polytope.hull_area, "ibp": polytope.box_area,
               # 1 where the box has no area: then the hull has none either (it lies inside)
               "fill": polytope.hull_area / polytope.box_area if polytope.box_area > 0 else 1.0}
    return Measurement(numbers, {
        "example": example, "label": int(labels[example]),
        "point": compact(polytope.point),
        "hull": [compact(vertex) for vertex in polytope.hull],
        "outline": [compact(point) for point in polytope.outline],
        "box": [compact([lo, hi]) for lo, hi in zip(polytope.box_lower, polytope.box_upper)],
    })


DIAGNOSTICS.add("tightness", Diagnostic(("bcp",), _tightness))
DIAGNOSTICS.add("lipschitz_bound", Diagnostic(("lipschitz", "local_lip"), _lipschitz_bound))
DIAGNOSTICS.add("bound_area", Diagnostic(("ibp",), _bound_area, applies=_planar_box,
                                         needs_labels=True))
from . import relu_activity  # noqa: E402,F401  (registers its diagnostic here)


def measure(model: nn.Module, x: torch.Tensor, perturbation: PerturbationSet,
            certifiers: Sequence[str], batch_size: int = 256,
            labels: torch.Tensor | None = None) -> Diagnosis:
    """Every diagnostic that one of `certifiers` asks for and that applies to this model, on
    inputs x (on the model's device) with their labels (needed by some)."""
    model.eval()
    out = Diagnosis()
    for name in DIAGNOSTICS.names():
        entry = DIAGNOSTICS.get(name)
        if not set(entry.wanted_by) & set(certifiers) or not entry.applies(model, x, perturbation):
            continue
        if entry.needs_labels:
            if labels is None:
                raise ValueError(f"diagnostic {name!r} needs the labels of x")
            measured = entry.function(model, x, perturbation, batch_size, labels=labels)
        else:
            measured = entry.function(model, x, perturbation, batch_size)
        if not isinstance(measured, Measurement):
            measured = Measurement(measured)
        out.metrics[name] = measured.numbers
        if measured.figure_data is not None:
            out.figure_data[name] = measured.figure_data
    return out


def diagnose(model: nn.Module, x: torch.Tensor, perturbation: PerturbationSet,
             certifiers: Sequence[str], batch_size: int = 256,
             labels: torch.Tensor | None = None) -> dict[str, dict[str, float]]:
    """The numbers of `measure` alone (what a result's metrics hold)."""
    return measure(model, x, perturbation, certifiers, batch_size, labels).metrics
