"""Figures of the bounds themselves (registered in orchestrator.figures.FIGURES): the toy
polytope against its interval box (IBP Figure 4) and the per-example tightness of BCP's outer
bound against the global Lipschitz bound (BCP Figure 3)."""
from __future__ import annotations

from .figures import FIGURES  # noqa: F401  (the registry these figures join)
